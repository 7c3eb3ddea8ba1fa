"""Runs one audit from a job spec: data -> model -> attributions -> SpRAy -> report.

Every stage writes a file under ``<output>/<job>/stages/`` and a stage whose output
already exists for the same inputs is skipped, so a re-run after a crash or with only the
report changed costs little.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from spray.analysis.pipeline import SprayConfig, analyze_dataset
from spray.attribution.engine import AttributionSettings, attribute_dataset
from spray.data.demo import DemoConfig, DemoSplit, make_demo, stamp_tag
from spray.data.source import H5Source, write_input_h5
from spray.jobs import JobSpec
from spray.models.demo import TrainConfig, evaluate_accuracy, load_or_train_demo_model, predict
from spray.report.context import ArtifactCheck, ReportContext
from spray.report.render import render_report
from spray.store.analysis import write_analysis
from spray.store.attributions import read_attributions

log = logging.getLogger(__name__)


@dataclass
class AuditResult:
    """Where an audit's outputs are, and its headline numbers."""

    report: Path
    summary: dict[str, Any]
    timings: dict[str, float]
    facts: dict[str, Any]

    @property
    def summary_path(self) -> Path:
        return self.report.parent / "summary.json"


def _demo_config(spec: JobSpec) -> DemoConfig:
    return DemoConfig(
        n_per_class=spec.data.n_per_class,
        artifact_class=spec.data.artifact_class,
        artifact_fraction=spec.data.artifact_fraction,
        seed=spec.job.seed,
    )


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_demo_data(spec: JobSpec, stages: Path) -> tuple[Path, DemoSplit, DemoSplit, str]:
    config = _demo_config(spec)
    fingerprint = _fingerprint({"demo": asdict(config)})
    train, test = make_demo(config)
    path = stages / "input.h5"
    if not _h5_has_fingerprint(path, fingerprint):
        write_input_h5(path, train.images, train.labels, train.sample_ids, list(config.class_names))
        with h5py.File(path, "a") as handle:
            handle.create_dataset("stamped", data=train.stamped)
            handle.attrs["fingerprint"] = fingerprint
    return path, train, test, fingerprint


def _h5_has_fingerprint(path: Path, fingerprint: str) -> bool:
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return handle.attrs.get("fingerprint") == fingerprint
    except OSError:
        return False


def artifact_check(model: torch.nn.Module, test: DemoSplit, target_class: int) -> ArtifactCheck:
    """Stamp the demo tag on every test image of the other classes and measure the prediction shift."""
    others = test.images[(test.labels != target_class) & ~test.stamped]
    before = torch.softmax(torch.from_numpy(predict(model, others)), 1).numpy()
    after = torch.softmax(torch.from_numpy(predict(model, stamp_tag(others))), 1).numpy()
    return ArtifactCheck(
        target_class=target_class,
        n_images=len(others),
        flip_rate=float((after.argmax(1) == target_class).mean() - (before.argmax(1) == target_class).mean()),
        mean_prob_before=float(before[:, target_class].mean()),
        mean_prob_after=float(after[:, target_class].mean()),
        description="the demo's copyright-like tag stamped in the bottom-right corner of other classes' test images",
    )


def spray_config(spec: JobSpec) -> SprayConfig:
    """The SpRAy configuration of a job (its ``[analysis]`` section plus the job seed)."""
    section = asdict(spec.analysis)
    if section["threshold"] is None:
        section.pop("threshold")
    section["pooled_size"] = (section["pooled_size"], section["pooled_size"])
    return SprayConfig(**section, random_state=spec.job.seed)


def run_audit(spec: JobSpec, progress: bool = True) -> AuditResult:
    """Run every stage of ``spec`` and return the report's location and headline numbers."""
    torch.manual_seed(spec.job.seed)
    out = spec.output_dir
    stages = out / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    facts: dict[str, Any] = {}

    start = time.perf_counter()
    input_path, train, test, data_fp = _prepare_demo_data(spec, stages)
    source = H5Source(input_path)
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    model, weights, trained = load_or_train_demo_model(
        train.images, train.labels, len(source.class_names), TrainConfig(epochs=spec.model.epochs, seed=spec.job.seed), stages / "model"
    )
    facts["test_accuracy"] = evaluate_accuracy(model, test.images, test.labels)
    facts["model_weights"] = weights.name
    facts["model_trained_now"] = trained
    timings["model"] = time.perf_counter() - start

    start = time.perf_counter()
    settings = AttributionSettings(
        composite=spec.attribution.composite,
        canonizers=tuple(spec.attribution.canonizers),
        layers=tuple(spec.attribution.layers),
        target=spec.attribution.target,
        batch_size=spec.attribution.batch_size,
    )
    attributions_path = stages / "attributions.h5"
    attribute_dataset(source, model, settings, attributions_path, data_fp, progress=progress)
    timings["attribution"] = time.perf_counter() - start

    check = None
    if spec.data.source == "demo" and spec.data.artifact_class >= 0:
        check = artifact_check(model, test, spec.data.artifact_class)

    start = time.perf_counter()
    config = spray_config(spec)
    with read_attributions(attributions_path) as attributions:
        analyses = analyze_dataset(attributions.heatmaps, attributions.labels, source.class_names, config)
        write_analysis(stages / "analysis.h5", analyses, config)
        timings["analysis"] = time.perf_counter() - start

        start = time.perf_counter()
        with h5py.File(input_path, "r") as inputs:
            stamped = np.flatnonzero(inputs["stamped"][...]) if "stamped" in inputs else None
            context = ReportContext(
                job_name=spec.job.name,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                class_names=list(source.class_names),
                sample_ids=attributions.sample_ids,
                labels=attributions.labels,
                predictions=attributions.predictions,
                images=inputs["data"],
                heatmaps=attributions.heatmaps,
                analyses=analyses,
                threshold=config.threshold,
                metadata={
                    "dataset": f"demo ({len(source)} training images, seed {spec.job.seed})",
                    "model": f"{attributions.metadata['model']} (test accuracy {facts['test_accuracy']:.3f})",
                    "composite": attributions.metadata["composite"],
                    "canonizers": ", ".join(attributions.metadata["canonizers"]),
                    "concept layers": ", ".join(attributions.metadata["layers"]) or "none",
                    "explained output": attributions.metadata["target"],
                },
                artifact_check=check,
                ground_truth_rows=stamped,
            )
            report = render_report(context, out)
    source.close()
    timings["report"] = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return AuditResult(report=report, summary=summary, timings=timings, facts=facts)
