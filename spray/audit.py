"""Runs one audit from a job spec: data -> model -> attributions -> SpRAy -> report.

Every stage writes a file under ``<output>/<job>/stages/``; a stage whose output already
exists for the same inputs (same content fingerprint of data, model and settings) is
reused, so a re-run after a crash, or a scheduled run on unchanged inputs, costs little.
Reports go to ``<output>/<job>/`` or, with ``job.dated = true``, to a new
``<output>/<job>/runs/<UTC time>/`` per run, of which the newest ``job.keep_runs`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from spray.analysis.pipeline import CONCEPT_PREFIX, SprayConfig, analyze_spaces, concept_space
from spray.analysis.result import ClassAnalysis
from spray.attribution.architectures import attribution_defaults
from spray.attribution.engine import AttributionSettings, attribute_dataset, model_fingerprint
from spray.data.demo import DemoConfig, DemoSplit, make_demo, stamp_tag
from spray.data.source import DataSource, H5Source, SourceImages, write_input_h5
from spray.data.sources import (
    ArrayFileSource,
    DatasetSource,
    FolderSource,
    ImagePreprocessing,
    load_entry_point,
    open_h5_source,
)
from spray.jobs import JobSpec
from spray.models.demo import TrainConfig, evaluate_accuracy, load_or_train_demo_model, predict
from spray.models.sources import entry_point_model, load_state_dict, pickled_model, torchvision_model
from spray.attribution.crp import make_conditional_explainer
from spray.report.atlas import build_concept_atlas
from spray.report.context import ArtifactCheck, ReportContext
from spray.report.index import write_index
from spray.report.render import render_report
from spray.store.analysis import read_analysis, write_analysis
from spray.store.attributions import read_attributions
from spray.store.common import StoreError, writable_folder

log = logging.getLogger(__name__)
RUN_NAME = re.compile(r"^\d{8}T\d{6}(\d{6})?Z$")


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


@dataclass
class AuditData:
    """The audited samples plus what only the demo knows (test split, planted rows)."""

    source: DataSource
    fingerprint: str
    description: str
    demo_test: DemoSplit | None = None
    stamped_rows: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _h5_has_fingerprint(path: Path, fingerprint: str) -> bool:
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return handle.attrs.get("fingerprint") == fingerprint
    except OSError:
        return False


def _demo_data(spec: JobSpec, stages: Path) -> AuditData:
    config = DemoConfig(
        n_per_class=spec.data.n_per_class,
        artifact_class=spec.data.artifact_class,
        artifact_fraction=spec.data.artifact_fraction,
        seed=spec.job.seed,
    )
    fingerprint = _fingerprint({"demo": asdict(config)})
    train, test = make_demo(config)
    path = stages / "input.h5"
    if not _h5_has_fingerprint(path, fingerprint):
        write_input_h5(path, train.images, train.labels, train.sample_ids, list(config.class_names))
        with h5py.File(path, "a") as handle:
            handle.create_dataset("stamped", data=train.stamped)
            handle.attrs["fingerprint"] = fingerprint
    return AuditData(
        source=H5Source(path),
        fingerprint=fingerprint,
        description=f"demo ({len(train.labels)} training images, seed {spec.job.seed})",
        demo_test=test,
        stamped_rows=np.flatnonzero(train.stamped),
    )


def open_data(spec: JobSpec, stages: Path) -> AuditData:
    """The dataset named by ``[data]``, with a content fingerprint for stage reuse."""
    section = spec.data
    names = list(section.class_names) or None
    if section.source == "demo":
        return _demo_data(spec, stages)
    if section.source == "folder":
        source = FolderSource(spec.resolve(section.path), ImagePreprocessing(tuple(section.resize), tuple(section.crop)), section.strict, names)
        return AuditData(source, source.fingerprint(), f"image folder {section.path} ({len(source)} images)", skipped=source.skipped)
    if section.source == "h5":
        source = open_h5_source(spec.resolve(section.path), names)
        return AuditData(source, source.fingerprint(), f"HDF5 {section.path} ({len(source)} samples)")
    if section.source == "npz":
        source = ArrayFileSource(spec.resolve(section.path), names)
        return AuditData(source, source.fingerprint(), f"npz {section.path} ({len(source)} samples)")
    dataset = load_entry_point(section.entrypoint, spec.base_dir)()
    class_names = names or list(getattr(dataset, "classes", [])) or None
    source = DatasetSource(dataset, class_names or [], section.entrypoint)
    return AuditData(source, source.fingerprint(), f"entry point {section.entrypoint} ({len(source)} samples)")


def open_model(spec: JobSpec, data: AuditData, stages: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model named by ``[model]`` (the demo model is trained once and cached)."""
    section, n_classes = spec.model, len(data.source.class_names)
    if section.source == "demo":
        train = data.source
        images, labels = train.read(np.arange(len(train))), train.labels
        model, weights, trained = load_or_train_demo_model(
            images, labels, n_classes, TrainConfig(epochs=section.epochs, seed=spec.job.seed), stages / "model"
        )
        accuracy = evaluate_accuracy(model, data.demo_test.images, data.demo_test.labels)
        return model, {"test_accuracy": accuracy, "model_weights": weights.name, "model_trained_now": trained}
    if section.source == "pickle":
        model = pickled_model(spec.resolve(section.weights), section.trust_pickle)
    else:
        if section.source == "torchvision":
            model = torchvision_model(section.architecture, n_classes)
        else:
            model = entry_point_model(section.entrypoint, spec.base_dir, n_classes)
        if section.weights:
            load_state_dict(model, spec.resolve(section.weights))
    return model.eval(), {"model_weights": section.weights or "(entry point)"}


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
    for key in ("spaces", "dataset_wide"):  # what is analysed, not how: see _analyse
        section.pop(key)
    if section["threshold"] is None:
        section.pop("threshold")
    section["pooled_size"] = (section["pooled_size"], section["pooled_size"])
    return SprayConfig(**section, random_state=spec.job.seed)


def attribution_settings(spec: JobSpec, model: torch.nn.Module) -> AttributionSettings:
    """The attribution stage's settings from ``[attribution]`` and the data's normalisation.

    ``"auto"`` composite, canonizers or layers are filled in for the model's architecture;
    ``device`` and ``precision`` stay as written (``"auto"`` resolves where the model runs,
    e.g. on each Dask worker).
    """
    section = spec.attribution
    defaults = attribution_defaults(model)
    return AttributionSettings(
        composite=defaults.composite if section.composite == "auto" else section.composite,
        canonizers=tuple(defaults.canonizers if section.canonizers == ["auto"] else section.canonizers),
        layers=tuple(defaults.layers if section.layers == ["auto"] else section.layers),
        target=section.target,
        batch_size=section.batch_size,
        mean=tuple(spec.data.mean),
        std=tuple(spec.data.std),
        engine=section.engine,
        device=section.device,
        precision=section.precision,
        loader_threads=section.loader_threads,
        heatmap_size=tuple(section.heatmap_size),
    )


def analysis_spaces(spec: JobSpec, concept_layers: list[str]) -> list[str]:
    """The job's ``[analysis] spaces``, with ``concept:*`` expanded to the stored layers.

    A named concept layer that the attribution file does not hold is an error naming the
    stored ones (``concept:*`` with no stored layer just adds nothing).
    """
    spaces: list[str] = []
    for space in spec.analysis.spaces:
        if space == "concept:*":
            spaces.extend(concept_space(layer) for layer in concept_layers)
        elif space.startswith(CONCEPT_PREFIX) and space[len(CONCEPT_PREFIX) :] not in concept_layers:
            raise ValueError(
                f"[analysis] spaces names {space!r}, but the attributions hold concept relevances of "
                f"{concept_layers or 'no layer'}; add the layer to [attribution] layers or drop the space."
            )
        else:
            spaces.append(space)
    return list(dict.fromkeys(spaces))


def _analyse(
    attributions: Any, class_names: list[str], config: SprayConfig, path: Path, spaces: list[str], dataset_wide: bool
) -> list[ClassAnalysis]:
    """SpRAy per class and space, reusing ``analysis.h5`` when it was computed from the same
    attributions, config, spaces and dataset-wide setting."""
    key = _fingerprint(
        {"attributions": attributions.fingerprint, "config": config.to_dict(), "spaces": spaces, "dataset_wide": dataset_wide}
    )
    if _h5_has_fingerprint(path, key):
        try:
            return read_analysis(path)
        except StoreError as error:
            log.warning("%s is not reusable (%s); analysing again", path, error)
    analyses = analyze_spaces(
        attributions.heatmaps, attributions.labels, class_names, config,
        concepts=attributions.concepts, spaces=spaces, dataset_wide=dataset_wide,
    )
    write_analysis(path, analyses, config)
    with h5py.File(path, "a") as handle:
        handle.attrs["fingerprint"] = key
    return analyses


def _run_folder(spec: JobSpec) -> Path:
    """Where this run's report goes; with dated runs, a new folder and old ones pruned."""
    out = spec.output_dir
    if not spec.job.dated:
        return out
    runs = out / "runs"
    folder = runs / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    folder.mkdir(parents=True, exist_ok=False)
    dated = _dated_runs(runs)
    for old in dated[: max(0, len(dated) - spec.job.keep_runs)]:
        shutil.rmtree(old)
    return folder


def _dated_runs(runs: Path) -> list[Path]:
    """The run folders (``<UTC time>``) under ``runs``, oldest first; none when it is missing."""
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if p.is_dir() and RUN_NAME.match(p.name))


def report_folder(spec: JobSpec) -> Path:
    """The folder of the job's latest report: ``<output>/<job>/``, or with ``dated = true``
    the newest ``runs/<UTC time>/`` that holds a ``summary.json``.

    Raises FileNotFoundError, naming the command to run, when the job has no report yet.
    """
    out = spec.output_dir
    if spec.job.dated:
        runs = out / "runs"
        finished = [p for p in _dated_runs(runs) if (p / "summary.json").is_file()]
        if finished:
            return finished[-1]
        raise FileNotFoundError(f"no finished run under {runs}; run 'spray audit' on the job first.")
    if not (out / "summary.json").is_file():
        raise FileNotFoundError(f"{out / 'summary.json'} not found; run 'spray audit' on the job first.")
    return out


def _inside(root: Path, path: Path) -> Path:
    """``path`` if it lies inside ``root`` (both resolved), else a ValueError: nothing is written outside."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{resolved} lies outside the output folder {root}; refusing to write there.")
    return resolved


def given_model_facts(model: torch.nn.Module, data: AuditData) -> dict[str, Any]:
    """Headline facts of a model handed to :func:`run_audit` in memory (e.g. a corrected one)."""
    facts: dict[str, Any] = {"model_weights": "(in memory)"}
    if data.demo_test is not None:
        facts["test_accuracy"] = evaluate_accuracy(model, data.demo_test.images, data.demo_test.labels)
    return facts


def run_audit(
    spec: JobSpec,
    progress: bool = True,
    client: Any = None,
    *,
    model: torch.nn.Module | None = None,
    output: Path | None = None,
) -> AuditResult:
    """Run every stage of ``spec`` and return the report's location and headline numbers.

    ``client``: an optional ``dask.distributed.Client`` for the attribution pass; without
    one, ``[cluster]`` decides (``none`` runs in this process).

    ``model``: audit this in-memory model instead of the one ``[model]`` names (a
    corrected model, say); the data are still those of ``[data]``. ``output``: a folder
    inside ``<output>/<job>/`` that receives this run's attribution and analysis stages
    and its report, instead of the job's own folder. The data stage and the demo model
    cache stay in ``<output>/<job>/stages``, so such a run explains the very samples of
    the job's audit.
    """
    torch.manual_seed(spec.job.seed)
    job_stages = _inside(spec.output_dir, spec.output_dir / "stages")
    out = spec.output_dir if output is None else _inside(spec.output_dir, Path(output))
    stages = _inside(out, out / "stages")
    fix = "set [job] output in the job file to a folder this user can write to."
    writable_folder(stages, fix)
    writable_folder(job_stages, fix)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    data = open_data(spec, job_stages)
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    if model is None:
        model, facts = open_model(spec, data, job_stages)
    else:
        facts = given_model_facts(model, data)
    timings["model"] = time.perf_counter() - start

    start = time.perf_counter()
    settings = attribution_settings(spec, model)
    attributions_path = stages / "attributions.h5"
    own_client = None
    if client is None and spec.cluster.kind != "none":
        from spray.attribution.distributed import start_client

        c = spec.cluster
        client = own_client = start_client(c.kind, c.workers, c.threads_per_worker, c.memory_limit, c.address)
    try:
        attribute_dataset(
            data.source, model, settings, attributions_path, data.fingerprint, progress=progress, client=client, write=spec.cluster.write
        )
    finally:
        if own_client is not None:
            own_client.close()
            if spec.cluster.kind == "local":
                own_client.cluster.close()
    timings["attribution"] = time.perf_counter() - start

    check = None
    if data.demo_test is not None and spec.data.artifact_fraction > 0:
        check = artifact_check(model, data.demo_test, spec.data.artifact_class)

    start = time.perf_counter()
    config = spray_config(spec)
    with read_attributions(attributions_path) as attributions:
        spaces = analysis_spaces(spec, list(attributions.concepts))
        analyses = _analyse(attributions, data.source.class_names, config, stages / "analysis.h5", spaces, spec.analysis.dataset_wide)
        timings["analysis"] = time.perf_counter() - start

        start = time.perf_counter()
        predictions = attributions.predictions
        facts.setdefault("accuracy_on_audited_data", float((predictions == attributions.labels).mean()))
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
        atlas = None
        if settings.layers and any(c.flagged for a in analyses for c in a.clusters):
            low, high = settings.input_range
            conditional = make_conditional_explainer(
                model, settings.composite, settings.canonizers, settings.layers[-1], low=low, high=high, engine=settings.engine
            )
            atlas = build_concept_atlas(
                model, None, data.source, attributions, analyses, settings.layers[-1],
                model_input=settings.model_input, conditional=conditional,
            )
        context = ReportContext(
            job_name=spec.job.name,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            class_names=list(data.source.class_names),
            sample_ids=attributions.sample_ids,
            labels=attributions.labels,
            predictions=predictions,
            images=SourceImages(data.source),
            heatmaps=attributions.heatmaps,
            analyses=analyses,
            threshold=config.threshold,
            metadata=metadata,
            artifact_check=check,
            ground_truth_rows=data.stamped_rows if data.stamped_rows is not None and len(data.stamped_rows) else None,
            concept_atlas=atlas,
        )
        report = render_report(context, _inside(out, _run_folder(spec) if output is None else out))
    if hasattr(data.source, "close"):
        data.source.close()
    try:
        write_index(spec.output_dir.parent)
    except (OSError, ValueError) as error:
        log.warning("audit index not updated: %s", error)
    timings["report"] = time.perf_counter() - start
    summary = json.loads((report.parent / "summary.json").read_text())
    return AuditResult(report=report, summary=summary, timings=timings, facts=facts)
