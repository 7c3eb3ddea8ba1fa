"""One correction from start to end: CAV from artifact rows, P-/R-/RR-ClArC, before/after evaluation, export.

:func:`correct_model` works on any model and data in memory; :func:`correct_demo` loads the
demo data and model of a job spec exactly as the audit does (same generator seed, same
cached weights under ``<output>/<job>/stages/model``) and writes its results under
``<output>/<job>/correction/<method>/``; :func:`spray.correction.user.correct_user` does the
same for a job's own data and model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spray.correction.cav import CAV, CLEAN_SCOPES, ESTIMATORS, POOLINGS, fit_cav, layer_activations
from spray.correction.clarc import (
    RR_TARGETS,
    CorrectionError,
    Gate,
    RRHistory,
    calibrate_threshold,
    p_clarc,
    r_clarc,
    rr_clarc,
)
from spray.correction.evaluate import EvaluationResult, evaluate, format_table, recovered_share
from spray.correction.export import ExportPaths, export_corrected
from spray.correction.page import write_correction_files

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("r-clarc", "p-clarc", "rr-clarc")
#: Gates of R-ClArC (P-ClArC is the gate "always").
R_GATES: tuple[str, ...] = ("class", "detector", "both")
#: The choices of CorrectionConfig's text fields.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "pooling": POOLINGS,
    "estimator": ESTIMATORS,
    "clean": CLEAN_SCOPES,
    "gate": R_GATES,
    "detector_estimator": ESTIMATORS,
    "rr_target": RR_TARGETS,
}


@dataclass(frozen=True)
class CorrectionConfig:
    """Parameters of one correction (defaults suit the demo model).

    Attributes:
        method: ``"r-clarc"`` (default), ``"p-clarc"`` or ``"rr-clarc"``.
        layer: layer whose activations hold the CAV (a name from ``model.named_modules()``).
        pooling: ``"flatten"`` (default: the demo's tag has a fixed position, and the whole
            activation tensor captures its signature best), ``"max"`` or ``"mean"``.
        estimator: CAV estimator of the projected/penalised direction (``"pattern"`` default).
        clean: clean samples for the CAV: ``"same_class"`` (default) or ``"all"``.
        gate: R-ClArC gate: ``"class"`` (default: the uncorrected prediction is the artifact
            class), ``"detector"`` or ``"both"``.
        detector_estimator: filter estimator of the detector gate (``"logistic"`` default).
        target_fpr: false-positive rate the detector threshold is calibrated to, on training
            samples of the other classes.
        soft_gate: scale the projection by a sigmoid of the detector score.
        temperature: soft gate temperature (detector-score units).
        rr_lambda: weight of RR-ClArC's gradient penalty.
        rr_epochs: maximum RR-ClArC fine-tuning epochs.
        rr_learning_rate: Adam learning rate of RR-ClArC.
        rr_target: explained output of the penalty: ``"predicted"`` logit or ``"all"`` logits summed.
        rr_max_samples: fine-tune RR-ClArC on a random subset of at most this many training
            samples (None: all), to bound its time on large sets.
        test_size: held-out share for the CAV's detection AUC.
        held_out: share of each class of a user job's audited samples held out (seeded, stratified)
            for the before/after evaluation; the CAV, the detector and fine-tuning see the rest
            (see :mod:`spray.correction.user`; the demo has its own test split).
        relevance_samples: attacked images explained for the artifact-relevance share (0 skips).
        seed: random state of every random choice.
        torchscript: also export a TorchScript file.
    """

    method: str = "r-clarc"
    layer: str = "features.relu3"
    pooling: str = "flatten"
    estimator: str = "pattern"
    clean: str = "same_class"
    gate: str = "class"
    detector_estimator: str = "logistic"
    target_fpr: float = 0.01
    soft_gate: bool = False
    temperature: float = 1.0
    rr_lambda: float = 100.0
    rr_epochs: int = 3
    rr_learning_rate: float = 1e-3
    rr_target: str = "predicted"
    rr_max_samples: int | None = None
    test_size: float = 0.25
    held_out: float = 0.25
    relevance_samples: int = 64
    seed: int = 0
    torchscript: bool = True

    def __post_init__(self) -> None:
        """Refuse unknown choices and impossible numbers; each message starts with the field's name."""
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                hint = " ('always' is P-ClArC: set method = 'p-clarc')" if key == "gate" and value == "always" else ""
                raise CorrectionError(f"{key} {value!r} is unknown; choose one of {list(choices)}{hint}.")
        if not self.layer:
            raise CorrectionError("layer must name a module of the model (a name from model.named_modules()).")
        ranges = (
            ("target_fpr", 0.0 <= self.target_fpr < 1.0, "in [0, 1)"),
            ("temperature", 0 < self.temperature < math.inf, "a positive finite number"),
            ("rr_lambda", 0 <= self.rr_lambda < math.inf, "a finite number, at least 0"),
            ("rr_epochs", self.rr_epochs >= 1, "at least 1"),
            ("rr_learning_rate", 0 < self.rr_learning_rate < math.inf, "a positive finite number"),
            ("rr_max_samples", self.rr_max_samples is None or self.rr_max_samples >= 1, "at least 1"),
            ("test_size", 0.0 < self.test_size < 1.0, "in (0, 1)"),
            ("held_out", 0.0 < self.held_out < 1.0, "in (0, 1)"),
            ("relevance_samples", self.relevance_samples >= 0, "at least 0"),
        )
        for key, valid, wanted in ranges:
            if not valid:
                raise CorrectionError(f"{key} must be {wanted}, got {getattr(self, key)!r}.")


def job_config(spec: Any, **overrides: Any) -> CorrectionConfig:
    """The correction parameters of job ``spec`` (a :class:`spray.jobs.JobSpec`).

    Its ``[correct]`` keys, replaced by the ``overrides`` that are not None (the flags of
    ``spray correct``), over the defaults of :class:`CorrectionConfig`; the seed is the job's.
    """
    chosen = {key: value for key, value in overrides.items() if value is not None}
    return CorrectionConfig(**{"seed": spec.job.seed, **spec.correct.config_values(), **chosen})


@dataclass
class CorrectionReport:
    """The outcome of one correction: the CAV, before/after rows, recovered share, timings, files
    and, after :func:`correct_demo`'s re-audit, its outcome (``reaudit``, see :mod:`spray.correction.reaudit`).

    ``evaluation_set`` says how a user job's evaluation data were made (held-out split,
    attacked set, artifact mask; see :mod:`spray.correction.user`); None for the demo.
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
    history: RRHistory | None = None
    detector_auc: float | None = None
    threshold: float | None = None
    reaudit: dict[str, Any] | None = None
    evaluation_set: dict[str, Any] | None = None

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
            "history": None if self.history is None else asdict(self.history),
            "files": None if self.export is None else {k: (None if v is None else str(v)) for k, v in asdict(self.export).items()},
            "reaudit": self.reaudit,
            "evaluation_set": self.evaluation_set,
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
) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``config.method`` to ``model`` with ``cav``; return the corrected model and facts (threshold, history, detector AUC)."""
    facts: dict[str, Any] = {}
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
    composite: str = "epsilon_plus_flat",
    canonizers: Sequence[str] = ("merge_batchnorm",),
    evaluation_set: dict[str, Any] | None = None,
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
        composite, canonizers: the LRP rules of the artifact-relevance share (the audit's).
        evaluation_set: how the test and attacked data were made, recorded in the report.
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
            composite=composite, canonizers=canonizers,
        )

    start = time.perf_counter()
    if before is None:
        before = run_evaluation(model, "original")
    seconds["evaluate_before"] = time.perf_counter() - start

    start = time.perf_counter()
    corrected, facts = build_correction(model, cav, train_images, train_labels, np.asarray(artifact_rows), config)
    seconds["correction"] = time.perf_counter() - start

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
    if output_dir is not None:
        start = time.perf_counter()
        example = torch.as_tensor(np.ascontiguousarray(test_images[:8]))
        report.export = export_corrected(
            corrected, output_dir, method=config.method, cav=cav, example_input=example,
            torchscript=config.torchscript, extra={"before": before.to_dict(), "after": after.to_dict()},
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


@dataclass
class DemoInputs:
    """The demo data and model of a job spec, as the audit sees them."""

    model: nn.Module
    train: Any  # spray.data.demo.DemoSplit
    test: Any
    n_classes: int
    weights: Path


def load_demo(spec: Any) -> DemoInputs:
    """The demo set and model of job ``spec``, exactly as ``spray audit`` builds them.

    The set is regenerated from ``[data]`` and ``job.seed``; the model is read from (or
    trained into) the audit's cache ``<output>/<job>/stages/model``.
    """
    from spray.data.demo import DemoConfig, make_demo
    from spray.models.demo import TrainConfig, load_or_train_demo_model

    demo = DemoConfig(
        n_per_class=spec.data.n_per_class,
        artifact_class=spec.data.artifact_class,
        artifact_fraction=spec.data.artifact_fraction,
        seed=spec.job.seed,
    )
    train, test = make_demo(demo)
    n_classes = len(demo.class_names)
    model, weights, _ = load_or_train_demo_model(
        train.images, train.labels, n_classes, TrainConfig(epochs=spec.model.epochs, seed=spec.job.seed),
        spec.output_dir / "stages" / "model",
    )
    return DemoInputs(model=model, train=train, test=test, n_classes=n_classes, weights=weights)


def correct_demo(
    spec: Any,
    artifact_rows: np.ndarray,
    config: CorrectionConfig | None = None,
    *,
    flag: dict[str, Any] | None = None,
    reaudit: bool = True,
    progress: bool = False,
) -> CorrectionReport:
    """Correct the demo model of job ``spec`` (a :class:`spray.jobs.JobSpec`) for the artifact in ``artifact_rows``.

    The data and model are those of ``spray audit`` for the same spec (see :func:`load_demo`).
    ``artifact_rows`` index the training split, i.e. the rows of the audit's ``input.h5``
    (``member_rows`` of a flag in ``summary.json``). Results are written to
    ``<output>/<job>/correction/<method>/``: the export files (see
    :mod:`spray.correction.export`), ``report.json`` and the page ``index.html``.

    With ``reaudit``, the corrected model is audited again on the same data into
    ``reaudit/`` there (see :mod:`spray.correction.reaudit`); ``flag`` is the audit's
    ``summary.json`` entry of the corrected flag (default: its rows and the CAV's class),
    whose disappearance the outcome (``report.reaudit``) records. When the audit's own
    summary exists, ``compare.html`` beside the page compares the two audits. The reports
    index above the job's folder is written again and lists the correction.
    """
    from spray.correction.reaudit import REAUDIT_FOLDER, run_reaudit
    from spray.data.demo import stamp_tag, tag_region

    config = config or CorrectionConfig()
    inputs = load_demo(spec)
    folder = spec.output_dir / "correction" / config.method
    report = correct_model(
        inputs.model, inputs.train.images, inputs.train.labels, inputs.test.images, inputs.test.labels,
        np.asarray(artifact_rows), stamp=stamp_tag, mask=tag_region(), config=config, n_classes=inputs.n_classes,
        output_dir=folder, job=spec.job.name,
    )
    if reaudit:
        original = flag if flag is not None else {"class_index": report.cav.class_id, "member_rows": np.asarray(artifact_rows).tolist()}
        report.reaudit = run_reaudit(spec, inputs.model, report.model, original, folder / REAUDIT_FOLDER, progress=progress)
        report.seconds["reaudit"] = report.reaudit["seconds"]
        write_correction_files(report.to_dict(), folder, spec.job.name)
    refresh_index(spec.output_dir.parent)
    return report


def refresh_index(root: Path) -> None:
    """Write the reports index above the job's folder again, so that it lists the correction (a warning if it cannot)."""
    from spray.report.index import write_index

    try:
        write_index(root)
    except (OSError, ValueError) as error:
        log.warning("audit index not updated: %s", error)
