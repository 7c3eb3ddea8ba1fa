"""Concept reach: does a flag's shortcut also drive other classes?

A flag's distinguishing concepts (the concept atlas: channels of a concept layer whose
relevance sets the cluster apart) are looked up in the job's stored concept relevances
(``<job>/stages/attributions.h5``, ``concepts/<layer>``: one relevance per sample and
channel, see ``spray.store.attributions``), CRP's reverse search over the whole dataset:

* every sample's **reach score** is the sum of its relevance on those channels;
* the **bar** is the 25th percentile of the flag's members' scores (three members in four
  reach it);
* per class: how many samples reach the bar (the flagged class counted without the
  members), their share, the mean score, and the samples with the highest scores.

A class other than the flagged one with a high share uses the same concepts, possibly the
same shortcut. The stage file holds the job's newest audit only, so reach is computed for
that audit's rows; a flag of an older run is compared by sample id and the page says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The percentile of the members' scores that a sample must reach.
BAR_PERCENTILE = 25.0


@dataclass
class ClassReach:
    """How far the concepts reach into one class."""

    class_index: int
    class_name: str
    n_samples: int
    n_reaching: int
    share: float
    mean_score: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Reach:
    """The concept reach of one flag."""

    concepts: list[str]
    bar: float
    n_members_found: int
    classes: list[ClassReach]
    missing_layers: list[str] = field(default_factory=list)


def concept_channels(concepts: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """``{layer: [channel, ...]}`` of a flag's ``concepts`` entries."""
    channels: dict[str, list[int]] = {}
    for concept in concepts:
        channels.setdefault(str(concept["layer"]), []).append(int(concept["channel"]))
    return {layer: sorted(set(values)) for layer, values in channels.items()}


def reach_scores(attributions: Path, channels: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """``(scores, labels, sample ids, missing layers)`` from a stored ``attributions.h5``."""
    from spray.store.attributions import read_attributions

    with read_attributions(attributions) as stored:
        scores = np.zeros(len(stored.sample_ids), dtype=np.float64)
        missing = []
        for layer, wanted in channels.items():
            dataset = stored.concepts.get(layer)
            if dataset is None or max(wanted) >= dataset.shape[1]:
                missing.append(layer)
                continue
            scores += np.asarray(dataset[:, wanted], dtype=np.float64).sum(axis=1)
        return scores, np.asarray(stored.labels), list(stored.sample_ids), missing


def concept_reach(
    attributions: Path, concepts: Sequence[dict[str, Any]], member_ids: Sequence[str], class_index: int,
    class_names: Sequence[str], top: int = 8,
) -> Reach:
    """The reach of a flag's concepts into every class (see the module docstring)."""
    channels = concept_channels(concepts)
    scores, labels, ids, missing = reach_scores(attributions, channels)
    members = np.isin(np.asarray(ids, dtype=object), np.asarray(list(member_ids), dtype=object))
    bar = float(np.percentile(scores[members], BAR_PERCENTILE)) if members.any() else float("inf")
    classes = []
    for index in sorted(set(int(label) for label in labels if label >= 0)):
        rows = np.flatnonzero((labels == index) & ~(members if index == class_index else False))
        if rows.size == 0:
            continue
        values = scores[rows]
        order = rows[np.argsort(-values, kind="stable")[:top]]
        reaching = int(np.count_nonzero(values >= bar))
        classes.append(ClassReach(
            class_index=index, class_name=str(class_names[index]) if index < len(class_names) else str(index),
            n_samples=int(rows.size), n_reaching=reaching, share=reaching / rows.size, mean_score=float(values.mean()),
            top=[(ids[row], float(scores[row])) for row in order],
        ))
    classes.sort(key=lambda item: (-item.share, item.class_index))
    names = [f"{layer}:{channel}" for layer, values in channels.items() for channel in values]
    return Reach(names, bar, int(members.sum()), classes, missing)
