"""Test an audit's candidates causally and write the verdict into its analyses.

Every cluster that SpRAy proposed (``candidate``: its artifact score reached the
threshold) is tested by :mod:`spray.confirm.test`, highest score first, up to
``max_candidates`` per audit. A tested candidate is flagged only when the test confirms
it; a candidate left untested (the cap, ``enabled = false``, or too little data to test)
stays flagged with ``status: "untested"``, so an unchecked candidate never reads as clean.

The score only proposes. After the candidates, up to ``max_low_score`` clusters scoring
under the threshold are tested as well, and flagged when they confirm with the larger lift
``low_score_min_lift`` (``concept_low_score_min_lift`` in a concept space; their record says
``"low_score": true``): a shortcut that the
clustering splits by position into small clusters scores low, yet each part's evidence
moves other classes' images as strongly as a whole one's. One that does not confirm stays
unflagged and keeps no record (it was never proposed). One beyond the cap (or with
``enabled = false``) keeps an ``"untested"`` record with ``"low_score": true`` and stays
unflagged: ``summary.json`` counts them (``untested_low_score``) and the verdict is then
``incomplete`` unless ``[check] allow_untested_low_score`` accepts it (``spray.verdict``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spray.analysis.artifacts import comparable
from spray.analysis.config import space_layer
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.confirm.config import ConfirmConfig, EvidenceSetting
from spray.confirm.evidence import excess_masks, image_masks, matched_donors, rest_share
from spray.confirm.resolve import lift_of, settle
from spray.confirm.test import Predict, decide, member_overlay, overlay_test, overlay_wording, paste_pairs, paste_test, removal_outcome, removal_test
from spray.store.rows import take_rows

log = logging.getLogger(__name__)

#: Rows of the rest of a class read to learn where it looks and its typical pixels.
REST_SAMPLE = 256
#: Before/after examples kept per tested candidate for the report.
EXAMPLES = 4
#: The overlay setting's evidence as outlined in the report: where the members' mean
#: difference reaches this share of its largest value.
OVERLAY_SHOWN = 0.5
#: Version of the records :func:`confirm_analyses` leaves on the clusters (and of which
#: clusters it tests); part of the audit's analysis-cache key, so analyses cached with older
#: records are recomputed. 3: a cluster whose rest is fewer than ``min_size`` outliers scores
#: 0 and is never tested.
RECORDS_VERSION = 3

ReadImages = Callable[[np.ndarray], np.ndarray]


def untested(target: int, reason: str) -> dict[str, Any]:
    """The confirmation record of a candidate that was not tested."""
    return {"status": "untested", "reason": reason, "target_class": int(target)}


def _low_score_skip(config: ConfirmConfig) -> str:
    """Why a cluster scoring under the threshold was not tested."""
    if not config.enabled:
        return "scored under the threshold; the causal test is switched off ([confirm] enabled = false)."
    return (
        f"scored under the threshold and was not tested: only the {config.max_low_score} highest-scoring "
        "such clusters are tested ([confirm] max_low_score)."
    )


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


@dataclass
class _Sample:
    """What one candidate's test reads once and every evidence setting reuses."""

    member_maps: np.ndarray
    rest_maps: np.ndarray
    member_images: np.ndarray
    rest_images: np.ndarray
    host_images: np.ndarray
    host_probs: np.ndarray
    member_probs: np.ndarray


def _setting_entry(record: dict[str, Any]) -> dict[str, Any]:
    """What the record keeps of one evidence setting's measurement."""
    return {key: record[key] for key in ("evidence", "status", "evidence_area", "paste", "control", "removal")}


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

    def test(
        self, cluster: ClusterResult, target: int, seed: int, low_score: bool = False, concept: bool = False
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The confirmation record and the example images of one candidate of class ``target``
        (:func:`candidate_target`), at each evidence setting (:meth:`ConfirmConfig.evidence_settings`;
        ``low_score``: a cluster scoring under the threshold, judged with the larger lifts, those
        of a ``concept`` space's cluster or not).

        Each setting is measured on the same sampled members, rest and hosts (the draws
        restart from the candidate's seed), and the record keeps the one whose evidence
        lifts most over its control among those that confirm (else the one that lifts most):
        a corner tag pastes best as a small region, a texture over the whole background only
        as a large one. Every setting's numbers stay in the record's ``settings``. A
        candidate holding most of its class is judged with ``majority_min_lift`` at least
        (its record says ``"majority": true``)."""
        return self.test_members(np.asarray(cluster.member_rows, dtype=np.int64), target, seed, low_score, concept)

    def test_members(
        self, members: np.ndarray, target: int, seed: int, low_score: bool = False, concept: bool = False
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """:meth:`test` for the rows ``members`` of class ``target``, whatever cluster they
        came from (a re-audit tests a finding's members again on a corrected model)."""
        config = self.config
        members = np.asarray(members, dtype=np.int64)
        rest = np.setdiff1d(np.flatnonzero(self.labels == target), members)
        hosts_pool = np.flatnonzero(self.labels != target)
        if len(rest) == 0:
            return untested(target, "the cluster is its whole class: no rest of the class to compare with."), {}
        if len(hosts_pool) == 0:
            return untested(target, "the data hold no images of other classes to paste into."), {}
        measured = []
        sample: _Sample | None = None
        majority = len(members) > len(rest) and config.majority_min_lift > 0
        for setting in config.evidence_settings(low_score, majority, concept):
            rng = np.random.default_rng([config.random_state, seed])
            if sample is None:
                sample = self._sample(members, rest, hosts_pool, rng)
            else:  # the same rows again, so that every setting's later draws are the same
                self._sample_rows(members, rest, hosts_pool, rng)
            measured.append(self._measure(sample, target, setting, rng))
        record, examples = max(measured, key=lambda entry: (entry[0]["status"] == "confirmed", lift_of(entry[0])))
        if len(measured) > 1:
            record = {**record, "settings": [_setting_entry(entry) for entry, _ in measured]}
        if majority:
            record = {
                **record, "majority": True,
                "reason": f"holds {len(members)} of its class's {len(members) + len(rest)} samples, tested with a lift of at "
                          f"least {config.majority_min_lift:.0%}: {record['reason']}",
            }
        if low_score:
            record = {
                **record, "low_score": True,
                "reason": f"scored under the threshold{' in a concept space' if concept else ''}, tested with a lift of at least "
                          f"{config.low_score_lift(concept):.0%}: {record['reason']}",
            }
        return record, examples

    def _sample_rows(
        self, members: np.ndarray, rest: np.ndarray, hosts_pool: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        config = self.config
        return (
            _sample(members, config.members, rng),
            _sample(rest, REST_SAMPLE, rng),
            _sample(hosts_pool, config.members * config.hosts, rng),
        )

    def _sample(self, members: np.ndarray, rest: np.ndarray, hosts_pool: np.ndarray, rng: np.random.Generator) -> _Sample:
        member_rows, rest_rows, host_rows = self._sample_rows(members, rest, hosts_pool, rng)
        member_images, host_images = self.read_images(member_rows), self.read_images(host_rows)
        return _Sample(
            member_maps=_heatmaps(self.heatmaps, member_rows),
            rest_maps=_heatmaps(self.heatmaps, rest_rows),
            member_images=member_images,
            rest_images=self.read_images(rest_rows),
            host_images=host_images,
            host_probs=self.predict(host_images),
            member_probs=self.predict(member_images),
        )

    def _measure(
        self, sample: _Sample, target: int, setting: EvidenceSetting, rng: np.random.Generator
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Paste, control and removal with the evidence of one setting, judged with that
        setting's ``min_lift``."""
        config = self.config
        if setting.overlay:
            return self._measure_overlay(sample, target, setting)
        small_masks = excess_masks(sample.member_maps, rest_share(sample.rest_maps), setting.area, setting.mass)
        member_masks = image_masks(small_masks, sample.member_images.shape[-2:])
        # the control's donor for member i: a sample of the rest that looks where member i's evidence is
        control_images = sample.rest_images[matched_donors(small_masks, sample.rest_maps, rng)]
        pairs = paste_pairs(member_masks, len(sample.host_images), config.hosts, rng)
        paste = paste_test(self.predict, sample.member_images, member_masks, sample.host_images, target, pairs, sample.host_probs)
        control = paste_test(self.predict, control_images, member_masks, sample.host_images, target, pairs, sample.host_probs)
        fill = np.median(sample.rest_images, axis=0)
        removal, removed, _ = removal_test(self.predict, sample.member_images, member_masks, fill, target, sample.member_probs)
        status, reason = decide(paste.entry, control.entry, config.min_paste_rate, setting.min_lift)
        record = {
            "status": status,
            "reason": reason,
            "target_class": target,
            "evidence": setting.entry(),
            "evidence_area": float(member_masks.reshape(len(member_masks), -1).mean()) if len(member_masks) else 0.0,
            "paste": paste.entry,
            "control": control.entry,
            "removal": removal,
        }
        return record, self._examples(sample.member_images, member_masks, removed, sample.host_images, paste)

    def _measure_overlay(
        self, sample: _Sample, target: int, setting: EvidenceSetting
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The overlay settings: what the members add on average to the images of the
        setting's reference (the rest of their class, or the hosts), where it is brighter, is
        added to the hosts; the control adds what the rest of the class adds to the hosts'
        own images (the rest's mean minus the hosts', where brighter: the class's object, on
        average), scaled to the same brightest pixel (or total ink: ``overlay_control``;
        always total ink against the hosts, whose overlay carries the members' objects as
        well). An overlay written over the object (a watermark, a texture) moves predictions
        this way where no pasted region holds it whole; a class-shaped one (the object drawn
        another way) moves them no more than the class's own object does. Every image group
        is summed up by the setting's statistic (``[confirm] overlay_statistic``)."""
        config = self.config
        against_hosts = setting.reference == "hosts"
        statistic = setting.statistic
        overlay = member_overlay(sample.member_images, sample.host_images if against_hosts else sample.rest_images, statistic)
        # the control: what the rest of the class adds to the hosts (its object, on average),
        # as bright at its brightest pixel as the overlay, or with as much ink in all
        class_overlay = member_overlay(sample.rest_images, sample.host_images, statistic)
        scale = "ink" if against_hosts else config.overlay_control
        measure = np.max if scale == "peak" else np.sum
        class_overlay *= float(measure(overlay)) / max(float(measure(class_overlay)), 1e-9)
        paste = overlay_test(self.predict, overlay, sample.host_images, target, sample.host_probs)
        control = overlay_test(self.predict, class_overlay, sample.host_images, target, sample.host_probs)
        removed = np.clip(sample.member_images - overlay[None], 0.0, 1.0).astype(sample.member_images.dtype)
        removal, _, _ = removal_outcome(self.predict, sample.member_images, removed, target, sample.member_probs)
        status, reason = decide(
            paste.entry, control.entry, config.min_paste_rate, setting.min_lift, overlay_wording(scale, setting.reference, statistic)
        )
        strongest = overlay.max(axis=0)
        mask = strongest >= OVERLAY_SHOWN * strongest.max() if strongest.max() > 0 else np.zeros_like(strongest, dtype=bool)
        record = {
            "status": status,
            "reason": reason,
            "target_class": target,
            "evidence": setting.entry(),
            "evidence_area": float(mask.mean()),
            "paste": paste.entry,
            "control": control.entry,
            "removal": removal,
        }
        shown = slice(0, min(EXAMPLES, len(sample.member_images)))
        members = sample.member_images[shown]
        examples = {
            "member": to_uint8(members),
            "evidence": outlined(members, np.repeat(mask[None], len(members), axis=0)),
            "removed": to_uint8(removed[shown]),
            "host": to_uint8(sample.host_images[: len(members)]),
            "pasted": to_uint8(paste.images[: len(members)]),
        }
        return record, examples

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


def _by_score(item: tuple[ClassAnalysis, ClusterResult]) -> tuple:
    """Highest score first, then a fixed order (class, space, cluster id)."""
    analysis, cluster = item
    return (-cluster.artifact_score, analysis.class_index, analysis.space, cluster.cluster_id)


def confirm_analyses(
    analyses: Sequence[ClassAnalysis],
    heatmaps: Any,
    labels: np.ndarray,
    read_images: ReadImages,
    predict: Predict,
    config: ConfirmConfig,
    settle_candidates: bool = True,
    min_size: int = 1,
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
        min_size: clusters scoring under the threshold are tested only from this size, and
            only when the rest of their analysis is as large (the analysis's
            ``min_cluster_size``: a smaller side is outliers, not a strategy to compare with).

    After every test, the confirmed candidates of each class are settled against each other
    (:func:`spray.confirm.resolve.settle`): the weaker side of a class's split is outranked
    (rejected), and clusters of one analysis carrying the same shortcut are joined into one.

    Returns:
        Counts: ``candidates``, ``confirmed`` (after settling), ``rejected`` (outranked
        included), ``untested``, ``outranked`` and ``joined``; of the clusters scoring under
        the threshold, ``low_score_tested``, ``low_score_flagged`` (after settling) and
        ``low_score_untested`` (beyond ``max_low_score``).
    """
    candidates = sorted(((a, c) for a in analyses for c in a.clusters if c.candidate), key=_by_score)
    low_scores = sorted(
        (
            (a, c) for a in analyses for c in a.clusters
            if a.n_clusters > 1 and not c.candidate and comparable(c.size, len(a.rows), min_size)
        ),
        key=_by_score,
    )
    tester = CandidateTester(heatmaps, labels, read_images, predict, config)
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
        tested.append((analysis, cluster, target))
        log.info(
            "candidate class %s %s cluster %d (score %.2f): %s", analysis.class_index, analysis.space,
            cluster.cluster_id, cluster.artifact_score, record["reason"],
        )
    low_tested = low_scores[: config.max_low_score] if config.enabled else []
    for analysis, cluster in low_scores[len(low_tested):]:
        cluster.confirmation = {**untested(candidate_target(analysis, cluster, tester.labels), _low_score_skip(config)), "low_score": True}
    for rank, (analysis, cluster) in enumerate(low_tested, start=len(candidates)):
        target = candidate_target(analysis, cluster, tester.labels)
        record, examples = tester.test(cluster, target, rank, low_score=True, concept=space_layer(analysis.space) is not None)
        if record["status"] == "confirmed":
            cluster.confirmation, cluster.examples, cluster.flagged = record, examples, True
            tested.append((analysis, cluster, target))
            log.info(
                "low-scoring class %s %s cluster %d (score %.2f): %s", analysis.class_index, analysis.space,
                cluster.cluster_id, cluster.artifact_score, record["reason"],
            )
    settled = settle(tested, config.dominance, config.wide_dominance) if settle_candidates else {"outranked": 0, "joined": 0}
    present = {id(cluster) for analysis in analyses for cluster in analysis.clusters}  # joined ones left
    counts = {"candidates": len(candidates), "confirmed": 0, "rejected": 0, "untested": 0}
    for _, cluster in candidates:
        if id(cluster) in present:
            counts[(cluster.confirmation or {})["status"]] += 1
    counts.update(
        low_score_tested=len(low_tested),
        low_score_flagged=sum(id(cluster) in present and cluster.flagged for _, cluster in low_tested),
        low_score_untested=len(low_scores) - len(low_tested),
    )
    return {**counts, **settled}
