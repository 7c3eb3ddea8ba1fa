"""Q3 dev probe: does a cluster's *mean overlay* move other classes' images?

The causal test (``spray.confirm``) pastes regions of the members' own pixels, and since
the overlay setting also adds their mean overlay. An overlay written over the object (a
watermark, a texture) is held by no region whole. This probe measures the overlay on the
planted truth, apart from the clustering:

* **overlay**: the members' mean image minus the rest of the class's, where brighter,
  added to other classes' images (clipped to [0, 1]);
* **control**: the rest of the class's mean image minus the hosts', where brighter, scaled
  to the overlay's brightest pixel (``--match peak``, spray's ``overlay_control``) or to its
  total added ink (``--match ink``), and added the same way (the class's object, as strong).

``--reference hosts`` takes the overlay against the hosts' mean image instead of the rest
of the class's: in a backdoor the members are other classes' objects, and their mean minus
the class's loses the artifact wherever the class's own object is bright (a watermark over
a 0's ring); against the hosts (other classes' objects too) the objects cancel and the
artifact stays. ``--statistic median`` takes every group's per-pixel median image instead of
its mean (spray's ``[confirm] overlay_statistic``, :func:`spray.confirm.test.member_overlay`).
``--extra`` adds the dev split's extra watermark cases
(``bench/cases.py extra_dev_cases``).

For each relied-on dev watermark and texture, both sides of the planted split are measured
(the stamped images against the genuine ones, and the reverse); for each two-mode class,
both modes. A usable test moves hosts with the stamped side's overlay, not with the genuine
side's, and not with a legitimate mode's. Dev split only: it reads the truth, so it never
runs on a test draw.

    python3 bench/overlay_probe.py [--match ink]   # about 4 min here (the dev cases' models cached)
    python3 bench/overlay_probe.py --reference hosts --extra
    python3 bench/overlay_probe.py --reference hosts --match ink --extra --statistic median   # spray's default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cases import Case, build_case, extra_dev_cases, generate_cases  # noqa: E402
from bench.detection import select  # noqa: E402
from spray.attribution.settings import AttributionSettings  # noqa: E402
from spray.confirm.config import OVERLAY_STATISTICS  # noqa: E402
from spray.confirm.predictor import model_predictor  # noqa: E402
from spray.confirm.test import Predict, member_overlay  # noqa: E402

#: Kinds whose artifact is an overlay over the object, and the legitimate two-mode classes.
OVERLAY_KINDS = ("watermark", "texture")
MULTIMODAL = "multimodal"
#: As the causal test: members whose images are averaged, rest samples, hosts.
MEMBERS, REST, HOSTS = 24, 256, 192


def moved(predict: Predict, hosts: np.ndarray, before: np.ndarray, overlay: np.ndarray, target: int) -> float:
    """Share of the hosts not predicted as ``target`` that are after ``overlay`` is added."""
    after = predict(np.clip(hosts + overlay[None], 0.0, 1.0).astype(hosts.dtype)).argmax(axis=1) == target
    eligible = ~before
    return float((after & eligible).sum() / max(eligible.sum(), 1))


def probe_side(case: Case, predict: Predict, side: np.ndarray, other: np.ndarray, hosts: np.ndarray,
               before: np.ndarray, rng: np.random.Generator, match: str = "ink", reference: str = "rest",
               statistic: str = "mean") -> tuple[float, float]:
    """(overlay move rate, matched control move rate) of the images ``side`` against ``other``
    (the overlay against the hosts' mean instead with ``reference`` "hosts"; medians instead
    of means with ``statistic`` "median")."""
    target = case.target_label
    members = case.train_images[np.sort(rng.choice(side, min(MEMBERS, len(side)), replace=False))]
    rest = case.train_images[np.sort(rng.choice(other, min(REST, len(other)), replace=False))]
    overlay = member_overlay(members, hosts if reference == "hosts" else rest, statistic)
    control = member_overlay(rest, hosts, statistic)
    if match == "ink":
        control *= overlay.sum() / max(float(control.sum()), 1e-9)
    else:  # peak: the control's brightest pixel as bright as the overlay's
        control *= overlay.max() / max(float(control.max()), 1e-9)
    return moved(predict, hosts, before, overlay, target), moved(predict, hosts, before, control, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planted", type=int, default=42)
    parser.add_argument("--clean", type=int, default=24)
    parser.add_argument("--multimodal", type=int, default=12)
    parser.add_argument("--match", choices=("ink", "peak"), default="peak",
                        help="the control's scale: the overlay's total added ink, or its brightest pixel")
    parser.add_argument("--reference", choices=("rest", "hosts"), default="rest",
                        help="the overlay is the members' mean minus the rest of the class's (spray's), or minus the hosts'")
    parser.add_argument("--statistic", choices=OVERLAY_STATISTICS, default="mean",
                        help="each group's per-pixel mean image (the probe's first measurements) or median image (spray's default)")
    parser.add_argument("--extra", action="store_true", help="add the dev split's extra watermark cases")
    args = parser.parse_args()
    specs = select(generate_cases("dev", "full", 0), args.planted, args.clean, args.multimodal)
    if args.extra:
        specs += extra_dev_cases()
    print("| case | side A | n | overlay | control | side B | n | overlay | control |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        if spec.kind not in (*OVERLAY_KINDS, MULTIMODAL):
            continue
        case = build_case(spec)
        if spec.kind != MULTIMODAL and not case.relied:
            continue
        predict = model_predictor(case.model, AttributionSettings(device="cpu"), 128)
        rng = np.random.default_rng(spec.seed)
        own = np.flatnonzero(case.train_labels == case.target_label)
        in_a = case.modes[own] == 1 if spec.kind == MULTIMODAL else case.stamped[own]
        side_a, side_b = own[in_a], own[~in_a]
        host_rows = np.sort(rng.choice(np.flatnonzero(case.train_labels != case.target_label), HOSTS, replace=False))
        hosts = case.train_images[host_rows]
        before = predict(hosts).argmax(axis=1) == case.target_label
        a = probe_side(case, predict, side_a, side_b, hosts, before, rng, args.match, args.reference, args.statistic)
        b = probe_side(case, predict, side_b, side_a, hosts, before, rng, args.match, args.reference, args.statistic)
        names = ("mode 1", "mode 0") if spec.kind == MULTIMODAL else ("stamped", "genuine")
        print(f"| {spec.key()} | {names[0]} | {len(side_a)} | {a[0]:.2f} | {a[1]:.2f} | "
              f"{names[1]} | {len(side_b)} | {b[0]:.2f} | {b[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
