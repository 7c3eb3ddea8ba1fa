"""Q3 correction, dev only: would another rule for choosing among the search's candidates
reach the goal more often?

Reads the JSON lines that ``bench/correction_q3.py --split dev --probe FILE`` writes (every
candidate of every case, with its validation numbers and its numbers on the case's test
images) and prints, per rule, how many cases the chosen candidate takes to the goal (at
least 0.8 of the attacked-accuracy loss recovered, at most 0.5 pt of clean accuracy lost)
on the test images, with the finding's evidence as the attack and with the true stamp. The
first row is spray's own rule (:func:`spray.correction.search.choose`); the last, the best
candidate in hindsight (a ceiling no rule can pass).

The rules tried:

* **margin k**: a candidate keeps the clean-accuracy bound only if its validation clean
  change minus ``k`` standard errors does (the paired standard error of the change, from
  the validation images that turned right or wrong);
* **enough d**: among the candidates that keep the bound, those within ``d`` of the most
  recovered; of them, the one that loses least clean accuracy.

Usage::

    python3 bench/correction_q3.py --split dev --methods cf --attack evidence --probe /tmp/dev.jsonl
    python3 bench/correction_rules.py /tmp/dev.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spray.correction.outcome import ROUNDING  # noqa: E402
from spray.correction.search import Candidate, choose  # noqa: E402

GOAL_RECOVERED, MAX_CLEAN_LOSS = 0.8, 0.005
Rule = Callable[[list[dict]], dict]


def standard_error(candidate: dict) -> float:
    """Paired standard error of the validation clean change (McNemar's discordant pairs)."""
    n, wrong, right = candidate["n_validation"], candidate["val_turned_wrong"], candidate["val_turned_right"]
    return math.sqrt(max(wrong + right - (right - wrong) ** 2 / n, 0.0)) / n


def recovered(candidate: dict) -> float:
    return -math.inf if candidate["recovered"] is None else candidate["recovered"]


def keeps(candidate: dict, k: float) -> bool:
    return candidate["clean_change"] - k * standard_error(candidate) >= -MAX_CLEAN_LOSS - ROUNDING


def spray_rule(candidates: list[dict]) -> dict:
    fields = {field.name for field in dataclasses.fields(Candidate)}
    chosen = choose([Candidate(**{key: value for key, value in item.items() if key in fields}) for item in candidates], MAX_CLEAN_LOSS)
    return next(item for item in candidates if dataclasses.asdict(chosen) == {key: item[key] for key in fields})


def margin_rule(k: float) -> Rule:
    def rule(candidates: list[dict]) -> dict:
        return max(candidates, key=lambda item: (1.0, recovered(item)) if keeps(item, k) else (0.0, item["clean_change"]))

    return rule


def enough_rule(d: float) -> Rule:
    def rule(candidates: list[dict]) -> dict:
        kept = [item for item in candidates if keeps(item, 0.0)]
        if not kept:
            return max(candidates, key=lambda item: item["clean_change"])
        best = max(recovered(item) for item in kept)
        return max((item for item in kept if recovered(item) >= best - d), key=lambda item: item["clean_change"])

    return rule


def reaches(candidate: dict, field: str) -> bool:
    value = candidate[field]
    clean_ok = candidate["test_clean_change"] >= -MAX_CLEAN_LOSS - ROUNDING
    return value is not None and not math.isnan(value) and value >= GOAL_RECOVERED and clean_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", type=Path, help="the JSON lines of bench/correction_q3.py --probe")
    args = parser.parse_args()
    cases = [json.loads(line) for line in args.probe.read_text().splitlines() if line.strip()]
    cases = [case for case in cases if case["candidates"]]
    rules: dict[str, Rule] = {"spray's rule (most recovered within 0.5 pt)": spray_rule}
    rules |= {f"margin k={k:g}": margin_rule(k) for k in (0.5, 1.0, 2.0)}
    rules |= {f"enough d={d:g}": enough_rule(d) for d in (0.05, 0.1, 0.2)}
    print(f"{len(cases)} dev cases with a correction searched")
    print("| rule | goal, evidence attack | goal, true stamp | chosen losing > 0.5 pt on test |")
    print("|---|---|---|---|")
    for name, rule in rules.items():
        chosen = [rule(case["candidates"]) for case in cases]
        print(f"| {name} | {sum(reaches(item, 'test_recovered') for item in chosen)} | "
              f"{sum(reaches(item, 'test_true_recovered') for item in chosen)} | "
              f"{sum(item['test_clean_change'] < -MAX_CLEAN_LOSS - ROUNDING for item in chosen)} |")
    hindsight = [any(reaches(item, field) for item in case["candidates"]) for field in ("test_recovered", "test_true_recovered") for case in cases]
    print(f"| any candidate (hindsight) | {sum(hindsight[:len(cases)])} | {sum(hindsight[len(cases):])} | - |")


if __name__ == "__main__":
    main()
