"""S4 — whole audits, end to end: wall time, stage times and peak memory of ``spray audit``
processes against the pipeline a person would assemble from the field's tools.

Cases (``--cases``, default all but ``large``):

* ``fixed``: fixed costs of a new process: importing the audit's modules.
* ``demo``: ``spray audit`` of the embedded demo (``jobs/demo.toml``) with the demo model
  cached and every other stage recomputed, from a new process (``--repeats`` runs).
* ``mnist``: the 50k MNIST training set (``bench/mnist.py``), a small CNN trained once and
  cached, given to spray as a user would: an HDF5 file and an entry-point model with a
  state dict, default settings (all default spaces: the heatmaps and every default concept
  layer). **Anchor**, in the same script: zennit heatmaps of the same model and data
  (``zennit.attribution.Gradient`` with the same composite and canonizers, batch 64) plus
  CoRelAy's default ``SpectralClustering`` per class on the flattened heatmaps (one space),
  in a new process too.
* ``large``: 224x224 images through a random-weight torchvision ResNet-50 with heatmaps
  pooled to 32x32 (``heatmap_size``), at two sizes N and 2N (``--large-n``), to show that
  peak memory does not grow with N; with the zennit + CoRelAy anchor at the smaller size.
* ``dask``: the analysis stage of 100 classes x 500 samples (synthetic 32x32 maps from
  bench S3) in one process and on a 2-worker ``LocalCluster``; the results must be identical.
  From the measured time of one 1,300-sample analysis it projects 1,000 classes x 1,300
  samples on N workers.

Every spray figure comes from the audit's own ``time:`` line (stage times, peak memory of the
process); wall time is measured around the process. Run from the repository root::

    python3 bench/end_to_end.py                      # fixed, demo, mnist, dask
    python3 bench/end_to_end.py --cases demo --repeats 3
    python3 bench/end_to_end.py --cases large --large-n 100

Working files go to ``.bench-cache/end_to_end/``; the numbers also to ``results.json`` there.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".bench-cache" / "end_to_end"
ALL_CASES = ("fixed", "demo", "mnist", "dask")
TIME_LINE = re.compile(r"time: ([\d.]+)s \((.*)\); peak memory (\d+) MiB")
ANCHOR_CLUSTERS = 4


# ----------------------------------------------------------------------------- helpers


def _run(command: list[str], timeout: float = 3600) -> tuple[float, str]:
    """(wall seconds, stdout+stderr) of a command; raises with its output when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode not in (0, 1):  # 1: the audit flagged something, a result like any other
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{output[-3000:]}")
    return wall, output


def _audit(job: Path, clear: Path) -> dict[str, Any]:
    """One ``spray audit`` in a new process, after removing the stage files under ``clear``."""
    for name in ("input.h5", "attributions.h5", "analysis.h5"):
        (clear / "stages" / name).unlink(missing_ok=True)
    wall, output = _run([sys.executable, "-m", "spray.cli", "--no-progress", "audit", str(job)])
    match = TIME_LINE.search(output)
    if match is None:
        raise RuntimeError(f"no time line in the audit's output:\n{output[-2000:]}")
    stages = {name: float(seconds) for name, seconds in re.findall(r"(\w+) ([\d.]+)s", match.group(2))}
    return {"wall_s": wall, "stages": stages, "peak_rss_mib": int(match.group(3))}


def _median_audit(runs: list[dict[str, Any]]) -> dict[str, Any]:
    stages = {name: statistics.median(run["stages"].get(name, 0.0) for run in runs) for name in runs[0]["stages"]}
    return {
        "wall_s": statistics.median(run["wall_s"] for run in runs),
        "stages": stages,
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "runs": len(runs),
    }


def _peak_rss_mib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _stage_text(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())


# ----------------------------------------------------------------------------- cases


def case_fixed(repeats: int) -> dict[str, Any]:
    """Seconds to import everything an audit imports, in a new process (median)."""
    code = "import spray.audit, spray.report.render, spray.analysis.pipeline"
    times = [_run([sys.executable, "-c", code])[0] for _ in range(repeats)]
    return {"imports_s": statistics.median(times)}


def case_demo(repeats: int) -> dict[str, Any]:
    folder = WORK / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "demo.toml"
    text = (REPO / "jobs" / "demo.toml").read_text().replace('output = "../reports"', f'output = "{folder / "out"}"')
    job.write_text(text)
    _audit(job, folder / "out" / "demo")  # trains and caches the model once (not timed)
    return _median_audit([_audit(job, folder / "out" / "demo") for _ in range(repeats)])


def _mnist_files() -> tuple[Path, Path]:
    """The 50k MNIST training set as an input HDF5 file and the cached CNN's state dict."""
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    from mnist import load_mnist, load_or_train_mnist_model

    from spray.data.h5 import write_input_h5

    folder = WORK / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    data_path, weights = folder / "mnist50k.h5", folder / "mnist_net.pt"
    if not data_path.exists() or not weights.exists():
        data = load_mnist()
        images, labels = data.train_images, data.train_labels
        model, _ = load_or_train_mnist_model(images, labels)
        torch.save(model.state_dict(), weights)
        write_input_h5(data_path, images, labels, [str(i) for i in range(len(labels))], [str(d) for d in range(10)])
    return data_path, weights


def _mnist_job(data_path: Path, weights: Path) -> Path:
    job = WORK / "mnist" / "mnist.toml"
    # an entry-point file must lie in the job's folder: this one builds bench/mnist.py's net
    (job.parent / "net.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'bench')!r})\nfrom mnist import MnistNet\n\n\n"
        "def build():\n    return MnistNet()\n"
    )
    job.write_text(
        "[job]\nname = \"mnist50k\"\noutput = \"out\"\nseed = 0\n\n"
        f"[data]\nsource = \"h5\"\npath = \"{data_path}\"\n\n"
        f"[model]\nsource = \"entrypoint\"\nentrypoint = \"net.py:build\"\nweights = \"{weights}\"\n"
    )
    return job


def case_mnist(repeats: int) -> dict[str, Any]:
    data_path, weights = _mnist_files()
    job = _mnist_job(data_path, weights)
    spray_runs, anchor_runs = [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        spray_runs.append(_audit(job, WORK / "mnist" / "out" / "mnist50k"))
        anchor_runs.append(_anchor_process("mnist", str(data_path), str(weights)))
    return {"spray": _median_audit(spray_runs), "anchor": _median_anchor(anchor_runs), "n": 50000}


def _large_files(n: int) -> Path:
    """``n`` random smooth 224x224 RGB images (uint8, N×H×W×C, chunks of 16) in 2 classes."""
    import h5py

    folder = WORK / "large"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"images{n}.h5"
    if path.exists():
        return path
    rng = np.random.default_rng(n)
    partial = path.with_suffix(".partial")
    with h5py.File(partial, "w") as file:
        data = file.create_dataset("data", shape=(n, 224, 224, 3), dtype=np.uint8, chunks=(16, 224, 224, 3))
        for start in range(0, n, 16):
            count = min(16, n - start)
            small = rng.uniform(0, 255, size=(count, 28, 28, 3))
            data[start : start + count] = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2).astype(np.uint8)
        file.create_dataset("label", data=np.arange(n) % 2)
        file.attrs["class_names"] = json.dumps(["a", "b"])
    partial.replace(path)
    return path


def _resnet50_weights() -> Path:
    """A random-weight ResNet-50 for the 2 classes (seed 0) as a state dict: no hub download, the same net for
    spray and the anchor."""
    import torch
    import torchvision

    path = WORK / "large" / "resnet50_random.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(num_classes=2).state_dict(), path)
    return path


def _large_job(n: int, data_path: Path) -> Path:
    job = WORK / "large" / f"large{n}.toml"
    job.write_text(
        f"[job]\nname = \"large{n}\"\noutput = \"out\"\nseed = 0\n\n"
        f"[data]\nsource = \"h5\"\npath = \"{data_path}\"\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n\n"
        f"[model]\nsource = \"torchvision\"\narchitecture = \"resnet50\"\nweights = \"{_resnet50_weights()}\"\n\n"
        "[attribution]\nheatmap_size = [32]\nbatch_size = 16\n\n"
        "[analysis]\nmin_class_size = 10\n"
    )
    return job


def case_large(sizes: list[int]) -> dict[str, Any]:
    rows = {}
    for n in sizes:
        data_path = _large_files(n)
        rows[str(n)] = _audit(_large_job(n, data_path), WORK / "large" / "out" / f"large{n}")
    anchor = _anchor_process("large", str(_large_files(sizes[0])), str(_resnet50_weights()))
    return {"spray": rows, "anchor": anchor, "anchor_n": sizes[0]}


def case_dask(classes: int, per_class: int, repeats: int) -> dict[str, Any]:
    """Single-process against a 2-worker LocalCluster on the same synthetic maps, ``repeats``
    times each, alternating (both see the same machine load); the medians are compared."""
    sys.path.insert(0, str(REPO / "bench"))
    from spray_scale import make_maps

    from spray.analysis.config import SprayConfig
    from spray.analysis.distributed import dask_runner
    from spray.analysis.pipeline import AnalysisTask, analyze_class, analyze_spaces, run_task
    from spray.attribution.distributed import start_client

    maps, _ = make_maps(classes * per_class, seed=0)
    labels = np.repeat(np.arange(classes), per_class)
    names = [f"class {c}" for c in range(classes)]
    config = SprayConfig(pooled_size=(32, 32))
    cluster = start_client("local", workers=2, threads_per_worker=1, memory_limit="4GiB")
    singles, spread = [], []
    try:
        # every worker imports spray and runs one analysis before the clock starts (a fixed cost per cluster)
        cluster.client.run(run_task, maps[:per_class], AnalysisTask("heatmap", 0, names[0], np.arange(per_class)), config, loaded=True)
        for _ in range(repeats):
            start = time.perf_counter()
            here = analyze_spaces(maps, labels, names, config, spaces=("heatmap",))
            singles.append(time.perf_counter() - start)
            start = time.perf_counter()
            there = analyze_spaces(maps, labels, names, config, spaces=("heatmap",), runner=dask_runner(cluster.client))
            spread.append(time.perf_counter() - start)
    finally:
        cluster.close()
    single, distributed = statistics.median(singles), statistics.median(spread)
    identical = all(
        np.array_equal(a.labels, b.labels) and [c.artifact_score for c in a.clusters] == [c.artifact_score for c in b.clusters]
        for a, b in zip(here, there)
    )
    big, _ = make_maps(4 * 1300, seed=1)
    task_times = []
    for part in range(4):
        start = time.perf_counter()
        analyze_class(big[part * 1300 : (part + 1) * 1300], np.arange(1300), part, "p", config)
        task_times.append(time.perf_counter() - start)
    per_task = statistics.median(task_times)
    return {
        "classes": classes, "per_class": per_class, "single_s": single, "dask_s": distributed,
        "speedup": single / distributed, "identical": identical, "task_1300_s": per_task, "repeats": repeats,
        "ratios": [a / b for a, b in zip(singles, spread)],
        "projection_s": {str(w): 1000 * per_task / w for w in (2, 8, 32, 128)},
    }


# ----------------------------------------------------------------------------- anchor


def _anchor_process(case: str, data_path: str, weights: str) -> dict[str, Any]:
    wall, output = _run([sys.executable, __file__, "--anchor", case, data_path, weights])
    result = json.loads(output.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _median_anchor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_s", "heatmaps_s", "spray_one_space_s")
    merged = {key: statistics.median(run[key] for run in runs) for key in keys}
    merged["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
    return merged


def anchor_worker(case: str, data_path: str, weights: str) -> dict[str, Any]:
    """zennit heatmaps of the audit's model and data, then CoRelAy's SpRAy per class."""
    import h5py
    import torch
    import zennit.attribution as za
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.clustering import KMeans

    from spray.attribution.lrp import make_composite
    from spray.attribution.architectures import attribution_defaults

    if case == "mnist":
        sys.path.insert(0, str(REPO / "bench"))
        from mnist import MnistNet

        model = MnistNet()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        mean, std, pool = None, None, None
    else:
        import torchvision

        model = torchvision.models.resnet50(num_classes=2)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        pool = 32
    model.eval()
    defaults = attribution_defaults(model)
    start = time.perf_counter()
    with h5py.File(data_path, "r") as file:
        data, labels = file["data"], np.asarray(file["label"][...])
        maps = []
        composite = make_composite(defaults.composite, defaults.canonizers)
        n_outputs = int(model.fc.out_features if case == "large" else model.classifier.fc2.out_features)
        with za.Gradient(model, composite) as attributor:
            for begin in range(0, len(labels), 64):
                batch = np.asarray(data[begin : begin + 64])
                if batch.dtype == np.uint8:
                    batch = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
                x = torch.from_numpy(np.asarray(batch, dtype=np.float32))
                if mean is not None:
                    x = (x - mean) / std
                target = torch.from_numpy(labels[begin : begin + 64]).long()
                _, relevance = attributor(x, torch.eye(n_outputs)[target])
                heatmap = relevance.sum(dim=1, keepdim=True)
                if pool:
                    heatmap = torch.nn.functional.adaptive_avg_pool2d(heatmap, pool)
                maps.append(heatmap[:, 0].detach().numpy())
    heatmaps = np.concatenate(maps)
    heatmaps_s = time.perf_counter() - start
    start = time.perf_counter()
    for label in np.unique(labels):
        vectors = heatmaps[labels == label].reshape(int((labels == label).sum()), -1)
        SpectralClustering(clustering=KMeans(n_clusters=ANCHOR_CLUSTERS, is_output=True))(vectors)
    spray_s = time.perf_counter() - start
    return {"heatmaps_s": heatmaps_s, "spray_one_space_s": spray_s, "peak_rss_mib": _peak_rss_mib()}


# ----------------------------------------------------------------------------- table


def print_tables(results: dict[str, Any]) -> None:
    if "fixed" in results:
        print(f"\nfixed cost: importing the audit's modules in a new process {results['fixed']['imports_s']:.1f} s")
    if "demo" in results:
        demo = results["demo"]
        print("\n| case | wall s | stages s | peak RSS MiB | goal |\n|---|---|---|---|---|")
        print(f"| demo, model cached (median of {demo['runs']}) | {demo['wall_s']:.1f} | {_stage_text(demo['stages'])} "
              f"| {demo['peak_rss_mib']} | <= 15 s: {'met' if demo['wall_s'] <= 15 else 'NOT met'} |")
    if "mnist" in results:
        mnist, spray, anchor = results["mnist"], results["mnist"]["spray"], results["mnist"]["anchor"]
        ratio = anchor["wall_s"] / spray["wall_s"]
        print("\n| 50k MNIST | wall s | heatmaps s | SpRAy s | other s | peak RSS MiB |\n|---|---|---|---|---|---|")
        stages = spray["stages"]
        other = spray["wall_s"] - stages.get("attribution", 0) - stages.get("analysis", 0)
        print(f"| spray audit, all default spaces (median of {spray['runs']}) | {spray['wall_s']:.1f} | "
              f"{stages.get('attribution', 0):.1f} | {stages.get('analysis', 0):.1f} (incl. causal test) | {other:.1f} | {spray['peak_rss_mib']} |")
        print(f"| anchor: zennit + CoRelAy, one space | {anchor['wall_s']:.1f} | {anchor['heatmaps_s']:.1f} | "
              f"{anchor['spray_one_space_s']:.1f} | {anchor['wall_s'] - anchor['heatmaps_s'] - anchor['spray_one_space_s']:.1f} | {anchor['peak_rss_mib']} |")
        print(f"\nspray's whole audit vs the anchor's heatmaps and one space: {ratio:.2f}x "
              f"(goal > 1: {'met' if ratio > 1 else 'NOT met'}); stages: {_stage_text(stages)}")
    if "large" in results:
        large = results["large"]
        print("\n| 224x224, ResNet-50, heatmaps pooled to 32x32 | N | wall s | stages s | peak RSS MiB |\n|---|---|---|---|---|")
        for n, row in large["spray"].items():
            print(f"| spray audit | {n} | {row['wall_s']:.1f} | {_stage_text(row['stages'])} | {row['peak_rss_mib']} |")
        anchor = large["anchor"]
        print(f"| anchor: zennit + CoRelAy | {large['anchor_n']} | {anchor['wall_s']:.1f} | heatmaps {anchor['heatmaps_s']:.1f}, "
              f"SpRAy {anchor['spray_one_space_s']:.1f} | {anchor['peak_rss_mib']} |")
    if "dask" in results:
        dask = results["dask"]
        print(f"\n| analysis, {dask['classes']} classes x {dask['per_class']} (median of {dask['repeats']}) | one process s | 2-worker LocalCluster s | speed-up | identical |\n|---|---|---|---|---|")
        print(f"| heatmap space | {dask['single_s']:.1f} | {dask['dask_s']:.1f} | {dask['speedup']:.2f}x "
              f"(goal >= 1.6: {'met' if dask['speedup'] >= 1.6 else 'NOT met'}) | {dask['identical']} |")
        print("\nspeed-up of each pair, one process then the cluster: " + ", ".join(f"{ratio:.2f}x" for ratio in dask["ratios"]))
        projection = ", ".join(f"{w} workers {s / 60:.1f} min" for w, s in dask["projection_s"].items())
        print(f"\nprojection, 1,000 classes x 1,300 samples, one space (one analysis of 1,300 takes "
              f"{dask['task_1300_s']:.2f} s here): {projection}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(ALL_CASES), choices=(*ALL_CASES, "large"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--large-n", type=int, default=100, help="large: the smaller N (the other is 2N)")
    parser.add_argument("--dask-classes", type=int, default=100)
    parser.add_argument("--dask-per-class", type=int, default=500)
    parser.add_argument("--anchor", nargs=3, metavar=("CASE", "DATA", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.anchor:
        print(json.dumps(anchor_worker(*args.anchor)))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for case in args.cases:
        started = time.perf_counter()
        if case == "fixed":
            results[case] = case_fixed(max(3, args.repeats))
        elif case == "demo":
            results[case] = case_demo(args.repeats)
        elif case == "mnist":
            results[case] = case_mnist(args.repeats)
        elif case == "large":
            results[case] = case_large([args.large_n, 2 * args.large_n])
        elif case == "dask":
            results[case] = case_dask(args.dask_classes, args.dask_per_class, max(3, args.repeats))
        print(f"[{case} done in {time.perf_counter() - started:.0f} s]", file=sys.stderr)
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
