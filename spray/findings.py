"""Findings: flags that name the same samples are one finding.

The same artifact is usually found in several analyses (heatmap and concept spaces, its
class and the dataset-wide run); a reviewer and a gate want it once, with the evidence of
where it showed. The causal test's resolution (:mod:`spray.confirm.resolve`), the
summary's flags, the concept atlas and the re-audit after a correction all group by the
same rule, so it lives below all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: Flags whose members overlap at least this much (Jaccard) are one finding.
SAME_FINDING_JACCARD = 0.5


def jaccard(first: list[int] | np.ndarray, second: list[int] | np.ndarray) -> float:
    """|A & B| / |A | B| of two sets of rows (0 when both are empty)."""
    a = np.unique(np.asarray(first, dtype=np.int64))
    b = np.unique(np.asarray(second, dtype=np.int64))
    union = np.union1d(a, b).size
    return np.intersect1d(a, b, assume_unique=True).size / union if union else 0.0


def group_findings(items: list[T], members: Callable[[T], Any]) -> list[tuple[T, list[tuple[T, float]]]]:
    """Group ``items`` (highest score first) into findings: each joins the first kept item
    whose ``members`` it overlaps by at least :data:`SAME_FINDING_JACCARD`, else it starts
    a finding of its own. Returns ``(primary, [(other, jaccard), ...])`` per finding.

    The same artifact is usually found in several analyses (heatmap and concept spaces,
    its class and the dataset-wide run); a reviewer and a gate want it once, with the
    evidence of where it showed. The summary's flags and the concept atlas both use it.
    """
    findings: list[tuple[T, list[tuple[T, float]]]] = []
    for item in items:
        for primary, others in findings:
            overlap_share = jaccard(members(item), members(primary))
            if overlap_share >= SAME_FINDING_JACCARD:
                others.append((item, overlap_share))
                break
        else:
            findings.append((item, []))
    return findings
