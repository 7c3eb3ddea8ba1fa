"""kNN libraries: spray's inverted-file index against faiss-cpu at equal neighbour recall.

SpRAy needs the k nearest neighbours of *every* sample (an all-points kNN graph), so each
tool is timed on that job: build its index over the n search vectors, then query every
vector for its k + 1 nearest (itself included and dropped). The common post-processing
of :func:`spray.analysis.graph.knn` (float64 distances, sorting) is the same whichever
search found the neighbours and is not timed.

Data: the S3 data of ``bench/spray_scale.py`` (synthetic 32x32 maps, five groups of blob
positions with jitter and noise), preprocessed as the pipeline does it (signed, square
root, L2) and reduced to 64 principal components by
:func:`spray.analysis.graph.reduce_dimensions`; cached under
``.bench-cache/knn_libraries/`` with exact ground truth for 2,000 random queries (brute
force against all n vectors, float32 shortlist re-ranked in float64).

Tools (each build in its own subprocess, so its peak memory is its own):

* **spray ivf**: :func:`spray.analysis.graph.ivf_knn` at its defaults (about
  ``sqrt(6 n)`` cells, 6 probes, one neighbours-of-neighbours pass), and with the probe
  counts of ``--spray-probe`` (a higher recall to compare at).
* **faiss IVFFlat**: ``nlist = 4 sqrt(n)`` cells, k-means (seeded) on at most 64 points per
  cell with 10 iterations, and on 16 points per cell with 6 iterations (the training
  budget of spray's index); ``nprobe`` swept. Each setting is also reported with spray's
  neighbours-of-neighbours pass applied to faiss's answer ("+ refine").
* **faiss HNSWFlat**: ``M`` of 16 and 32, ``efConstruction`` 40 (faiss's default);
  ``efSearch`` swept.

One thread for everything (BLAS via threadpoolctl, torch, faiss's OpenMP). The tools
alternate within every repeat (order reversed on odd repeats); times are medians over
``--repeats``. A sweep stops at the first setting whose recall reaches spray's (once
spray's recall is known), which keeps the 1M run short. Recall@k is the share of the true
k nearest neighbours found, averaged over the 2,000 queries. For each spray row and each
faiss index, the cheapest faiss setting with recall at least spray's is reported with the
ratio spray's time / faiss's time (above 1: faiss is faster).

Usage::

    python3 bench/knn_libraries.py --quick                 # 20k, 100k: a few minutes
    python3 bench/knn_libraries.py --sizes 100000 1000000
    python3 bench/knn_libraries.py --sizes 100000 --spray-probe 10 16 --no-stop   # full sweeps

Results (every setting and run) go to ``.bench-cache/knn_libraries/results_<sizes>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench-cache" / "knn_libraries"
N_QUERIES = 2000
DEFAULT_SIZES = (100000, 1000000)
QUICK_SIZES = (20000, 100000)
DEFAULT_NPROBE = (4, 6, 8, 10, 12, 16, 24, 32, 48, 64)
DEFAULT_EF_SEARCH = (12, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_HNSW_M = (16, 32)
DEFAULT_IVF_TRAIN = ("64:10", "16:6")


# ---------------------------------------------------------------------------- data


def _vectors_path(n: int, seed: int) -> Path:
    return CACHE / f"vectors_n{n}_seed{seed}.npy"


def _truth_path(n: int, seed: int, k: int) -> Path:
    return CACHE / f"truth_n{n}_seed{seed}_k{k}.npz"


def make_search_vectors(n: int, seed: int) -> np.ndarray:
    """(n, 64) float32 search vectors of S3's maps, as the pipeline computes them."""
    sys.path.insert(0, str(REPO / "bench"))
    from spray_scale import SIDE, make_maps

    from spray.analysis.config import SprayConfig
    from spray.analysis.graph import reduce_dimensions
    from spray.analysis.preprocess import preprocess

    config = SprayConfig(pooled_size=(SIDE, SIDE))
    maps, _ = make_maps(n, seed)
    prepared = preprocess(
        maps, config.pooled_size, config.relevance, config.normalisation,
        keep_pooled=False, scaling=config.scaling,
    )
    del maps
    return reduce_dimensions(prepared.vectors, config.pca_components, random_state=config.random_state)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, shortlist: int = 32) -> np.ndarray:
    """(q, k) exact nearest neighbours of ``vectors[queries]`` among all vectors, self excluded.

    A float32 matrix-product pass over column blocks keeps a shortlist per query, which is
    then re-ranked with float64 distances (the float32 shortcut alone can swap near ties).
    """
    n = len(vectors)
    q = vectors[queries]
    q_norms = np.einsum("ij,ij->i", q, q)
    best_d = np.full((len(queries), shortlist), np.inf, dtype=np.float32)
    best_i = np.full((len(queries), shortlist), -1, dtype=np.int64)
    step = 200000
    for start in range(0, n, step):
        block = vectors[start : start + step]
        d = q_norms[:, None] - 2.0 * (q @ block.T) + np.einsum("ij,ij->i", block, block)[None, :]
        own = (queries >= start) & (queries < start + len(block))
        d[np.flatnonzero(own), queries[own] - start] = np.inf
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), d.shape)], axis=1)
        top = np.argpartition(all_d, shortlist, axis=1)[:, :shortlist]
        best_d = np.take_along_axis(all_d, top, axis=1)
        best_i = np.take_along_axis(all_i, top, axis=1)
    diff = vectors[best_i].astype(np.float64) - q[:, None, :].astype(np.float64)
    exact = np.einsum("qcd,qcd->qc", diff, diff)
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best_i, order, axis=1)


def prepare(n: int, seed: int, k: int) -> None:
    """Write the search vectors and the queries' ground truth to the cache (once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    vectors_path, truth_path = _vectors_path(n, seed), _truth_path(n, seed, k)
    if not vectors_path.exists():
        start = time.perf_counter()
        vectors = make_search_vectors(n, seed)
        np.save(vectors_path, vectors)
        print(f"n={n}: search vectors {vectors.shape} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if not truth_path.exists():
        vectors = np.load(vectors_path)
        rng = np.random.default_rng(seed + 1)
        queries = np.sort(rng.choice(n, min(N_QUERIES, n), replace=False))
        start = time.perf_counter()
        truth = exact_neighbours(vectors, queries, k)
        np.savez(truth_path, queries=queries, truth=truth)
        print(f"n={n}: ground truth in {time.perf_counter() - start:.1f} s", file=sys.stderr)


# ---------------------------------------------------------------------------- workers


def _memory_gb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process, GiB.

    Read from ``/proc/self/status``: unlike ``ru_maxrss``, the peak there is the process's
    own and not inherited from the parent that started it.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2  # kB
    return float("nan")


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def _drop_self_sq(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from spray.analysis.graph import _drop_self

    indices, distances = _drop_self(indices, distances, k)
    return indices, np.ascontiguousarray(distances, dtype=np.float32)


def worker(tool: str, n: int, seed: int, k: int, params: dict[str, Any], target: float | None) -> dict:
    """Build one index and sweep its search setting; one JSON-able record."""
    from threadpoolctl import threadpool_limits
    import torch

    torch.set_num_threads(1)
    vectors = np.load(_vectors_path(n, seed))
    truth_file = np.load(_truth_path(n, seed, k))
    queries, truth = truth_file["queries"], truth_file["truth"]
    if tool != "spray":
        import faiss

        faiss.omp_set_num_threads(1)
    from spray.analysis.graph import _refine, _squared_norms, ivf_knn

    record: dict[str, Any] = {"tool": tool, "n": n, "params": params, "settings": []}
    base_rss = _memory_gb("VmRSS")
    with threadpool_limits(limits=1):
        if tool == "spray":
            start = time.perf_counter()
            found = ivf_knn(vectors, k, random_state=seed, **params)
            seconds = time.perf_counter() - start
            record["build_s"] = 0.0
            setting = ", ".join(f"{key}={value}" for key, value in params.items()) or "defaults"
            record["settings"].append({"setting": setting, "search_s": seconds, "recall": _recall(found[queries], truth)})
        else:
            dim = vectors.shape[1]
            start = time.perf_counter()
            if tool == "ivf":
                nlist = params["nlist"]
                quantizer = faiss.IndexFlatL2(dim)
                index = faiss.IndexIVFFlat(quantizer, dim, nlist)
                index.cp.seed = seed
                index.cp.niter = params["train_iter"]
                index.cp.max_points_per_centroid = params["train_per_cell"]
                index.train(vectors)
                record["train_s"] = time.perf_counter() - start
                index.add(vectors)
                sweep_name, sweep = "nprobe", params["nprobe"]
            else:
                index = faiss.IndexHNSWFlat(dim, params["M"])
                index.hnsw.efConstruction = 40
                index.add(vectors)
                sweep_name, sweep = "efSearch", params["efSearch"]
            record["build_s"] = time.perf_counter() - start
            norms = _squared_norms(vectors)
            for value in sweep:
                if tool == "ivf":
                    index.nprobe = value
                else:
                    index.hnsw.efSearch = value
                start = time.perf_counter()
                distances, indices = index.search(vectors, k + 1)
                found_i, found_d = _drop_self_sq(indices, distances, k)
                seconds = time.perf_counter() - start
                recall = _recall(found_i[queries], truth)
                entry = {"setting": f"{sweep_name}={value}", "search_s": seconds, "recall": recall}
                if tool == "ivf" and params.get("refine", True):
                    start = time.perf_counter()
                    _, refined = _refine(vectors, norms, found_d, found_i)
                    entry["refine_s"] = time.perf_counter() - start
                    entry["refine_recall"] = _recall(refined[queries], truth)
                    del refined
                record["settings"].append(entry)
                print(json.dumps({"n": n, "tool": tool, **params, **entry}), file=sys.stderr, flush=True)
                del distances, indices, found_i, found_d
                if target is not None and recall >= target:
                    break
    record["peak_delta_gb"] = max(0.0, _memory_gb("VmHWM") - base_rss)
    return record


def run_worker(tool: str, n: int, seed: int, k: int, params: dict, target: float | None, timeout: float) -> dict:
    command = [
        sys.executable, __file__, "--worker", tool, "--n", str(n), "--seed", str(seed), "--k", str(k),
        "--params", json.dumps(params),
    ]
    if target is not None:
        command += ["--target", repr(target)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        return {"tool": tool, "n": n, "params": params, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report


def _label(record: dict) -> str:
    if record["tool"] == "spray":
        return "spray ivf"
    if record["tool"] == "ivf":
        p = record["params"]
        return f"faiss IVFFlat nlist={p['nlist']} train {p['train_per_cell']}/cell x{p['train_iter']}"
    return f"faiss HNSWFlat M={record['params']['M']}"


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (index, setting): median times over repeats, recall, memory."""
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for record in runs:
        if "error" in record:
            continue
        for entry in record["settings"]:
            groups.setdefault((_label(record), entry["setting"]), []).append((record, entry))
            if "refine_s" in entry:
                refined = {"setting": entry["setting"], "search_s": entry["search_s"] + entry["refine_s"],
                           "recall": entry["refine_recall"]}
                groups.setdefault((_label(record) + " + refine", entry["setting"]), []).append((record, refined))
    rows = []
    for (label, setting), items in groups.items():
        build = statistics.median(r.get("build_s", 0.0) for r, _ in items)
        search = statistics.median(e["search_s"] for _, e in items)
        totals = [r.get("build_s", 0.0) + e["search_s"] for r, e in items]
        rows.append({
            "index": label, "setting": setting, "build_s": build, "search_s": search,
            "total_s": statistics.median(totals), "recall": statistics.median(e["recall"] for _, e in items),
            "peak_delta_gb": max(r["peak_delta_gb"] for r, _ in items), "repeats": len(items),
        })
    return rows


def print_table(n: int, rows: list[dict]) -> dict:
    """Markdown table for one size, then the equal-recall comparison; returns the latter."""
    print(f"\n### n = {n:,}\n")
    print("| index | setting | build s | search s | total s | recall@k | peak delta GB | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['index']} | {row['setting']} | {row['build_s']:.1f} | {row['search_s']:.1f} | "
              f"{row['total_s']:.1f} | {row['recall']:.4f} | {row['peak_delta_gb']:.2f} | {row['repeats']} |")
    verdicts: dict[str, Any] = {}
    for reference in (r for r in rows if r["index"].startswith("spray")):
        print(f"\nAt recall >= spray ivf {reference['setting']}'s {reference['recall']:.4f} "
              f"(spray: {reference['total_s']:.1f} s):\n")
        verdict: dict[str, Any] = {"spray_recall": reference["recall"], "spray_s": reference["total_s"]}
        for label in dict.fromkeys(r["index"] for r in rows if not r["index"].startswith("spray")):
            good = [r for r in rows if r["index"] == label and r["recall"] >= reference["recall"]]
            if not good:
                best = max((r for r in rows if r["index"] == label), key=lambda r: r["recall"])
                print(f"* {label}: no setting reached it (best {best['recall']:.4f} at {best['setting']}, "
                      f"{best['total_s']:.1f} s)")
                verdict[label] = None
                continue
            cheapest = min(good, key=lambda r: r["total_s"])
            ratio = reference["total_s"] / cheapest["total_s"]
            print(f"* {label}: {cheapest['setting']}, {cheapest['total_s']:.1f} s, recall {cheapest['recall']:.4f}: "
                  f"spray time / faiss time = {ratio:.2f}")
            verdict[label] = {"setting": cheapest["setting"], "total_s": cheapest["total_s"],
                              "recall": cheapest["recall"], "spray_over_faiss": ratio}
        verdicts[reference["setting"]] = verdict
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--quick", action="store_true", help="sizes 20k and 100k")
    parser.add_argument("--k", type=int, default=10, help="neighbours per sample (spray's n_neighbors)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobe", type=int, nargs="+", default=list(DEFAULT_NPROBE), help="IVFFlat sweep")
    parser.add_argument("--ivf-train", nargs="*", default=list(DEFAULT_IVF_TRAIN),
                        help="IVFFlat k-means training as POINTS_PER_CELL:ITERATIONS, one index each")
    parser.add_argument("--ef-search", type=int, nargs="+", default=list(DEFAULT_EF_SEARCH), help="HNSW sweep")
    parser.add_argument("--hnsw-m", type=int, nargs="*", default=list(DEFAULT_HNSW_M), help="HNSW M values")
    parser.add_argument("--spray-probe", type=int, nargs="*", default=[],
                        help="also run spray's index with these n_probe values (default 6)")
    parser.add_argument("--no-refine", action="store_true", help="skip the IVFFlat + refine variant")
    parser.add_argument("--no-stop", action="store_true", help="sweep every setting, even past spray's recall")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    parser.add_argument("--worker", choices=("spray", "ivf", "hnsw"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.seed, args.k, json.loads(args.params), args.target)))
        return

    import faiss

    sizes = list(QUICK_SIZES) if args.quick else args.sizes
    results: dict[str, Any] = {"command": "python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
                               "faiss": faiss.__version__, "k": args.k, "seed": args.seed, "sizes": {}}
    for n in sizes:
        prepare(n, args.seed, args.k)
        tools: list[tuple[str, dict]] = [("spray", {})]
        tools += [("spray", {"n_probe": probe}) for probe in args.spray_probe]
        for spec in args.ivf_train:
            per_cell, iterations = (int(v) for v in spec.split(":"))
            tools.append(("ivf", {"nlist": int(round(4 * math.sqrt(n))), "train_per_cell": per_cell,
                                  "train_iter": iterations, "nprobe": args.nprobe,
                                  "refine": not args.no_refine}))
        tools += [("hnsw", {"M": m, "efSearch": args.ef_search}) for m in args.hnsw_m]
        runs: list[dict] = []
        target: float | None = None
        for repeat in range(args.repeats):
            for tool, params in tools if repeat % 2 == 0 else tools[::-1]:
                record = run_worker(tool, n, args.seed, args.k, params, None if args.no_stop else target, args.timeout)
                print(json.dumps(record), file=sys.stderr, flush=True)
                runs.append(record)
                if tool == "spray" and not params and "error" not in record:
                    target = record["settings"][0]["recall"]
        rows = summarise(runs)
        verdict = print_table(n, rows)
        results["sizes"][str(n)] = {"rows": rows, "equal_recall": verdict, "runs": runs}
        CACHE.mkdir(parents=True, exist_ok=True)
        out = CACHE / f"results_{'_'.join(str(s) for s in sizes)}.json"
        out.write_text(json.dumps(results, indent=1))
    print(f"\ncommand: {results['command']}  (faiss-cpu {results['faiss']}, one thread, "
          f"medians of {args.repeats} alternating runs; results in {out.relative_to(REPO)})")


if __name__ == "__main__":
    main()
