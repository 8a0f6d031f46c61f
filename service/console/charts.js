// Hand-drawn SVG charts for the console: a heatmap, line charts and horizontal bars.
// Every text is set with textContent, never parsed as markup.
"use strict";

const Charts = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    for (const child of children) node.append(child);
    return node;
  }

  function text(x, y, content, attrs = {}) {
    const node = svg("text", { x, y, ...attrs });
    node.textContent = content;
    return node;
  }

  function tip(content) {
    const node = svg("title");
    node.textContent = content;
    return node;
  }

  const pct = (v) => `${Math.round(v * 100)}%`;

  // Red (0) → amber (0.5) → green (1), read as "how much of this window is still known".
  const STOPS = [[0, [192, 57, 43]], [0.5, [244, 196, 48]], [1, [30, 132, 73]]];
  function colour(v) {
    const x = Math.max(0, Math.min(1, v));
    const i = x <= 0.5 ? 0 : 1;
    const [a, ca] = STOPS[i], [b, cb] = STOPS[i + 1];
    const t = (x - a) / (b - a);
    return `rgb(${ca.map((c, k) => Math.round(c + (cb[k] - c) * t)).join(",")})`;
  }

  function width(container, fallback) {
    return Math.max(320, container.clientWidth || fallback);
  }

  // rows: [{name, cls}], columns: [window ids], value(row, column) → number | undefined.
  function heatmap(container, rows, columns, value) {
    const labelW = 64, headH = 24, gap = 3;
    const cellW = Math.max(40, Math.min(110, (width(container, 480) - labelW) / Math.max(columns.length, 1) - gap));
    const cellH = 30;
    const w = labelW + columns.length * (cellW + gap), h = headH + rows.length * (cellH + gap);
    const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: w, height: h, class: "heatmap", role: "img" });
    columns.forEach((c, j) => root.append(text(labelW + j * (cellW + gap) + cellW / 2, 15, `w${c}`,
      { class: "axis", "text-anchor": "middle" })));
    rows.forEach((row, i) => {
      const y = headH + i * (cellH + gap);
      root.append(text(labelW - 8, y + cellH / 2 + 4, row.name, { class: `axis ${row.cls || ""}`, "text-anchor": "end" }));
      columns.forEach((c, j) => {
        const v = value(row, c), x = labelW + j * (cellW + gap);
        const measured = typeof v === "number";
        const before = measured && row.trained && !row.trained.includes(c);  // measured before training on it
        const cell = svg("g", { class: `cell ${measured ? "measured" : "empty"}${before ? " before" : ""}`,
          "data-version": row.name, "data-window": c },
          svg("rect", { x, y, width: cellW, height: cellH, rx: 3, fill: measured ? colour(v) : "#eef1f4" }),
          text(x + cellW / 2, y + cellH / 2 + 4, measured ? pct(v) : "·",
            { "text-anchor": "middle", class: measured && v > 0.25 && v < 0.75 ? "cell-text dark" : "cell-text" }),
          tip(measured ? `${row.name} on window ${c}: accuracy ${(v * 100).toFixed(1)}%${before ? " (not trained on it)" : ""}`
            : `${row.name}: not measured on window ${c}`));
        root.append(cell);
      });
    });
    container.replaceChildren(root);
  }

  function placeholder(container, content) {
    const note = document.createElement("p");
    note.className = "muted placeholder";
    note.textContent = content;
    container.replaceChildren(note);
  }

  // labels: x labels; series: [{name, colour, values: [number|null], dashed}]
  function lines(container, labels, series, { yMin = 0, yMax = 1, step = 0.25, format = pct, height = 210 } = {}) {
    const w = width(container, 520), h = height, left = 44, right = 26, top = 10, bottom = 28;
    const x = (i) => left + (labels.length < 2 ? (w - left - right) / 2 : i * (w - left - right) / (labels.length - 1));
    const y = (v) => top + (yMax - v) / (yMax - yMin) * (h - top - bottom);
    const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: w, height: h, class: "lines", role: "img" });
    for (let v = yMin; v <= yMax + 1e-9; v += step) {
      root.append(svg("line", { x1: left, x2: w - right, y1: y(v), y2: y(v), class: Math.abs(v) < 1e-9 ? "zero" : "grid" }),
        text(left - 6, y(v) + 4, format(v), { class: "axis", "text-anchor": "end" }));
    }
    const every = Math.ceil(labels.length / Math.max(1, Math.floor((w - left) / 56)));
    labels.forEach((label, i) => {
      if (i % every === 0 || i === labels.length - 1) root.append(text(x(i), h - 8, label, { class: "axis", "text-anchor": "middle" }));
    });
    for (const s of series) {
      let path = "";
      s.values.forEach((v, i) => {
        if (typeof v !== "number") return;
        const prev = i > 0 && typeof s.values[i - 1] === "number";
        path += `${prev ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      });
      root.append(svg("path", { d: path, fill: "none", stroke: s.colour, "stroke-width": 2.2,
        "stroke-dasharray": s.dashed ? "5 4" : "none", class: "series" }));
      s.values.forEach((v, i) => {
        if (typeof v !== "number") return;
        root.append(svg("circle", { cx: x(i), cy: y(v), r: 3.4, fill: s.hollow && s.hollow[i] ? "#fff" : s.colour, stroke: s.colour,
          "stroke-width": 1.6 }, tip(`${s.name} at ${labels[i]}: ${format(v)}`)));
      });
    }
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const s of series) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = s.colour;
      item.append(swatch, s.name);
      legend.append(item);
    }
    container.replaceChildren(root, legend);
  }

  // entries: [[name, count]]; an empty list shows `none`.
  function bars(container, entries, none = "none") {
    if (!entries.length) {
      const empty = document.createElement("p");
      empty.className = "muted";
      empty.textContent = none;
      container.replaceChildren(empty);
      return;
    }
    const max = Math.max(...entries.map(([, n]) => n), 1);
    container.replaceChildren(...entries.map(([name, n]) => {
      const row = document.createElement("div");
      row.className = "bar-row";
      const label = document.createElement("span");
      label.textContent = name;
      label.title = name;
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.style.width = `${(100 * n / max).toFixed(1)}%`;
      track.append(fill);
      const count = document.createElement("b");
      count.textContent = n.toLocaleString();
      row.append(label, track, count);
      return row;
    }));
  }

  const PALETTE = ["#1f77b4", "#e8710a", "#2ca02c", "#9467bd", "#d62728", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
  return { heatmap, lines, bars, placeholder, colour, pct, PALETTE };
})();
