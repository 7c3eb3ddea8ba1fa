"""Where the fast LRP engine spends its time: a per-operator profile of one S1 batch.

Builds the S1 setting of ``bench/attribution.py`` (torchvision network, random weights,
``num_classes=10``, 3×224×224 inputs, the architecture's default composite, canonizers and
three concept layers), runs spray's explainer once to warm up, then once under
``torch.profiler`` and prints the operators by their own CPU time, beside the time of a
plain forward pass measured in the same run (the forward unit).

    python3 bench/attribution_profile.py --network vgg16 --batch 8
    python3 bench/attribution_profile.py --network resnet18 --batch 16 --rows 15
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

from spray.attribution.architectures import attribution_defaults
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="vgg16", choices=["resnet18", "vgg16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12, help="operators listed")
    parser.add_argument("--forward", default="zennit", choices=["zennit", "fast"], help="the engine's forward mode")
    args = parser.parse_args(argv)
    print("$ python3 bench/attribution_profile.py " + shlex.join(sys.argv[1:] if argv is None else argv))

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.network)(num_classes=10).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(args.batch) % 10
    defaults = attribution_defaults(model)
    settings = AttributionSettings(
        composite=defaults.composite, canonizers=tuple(defaults.canonizers), layers=tuple(defaults.layers), device="cpu"
    )
    explainer = make_explainer(model, settings, forward=args.forward)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    forward()
    explainer.explain(x, targets)
    start = time.perf_counter()
    forward()
    unit = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        explainer.explain(x, targets)
        total = time.perf_counter() - start

    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
    print(
        f"{args.network}, batch {args.batch}, {explainer.engine} engine, forward={args.forward!r}, "
        f"{torch.get_num_threads()} threads: plain forward {unit * 1e3:.0f} ms; explain {total * 1e3:.0f} ms "
        f"under the profiler ({total / unit:.2f} forward units)"
    )
    print(f"{'operator':<45} {'calls':>6} {'self ms':>9} {'share':>7}")
    profiled = sum(e.self_cpu_time_total for e in prof.key_averages())
    for event in events:
        share = event.self_cpu_time_total / profiled if profiled else 0.0
        print(f"{event.key:<45} {event.count:>6} {event.self_cpu_time_total / 1e3:>9.1f} {share:>7.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
