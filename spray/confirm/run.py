"""Test an audit's candidates causally and write the verdict into its analyses.

Every cluster that SpRAy proposed (``candidate``: its artifact score reached the
threshold) is tested by :mod:`spray.confirm.test`, highest score first, up to
``max_candidates`` per audit. A tested candidate is flagged only when the test confirms
it; a candidate left untested (the cap, ``enabled = false``, or too little data to test)
stays flagged with ``status: "untested"``, so an unchecked candidate never reads as clean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.confirm.config import ConfirmConfig
from spray.confirm.evidence import excess_masks, image_masks, matched_donors, rest_share
from spray.confirm.resolve import settle
from spray.confirm.test import Predict, decide, paste_pairs, paste_test, removal_test
from spray.store.rows import take_rows

log = logging.getLogger(__name__)

#: Rows of the rest of a class read to learn where it looks and its typical pixels.
REST_SAMPLE = 256
#: Before/after examples kept per tested candidate for the report.
EXAMPLES = 4

ReadImages = Callable[[np.ndarray], np.ndarray]


def untested(target: int, reason: str) -> dict[str, Any]:
    """The confirmation record of a candidate that was not tested."""
    return {"status": "untested", "reason": reason, "target_class": int(target)}


def candidate_target(analysis: ClassAnalysis, cluster: ClusterResult, labels: np.ndarray) -> int:
    """The class a candidate speaks for: its class, or in a dataset-wide analysis its members' commonest label."""
    if analysis.class_index >= 0:
        return int(analysis.class_index)
    values, counts = np.unique(labels[cluster.member_rows], return_counts=True)
    return int(values[np.argmax(counts)])


def _sample(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    return np.sort(rng.choice(rows, size=size, replace=False)) if len(rows) > size else np.sort(rows)


def _read(source: Any, rows: np.ndarray) -> np.ndarray:
    """``source[rows]`` as float arrays, each HDF5 chunk read once."""
    return np.asarray(take_rows(source, rows), dtype=np.float32)


def _heatmaps(heatmaps: Any, rows: np.ndarray) -> np.ndarray:
    maps = _read(heatmaps, rows)
    return maps.sum(axis=1) if maps.ndim == 4 else maps


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Display images (n, C, H, W) in [0, 1] as uint8 (n, H, W, C)."""
    return (np.clip(np.asarray(images), 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def outlined(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) images with the masks' pixels tinted red: where the evidence is."""
    rgb = to_uint8(images)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    tinted = rgb.astype(np.float32)
    tinted[masks] = 0.45 * tinted[masks] + 0.55 * np.array([255.0, 0.0, 0.0])
    return tinted.astype(np.uint8)


class CandidateTester:
    """Runs :mod:`spray.confirm.test` for candidates of one audit's data and model."""

    def __init__(
        self, heatmaps: Any, labels: np.ndarray, read_images: ReadImages, predict: Predict, config: ConfirmConfig
    ) -> None:
        self.heatmaps = heatmaps
        self.labels = np.asarray(labels, dtype=np.int64)
        self.read_images = read_images
        self.predict = predict
        self.config = config

    def test(self, cluster: ClusterResult, target: int, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The confirmation record and the example images of one candidate of class ``target``
        (:func:`candidate_target`)."""
        config = self.config
        rng = np.random.default_rng([config.random_state, seed])
        members = np.asarray(cluster.member_rows, dtype=np.int64)
        rest = np.setdiff1d(np.flatnonzero(self.labels == target), members)
        hosts_pool = np.flatnonzero(self.labels != target)
        if len(rest) == 0:
            return untested(target, "the cluster is its whole class: no rest of the class to compare with."), {}
        if len(hosts_pool) == 0:
            return untested(target, "the data hold no images of other classes to paste into."), {}
        member_rows = _sample(members, config.members, rng)
        rest_rows = _sample(rest, REST_SAMPLE, rng)
        host_rows = _sample(hosts_pool, config.members * config.hosts, rng)

        member_maps, rest_maps = _heatmaps(self.heatmaps, member_rows), _heatmaps(self.heatmaps, rest_rows)
        member_images, rest_images = self.read_images(member_rows), self.read_images(rest_rows)
        host_images = self.read_images(host_rows)
        small_masks = excess_masks(member_maps, rest_share(rest_maps), config.evidence_area, config.evidence_mass)
        member_masks = image_masks(small_masks, member_images.shape[-2:])
        # the control's donor for member i: a sample of the rest that looks where member i's evidence is
        control_images = rest_images[matched_donors(small_masks, rest_maps, rng)]
        pairs = paste_pairs(member_masks, len(host_images), config.hosts, rng)
        host_probs = self.predict(host_images)
        paste = paste_test(self.predict, member_images, member_masks, host_images, target, pairs, host_probs)
        control = paste_test(self.predict, control_images, member_masks, host_images, target, pairs, host_probs)
        fill = np.median(rest_images, axis=0)
        removal, removed, _ = removal_test(self.predict, member_images, member_masks, fill, target)
        status, reason = decide(paste.entry, control.entry, config.min_paste_rate, config.min_lift)
        record = {
            "status": status,
            "reason": reason,
            "target_class": target,
            "evidence_area": float(member_masks.reshape(len(member_masks), -1).mean()) if len(member_masks) else 0.0,
            "paste": paste.entry,
            "control": control.entry,
            "removal": removal,
        }
        return record, self._examples(member_images, member_masks, removed, host_images, paste)

    @staticmethod
    def _examples(members: np.ndarray, masks: np.ndarray, removed: np.ndarray, hosts: np.ndarray, paste: Any) -> dict[str, np.ndarray]:
        if len(paste.pairs) == 0:
            return {}
        # one pasted host per shown member: the first pair of each of the first donors
        _, first = np.unique(paste.pairs[:, 0], return_index=True)
        first = first[:EXAMPLES]
        donors = paste.pairs[first, 0]
        return {
            "member": to_uint8(members[donors]),
            "evidence": outlined(members[donors], masks[donors]),
            "removed": to_uint8(removed[donors]),
            "host": to_uint8(hosts[paste.pairs[first, 1]]),
            "pasted": to_uint8(paste.images[first]),
        }


def confirm_analyses(
    analyses: Sequence[ClassAnalysis],
    heatmaps: Any,
    labels: np.ndarray,
    read_images: ReadImages,
    predict: Predict,
    config: ConfirmConfig,
    settle_candidates: bool = True,
) -> dict[str, int]:
    """Test every candidate of ``analyses`` and set each one's ``flagged``, ``confirmation``, ``examples``.

    Args:
        analyses: the audit's analyses (changed in place).
        heatmaps: (N, h, w) relevance maps over every attribution row (array or h5py).
        labels: (N,) class index per row (the grouping the analyses used).
        read_images: display images (n, C, H, W) in [0, 1] for ascending rows.
        predict: class probabilities for display images.
        config: the test's settings.
        settle_candidates: settle the confirmed candidates (an audit always does; a
            benchmark that applies its own rules to the raw test numbers does not).

    After every test, the confirmed candidates of each class are settled against each other
    (:func:`spray.confirm.resolve.settle`): the weaker side of a class's split is outranked
    (rejected), and clusters of one analysis carrying the same shortcut are joined into one.

    Returns:
        Counts: ``candidates``, ``confirmed`` (after settling), ``rejected`` (outranked
        included), ``untested``, ``outranked`` and ``joined``.
    """
    candidates = sorted(
        ((a, c) for a in analyses for c in a.clusters if c.candidate),
        key=lambda item: (-item[1].artifact_score, item[0].class_index, item[0].space, item[1].cluster_id),
    )
    tester = CandidateTester(heatmaps, labels, read_images, predict, config)
    counts = {"candidates": len(candidates), "confirmed": 0, "rejected": 0, "untested": 0}
    tested: list[tuple[ClassAnalysis, ClusterResult, int]] = []
    for rank, (analysis, cluster) in enumerate(candidates):
        target = candidate_target(analysis, cluster, tester.labels)
        if not config.enabled:
            record, examples = untested(target, "the causal test is switched off ([confirm] enabled = false)."), {}
        elif rank >= config.max_candidates:
            record, examples = untested(
                target, f"only the {config.max_candidates} highest-scoring candidates are tested ([confirm] max_candidates)."
            ), {}
        else:
            record, examples = tester.test(cluster, target, rank)
        cluster.confirmation, cluster.examples = record, examples
        cluster.flagged = record["status"] != "rejected"
        counts[record["status"]] += 1
        tested.append((analysis, cluster, target))
        log.info(
            "candidate class %s %s cluster %d (score %.2f): %s", analysis.class_index, analysis.space,
            cluster.cluster_id, cluster.artifact_score, record["reason"],
        )
    settled = settle(tested, config.dominance) if settle_candidates else {"outranked": 0, "joined": 0}
    counts["confirmed"] -= settled["outranked"] + settled["joined"]
    counts["rejected"] += settled["outranked"]
    return {**counts, **settled}
