"""Are two audits of the same job the same? Compares two audit folders (each holding
``summary.json`` and ``stages/``): the summaries with their timestamps left out, and every
array of ``attributions.h5`` and ``analysis.h5``. With ``--correction METHOD`` it also
compares ``correction/METHOD/report.json`` (times left out).

Used to show that a restructuring changes no result:

    cp -r reports/demo /tmp/before       # audit (and correct) on the old code first
    python3 bench/same_audit.py /tmp/before reports/demo --correction r-clarc

Prints one line per compared item and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

#: Keys whose values are clocks, not results.
VOLATILE = {"created", "time_s", "seconds", "timings", "elapsed"}


def _strip(value: Any) -> Any:
    """``value`` with every volatile key removed, at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by name."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return found


def compare_json(before: Path, after: Path) -> list[str]:
    """Differences between two JSON files, volatile keys left out (empty: the same)."""
    a, b = _strip(json.loads(before.read_text())), _strip(json.loads(after.read_text()))
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"key {key!r} differs" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return ["contents differ"]


def compare_h5(before: Path, after: Path) -> list[str]:
    """Differences between the datasets of two HDF5 files (empty: every array equal)."""
    a, b = _arrays(before), _arrays(after)
    problems = [f"dataset {name!r} only in one file" for name in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            problems.append(f"dataset {name!r} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="audit folder of the earlier run")
    parser.add_argument("after", type=Path, help="audit folder of the later run")
    parser.add_argument("--correction", default=None, help="also compare correction/<METHOD>/report.json")
    args = parser.parse_args(argv)
    checks = [
        ("summary.json", compare_json, "summary.json"),
        ("attributions.h5", compare_h5, "stages/attributions.h5"),
        ("analysis.h5", compare_h5, "stages/analysis.h5"),
    ]
    if args.correction:
        checks.append((f"correction {args.correction}", compare_json, f"correction/{args.correction}/report.json"))
    failed = False
    for label, compare, relative in checks:
        problems = compare(args.before / relative, args.after / relative)
        failed |= bool(problems)
        print(f"{label:28s} {'same' if not problems else 'DIFFERS: ' + '; '.join(problems)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
