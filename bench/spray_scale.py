"""S3: wall time and peak memory of the SpRAy analysis from 2k to 1M samples.

Data: synthetic relevance maps of 32x32 = 1,024 values (a pooled heatmap). Five groups of
samples ("strategies", 45/25/15/10/5 % of the samples) each put a Gaussian blob of
relevance at their own place; within a group the blob's position and width vary from
sample to sample (a continuum, as for real objects), and every pixel gets noise.

For every size, in a fresh subprocess (so that the peak resident memory is the run's own):

* **spray**: ``analyze_class`` on the maps with ``pooled_size=(32, 32)`` and the spectral
  picture (preprocessing, PCA to 64 components, kNN graph, Laplacian eigenpairs, eigengap,
  k-means, artifact scores), then, timed separately, the UMAP picture as the audit makes
  it (subset of at most 20,000 samples embedded, the others placed through the graph).
* **CoRelAy** (sizes up to ``--corelay-max``, default 10k): its default
  ``SpectralClustering`` pipeline (Euclidean distance matrix, kNN affinity with k=10,
  symmetric normalised Laplacian, 32 eigenpairs, k-means) on the same maps, flattened,
  with k-means given the planted number of groups.

Both run with the same BLAS/torch thread count (``--threads``, default 1: on a machine
shared with other work, multi-threaded BLAS is slower). Anchor and spray alternate, and
for sizes with an anchor the medians over ``--repeats`` runs are reported with their
ratio. ARI is the adjusted Rand index of the clusters against the planted groups. Peak
RSS includes the input maps themselves (the "data" column).

Usage::

    python3 bench/spray_scale.py --quick              # 2k, 5k, 10k
    python3 bench/spray_scale.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDE = 32
GROUP_SHARES = (0.45, 0.25, 0.15, 0.10, 0.05)
GROUP_CENTRES = ((16, 16), (6, 6), (6, 26), (26, 8), (25, 25))
DEFAULT_SIZES = (2000, 5000, 10000, 100000, 1000000)
QUICK_SIZES = (2000, 5000, 10000)


def make_maps(n: int, seed: int = 0, chunk: int = 50000) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32) float32 maps and (n,) planted group per map (see module docstring)."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(len(GROUP_SHARES), size=n, p=GROUP_SHARES)
    maps = np.empty((n, SIDE, SIDE), dtype=np.float32)
    axis = np.arange(SIDE, dtype=np.float32)
    centres = np.asarray(GROUP_CENTRES, dtype=np.float32)
    for start in range(0, n, chunk):
        block = groups[start : start + chunk]
        m = len(block)
        centre = centres[block] + rng.uniform(-2.5, 2.5, size=(m, 2)).astype(np.float32)
        radius = rng.uniform(1.5, 3.0, size=(m, 1)).astype(np.float32)
        rows = np.exp(-((axis[None, :] - centre[:, :1]) ** 2) / (2 * radius**2))
        cols = np.exp(-((axis[None, :] - centre[:, 1:]) ** 2) / (2 * radius**2))
        out = maps[start : start + m]
        np.einsum("ni,nj->nij", rows, cols, out=out)
        out += 0.05 * rng.standard_normal((m, SIDE, SIDE), dtype=np.float32)
    return maps, groups


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _ari(truth: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, labels))


def worker_spray(n: int, threads: int, seed: int, umap: bool) -> dict:
    from spray.analysis.embed import embed_2d
    from spray.analysis.graph import affinity_graph, reduce_dimensions
    from spray.analysis.config import SprayConfig
    from spray.analysis.pipeline import analyze_class, thread_limit

    import torch  # noqa: F401 - loaded in any audit (the model); not part of the analysis time

    maps, groups = make_maps(n, seed)
    data_rss = _peak_rss_gb()
    config = SprayConfig(pooled_size=(SIDE, SIDE), embedding="spectral", n_threads=threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    result = analyze_class(maps, np.arange(n), 0, "synthetic", config, timings=timings)
    seconds = time.perf_counter() - start
    labels = np.empty(n, dtype=np.int64)
    labels[result.rows] = result.labels
    out = {
        "tool": "spray", "n": n, "seconds": seconds, "steps": timings,
        "n_clusters": result.n_clusters, "ari": _ari(groups, labels),
        "data_gb": maps.nbytes / 1024**3, "rss_after_data_gb": data_rss,
        "peak_rss_gb": _peak_rss_gb(),
    }
    if umap:
        # the picture as the audit makes it, timed on its own (it needs the search
        # vectors and the graph, which are rebuilt here outside the timing)
        del result
        with thread_limit(threads):
            vectors = maps.reshape(n, -1)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            search = reduce_dimensions(vectors / norms, config.pca_components)
            graph = affinity_graph(search, config.n_neighbors) if n > config.embedding_max_samples else None
            start = time.perf_counter()
            embed_2d(search, "umap", config.embedding_neighbors, 0, graph=graph,
                     max_samples=config.embedding_max_samples)
            out["umap_seconds"] = time.perf_counter() - start
        out["peak_rss_gb"] = max(out["peak_rss_gb"], _peak_rss_gb())
    return out


def worker_corelay(n: int, threads: int, seed: int) -> dict:
    from threadpoolctl import threadpool_limits
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.clustering import KMeans

    maps, groups = make_maps(n, seed)
    data_rss = _peak_rss_gb()
    vectors = maps.reshape(n, -1)
    pipeline = SpectralClustering(clustering=KMeans(n_clusters=len(GROUP_SHARES), is_output=True))
    with threadpool_limits(limits=threads):
        start = time.perf_counter()
        output = pipeline(vectors)
        seconds = time.perf_counter() - start
    labels = np.asarray(output[-1])
    return {
        "tool": "corelay", "n": n, "seconds": seconds, "n_clusters": len(GROUP_SHARES),
        "ari": _ari(groups, labels), "data_gb": maps.nbytes / 1024**3,
        "rss_after_data_gb": data_rss, "peak_rss_gb": _peak_rss_gb(),
    }


def run_worker(tool: str, n: int, threads: int, seed: int, umap: bool, timeout: float) -> dict:
    command = [sys.executable, __file__, "--worker", tool, "--n", str(n), "--threads", str(threads), "--seed", str(seed)]
    if not umap:
        command.append("--no-umap")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        return {"tool": tool, "n": n, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--quick", action="store_true", help="sizes 2k, 5k, 10k")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool for sizes with an anchor")
    parser.add_argument("--corelay-max", type=int, default=10000, help="largest size CoRelAy runs on")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads, both tools")
    parser.add_argument("--no-umap", action="store_true", help="skip the UMAP timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    parser.add_argument("--worker", choices=("spray", "corelay"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "spray":
        print(json.dumps(worker_spray(args.n, args.threads, args.seed, not args.no_umap)))
        return
    if args.worker == "corelay":
        print(json.dumps(worker_corelay(args.n, args.threads, args.seed)))
        return

    sizes = list(QUICK_SIZES) if args.quick else args.sizes
    try:
        import corelay  # noqa: F401
        have_corelay = True
    except ImportError:
        have_corelay = False
        print("corelay is not installed (python3 -m pip install corelay): no anchor.", file=sys.stderr)

    rows = []
    for n in sizes:
        anchored = have_corelay and n <= args.corelay_max
        repeats = args.repeats if anchored else 1
        spray_runs, corelay_runs = [], []
        for repeat in range(repeats):
            order = ("corelay", "spray") if repeat % 2 == 0 else ("spray", "corelay")
            for tool in order:
                if tool == "corelay" and not anchored:
                    continue
                umap = tool == "spray" and repeat == 0 and not args.no_umap
                result = run_worker(tool, n, args.threads, args.seed, umap, args.timeout)
                print(json.dumps(result), file=sys.stderr, flush=True)
                (spray_runs if tool == "spray" else corelay_runs).append(result)
        rows.append((n, spray_runs, corelay_runs))

    print()
    print(f"S3 - SpRAy analysis of synthetic 32x32 maps ({args.threads} BLAS thread(s); medians of "
          f"{args.repeats} alternating runs where CoRelAy runs)")
    header = (f"{'N':>9} | {'CoRelAy s':>9} | {'spray s':>8} | {'speed-up':>8} | {'prep':>5} {'pca':>5} {'graph':>6} "
              f"{'eigen':>6} {'clust':>5} {'score':>5} | {'UMAP s':>6} | {'peak RSS GB':>11} | "
              f"{'data GB':>7} | {'CoRelAy GB':>10} | {'k':>2} | {'ARI':>5} | {'CoRelAy ARI':>11}")
    print(header)
    print("-" * len(header))
    steps_shown = ("preprocess", "pca", "graph", "eigen", "cluster", "score")
    for n, spray_runs, corelay_runs in rows:
        ok = [r for r in spray_runs if "error" not in r]
        if not ok:
            print(f"{n:>9} | spray failed: {spray_runs[0].get('error')}")
            continue
        spray_s = _median(ok, "seconds")
        anchor_ok = [r for r in corelay_runs if "error" not in r]
        steps = {k: statistics.median([r["steps"].get(k, 0.0) for r in ok]) for k in steps_shown}
        umap_s = _median(ok, "umap_seconds")
        if anchor_ok:
            anchor_s = _median(anchor_ok, "seconds")
            anchor = (f"{anchor_s:>9.2f}", f"{anchor_s / spray_s:>7.1f}x",
                      f"{max(r['peak_rss_gb'] for r in anchor_ok):>10.2f}", f"{_median(anchor_ok, 'ari'):>11.3f}")
        else:
            missing = "failed" if corelay_runs else "-"
            anchor = (f"{missing:>9}", f"{'-':>8}", f"{'-':>10}", f"{'-':>11}")
        umap_cell = f"{umap_s:>6.1f}" if umap_s == umap_s else f"{'-':>6}"
        print(f"{n:>9} | {anchor[0]} | {spray_s:>8.2f} | {anchor[1]} | "
              + " ".join(f"{steps[k]:>{w}.1f}" for k, w in zip(steps_shown, (5, 5, 6, 6, 5, 5)))
              + f" | {umap_cell} | {max(r['peak_rss_gb'] for r in ok):>11.2f} | {ok[0]['data_gb']:>7.2f} | "
              f"{anchor[2]} | {ok[0]['n_clusters']:>2} | {_median(ok, 'ari'):>5.3f} | {anchor[3]}")
    print()
    print("command: python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]))


if __name__ == "__main__":
    main()
