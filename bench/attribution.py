"""S1 — attribution throughput of spray's fast LRP engine against zennit (see BENCHMARKS.md).

For torchvision resnet18 and vgg16 (random weights, num_classes=10, eval, 3×224×224) at
batch 16 and 8, times alternately, in one process:

- a plain forward pass (no grad), and the same with channels-last tensors (for reference:
  the fast engine runs its convolutions channels-last in float32);
- an input gradient (``x.requires_grad_()``, parameters frozen);
- zennit's ``Gradient`` attributor with EpsilonPlusFlat and the torchvision canonizer (the anchor);
- spray: heatmap plus concept-relevance vectors at three layers, in one pass
  (``spray.attribution.select.make_explainer``, layers from ``architectures``), and the same
  engine with zennit's forward arithmetic (NCHW, BatchNorm not folded).

Reports the median images/s, forward units (time ÷ plain forward time), the speed-up over
zennit, and two accuracy figures, each the largest over samples of max|a − b| / max|b|:
"diff vs zennit" (spray's float32 heatmaps against zennit's, all samples) and "err vs f64"
(float32 heatmaps of zennit and of spray against float64 ones, on the ``--f64-samples``
samples where spray and zennit differ most). Float32 LRP on random-weight networks loses digits where the relevance is divided
by nearly cancelling sums, so the first figure is only meaningful beside the second.
S2 (conditional heatmaps) is not measured here.

    python3 bench/attribution.py --quick
    python3 bench/attribution.py --device cuda --amp
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
import zennit.attribution as za

from spray.attribution.architectures import attribution_defaults
from spray.attribution.lrp import make_composite
from spray.attribution.select import engine_name, make_explainer


ZENNIT_ORDER = "  same, NCHW and BatchNorm unfolded (zennit order)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.one_hot(targets, logits.shape[1]).to(logits) * logits


def _per_sample_difference(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max|ours − reference| / max|reference| per sample."""
    ours, reference = ours.detach().double().cpu().flatten(1), reference.detach().double().cpu().flatten(1)
    scale = reference.abs().amax(dim=1).clamp(min=1e-30)
    return (ours - reference).abs().amax(dim=1) / scale


def _relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float(_per_sample_difference(ours, reference).max())


def _float64_reference(model, defaults, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Heatmaps in float64 (spray's engine, equal to zennit's in float64 to ~1e-15)."""
    model64 = copy.deepcopy(model).double()
    explainer = make_explainer(model64, defaults.composite, defaults.canonizers)
    return explainer.explain(x.double(), targets).heatmaps


def bench_network(name: str, batch: int, repeats: int, device: str, amp: bool, f64_samples: int) -> list[dict]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model_cl = getattr(torchvision.models, name)(num_classes=10).eval().to(device)
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    defaults = attribution_defaults(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=generator).to(device)
    targets = (torch.arange(batch) % 10).to(device)

    start = time.perf_counter()
    explainer = make_explainer(model, defaults.composite, defaults.canonizers, defaults.layers)
    compile_s = time.perf_counter() - start
    # The same engine with zennit's forward arithmetic (NCHW, BatchNorm after its layer).
    explainer_zo = make_explainer(
        model, defaults.composite, defaults.canonizers, defaults.layers, memory_format="contiguous", fold_batchnorm=False
    )

    outputs: dict[str, torch.Tensor] = {}

    def forward(inputs: torch.Tensor = x) -> None:
        with torch.no_grad():
            model(inputs)

    def forward_cl(inputs: torch.Tensor = x) -> None:
        with torch.no_grad():
            model_cl(inputs.contiguous(memory_format=torch.channels_last))

    def input_gradient(inputs: torch.Tensor = x) -> None:
        leaf = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(leaf)
            torch.autograd.grad(logits, leaf, _seed(logits, targets[: len(inputs)]).detach())

    def zennit(inputs: torch.Tensor = x) -> None:
        composite = make_composite(defaults.composite, defaults.canonizers)
        with za.Gradient(model, composite) as attributor:
            _, relevance = attributor(inputs, lambda out: _seed(out, targets[: len(inputs)]))
        outputs["zennit"] = relevance.sum(dim=1)

    def spray(inputs: torch.Tensor = x) -> None:
        with explainer:
            result = explainer.explain(inputs, targets[: len(inputs)])
        outputs["spray"] = result.heatmaps

    def spray_zennit_order(inputs: torch.Tensor = x) -> None:
        with explainer_zo:
            result = explainer_zo.explain(inputs, targets[: len(inputs)])
        outputs["spray, zennit order"] = result.heatmaps

    spray_label = f"spray ({engine_name(explainer)}) heatmap + {len(defaults.layers)} concept vectors"
    methods: dict[str, Callable[..., None]] = {
        "plain forward": forward,
        "plain forward, channels-last": forward_cl,
        "input gradient": input_gradient,
        "zennit Gradient (anchor)": zennit,
        spray_label: spray,
        ZENNIT_ORDER: spray_zennit_order,
    }
    for fn in methods.values():  # warm-up on a small batch: allocations, kernel selection
        fn(x[:2])
    times: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(repeats):
        for label, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    # The float64 reference is computed for the samples where spray and zennit disagree most.
    per_sample = _per_sample_difference(outputs["spray"], outputs["zennit"])
    worst = per_sample.argsort(descending=True)[:f64_samples].to(x.device)
    reference = _float64_reference(model, defaults, x[worst], targets[worst])
    heatmaps = {spray_label: outputs["spray"], ZENNIT_ORDER: outputs["spray, zennit order"]}
    medians = {label: statistics.median(values) for label, values in times.items()}
    base, anchor = medians["plain forward"], medians["zennit Gradient (anchor)"]
    rows = []
    for label, seconds in medians.items():
        ours = heatmaps.get(label)
        heatmap = ours if ours is not None else outputs["zennit"] if label.startswith("zennit") else None
        rows.append({
            "network": name, "batch": batch, "method": label,
            "images/s": batch / seconds, "units": seconds / base,
            "vs zennit": anchor / seconds if heatmap is not None else None,
            "difference": _relative_difference(ours, outputs["zennit"]) if ours is not None else None,
            "f64 error": _relative_difference(heatmap[worst], reference) if heatmap is not None else None,
        })
    print(
        f"  {name} batch {batch}: compile {compile_s:.1f} s; float64 reference (spray's engine in float64) on the "
        f"{f64_samples} sample(s) where spray and zennit differ most: {worst.tolist()}"
    )
    if amp:
        rows.append(_amp_row(name, batch, explainer, x, targets, outputs["zennit"], reference, worst, base, anchor, device))
    return rows


def _amp_row(name, batch, explainer, x, targets, zennit, reference, worst, base, anchor, device) -> dict:
    """spray under float16 autocast: time and agreement with zennit's float32 heatmaps."""
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16), explainer:
            heatmaps = explainer.explain(x, targets).heatmaps
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "network": name, "batch": batch, "method": "spray heatmap + concepts, float16 autocast",
        "images/s": batch / seconds, "units": seconds / base, "vs zennit": anchor / seconds,
        "difference": _relative_difference(heatmaps.float(), zennit),
        "f64 error": _relative_difference(heatmaps[worst].float(), reference),
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'network':<9} {'batch':>5}  {'method':<55} {'images/s':>9} {'fwd units':>9} {'x zennit':>8} "
        f"{'diff vs zennit':>14} {'err vs f64':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        versus = f"{row['vs zennit']:.2f}" if row["vs zennit"] is not None else ""
        difference = f"{row['difference']:.1e}" if row["difference"] is not None else ""
        error = f"{row['f64 error']:.1e}" if row["f64 error"] is not None else ""
        lines.append(
            f"{row['network']:<9} {row['batch']:>5}  {row['method']:<55} {row['images/s']:>9.2f} "
            f"{row['units']:>9.2f} {versus:>8} {difference:>14} {error:>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed repeats instead of 5, 1 float64 sample instead of 2")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median reported)")
    parser.add_argument("--networks", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 8])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", action="store_true", help="also time spray under float16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--f64-samples", type=int, default=None,
        help="samples explained in float64 as the accuracy reference (default 2, 1 with --quick)",
    )
    args = parser.parse_args(argv)
    print("$ python3 " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: skipped.")
        return 0
    if args.amp and args.device != "cuda":
        print("--amp: float16 autocast is measured on CUDA only; skipped (use --device cuda).")
        args.amp = False
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    f64_samples = args.f64_samples or (1 if args.quick else 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load:.1f}, {platform.processor() or platform.machine()}; {repeats} repeats, median"
    )
    rows = []
    for name in args.networks:
        for batch in args.batches:
            new = bench_network(name, batch, repeats, args.device, args.amp, min(f64_samples, batch))
            rows += new
            print(format_table(new), flush=True)
    print()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
