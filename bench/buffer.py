"""Replay-buffer vector search at scale: the approximate index the buffer switches to past
`replay.exact_max_rows` (`--kind pq`, the default, `hnsw` or `ivf`), against exact search over
the same vectors in the same run.

Workload: N random 384-d unit vectors (`--data uniform`: isotropic Gaussian, the hardest case
for any approximate index, since no neighbour is much closer than a random point; `--data
clustered`: a mixture of 1,000 Gaussian blobs, closer to how sentence embeddings sit), added in
blocks of 10,000 through `replay.index.VectorIndex` (the class the buffer uses), then
`--queries` single-vector kNN@10 queries from the same distribution, not in the index.
Baseline, measured in the same run: the exact `IndexFlatIP` over the same vectors (its answers
are the ground truth for recall@10). Prints add rate, p50/p99 query latency of both, the
speed-up, recall@10 and resident memory; writes bench/results/buffer.json.

    .venv/bin/python bench/buffer.py [--n 1000000] [--data uniform|clustered] [--kind pq|hnsw|ivf]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import faiss
import numpy as np

from replay.config import ReplaySettings
from replay.index import PQ_DIMS_PER_CODE, VectorIndex, ivf_lists


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vectors(n: int, dim: int, data: str, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    if data == "clustered" and centres is not None:
        v = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32) * 0.6
    else:
        v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--exact-queries", type=int, default=50, help="single queries timed on the baseline")
    parser.add_argument("--data", choices=["uniform", "clustered"], default="uniform")
    parser.add_argument("--kind", choices=["pq", "hnsw", "ivf"], default=ReplaySettings().large_index)
    parser.add_argument("--refine", type=int, default=ReplaySettings().pq_refine_factor)
    parser.add_argument("--threads", type=int, default=0,
                        help="FAISS threads (0: its default, one per core); a single query gains little "
                        "from more than one, and on a busy machine loses")
    parser.add_argument("--nprobe", type=int, default=ReplaySettings().ivf_nprobe)
    parser.add_argument("--lists", type=int, default=1024, help="IVF lists (k-means cost grows with them)")
    parser.add_argument("--ef-search", type=int, default=ReplaySettings().hnsw_ef_search)
    parser.add_argument("--m", type=int, default=ReplaySettings().hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=ReplaySettings().hnsw_ef_construction)
    parser.add_argument("--out", type=Path, default=Path("bench/results/buffer.json"))
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    k = 10
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32) if args.data == "clustered" else None
    settings = ReplaySettings(index=args.kind, hnsw_m=args.m, hnsw_ef_search=args.ef_search,
                              hnsw_ef_construction=args.ef_construction, ivf_nprobe=args.nprobe,
                              ivf_lists=args.lists, pq_refine_factor=args.refine)
    params = {"hnsw": {"m": args.m, "ef_construction": args.ef_construction, "ef_search": args.ef_search},
              "ivf": {"lists": ivf_lists(args.n, settings), "nprobe": args.nprobe},
              "pq": {"dims_per_code": PQ_DIMS_PER_CODE, "bits": 4, "refine_factor": args.refine}}[args.kind]
    print(f"{args.n:,} {args.data} {args.dim}-d vectors, {args.kind} {params}, "
          f"{faiss.omp_get_max_threads()} FAISS threads")

    base_rss = rss_mib()
    approx = VectorIndex(args.dim, args.kind, settings)
    train_s = 0.0
    if wanted := approx.train_sample_size(args.n):  # k-means over a sample of the same data, timed as adding
        sample = vectors(wanted, args.dim, args.data, rng, centres)
        t = time.perf_counter()
        approx.train(sample, args.n)
        train_s = time.perf_counter() - t
        del sample
        print(f"  trained in {train_s:.1f} s")
    exact = faiss.IndexFlatIP(args.dim)
    add_s = exact_add_s = 0.0
    block = 10_000
    for start in range(0, args.n, block):
        v = vectors(min(block, args.n - start), args.dim, args.data, rng, centres)
        t = time.perf_counter()
        approx.add(v, np.arange(start, start + len(v), dtype=np.int64))
        add_s += time.perf_counter() - t
        t = time.perf_counter()
        exact.add(v)
        exact_add_s += time.perf_counter() - t
        if (start // block) % 10 == 0:
            print(f"  added {start + len(v):>9,}  ({(start + len(v)) / add_s:,.0f} vectors/s)", flush=True)
    # Both indexes hold a copy of the vectors; the approximate one adds its graph, ids or codes.
    add_s += train_s
    extra = {"hnsw": args.m * 2 * 4, "ivf": 8, "pq": args.dim // PQ_DIMS_PER_CODE // 2 + 8}[args.kind]
    approx_bytes = args.n * (args.dim * 4 + extra)
    rss_after = rss_mib()

    queries = vectors(args.queries, args.dim, args.data, rng, centres)
    _, truth = exact.search(queries, k)  # batched: the ground truth
    found = np.zeros_like(truth)
    latencies = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        _, ids = approx.search(q[None], k)
        latencies.append(time.perf_counter() - t)
        found[i] = ids[0, :k]
    recall = float(np.mean([len(set(found[i]) & set(truth[i])) / k for i in range(len(queries))]))
    exact_latencies = []
    for q in queries[:args.exact_queries]:
        t = time.perf_counter()
        exact.search(q[None], k)
        exact_latencies.append(time.perf_counter() - t)

    result = {
        "n": args.n, "dim": args.dim, "data": args.data, "k": k, "queries": args.queries,
        "index": args.kind,
        "params": params, "faiss_threads": faiss.omp_get_max_threads(),
        "train_s": train_s,
        "add_vectors_per_s": args.n / add_s,
        "exact_add_vectors_per_s": args.n / exact_add_s,
        "knn_p50_ms": percentile_ms(latencies, 50), "knn_p99_ms": percentile_ms(latencies, 99),
        "exact_knn_p50_ms": percentile_ms(exact_latencies, 50),
        "exact_knn_p99_ms": percentile_ms(exact_latencies, 99),
        "recall_at_10": recall,
        "rss_mib": rss_after, "rss_growth_mib": rss_after - base_rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "index_estimated_mib": approx_bytes / 2**20,
        "machine": platform.processor() or platform.machine(),
    }
    result["speedup_vs_exact_p50"] = result["exact_knn_p50_ms"] / result["knn_p50_ms"]
    result["targets_met"] = {"knn_p50_le_5ms": result["knn_p50_ms"] <= 5.0, "recall_ge_0_95": recall >= 0.95}
    print(f"add rate           {result['add_vectors_per_s']:>10,.0f} vectors/s   "
          f"(exact flat: {result['exact_add_vectors_per_s']:,.0f} vectors/s)")
    print(f"kNN@10 p50 / p99   {result['knn_p50_ms']:>10.2f} / {result['knn_p99_ms']:.2f} ms   "
          f"(exact: {result['exact_knn_p50_ms']:.2f} / {result['exact_knn_p99_ms']:.2f} ms)")
    print(f"speed-up vs exact  {result['speedup_vs_exact_p50']:>10.1f}x at p50   (target p50 <= 5 ms: "
          f"{'met' if result['targets_met']['knn_p50_le_5ms'] else 'MISSED'})")
    print(f"recall@10          {recall:>10.3f}   (target >= 0.95: "
          f"{'met' if result['targets_met']['recall_ge_0_95'] else 'MISSED'})")
    print(f"resident memory    {rss_after:>10,.0f} MiB (grew {result['rss_growth_mib']:,.0f} MiB for both "
          f"indexes; {args.kind} alone ~{result['index_estimated_mib']:,.0f} MiB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
