"""One correction from start to end: CAV from artifact rows, P-/R-/RR-ClArC, before/after evaluation, export.

:func:`correct_model` works on any model and data in memory. A job's data come to it as an
:class:`EvaluationPlan` (see :func:`spray.correction.job.correct_job`, which opens the data and
model of a job spec exactly as the audit does); :func:`job_config` gives a job's
``[correct]`` parameters and :func:`flag_entry` the audit's flag to correct.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spray.attribution.settings import AttributionSettings
from spray.correction.cav import CAV, fit_cav, layer_activations
from spray.correction.config import CorrectionConfig
from spray.correction.clarc import (
    CorrectionError,
    Gate,
    RRHistory,
    calibrate_threshold,
    p_clarc,
    r_clarc,
    rr_clarc,
)
from spray.correction.counterfactual import Evidence, FineTuneHistory, counterfactual_finetune
from spray.correction.evaluate import EvaluationResult, Stamp, evaluate, format_table, recovered_share
from spray.correction.export import ExportPaths, export_corrected
from spray.correction.images import RowImages
from spray.correction.outcome import Outcome, judge
from spray.correction.page import write_correction_files

log = logging.getLogger(__name__)


def job_config(spec: Any, **overrides: Any) -> CorrectionConfig:
    """The correction parameters of job ``spec`` (a :class:`spray.jobs.JobSpec`).

    Its ``[correct]`` keys, replaced by the ``overrides`` that are not None (the flags of
    ``spray correct``), over the defaults of :class:`CorrectionConfig`; the seed is the job's.
    """
    chosen = {key: value for key, value in overrides.items() if value is not None}
    return replace(spec.correct, seed=spec.job.seed, **chosen)


@dataclass
class CorrectionReport:
    """The outcome of one correction: the CAV, before/after rows, recovered share, timings, files
    and, after a job's re-audit, its outcome (``reaudit``, see :mod:`spray.correction.reaudit`).

    ``evaluation_set`` says how a job's evaluation data were made (held-out split, attacked
    set, artifact mask; see :mod:`spray.correction.user`); None when the data brought their
    own test split (the demo's planted artifact).
    """

    method: str
    config: CorrectionConfig
    cav: CAV
    before: EvaluationResult
    after: EvaluationResult
    recovered: float
    clean_change: float
    seconds: dict[str, float]
    model: nn.Module = field(repr=False)
    export: ExportPaths | None = None
    history: RRHistory | FineTuneHistory | None = None
    detector_auc: float | None = None
    threshold: float | None = None
    reaudit: dict[str, Any] | None = None
    evaluation_set: dict[str, Any] | None = None
    outcome: Outcome | None = None
    #: ``{"read": images read from the data (a row read twice counts twice), "distinct": rows read, "audited":
    #: images the audit explained}`` (a job's correction)
    images_read: dict[str, int] | None = None
    #: The candidates tried on the validation split and the one chosen (:mod:`spray.correction.search`)
    search: dict[str, Any] | None = None
    #: The check of the flagged members no step of the correction saw (:mod:`spray.correction.unseen`); None: not run
    unseen: dict[str, Any] | None = None

    def judge(self) -> Outcome:
        """Judge the correction (:mod:`spray.correction.outcome`) with what it knows now, and keep the verdict."""
        self.outcome = judge(
            self.recovered, self.clean_change, self.reaudit, self.config.goal_recovered, self.config.max_clean_loss, self.unseen,
            attack_moves=self.before.moved_to_class, min_attack_moves=self.config.min_attack_moves,
            attack_raise=self.before.raised_class_probability, min_attack_raise=self.config.min_attack_raise,
        )
        return self.outcome

    def table(self) -> str:
        """The before/after table as plain text."""
        return format_table([self.before, self.after], baseline=self.before)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors, no model)."""

        def finite(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        return {
            "method": self.method,
            "config": asdict(self.config),
            "cav": self.cav.metadata(),
            "detector_auc": finite(self.detector_auc),
            "threshold": finite(self.threshold),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "recovered_share": finite(self.recovered),
            "clean_accuracy_change": finite(self.clean_change),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "history": None if self.history is None else {
                key: finite(value) if isinstance(value, float) else value for key, value in asdict(self.history).items()
            },
            "files": None if self.export is None else {k: (None if v is None else str(v)) for k, v in asdict(self.export).items()},
            "reaudit": self.reaudit,
            "evaluation_set": self.evaluation_set,
            "outcome": None if self.outcome is None else self.outcome.to_dict(),
            "images_read": self.images_read,
            "search": self.search,
            "unseen_members": None if self.unseen is None else {
                key: finite(value) if isinstance(value, float) else value for key, value in self.unseen.items()
            },
        }


def _calibration_rows(labels: np.ndarray, class_id: int, limit: int, seed: int) -> np.ndarray:
    """Training rows of the other classes (assumed free of the artifact), at most ``limit``."""
    rows = np.flatnonzero(np.asarray(labels) != class_id)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


def build_correction(
    model: nn.Module,
    cav: CAV,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    artifact_rows: np.ndarray,
    config: CorrectionConfig,
    evidence: Evidence | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``config.method`` to ``model`` with ``cav``; return the corrected model and facts
    (threshold, history, detector AUC). Counterfactual fine-tuning needs the members'
    ``evidence`` (:func:`spray.correction.counterfactual.member_evidence`) and uses no CAV."""
    facts: dict[str, Any] = {}
    if config.method == "counterfactual":
        if evidence is None:
            raise CorrectionError("counterfactual fine-tuning needs the flag's evidence (the audit's heatmaps of its members).")
        tuned, history = counterfactual_finetune(
            model, train_images, train_labels, artifact_rows, evidence, class_id=cav.class_id, epochs=config.cf_epochs,
            learning_rate=config.cf_learning_rate, paste_share=config.cf_paste_share, max_samples=config.cf_max_samples, random_state=config.seed,
        )
        facts["history"] = history
        return tuned, facts
    if config.method == "p-clarc":
        return p_clarc(model, cav), facts
    if config.method == "rr-clarc":
        rows = np.arange(len(train_images))
        if config.rr_max_samples is not None and len(rows) > config.rr_max_samples:
            rows = np.sort(np.random.default_rng(config.seed).choice(rows, size=config.rr_max_samples, replace=False))
        tuned, history = rr_clarc(
            model, cav, train_images[rows], train_labels[rows], lam=config.rr_lambda, epochs=config.rr_epochs,
            learning_rate=config.rr_learning_rate, target=config.rr_target, random_state=config.seed,
        )
        facts["history"] = history
        return tuned, facts
    detector = None
    threshold = 0.0
    if config.gate in ("detector", "both"):
        detector = fit_cav(
            model, train_images, train_labels, artifact_rows, cav.layer, class_id=cav.class_id, clean=config.clean,
            pooling=cav.pooling, estimator=config.detector_estimator, test_size=config.test_size, random_state=config.seed,
        )
        rows = _calibration_rows(train_labels, cav.class_id, 2000, config.seed)
        features, _ = layer_activations(model, train_images[rows], cav.layer, detector.pooling)
        threshold = calibrate_threshold(detector.score(torch.from_numpy(features)).numpy(), config.target_fpr)
        facts["detector_auc"] = detector.auc
        facts["threshold"] = threshold
    gate = Gate(
        kind=config.gate,
        target_classes=(cav.class_id,) if config.gate in ("class", "both") else (),
        threshold=threshold,
        soft=config.soft_gate,
        temperature=config.temperature,
    )
    return r_clarc(model, cav, gate, detector), facts


@dataclass
class EvaluationPlan:
    """The data that a job's correction is fitted and evaluated on: :func:`correct_model`'s data arguments.

    Images are display images in [0, 1] (the job converts them to the model's input).
    ``fit_images`` may be a :class:`~spray.correction.images.RowImages` (read as the steps
    ask). ``artifact_rows`` index ``fit_images``; ``stamp`` puts the artifact on display images for
    the attacked test set; ``mask`` is its region for the relevance share (None skips it);
    ``facts`` says how the sets were made (``evaluation_set`` of the report; None when the
    data brought their own test split); ``fit_rows``: the audited rows ``fit_images`` holds
    (None: all of them, in order); ``unseen_rows``: see the attribute.
    """

    fit_images: np.ndarray | RowImages
    fit_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    artifact_rows: np.ndarray
    stamp: Stamp
    mask: np.ndarray | tuple[slice, slice] | None
    facts: dict[str, Any] | None
    fit_rows: np.ndarray | None = None
    #: The flagged members' rows (audited data) that no step of the correction sees: the
    #: held-out part's (:mod:`spray.correction.unseen`); None: none set aside
    unseen_rows: np.ndarray | None = None
    #: Rows of ``fit_images`` whose evidence the attacked set pastes (:mod:`spray.correction.attack`):
    #: counterfactual fine-tuning must not paste it too; None: the attack is no member's evidence
    attack_donors: np.ndarray | None = None
    #: The attack the search validates on where it is not ``stamp`` (display images); None: ``stamp``
    search_stamp: Stamp | None = None


def correct_model(
    model: nn.Module,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    artifact_rows: np.ndarray,
    *,
    stamp: Callable[[np.ndarray], np.ndarray],
    mask: np.ndarray | tuple[slice, slice] | None = None,
    config: CorrectionConfig | None = None,
    output_dir: Path | None = None,
    n_classes: int | None = None,
    class_id: int | None = None,
    before: EvaluationResult | None = None,
    cav: CAV | None = None,
    job: str = "",
    attribution: AttributionSettings = AttributionSettings(),
    evaluation_set: dict[str, Any] | None = None,
    evidence: Evidence | None = None,
    corrected: tuple[nn.Module, dict[str, Any]] | None = None,
) -> CorrectionReport:
    """Correct ``model`` for the artifact carried by ``train_images[artifact_rows]`` and evaluate it.

    Args:
        model: the classifier (not modified; RR-ClArC fine-tunes a copy).
        train_images, train_labels: the data the artifact rows index (e.g. the audited set).
        test_images, test_labels: held-out data for the before/after evaluation.
        artifact_rows: rows of ``train_images`` carrying the artifact.
        stamp: puts the artifact on images, for the attacked test set.
        mask: artifact region for the relevance share (None skips it).
        config: the correction's parameters.
        output_dir: export folder, which also receives ``report.json`` and the page
            ``index.html`` (see :mod:`spray.correction.page`); None: nothing written.
        n_classes, class_id: passed to :func:`spray.correction.cav.fit_cav`.
        before: the original model's evaluation, when already computed (saves time).
        cav: a CAV to use instead of fitting one.
        job: the job's name, for the page's title.
        attribution: the audit's ``[attribution]`` settings, for the artifact-relevance share.
        evaluation_set: how the test and attacked data were made, recorded in the report.
        evidence: the members' evidence, for counterfactual fine-tuning.
        corrected: the corrected model and its facts when already made (the search's validated
            candidate, :data:`spray.correction.search.VALIDATED_METHODS`); None: made here.
    """
    config = config or CorrectionConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if cav is None:
        cav = fit_cav(
            model, train_images, train_labels, artifact_rows, config.layer, class_id=class_id, n_classes=n_classes,
            clean=config.clean, pooling=config.pooling, estimator=config.estimator, test_size=config.test_size,
            random_state=config.seed,
        )
    seconds["cav"] = time.perf_counter() - start
    log.info("CAV at %s (%s, %s): held-out AUC %.3f", cav.layer, cav.pooling, cav.estimator, cav.auc)

    def run_evaluation(candidate: nn.Module, name: str) -> EvaluationResult:
        return evaluate(
            candidate, test_images, test_labels, cav.class_id, stamp, mask=mask, name=name,
            relevance_samples=config.relevance_samples, random_state=config.seed,
            attribution=attribution,
        )

    start = time.perf_counter()
    if before is None:
        before = run_evaluation(model, "original")
    seconds["evaluate_before"] = time.perf_counter() - start

    start = time.perf_counter()
    if corrected is None:
        corrected, facts = build_correction(model, cav, train_images, train_labels, np.asarray(artifact_rows), config, evidence)
        seconds["correction"] = time.perf_counter() - start
    else:  # the search's validated candidate: its fine-tuning time is the correction's
        corrected, facts = corrected
        seconds["correction"] = float(getattr(facts.get("history"), "seconds", 0.0))

    start = time.perf_counter()
    after = run_evaluation(corrected, config.method)
    after.seconds = seconds["correction"] + seconds["cav"]
    seconds["evaluate_after"] = time.perf_counter() - start

    report = CorrectionReport(
        method=config.method, config=config, cav=cav, before=before, after=after,
        recovered=recovered_share(before, after), clean_change=after.clean_accuracy - before.clean_accuracy,
        seconds=seconds, model=corrected, history=facts.get("history"),
        detector_auc=facts.get("detector_auc"), threshold=facts.get("threshold"), evaluation_set=evaluation_set,
    )
    report.judge()  # without a re-audit (yet): at best "unverified"
    if output_dir is not None:
        start = time.perf_counter()
        example = torch.as_tensor(np.ascontiguousarray(test_images[:8]))
        report.export = export_corrected(
            corrected, output_dir, method=config.method, cav=cav, example_input=example,
            torchscript=config.torchscript, torch_export=config.torch_export, onnx=config.onnx, extra={"before": before.to_dict(), "after": after.to_dict()},
        )
        seconds["export"] = time.perf_counter() - start
        write_correction_files(report.to_dict(), output_dir, job)
    return report


def flag_entry(summary: dict[str, Any] | Path, flag: int = 0) -> dict[str, Any]:
    """The ``flag``-th entry of the ``flags`` of an audit's ``summary.json`` (parsed, or its path).

    Flags are ordered highest score first, so ``flag=0`` is the strongest. Raises
    :class:`CorrectionError` when the file or the flag does not exist.
    """
    if not isinstance(summary, dict):
        path = Path(summary)
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise CorrectionError(f"{path} not found: run the audit first (spray audit <job>).") from error
    if summary.get("verdict") == "error":
        raise CorrectionError(f"the latest audit failed ({summary.get('error', 'no message')}); run 'spray audit' on the job again first.")
    flags = summary.get("flags") or []
    if not flags:
        raise CorrectionError("the audit flagged no cluster: there is no artifact to correct.")
    if not 0 <= flag < len(flags):
        raise CorrectionError(f"flag {flag} does not exist: the audit has {len(flags)} flag(s) (0..{len(flags) - 1}).")
    return flags[flag]


def flag_rows(summary: dict[str, Any] | Path, flag: int = 0) -> tuple[np.ndarray, int]:
    """(member rows, class index) of the ``flag``-th flagged cluster of an audit's ``summary.json`` (see :func:`flag_entry`)."""
    entry = flag_entry(summary, flag)
    return np.asarray(entry["member_rows"], dtype=np.int64), int(entry["class_index"])
