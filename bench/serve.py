"""Serving: the HTTP endpoints against the raw model, measured in one run on one model.

Workload: the first N BANKING77 test tickets scored against L intents, and a few chat prompts,
on the default base model served by a real uvicorn server (in this process, on a free port).
Baselines, measured in the same run on the same weights:
- raw in-process label scoring (`LabelScorer.score`) for `/v1/classify` p50 latency;
- raw greedy `model.generate` for `/v1/chat/completions` tokens/s;
- one sequential client for 8 concurrent ones (micro-batching), both in a separate client process;
- the same adapter merged by PEFT into a copy of the base, for what LoRA costs as served (and
  PEFT's unmerged LoRA layers, what serving cost before versions were merged);
- promotion → first answer from the new version is the swap time: for a version loaded
  beforehand (the pointer move plus one request) and for one the promotion must load.
Prints each figure with its ratio and target; writes bench/results/serve.json.

    nice -n 10 .venv/bin/python bench/serve.py [--tickets 16] [--labels 12] [--threads 0] [--base smollm2-135m]
    python bench/serve.py --device cuda --precision bfloat16 --tickets 64   # the GPU preset: serve-gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
import uvicorn
from peft import PeftModel
from safetensors.torch import load_file, save_file

from learners.base_model import SMOLLM2
from learners.placement import device_of, synchronize
from learners.prompts import chat_ids
from learners.scoring import LabelScorer
from service.app import create_app
from service.core import Service
from service.registry import ADAPTER_WEIGHTS, VersionMetadata
from service.settings import DEV_ADMIN_KEY, ApiSettings, ModelSettings, SchedulerSettings, ServingSettings, Settings
from streams.broker import free_port
from streams.datasets import load_tickets

ADMIN = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
CHAT_PROMPTS = ["My new card still has not arrived, what should I do?",
                "I was charged twice for one payment.",
                "How do I change my PIN?"]


def timed(call: Callable[[], object]) -> float:
    """Seconds of one call (label scores come back to the host, which waits for the GPU)."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def start_server(service: Service, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def new_version(service: Service, seed: int) -> str:
    """A registry version with distinct finite weights, as an update would write it."""
    source = service.registry.path(service.registry.live or "v0000")
    with service.registry.draft() as draft:
        shutil.copy(source / "adapter_config.json", draft.path / "adapter_config.json")
        generator = torch.Generator().manual_seed(seed)
        save_file({k: torch.randn(v.shape, generator=generator) * 0.01
                   for k, v in load_file(str(source / ADAPTER_WEIGHTS)).items()}, str(draft.path / ADAPTER_WEIGHTS))
        metadata = VersionMetadata(parent=None, verdict="accepted", windows_trained=[], labels=[])
        return service.registry.publish(draft, metadata).name


# The load generator runs as a program of its own, as real clients do: client threads in the
# server's process would compete with it for the GIL, which a remote client never does.
CLIENT = """
import json, sys, threading, time, httpx
url, clients, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bodies = json.loads(sys.stdin.readline())
sessions = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
errors = []
def run(worker):
    try:
        for i in range(rounds):
            body = bodies[(worker * rounds + i) % len(bodies)]
            sessions[worker].post("/v1/classify", json=body).raise_for_status()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(time.perf_counter() - started, flush=True)
sys.exit("; ".join(errors[:3]) if errors else 0)
"""


def load_seconds(url: str, bodies: list[dict[str, object]], clients: int, rounds: int) -> float:
    """Seconds for `clients` closed-loop clients, in another process, to get `rounds` answers each."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, url, str(clients), str(rounds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(bodies) + "\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"load client failed to start (exit {proc.wait()})")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seconds = proc.stdout.readline()
    if proc.wait() != 0 or not seconds:
        raise RuntimeError(f"load client failed (exit {proc.returncode})")
    return float(seconds)


def classify_figures(service: Service, http: httpx.Client, texts: list[str], labels: list[str],
                     concurrency: int) -> dict[str, float]:
    scorer = LabelScorer(service.runtime.tokenizer, labels)
    model = service.runtime.model
    body = [{"text": t, "labels": labels} for t in texts]
    rounds = 4  # each concurrent client sends this many requests
    url = str(http.base_url)

    scorer.score(model, texts[0])
    http.post("/v1/classify", json=body[0]).raise_for_status()  # warm-up of both paths
    batches, requests = service.batcher.batches, service.batcher.requests
    # Concurrent and sequential blocks alternate (C S … S C): load drift hits both alike.
    concurrent_s = load_seconds(url, body, concurrency, rounds)
    sequential_s = load_seconds(url, body, 1, len(body))
    raw, served = [], []
    for text, request in zip(texts, body, strict=True):  # interleaved, for the same reason
        raw.append(timed(lambda t=text: scorer.score(model, t)))
        served.append(timed(lambda b=request: http.post("/v1/classify", json=b).raise_for_status()))
    sequential_s += load_seconds(url, body, 1, len(body))
    concurrent_s += load_seconds(url, body, concurrency, rounds)
    alone = len(served) + 2 * len(body)  # requests that ran as batches of one
    # What micro-batching could gain at most here: the same scorer, `concurrency` tickets per pass
    # against one per pass, in-process (no HTTP, no queueing).
    batched = [timed(lambda i=i: scorer.score_batch(model, texts[i:i + concurrency])) / concurrency
               for i in range(0, len(texts) - concurrency + 1, concurrency)]
    sequential_rps = 2 * len(body) / sequential_s
    concurrent_rps = 2 * concurrency * rounds / concurrent_s
    return {"raw_p50_s": statistics.median(raw), "http_p50_s": statistics.median(served),
            "p50_ratio": statistics.median(served) / statistics.median(raw),
            "sequential_rps": sequential_rps, "concurrent_rps": concurrent_rps,
            "throughput_ratio": concurrent_rps / sequential_rps,
            "in_process_batch_gain": statistics.mean(raw) / statistics.mean(batched),
            "mean_batch": (service.batcher.requests - requests - alone)
                          / max(service.batcher.batches - batches - alone, 1)}


@torch.inference_mode()
def generate_one(model: torch.nn.Module, tokenizer: object, prompt: list[int], max_tokens: int) -> tuple[int, float]:
    """Greedy `model.generate` of one prompt: tokens generated and seconds taken."""
    ids = torch.tensor([prompt], device=device_of(model))
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
    synchronize(ids.device)
    return out.shape[1] - ids.shape[1], time.perf_counter() - started


def generate_tokens_per_s(model: torch.nn.Module, tokenizer: object, prompts: list[list[int]],
                          max_tokens: int) -> float:
    runs = [generate_one(model, tokenizer, prompt, max_tokens) for prompt in prompts]
    return sum(tokens for tokens, _ in runs) / sum(seconds for _, seconds in runs)


def chat_figures(service: Service, http: httpx.Client, max_tokens: int) -> dict[str, float]:
    tokenizer = service.runtime.tokenizer
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    generate_tokens_per_s(service.runtime.model, tokenizer, prompts[:1], 4)  # warm-up
    raw_tokens, raw_seconds, tokens, seconds = 0, 0.0, 0, 0.0
    for prompt, text in zip(prompts, CHAT_PROMPTS, strict=True):  # interleaved, as for classify
        generated, took = generate_one(service.runtime.model, tokenizer, prompt, max_tokens)
        raw_tokens, raw_seconds = raw_tokens + generated, raw_seconds + took
        request = {"model": "live", "messages": [{"role": "user", "content": text}],
                   "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        answer = http.post("/v1/chat/completions", json=request)
        seconds += time.perf_counter() - started
        answer.raise_for_status()
        tokens += answer.json()["usage"]["completion_tokens"]
    raw, served = raw_tokens / raw_seconds, tokens / seconds
    return {"raw_tokens_per_s": raw, "http_tokens_per_s": served, "tokens_ratio": served / raw}


def lora_figures(service: Service, texts: list[str], labels: list[str], max_tokens: int) -> dict[str, float]:
    """The live version as served, against the same adapter merged by PEFT into a copy of the base
    (the target: nothing lost to LoRA) and unmerged in PEFT's LoRA layers (what serving was)."""
    served = service.runtime.model
    unmerged = PeftModel.from_pretrained(copy.deepcopy(service.runtime.base),
                                         service.registry.path(service.runtime.version)).eval()
    models = {"served": served, "merged": copy.deepcopy(unmerged).merge_and_unload(), "unmerged": unmerged}
    scorer = LabelScorer(service.runtime.tokenizer, labels)
    prompts = [chat_ids(service.runtime.tokenizer, [{"role": "user", "content": CHAT_PROMPTS[0]}])]
    times: dict[str, list[float]] = {name: [] for name in models}
    rates: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        scorer.score(model, texts[0])
    for text in texts:  # interleaved: load drift hits all three alike
        for name, model in models.items():
            times[name].append(timed(lambda t=text, m=model: scorer.score(m, t)))
    for _ in range(3):
        for name, model in models.items():
            rates[name].append(generate_tokens_per_s(model, service.runtime.tokenizer, prompts, max_tokens))
    figures = {f"{name}_score_s": statistics.median(t) for name, t in times.items()}
    figures.update({f"{name}_tokens_per_s": statistics.median(r) for name, r in rates.items()})
    figures["served_vs_merged_score"] = figures["served_score_s"] / figures["merged_score_s"]
    figures["unmerged_vs_merged_score"] = figures["unmerged_score_s"] / figures["merged_score_s"]
    figures["served_vs_merged_tokens"] = figures["served_tokens_per_s"] / figures["merged_tokens_per_s"]
    return figures


def first_answer_from(http: httpx.Client, version: str, labels: list[str]) -> None:
    # A short request: the figure is the swap, not the scoring of 12 labels.
    probe = {"text": "card", "labels": labels[:2]}
    while http.post("/v1/classify", json=probe).json()["adapter_version"] != version:
        pass


def swap_figures(service: Service, http: httpx.Client, labels: list[str], swaps: int) -> dict[str, float]:
    """Promotion request sent → first classify answer naming the new version.

    `loaded`: the version was loaded beforehand (`POST /v1/adapters/{v}/load`, as an update does
    after its gate), so the interval is the pointer move plus one request. `cold`: the promotion
    itself reads, checks and merges the version first.
    """
    figures: dict[str, list[float]] = {"load_s": [], "loaded_s": [], "cold_s": []}
    for i in range(swaps):
        for kind in ("loaded", "cold"):  # alternated: load drift hits both alike
            version = new_version(service, seed=100 + 2 * i + (kind == "cold"))
            if kind == "loaded":
                figures["load_s"].append(timed(lambda v=version: http.post(
                    f"/v1/adapters/{v}/load", headers=ADMIN).raise_for_status()))
            started = time.perf_counter()
            http.post(f"/v1/adapters/{version}/promote", headers=ADMIN).raise_for_status()
            first_answer_from(http, version, labels)
            figures[f"{kind}_s"].append(time.perf_counter() - started)
    return {**{f"{k}_p50": statistics.median(v) for k, v in figures.items()},
            **{f"{k}_max": max(v) for k, v in figures.items()}}


RESULTS = Path(__file__).parent / "results"


def write_result(out: Path, args: argparse.Namespace, load_before: float, results: dict[str, object]) -> None:
    """The run's options, machine, threads and load average beside its figures, as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    out.write_text(json.dumps({"args": options, "machine": platform.processor() or platform.machine(),
                               "torch_threads": torch.get_num_threads(),
                               "load_average": [load_before, os.getloadavg()[0]], **results}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=16)
    parser.add_argument("--labels", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (`model.device`)")
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (`model.precision`)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other work on the machine: the ratios cancel most of it
    test = load_tickets("banking77", "test")
    labels = sorted({t.label for t in test if t.label})[: args.labels]
    texts = [t.text for t in test[: args.tickets]]
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        settings = Settings(data_dir=Path(data), model=ModelSettings(base=args.base, threads=args.threads,
                                                                     device=args.device, precision=args.precision),
                            scheduler=SchedulerSettings(enabled=False), api=ApiSettings(port=port),
                            serving=ServingSettings(max_tokens=max(args.max_tokens, 64)))
        service = Service(settings)
        server = start_server(service, port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
                results = {"classify": classify_figures(service, http, texts, labels, args.concurrency),
                           "chat": chat_figures(service, http, args.max_tokens),
                           "lora": lora_figures(service, texts[:6], labels, args.max_tokens),
                           "swap": swap_figures(service, http, labels, args.swaps)}
        finally:
            server.should_exit = True
            service.stop()

    c, g, lora, s = results["classify"], results["chat"], results["lora"], results["swap"]
    rows = [
        ("/v1/classify p50 vs raw scoring", f"{c['http_p50_s'] * 1e3:.1f} ms vs {c['raw_p50_s'] * 1e3:.1f} ms",
         c["p50_ratio"], "≤ 1.15", c["p50_ratio"] <= 1.15),
        ("chat tokens/s vs raw generate", f"{g['http_tokens_per_s']:.2f} vs {g['raw_tokens_per_s']:.2f}",
         g["tokens_ratio"], "≥ 0.9", g["tokens_ratio"] >= 0.9),
        (f"{args.concurrency} concurrent vs sequential req/s",
         f"{c['concurrent_rps']:.2f} vs {c['sequential_rps']:.2f} (mean batch {c['mean_batch']:.1f})",
         c["throughput_ratio"], "≥ 2", c["throughput_ratio"] >= 2),
        (f"(ceiling) in-process {args.concurrency}/pass vs 1/pass", "seconds per ticket, same scorer",
         c["in_process_batch_gain"], "report", True),
        ("LoRA served/merged scoring time", f"{lora['served_score_s'] * 1e3:.1f} vs "
         f"{lora['merged_score_s'] * 1e3:.1f} ms", lora["served_vs_merged_score"], "~1.0", True),
        ("LoRA served/merged tokens/s", f"{lora['served_tokens_per_s']:.2f} vs "
         f"{lora['merged_tokens_per_s']:.2f}", lora["served_vs_merged_tokens"], "~1.0", True),
        ("(before) unmerged/merged scoring time", f"{lora['unmerged_score_s'] * 1e3:.1f} vs "
         f"{lora['merged_score_s'] * 1e3:.1f} ms", lora["unmerged_vs_merged_score"], "report", True),
        ("load a version (read, check, merge)", f"{s['load_s_p50']:.3f} s (max {s['load_s_max']:.3f} s)",
         s["load_s_p50"], "report", True),
        ("swap: promote loaded → first answer", f"{s['loaded_s_p50']:.3f} s (max {s['loaded_s_max']:.3f} s)",
         s["loaded_s_p50"], "≤ 1 s", s["loaded_s_max"] <= 1.0),
        ("swap: promote cold → first answer", f"{s['cold_s_p50']:.3f} s (max {s['cold_s_max']:.3f} s)",
         s["cold_s_p50"], "report", True),
    ]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_initialized() else None
    print(f"base {args.base} on {gpu or 'the CPU'} ({args.precision}), {args.tickets} tickets × {len(labels)} labels, "
          f"{args.max_tokens} tokens, {torch.get_num_threads()} threads, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    for name, figures, ratio, target, ok in rows:
        print(f"  {name:38s} {figures:44s} ratio {ratio:6.3f}  target {target:7s} {'ok' if ok else 'MISSED'}")
    write_result(RESULTS / ("serve-gpu.json" if gpu else "serve.json"), args, load_before, {"gpu": gpu, **results})


if __name__ == "__main__":
    main()
