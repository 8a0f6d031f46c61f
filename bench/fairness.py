"""Fair share of the model: small requests while the largest allowed ones run.

Workload, on the default base model served by a real uvicorn server (in this process):
- small requests, sent one after another by one client: a BANKING77 ticket against 12 labels on
  `/v1/classify`, and a 2-token answer on `/v1/chat/completions`, alternating;
- the largest requests the service accepts, sent back to back by a second client: a classify of
  a 16,384-character ticket against 512 labels filling `serving.max_classify_tokens`, or a chat
  answer of `serving.max_tokens` tokens after a prompt of nearly `serving.max_prompt_tokens`.
Both clients are programs of their own (no GIL shared with the server). The baseline is the
same small requests on the idle service, measured first in the same run; each phase's small
p99 is printed as a ratio of that idle p50, and against the one-second target (issue 13).
Writes bench/results/fairness-TURN_TOKENS-TURN_MSms.json.

    PYTHONPATH=. nice -n 10 .venv/bin/python bench/fairness.py [--rounds 30] [--turn-tokens 128] [--turn-ms 250]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.serve import RESULTS, start_server, write_result
from learners.base_model import SMOLLM2
from learners.prompts import chat_ids
from service.core import Service
from service.settings import ApiSettings, ModelSettings, SchedulerSettings, ServingSettings, Settings
from streams.broker import free_port
from streams.datasets import load_tickets

# Sends its requests (path, body) in turn, `rounds` times or, with rounds 0, until told to stop
# on stdin; prints each request's path and seconds as JSON lines at the end.
CLIENT = """
import json, sys, threading, time, httpx
url, rounds = sys.argv[1], int(sys.argv[2])
requests = json.loads(sys.stdin.readline())
stop = threading.Event()
if rounds == 0:
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
took, errors = [], []
with httpx.Client(base_url=url, timeout=900) as http:
    print("ready", flush=True)
    i = 0
    while (i < rounds) if rounds else not stop.is_set():
        path, body = requests[i % len(requests)]
        started = time.perf_counter()
        answer = http.post(path, json=body)
        took.append((path, time.perf_counter() - started))
        if answer.status_code != 200:
            errors.append(f"{path}: {answer.status_code} {answer.text[:200]}")
        i += 1
print(json.dumps({"took": took, "errors": errors}), flush=True)
"""


def start_client(url: str, requests: list[tuple[str, dict[str, object]]], rounds: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, url, str(rounds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(requests) + "\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"client failed to start (exit {proc.wait()})")
    return proc


def finish(proc: subprocess.Popen[str]) -> dict[str, list[float]]:
    """The client's seconds per request path; raises on any failed request."""
    out, _ = proc.communicate("stop\n" if proc.stdin and not proc.stdin.closed else None)
    result = json.loads(out.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{len(result['errors'])} failed requests, e.g. {result['errors'][0]}")
    by_path: dict[str, list[float]] = {}
    for path, seconds in result["took"]:
        by_path.setdefault(path, []).append(seconds)
    return by_path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def largest_classify(service: Service, text: str, names: list[str]) -> dict[str, object]:
    """512 distinct labels of up to 128 characters, as many tokens as the budget allows."""
    budget = service.settings.serving.max_classify_tokens
    labels = [f"{names[i % len(names)].replace('_', ' ')} {i}" for i in range(512)]
    while service.runtime.classify_work(text, labels) > budget:
        labels.pop()
    return {"text": text, "labels": labels}


def chat_prompt_tokens(service: Service, body: dict[str, object]) -> int:
    return len(chat_ids(service.runtime.tokenizer, body["messages"],  # type: ignore[arg-type]
                        service.settings.train.system_prompt))


def largest_chat(service: Service, text: str) -> dict[str, object]:
    """A prompt of nearly `serving.max_prompt_tokens` and the largest `max_tokens`, greedy."""
    serving = service.settings.serving
    words = text.split()
    while True:
        body: dict[str, object] = {
            "model": "live", "max_tokens": serving.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": " ".join(words) + "\nRetell all of this in detail."}]}
        if chat_prompt_tokens(service, body) <= serving.max_prompt_tokens:
            return body
        words = words[: int(len(words) * 0.97)]


def phase(url: str, small: list[tuple[str, dict[str, object]]], rounds: int,
          large: tuple[str, dict[str, object]] | None) -> dict[str, object]:
    """Small requests' latencies, alone or while `large` is sent back to back."""
    heavy = start_client(url, [large], 0) if large else None
    try:
        if heavy:
            time.sleep(2)  # the first large request takes the model before the small ones start
        figures: dict[str, object] = {}
        for path, seconds in finish(start_client(url, small, rounds)).items():
            figures[path] = {"p50_s": statistics.median(seconds), "p99_s": percentile(seconds, 0.99),
                             "max_s": max(seconds), "n": len(seconds)}
    finally:
        if heavy:
            large_took = finish(heavy)
            [(path, seconds)] = large_took.items()
            figures["large"] = {"path": path, "n": len(seconds), "p50_s": statistics.median(seconds)}
    return figures


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="small requests per phase (half classify, half chat)")
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--turn-tokens", type=int, default=ServingSettings().turn_tokens,
                        help="`serving.turn_tokens`: tokens a request computes per turn at the model")
    parser.add_argument("--turn-ms", type=float, default=ServingSettings().turn_ms,
                        help="`serving.turn_ms`: how long a generation's turn lasts")
    parser.add_argument("--out", type=Path,
                        help="the JSON result (default: bench/results/fairness-TURN_TOKENS-TURN_MSms.json)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    test = load_tickets("banking77", "test")
    names = sorted({t.label for t in test if t.label})
    corpus = " ".join(t.text for t in test)
    small = [("/v1/classify", {"text": test[0].text, "labels": names[:12]}),
             ("/v1/chat/completions", {"model": "live", "max_tokens": 2, "temperature": 0,
                                       "messages": [{"role": "user", "content": test[1].text}]})]
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        settings = Settings(data_dir=Path(data), model=ModelSettings(base=args.base),
                            scheduler=SchedulerSettings(enabled=False), api=ApiSettings(port=port),
                            serving=ServingSettings(turn_tokens=args.turn_tokens, turn_ms=args.turn_ms))
        service = Service(settings)
        server = start_server(service, port)
        url = f"http://127.0.0.1:{port}"
        try:
            classify = largest_classify(service, corpus[:16_384], names)
            chat = largest_chat(service, corpus)
            with httpx.Client(base_url=url, timeout=900) as http:
                for path, body in small:  # warm-up
                    http.post(path, json=body).raise_for_status()
            results = {
                "largest_classify": {"labels": len(classify["labels"]),  # type: ignore[arg-type]
                                     "work_tokens": service.runtime.classify_work(classify["text"], classify["labels"]),  # type: ignore[arg-type]
                                     "budget": settings.serving.max_classify_tokens,
                                     "turn_tokens": settings.serving.turn_tokens},
                "largest_chat": {"prompt_tokens": chat_prompt_tokens(service, chat),
                                 "max_prompt_tokens": settings.serving.max_prompt_tokens,
                                 "max_tokens": settings.serving.max_tokens},
                "idle": phase(url, small, args.rounds, None),
                "under_largest_classify": phase(url, small, args.rounds, ("/v1/classify", classify)),
                "under_largest_chat": phase(url, small, args.rounds, ("/v1/chat/completions", chat)),
            }
        finally:
            server.should_exit = True
            service.stop()

    idle = results["idle"]
    print(f"base {args.base}, {torch.get_num_threads()} threads, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; largest classify {results['largest_classify']}, "
          f"largest chat {results['largest_chat']}")
    for name in ("idle", "under_largest_classify", "under_largest_chat"):
        row = results[name]
        for path in ("/v1/classify", "/v1/chat/completions"):
            small_row, base = row[path], idle[path]
            print(f"  {name:24s} small {path:22s} p50 {small_row['p50_s'] * 1e3:7.0f} ms  "
                  f"p99 {small_row['p99_s'] * 1e3:7.0f} ms = {small_row['p99_s'] / base['p50_s']:5.1f} × idle p50  "
                  f"{'ok' if small_row['p99_s'] < 1 else 'MISSED'} (p99 < 1 s)")
        if "large" in row:
            print(f"  {'':24s} large request: {row['large']['n']} answered, p50 {row['large']['p50_s']:.1f} s")
    out = args.out or RESULTS / f"fairness-{args.turn_tokens}-{args.turn_ms:g}ms.json"
    write_result(out, args, load_before, results)
    return results


if __name__ == "__main__":
    main()
