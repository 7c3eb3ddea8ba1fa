"""Do a flag's members stay in the counterfactual fine-tuning? The decision, case by case.

Counterfactual fine-tuning (:mod:`spray.correction.counterfactual`) keeps the top finding's
members under their label when they are the class's own objects (a co-occurrence) and leaves
them out, relabelled, when they are other classes' objects under the flagged label (a
backdoor). It decides with no ground truth, from three removals of the members' evidence:
filled with the class's median image, the whole image blurred, the members' mean overlay
subtracted (the last two against the same removal on the rest of the class). Q3's cases know
the truth (the regime and which rows were stamped), so this prints each removal's shares, the decision with and without
the overlay's subtraction, and whether it matches: a watermark backdoor whose members keep
the class when masked and blurred is trained under the flagged label again (draw 9, docs/correction.md).

No fine-tuning runs: a dev split takes a few minutes once its cases and audits are cached
(``bench/detection.py --split dev``). ``--extra`` adds dev-split cases of the kind the
grid's dev draw lacks (watermark backdoors on 30-60 % of a class and co-occurrences on
60-90 %, every architecture, seeds 10-11: dev targets, variant 0).

    python3 bench/member_decision.py --split dev --extra
    python3 bench/member_decision.py --split test --draw 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cases import CaseSpec, build_case, extra_dev_cases, generate_cases  # noqa: E402
from bench.correction_q3 import cf_evidence, top_finding  # noqa: E402
from bench.detection import explain, select  # noqa: E402

def decide(spec: CaseSpec) -> dict | None:
    """The removals and the decisions for one relied-on case with a finding (None otherwise)."""
    from spray.correction import counterfactual

    case = build_case(spec)
    if not case.relied:
        return None
    finding = top_finding(spec)
    if finding is None:
        return {"spec": spec, "finding": False}
    members = np.asarray(sorted(finding["members"]), dtype=np.int64)
    class_id = int(finding["class"])
    evidence = cf_evidence(case, members, class_id, explain(case)[0], np.zeros(0, dtype=np.int64))
    rest = np.setdiff1d(np.flatnonzero(case.train_labels == class_id), members)
    rng = np.random.default_rng([spec.seed, 23])
    rest = np.sort(rng.choice(rest, size=min(counterfactual.MAX_REST, len(rest)), replace=False))
    rest_images = case.train_images[rest]
    removal = counterfactual.member_removal(case.model, evidence, np.median(rest_images, axis=0), class_id, rest_images=rest_images)
    without_overlay = removal.members_stay(overlay_control=0.0)
    stamped = float(np.isin(members, np.flatnonzero(case.stamped)).mean()) if len(members) else float("nan")
    return {
        "spec": spec, "finding": True, "in_target": class_id == case.target_label, "members": len(members), "stamped": stamped,
        "rates": removal.rates(), "old": without_overlay, "new": removal.members_stay(),
        # the members are other classes' objects when they are a backdoor's stamped rows; a
        # finding of a class's unstamped side (or a co-occurrence's stamped one) holds its own objects
        "truth": not (spec.regime == "backdoor" and stamped >= 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--draw", type=int, default=0, help="test only: the draw of the test split")
    parser.add_argument("--extra", action="store_true", help="dev only: add the extra watermark cases")
    parser.add_argument("--only-extra", action="store_true", help="dev only: the extra watermark cases alone")
    args = parser.parse_args()
    if (args.extra or args.only_extra) and args.split != "dev":
        parser.error("--extra adds dev-split cases.")
    torch.set_num_threads(1)
    specs = [] if args.only_extra else select(generate_cases(args.split, "full", args.draw), 30, 0, 0)
    if args.extra or args.only_extra:
        specs += extra_dev_cases()
    print("| case | regime | members (stamped) | filled | blurred / rest | overlay off / rest | stay without overlay | stay | right |")
    print("|---|---|---|---|---|---|---|---|---|")
    tally = {"old": [0, 0], "new": [0, 0]}
    for spec in specs:
        row = decide(spec)
        if row is None:
            continue
        name = f"{spec.dataset}-{spec.arch}-{spec.kind}-f{round(spec.fraction * 100)}-t{spec.target}-s{spec.seed}"
        if not row["finding"]:
            print(f"| {name} | {spec.regime} | nothing flagged | | | | | | |", flush=True)
            continue
        rates = row["rates"]
        for key in tally:
            tally[key][0] += row[key] == row["truth"]
            tally[key][1] += 1
        print(
            f"| {name} | {spec.regime} | {row['members']} ({row['stamped']:.2f}){'' if row['in_target'] else ' other class'} | "
            f"{rates['member_survival']:.2f} | {rates['blurred_survival']:.2f} / {rates['blurred_control']:.2f} | "
            f"{rates['unoverlaid_survival']:.2f} / {rates['unoverlaid_control']:.2f} | {'yes' if row['old'] else 'no'} | "
            f"{'yes' if row['new'] else 'no'} | {'yes' if row['new'] == row['truth'] else 'NO'} |",
            flush=True,
        )
    for key, (right, total) in tally.items():
        label = "with the overlay's subtraction" if key == "new" else "without it"
        print(f"\nright decisions {label}: {right}/{total} (a backdoor's stamped members leave, any other stay)")


if __name__ == "__main__":
    main()
