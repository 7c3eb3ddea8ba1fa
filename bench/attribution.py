"""S1 and S2 — attribution throughput of spray's fast LRP engine against zennit (see BENCHMARKS.md).

S1, for torchvision resnet18 and vgg16 (random weights, num_classes=10, eval, 3×224×224) at
batch 16 and 8, timed alternately in one process:

- a plain forward pass (no grad), and the same with channels-last tensors (for reference:
  the fast engine's backward sweep runs its convolutions channels-last in float32);
- an input gradient (``x.requires_grad_()``, parameters frozen);
- zennit's ``Gradient`` attributor with EpsilonPlusFlat and the torchvision canonizer (the anchor);
- spray: heatmap plus concept-relevance vectors at three layers, in one pass
  (``spray.attribution.select.make_explainer``, layers from ``architectures``; the default
  forward pass computes zennit's values bit for bit), and the same engine with
  ``forward="fast"`` (channels-last forward, BatchNorm folded into its layer). spray's
  explainers return CPU tensors, so on CUDA their times include copying the results back.

Reports the median images/s, forward units (time ÷ plain forward time), the speed-up over
zennit, and two accuracy figures, each the largest over samples of max|a − b| / max|b|:
"diff vs zennit" (spray's float32 heatmaps against zennit's, all samples) and "err vs f64"
(float32 heatmaps of zennit and of spray against float64 ones, on the ``--f64-samples``
samples where a spray mode and zennit differ most). Float32 LRP on random-weight networks
loses digits where the relevance is divided by nearly cancelling sums, so the first figure
is only meaningful beside the second.

S2, for the same networks and 16 samples: the conditional (CRP) heatmaps of each sample's
top-5 concepts at the middle concept layer (resnet18 ``layer3``, vgg16 ``features.21``),
the concepts ranked by the relevance vectors of the one-pass explanation (as stored in
``attributions.h5``; not timed). Timed alternately:

- a plain forward pass of the 16 samples (the unit);
- zennit CRP the straightforward way (the anchor): one forward and full backward pass per
  condition, the other channels' relevance masked at the layer by a gradient hook
  (spray's zennit engine, ``spray.attribution.lrp.Explainer.explain_conditional``, 16
  conditions per pass, 5 passes);
- spray's fast engine (``FastExplainer.explain_conditional``): one forward pass and the
  backward sweep above the layer per sample, the sweep below the layer per condition (all 80
  conditions);
- without ``--quick`` also the zennit engine with the 80 conditions in one batch.

Reports conditional heatmaps/s, forward units per conditional heatmap (time per heatmap ÷
plain forward time per image), the speed-up over the anchor and the largest relative
difference to the anchor's heatmaps.

    python3 bench/attribution.py --quick
    python3 bench/attribution.py --quick --protocols S2 --networks resnet18
    python3 bench/attribution.py --device cuda --amp
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
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

from spray.attribution.architectures import AttributionDefaults, attribution_defaults
from spray.attribution.crp import channel_masks
from spray.attribution.lrp import ieee_float32, make_composite
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings


FAST_FORWARD = "  same, forward='fast' (channels-last, BatchNorm folded)"


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


def _time_alternately(methods: dict[str, Callable[..., None]], repeats: int, device: str, warm_up: Callable) -> dict[str, float]:
    """Median seconds of each method, the methods run in turn ``repeats`` times after ``warm_up(fn)`` each."""
    for fn in methods.values():  # allocations, kernel selection
        warm_up(fn)
    times: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(repeats):
        for label, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def _model(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _settings(defaults: AttributionDefaults, device: str, layers: tuple[str, ...] | None = None) -> AttributionSettings:
    """The architecture's composite and canonizers (and its concept layers, or ``layers``) on ``device``."""
    return AttributionSettings(
        composite=defaults.composite, canonizers=tuple(defaults.canonizers),
        layers=tuple(defaults.layers if layers is None else layers), device=device,
    )


def _float64_reference(model, defaults, x: torch.Tensor, targets: torch.Tensor, device: str) -> torch.Tensor:
    """Heatmaps in float64 (spray's engine, equal to zennit's in float64 to ~1e-15)."""
    model64 = copy.deepcopy(model).double()
    explainer = make_explainer(model64, _settings(defaults, device, layers=()))
    return explainer.explain(x.double(), targets).heatmaps


def bench_network(name: str, batch: int, repeats: int, device: str, amp: bool, f64_samples: int) -> list[dict]:
    model = _model(name, device)
    model_cl = getattr(torchvision.models, name)(num_classes=10).eval().to(device)
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    defaults = attribution_defaults(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=generator).to(device)
    targets = (torch.arange(batch) % 10).to(device)

    settings = _settings(defaults, device)
    start = time.perf_counter()
    explainer = make_explainer(model, settings)
    compile_s = time.perf_counter() - start
    # The same engine with the faster forward pass (channels-last, BatchNorm folded into its layer).
    explainer_ff = make_explainer(model, settings, forward="fast")

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

    def spray_fast_forward(inputs: torch.Tensor = x) -> None:
        with explainer_ff:
            result = explainer_ff.explain(inputs, targets[: len(inputs)])
        outputs["spray, fast forward"] = result.heatmaps

    spray_label = f"spray ({explainer.engine}) heatmap + {len(defaults.layers)} concept vectors"
    methods: dict[str, Callable[..., None]] = {
        "plain forward": forward,
        "plain forward, channels-last": forward_cl,
        "input gradient": input_gradient,
        "zennit Gradient (anchor)": zennit,
        spray_label: spray,
        FAST_FORWARD: spray_fast_forward,
    }
    medians = _time_alternately(methods, repeats, device, warm_up=lambda fn: fn(x[:2]))
    # The float64 reference is computed for the samples where a spray mode and zennit disagree most.
    per_sample = torch.maximum(
        _per_sample_difference(outputs["spray"], outputs["zennit"]),
        _per_sample_difference(outputs["spray, fast forward"], outputs["zennit"]),
    )
    worst = per_sample.argsort(descending=True)[:f64_samples].to(x.device)
    reference = _float64_reference(model, defaults, x[worst], targets[worst], device)
    heatmaps = {spray_label: outputs["spray"], FAST_FORWARD: outputs["spray, fast forward"]}
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
            "f64 error": _relative_difference(heatmap[worst.to(heatmap.device)], reference) if heatmap is not None else None,
        })
    print(
        f"  {name} batch {batch}: compile {compile_s:.1f} s; float64 reference (spray's engine in float64) on the "
        f"{f64_samples} sample(s) where spray's modes and zennit differ most: {worst.tolist()}"
    )
    if amp:
        amp_explainer = make_explainer(model, dataclasses.replace(settings, precision="amp"))
        rows.append(_amp_row(name, batch, amp_explainer, x, targets, outputs["zennit"], reference, worst, base, anchor, device))
    return rows


def _amp_row(name, batch, explainer, x, targets, zennit, reference, worst, base, anchor, device) -> dict:
    """spray with ``precision = "amp"`` (float16 autocast, as a job spec runs it): time and
    agreement with zennit's float32 heatmaps."""
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        with explainer:
            heatmaps = explainer.explain(x, targets).heatmaps
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "network": name, "batch": batch, "method": "spray heatmap + concepts, precision='amp'",
        "images/s": batch / seconds, "units": seconds / base, "vs zennit": anchor / seconds,
        "difference": _relative_difference(heatmaps, zennit),
        "f64 error": _relative_difference(heatmaps[worst.cpu()], reference),
    }


def bench_conditional(name: str, repeats: int, device: str, batched_anchor: bool, samples: int = 16, top: int = 5) -> list[dict]:
    """S2: conditional heatmaps of each sample's ``top`` concepts at the middle concept layer."""
    model = _model(name, device)
    defaults = attribution_defaults(model)
    layer = defaults.layers[len(defaults.layers) // 2]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 3, 224, 224, generator=generator).to(device)
    targets = (torch.arange(samples) % 10).to(device)
    settings = _settings(defaults, device, layers=(layer,))
    fast = make_explainer(model, settings)
    zennit = make_explainer(model, dataclasses.replace(settings, engine="zennit"))
    concepts = fast.explain(x, targets).concepts[layer]
    ranked = concepts.topk(top, dim=1).indices.cpu()  # (samples, top): each sample's most relevant channels
    channels = concepts.shape[1]
    picks = torch.arange(samples).repeat_interleave(top).to(device)
    masks = channel_masks(channels, ranked.reshape(-1, 1).tolist()).to(device)
    per_rank = [channel_masks(channels, ranked[:, k : k + 1].tolist()).to(device) for k in range(top)]
    outputs: dict[str, torch.Tensor] = {}

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def anchor() -> None:
        with zennit:
            parts = [zennit.explain_conditional(x, targets, layer, per_rank[k]).heatmaps for k in range(top)]
        outputs["anchor"] = torch.stack(parts, dim=1).reshape(samples * top, *x.shape[2:])  # sample-major

    def batched() -> None:
        with zennit:
            outputs["batched"] = zennit.explain_conditional(x, targets, layer, masks, picks).heatmaps

    def spray() -> None:
        with fast:
            outputs["spray"] = fast.explain_conditional(x, targets, layer, masks, picks).heatmaps

    anchor_label = "zennit CRP, one backward per condition (anchor)"
    spray_label = f"spray {fast.engine} engine (shared forward)"
    batched_label = "spray zennit engine, 80 in one batch"
    methods = {"plain forward": forward, anchor_label: anchor, spray_label: spray}
    if batched_anchor:
        methods[batched_label] = batched
    medians = _time_alternately(methods, repeats, device, warm_up=lambda fn: None)
    heatmaps = {anchor_label: outputs["anchor"], spray_label: outputs["spray"], **(
        {batched_label: outputs["batched"]} if batched_anchor else {}
    )}
    n = samples * top
    per_image = medians["plain forward"] / samples
    rows = []
    for label, seconds in medians.items():
        if label == "plain forward":
            rows.append({"network": name, "layer": layer, "method": "plain forward (rate: images/s)",
                         "per second": samples / seconds, "units": 1.0, "vs anchor": None, "difference": None})
            continue
        rows.append({
            "network": name, "layer": layer, "method": label, "per second": n / seconds,
            "units": seconds / n / per_image, "vs anchor": medians[anchor_label] / seconds,
            "difference": _relative_difference(heatmaps[label], outputs["anchor"]),
        })
    print(f"  {name} S2: {samples} samples x top-{top} concepts of {channels} at {layer!r} = {n} conditional heatmaps")
    return rows


def _number(spec: str) -> Callable[[object], str]:
    """A cell formatter: ``spec`` for numbers, empty for None."""
    return lambda value: "" if value is None else format(value, spec)


#: (title, row key, width, formatter); the first two columns are left-aligned.
S1_COLUMNS = [
    ("network", "network", 9, str), ("batch", "batch", 5, str), ("method", "method", 55, str),
    ("images/s", "images/s", 9, _number(".2f")), ("fwd units", "units", 9, _number(".2f")),
    ("x zennit", "vs zennit", 8, _number(".2f")), ("diff vs zennit", "difference", 14, _number(".1e")),
    ("err vs f64", "f64 error", 10, _number(".1e")),
]
S2_COLUMNS = [
    ("network", "network", 9, str), ("layer", "layer", 12, str), ("method", "method", 60, str),
    ("heatmaps/s", "per second", 10, _number(".2f")), ("fwd units/heatmap", "units", 17, _number(".2f")),
    ("x anchor", "vs anchor", 8, _number(".2f")), ("diff vs anchor", "difference", 14, _number(".1e")),
]


def _table(rows: list[dict], columns: list[tuple[str, str, int, Callable[[object], str]]]) -> str:
    """A fixed-width text table: text columns left-aligned, numbers right-aligned."""

    def line(cells: list[str]) -> str:
        return " ".join(
            cell.ljust(width) if title in ("network", "layer", "method") else cell.rjust(width)
            for cell, (title, _, width, _) in zip(cells, columns)
        )

    header = line([title for title, *_ in columns])
    body = [line([fmt(row[key]) for _, key, _, fmt in columns]) for row in rows]
    return "\n".join([header, "-" * len(header), *body])


def format_table(rows: list[dict]) -> str:
    """The S1 table."""
    return _table(rows, S1_COLUMNS)


def format_conditional_table(rows: list[dict]) -> str:
    """The S2 table (the plain forward row's rate is images/s)."""
    return _table(rows, S2_COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true",
        help="S1: 2 timed repeats instead of 5, 1 float64 sample instead of 2; S2: 1 repeat instead of 3, no batched zennit row",
    )
    parser.add_argument("--protocols", nargs="+", choices=["S1", "S2"], default=["S1", "S2"])
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
        f"load average {load:.1f}, {platform.processor() or platform.machine()}; S1 {repeats} repeats, "
        f"S2 {args.repeats or (1 if args.quick else 3)}, median"
    )
    # float32 on CUDA means IEEE float32 (no TF32), for zennit as for spray.
    with ieee_float32() if args.device == "cuda" else contextlib.nullcontext():
        rows = []
        if "S1" in args.protocols:
            for name in args.networks:
                for batch in args.batches:
                    new = bench_network(name, batch, repeats, args.device, args.amp, min(f64_samples, batch))
                    rows += new
                    print(format_table(new), flush=True)
        conditional = []
        if "S2" in args.protocols:
            s2_repeats = args.repeats or (1 if args.quick else 3)
            for name in args.networks:
                new = bench_conditional(name, s2_repeats, args.device, batched_anchor=not args.quick)
                conditional += new
                print(format_conditional_table(new), flush=True)
    if rows:
        print("\nS1, heatmap plus concept vectors at three layers")
        print(format_table(rows))
    if conditional:
        print("\nS2, conditional heatmaps of the top-5 concepts of 16 samples")
        print(format_conditional_table(conditional))
    return 0


if __name__ == "__main__":
    sys.exit(main())
