"""Runs one audit from a job spec: data -> model -> attributions -> SpRAy -> report.

Every stage writes a file under ``<output>/<job>/stages/`` (``spray.store.folders``); a
stage whose file already records the same inputs (content fingerprint of data, model and
settings: ``spray.store.stage_cache``) is reused, so a re-run after a crash, or a scheduled
run on unchanged inputs, costs little. Reports go to ``<output>/<job>/`` or, with
``job.dated = true``, to a new ``<output>/<job>/runs/<UTC time>/`` per run, of which the
newest ``job.keep_runs`` are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from spray.analysis.config import SprayConfig, expand_spaces
from spray.analysis.distributed import dask_runner
from spray.analysis.pipeline import TaskRunner, analyze_spaces
from spray.analysis.result import ClassAnalysis
from spray.attribution.distributed import cluster_client
from spray.dask_tasks import dask_starmap, starmap_here
from spray.attribution.engine import attribute_dataset, model_fingerprint
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings
from spray.confirm.predictor import model_predictor
from spray.confirm.run import RECORDS_VERSION, confirm_analyses
from spray.data.base import SourceImages
from spray.data.open import AuditData, PlantedArtifact, open_data
from spray.jobs import JobSpec
from spray.models.demo import predict, softmax_probabilities
from spray.models.open import held_out_accuracy, open_model
from spray.report.atlas import build_concept_atlas
from spray.report.context import ArtifactCheck, ReportContext
from spray.report.failed import set_aside, write_failure
from spray.report.index import refresh_index
from spray.report.render import render_report
from spray.store.analysis import read_analysis, write_analysis
from spray.store.attributions import Attributions, read_attributions
from spray.store.common import writable_folder
from spray.store.lock import job_lock
from spray.store.folders import ANALYSIS_FILE, ATTRIBUTIONS_FILE, STAGES, SUMMARY_FILE
from spray.store.stage_cache import cached, fingerprint

log = logging.getLogger(__name__)
#: What to do when a job's output folder cannot be written.
WRITE_FIX = "set [job] output in the job file to a folder this user can write to."


@dataclass
class AuditResult:
    """Where an audit's outputs are, and its headline numbers."""

    report: Path
    summary: dict[str, Any]
    timings: dict[str, float]
    facts: dict[str, Any]

    @property
    def summary_path(self) -> Path:
        return self.report.parent / SUMMARY_FILE


def open_job_data(spec: JobSpec) -> AuditData:
    """The dataset of job ``spec``, as every command opens it (the demo's ``input.h5`` in its stages)."""
    return open_data(spec.data, spec.base_dir, spec.job.seed, spec.folders.stages)


def open_job_model(spec: JobSpec, data: AuditData) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of job ``spec`` and its headline facts, as every command opens it."""
    return open_model(spec.model, data, spec.base_dir, spec.job.seed, spec.folders.model_cache)


def artifact_check(model: torch.nn.Module, planted: PlantedArtifact) -> ArtifactCheck:
    """Stamp the planted artifact on every test image of the other classes (that does not carry
    it already) and measure the prediction shift towards its class."""
    test, target_class = planted.test, planted.class_index
    others = test.images[(test.labels != target_class) & ~test.stamped]
    before = softmax_probabilities(predict(model, others))
    after = softmax_probabilities(predict(model, planted.stamp(others)))
    return ArtifactCheck(
        target_class=target_class,
        n_images=len(others),
        flip_rate=float((after.argmax(1) == target_class).mean() - (before.argmax(1) == target_class).mean()),
        mean_prob_before=float(before[:, target_class].mean()),
        mean_prob_after=float(after[:, target_class].mean()),
        description=f"{planted.description} of other classes' test images",
    )


def analyse(
    attributions: Attributions, data: AuditData, model: torch.nn.Module, settings: AttributionSettings,
    spec: JobSpec, path: Path, runner: TaskRunner | None = None,
) -> list[ClassAnalysis]:
    """The analysis stage: SpRAy per class and space, then the causal test of its candidates
    (``spray.confirm``), reusing ``path`` when it was computed from the same attributions and
    settings. Every class of the data gets a result, a class without samples one that says it
    could not be analysed. ``runner``: where the (class, space) analyses run (default: here,
    one after another; :func:`spray.analysis.distributed.dask_runner` for a Dask cluster)."""
    config, class_names = spec.analysis, data.source.class_names

    def compute() -> list[ClassAnalysis]:
        analyses = analyze_spaces(
            attributions.heatmaps, attributions.labels, class_names, config, concepts=attributions.concepts,
            classes=list(range(len(class_names))), runner=runner,
        )
        predict = model_predictor(model, settings, spec.confirm.batch_size)
        confirm_analyses(
            analyses, attributions.heatmaps, attributions.labels, data.source.read, predict, spec.confirm,
            min_size=config.min_cluster_size,
        )
        return analyses

    return cached(
        path,
        fingerprint({
            "attributions": attributions.fingerprint, "config": config.to_dict(),
            "confirm": dataclasses.asdict(spec.confirm), "classes": "every class", "records": RECORDS_VERSION,
        }),
        compute=compute,
        write=lambda target, analyses: write_analysis(target, analyses, config),
        read=read_analysis,
    )


def _report_folder(spec: JobSpec, output: Path | None) -> Path:
    """Where this run's report goes: ``output``, the job's folder, or with dated runs a new
    ``runs/<UTC time>/`` (older runs beyond ``keep_runs`` are removed)."""
    if output is not None:
        return output
    folders = spec.folders
    if not spec.job.dated:
        return folders.root
    folder = folders.new_run()
    dated = folders.dated_runs()
    for old in dated[: max(0, len(dated) - spec.job.keep_runs)]:
        shutil.rmtree(old)
    return folder


def demo_artifact_check(spec: JobSpec, data: AuditData, model: torch.nn.Module) -> ArtifactCheck | None:
    """The demo's proof that the model uses its planted tag (None for other data or a clean demo)."""
    if data.planted is None or spec.data.artifact_fraction <= 0:
        return None
    return artifact_check(model, data.planted)


def report_metadata(
    data: AuditData, model: torch.nn.Module, attributions: Attributions, facts: dict[str, Any]
) -> dict[str, str]:
    """The report's "how this audit was made" table; also records skipped images in ``facts``."""
    facts.setdefault("accuracy_on_audited_data", float((attributions.predictions == attributions.labels).mean()))
    metadata = {
        "dataset": data.description,
        "model": f"{attributions.metadata['model']}, fingerprint {model_fingerprint(model)}",
        "composite": attributions.metadata["composite"],
        "canonizers": ", ".join(attributions.metadata["canonizers"]),
        "concept layers": ", ".join(attributions.metadata["layers"]) or "none",
        "explained output": attributions.metadata["target"],
    }
    for key in ("test_accuracy", "accuracy_on_audited_data"):
        if key in facts:
            metadata[key.replace("_", " ")] = f"{facts[key]:.3f}"
    if data.skipped:
        listed = "; ".join(f"{name} ({why})" for name, why in data.skipped[:20])
        metadata["skipped unreadable images"] = f"{len(data.skipped)}: {listed}" + (" ..." if len(data.skipped) > 20 else "")
        facts["skipped_images"] = len(data.skipped)
    return metadata


def report_context(
    spec: JobSpec,
    data: AuditData,
    model: torch.nn.Module,
    settings: AttributionSettings,
    attributions: Attributions,
    analyses: list[ClassAnalysis],
    facts: dict[str, Any],
    check: ArtifactCheck | None,
) -> ReportContext:
    """Everything the report shows: results, pictures' arrays, metadata and, when a cluster
    is flagged and concept layers were stored, the concept atlas of its last layer."""
    atlas = None
    if settings.layers and any(c.flagged for a in analyses for c in a.clusters):
        atlas = build_concept_atlas(
            make_explainer(model, settings), data.source, attributions, analyses, settings.layers[-1],
            model_input=settings.model_input,
        )
    return ReportContext(
        job_name=spec.job.name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        class_names=list(data.source.class_names),
        sample_ids=attributions.sample_ids,
        labels=attributions.labels,
        predictions=attributions.predictions,
        images=SourceImages(data.source),
        heatmaps=attributions.heatmaps,
        analyses=analyses,
        threshold=spec.analysis.threshold,
        metadata=report_metadata(data, model, attributions, facts),
        artifact_check=check,
        ground_truth_rows=data.planted.rows if data.planted is not None and len(data.planted.rows) else None,
        concept_atlas=atlas,
        expected_spaces=expand_spaces(spec.analysis.spaces, list(attributions.concepts)),
        dataset_wide=spec.analysis.dataset_wide,
        skipped_images=len(data.skipped),
        check=spec.check,
        min_cluster_size=spec.analysis.min_cluster_size,
    )


def given_model_facts(model: torch.nn.Module, data: AuditData) -> dict[str, Any]:
    """Headline facts of a model handed to :func:`run_audit` in memory (e.g. a corrected one)."""
    facts: dict[str, Any] = {"model_weights": "(in memory)"}
    accuracy = held_out_accuracy(model, data)
    if accuracy is not None:
        facts["test_accuracy"] = accuracy
    return facts


class _StageClock:
    """Seconds per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def run_audit(
    spec: JobSpec,
    progress: bool = True,
    client: Any = None,
    *,
    model: torch.nn.Module | None = None,
    output: Path | None = None,
    wait: bool = False,
) -> AuditResult:
    """Run every stage of ``spec`` and return the report's location and headline numbers.

    The stages: open the data and the model, explain every sample (on ``client``'s Dask
    workers when given, else as ``[cluster]`` says), analyse the attributions (SpRAy per
    class and space), check the demo's planted artifact, and write the report and the
    audit index.

    One run at a time holds the job's folder (``spray.store.lock``): another run raises
    ``JobBusyError``, or with ``wait`` waits for it. The previous report is set aside before
    the stages start, and a run that fails or is interrupted leaves a ``summary.json`` with
    the verdict ``error`` (``spray.report.failed``), so no reader takes an old verdict for
    this run.

    ``model``: audit this in-memory model instead of the one ``[model]`` names (a
    corrected model, say); the data are still those of ``[data]``. ``output``: a folder
    inside ``<output>/<job>/`` that receives this run's attribution and analysis stages
    and its report, instead of the job's own folder. The data stage and the demo model
    cache stay in ``<output>/<job>/stages``, so such a run explains the very samples of
    the job's audit.
    """
    torch.manual_seed(spec.job.seed)
    folders = spec.folders
    out = folders.root if output is None else folders.inside(output)
    stages = writable_folder(folders.inside(out / STAGES), WRITE_FIX)
    writable_folder(folders.inside(folders.stages), WRITE_FIX)
    with job_lock(folders.root, wait=wait):
        report_dir = folders.inside(_report_folder(spec, None if output is None else out))
        set_aside(report_dir)
        try:
            result = _run_stages(spec, stages, report_dir, progress, client, model)
        except BaseException as error:
            write_failure(report_dir, spec.job.name, describe_failure(error))
            refresh_index(folders.root.parent)
            raise
    return result


def describe_failure(error: BaseException) -> str:
    """What ``summary.json`` says about a run that stopped with ``error``."""
    if isinstance(error, KeyboardInterrupt):
        return "the run was interrupted (KeyboardInterrupt) before it finished."
    return f"{type(error).__name__}: {error}"


def _run_stages(
    spec: JobSpec, stages: Path, report_dir: Path, progress: bool, client: Any, model: torch.nn.Module | None
) -> AuditResult:
    """The stages of :func:`run_audit`, writing stage files to ``stages`` and the report to ``report_dir``."""
    clock = _StageClock()
    with clock("data"):
        data = open_job_data(spec)
    try:
        with clock("model"):
            model, facts = open_job_model(spec, data) if model is None else (model, given_model_facts(model, data))
        settings = spec.attribution.for_model(model)
        with cluster_client(spec.cluster, client) as dask:
            with clock("attribution"):
                attributions_path = attribute_dataset(
                    data.source, model, settings, stages / ATTRIBUTIONS_FILE, data.fingerprint, progress=progress, client=dask, write=spec.cluster.write
                )
            check = demo_artifact_check(spec, data, model)
            with read_attributions(attributions_path) as attributions:
                with clock("analysis"):
                    runner = None if dask is None else dask_runner(dask.client)
                    analyses = analyse(attributions, data, model, settings, spec, stages / ANALYSIS_FILE, runner)
                with clock("report"):
                    context = report_context(spec, data, model, settings, attributions, analyses, facts, check)
                    starmap = starmap_here if dask is None else dask_starmap(dask.client)
                    report = render_report(context, report_dir, spec.report, starmap)
    finally:
        data.close()
    with clock("report"):
        refresh_index(spec.output_dir.parent)
    summary = json.loads((report.parent / SUMMARY_FILE).read_text())
    return AuditResult(report=report, summary=summary, timings=clock.timings, facts=facts)
