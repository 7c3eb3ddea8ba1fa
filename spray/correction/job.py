"""``spray correct``: one job's correction, on the data and model that its audit explained.

:func:`correct_job` opens the job's data and model exactly as ``spray audit`` does
(:func:`spray.audit.open_job_data`, :func:`spray.audit.open_job_model`), corrects the model
for one flag of the audit's ``summary.json`` (:func:`spray.correction.run.correct_model`),
with ``[correct] reaudit`` audits the corrected model again (:mod:`spray.correction.reaudit`),
and writes everything to the job's ``correction/<method>/`` folder
(:class:`spray.store.folders.JobFolders`): the export, ``report.json``, ``index.html`` and
the re-audit in ``reaudit/``.

**Evaluation data.** Data that carry a planted artifact (the demo's,
:class:`spray.data.open.PlantedArtifact`) bring what an evaluation needs: the correction is
fitted on every audited sample and evaluated on the artifact's own held-out test split,
attacked with its stamping function, its relevance share measured inside its region. Other
data are split into a fitting and a held-out part, attacked with the job's ``[correct] stamp``
or with the flagged samples' own evidence pasted (:mod:`spray.correction.user`).

**Input space.** Sources yield display images in [0, 1]; the model sees them normalised with
``[data] mean``/``std``. The correction works on the normalised images (so the exported model
takes the same input as the audited one); stamping happens on display images.

**Layer.** ``[correct] layer = "auto"`` is the layer the model's package names for it (the demo
net's :data:`spray.models.demo.DEMO_CAV_LAYER`), else
:func:`spray.correction.user.default_layer` of the audit's concept layers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from spray.attribution.settings import AttributionSettings
from spray.confirm.resolve import confirmed_as_overlay
from spray.correction.config import AUTO_LAYER, CorrectionConfig
from spray.correction.counterfactual import MAX_REST, Evidence, sampled_evidence
from spray.correction.errors import CorrectionError
from spray.correction.evaluate import Stamp
from spray.correction.images import CountingReader, RowImages
from spray.correction.page import write_correction_files
from spray.correction.reaudit import run_reaudit
from spray.correction.run import CorrectionReport, EvaluationPlan, build_correction, correct_model, job_config
from spray.correction.search import search
from spray.correction.unseen import unseen_members_check
from spray.correction.user import cut_points, default_layer, held_out_evaluation, read_audit_heatmaps
from spray.data.open import AuditData, PlantedArtifact
from spray.jobs import JobSpec
from spray.models.demo import DEMO_CAV_LAYER, DemoNet
from spray.report.index import refresh_index

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class InputSpace:
    """Display images in [0, 1] <-> the model's input (normalised with ``mean``/``std`` when given)."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def _stats(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (1, -1) + (1,) * (images.ndim - 2)
        return np.asarray(self.mean, np.float32).reshape(shape), np.asarray(self.std, np.float32).reshape(shape)

    def to_model(self, images: np.ndarray) -> np.ndarray:
        """The model's input for display ``images`` (float32)."""
        images = np.asarray(images, dtype=np.float32)
        if not self.mean:
            return images
        mean, std = self._stats(images)
        return ((images - mean) / std).astype(np.float32)

    def to_display(self, inputs: np.ndarray) -> np.ndarray:
        """Display images for model ``inputs``, clipped to [0, 1] against rounding."""
        inputs = np.asarray(inputs, dtype=np.float32)
        if not self.mean:
            return inputs
        mean, std = self._stats(inputs)
        return np.clip(inputs * std + mean, 0.0, 1.0).astype(np.float32)

    def stamp_inputs(self, stamp: Stamp) -> Stamp:
        """``stamp`` (on display images) as a stamp on model inputs."""
        return lambda inputs: self.to_model(stamp(self.to_display(inputs)))


@dataclass
class JobInputs:
    """A job's audited samples and model as its audit saw them, with the audit's attribution
    settings. ``display`` reads the images a step asks for (:mod:`spray.correction.images`),
    so the data stay open until :meth:`close` (or the end of a ``with`` block)."""

    model: nn.Module
    display: RowImages
    labels: np.ndarray
    n_classes: int
    space: InputSpace
    attribution: AttributionSettings
    planted: PlantedArtifact | None
    data: AuditData
    reader: CountingReader

    def close(self) -> None:
        self.data.close()

    def __enter__(self) -> JobInputs:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def load_job_inputs(spec: JobSpec) -> JobInputs:
    """Data and model of job ``spec`` exactly as ``spray audit`` opens them (the demo's from its
    ``input.h5`` and model cache), with the audit's attribution settings and the data's planted
    artifact. No image is read yet; close the inputs when done."""
    from spray.audit import open_job_data, open_job_model

    data = open_job_data(spec)
    try:
        model, _ = open_job_model(spec, data)
        labels = np.asarray(data.source.labels)
        if len(labels) == 0:
            raise CorrectionError("the job's data hold no sample; check [data] and audit the job again.")
        reader = CountingReader(data.source.read)
        image_shape = tuple(data.source.read(np.arange(1)).shape[1:])
        display = RowImages(reader, np.arange(len(labels)), image_shape)
        n_classes = len(data.source.class_names)
    except BaseException:
        data.close()
        raise
    settings = spec.attribution.for_model(model)
    return JobInputs(
        model=model.eval(), display=display, labels=labels, n_classes=n_classes, space=InputSpace(settings.mean, settings.std),
        attribution=settings, planted=data.planted, data=data, reader=reader,
    )


def auto_layer(model: nn.Module, candidates: tuple[str, ...]) -> str:
    """What ``[correct] layer = "auto"`` means for ``model``: the demo net's own layer, else
    :func:`spray.correction.user.default_layer` of ``candidates`` (the audit's concept layers)."""
    return DEMO_CAV_LAYER if isinstance(model, DemoNet) else default_layer(model, candidates)


def planted_evaluation(planted: PlantedArtifact, display: RowImages, labels: np.ndarray, members: np.ndarray) -> EvaluationPlan:
    """Fit on every audited sample; evaluate on the planted artifact's own test split, with its stamp and region."""
    return EvaluationPlan(
        fit_images=display, fit_labels=labels, test_images=planted.test.images, test_labels=planted.test.labels,
        artifact_rows=members, stamp=planted.stamp, mask=planted.region, facts=None,
    )


def flag_members(flag: dict[str, Any], n_samples: int) -> tuple[int, np.ndarray]:
    """(class index, sorted unique member rows) of ``flag``; its rows must index data of ``n_samples``."""
    members = np.unique(np.asarray(flag["member_rows"], dtype=np.int64))
    if members.size and (members.min() < 0 or members.max() >= n_samples):
        raise CorrectionError(f"the flag's member rows reach {int(members.max())}, but the data hold {n_samples} samples; audit the job again.")
    return int(flag["class_index"]), members


def flag_evidence(spec: JobSpec, inputs: JobInputs, plan: EvaluationPlan, class_id: int, seed: int) -> Evidence:
    """The evidence of the flag's fitting members for counterfactual fine-tuning
    (:func:`spray.correction.counterfactual.sampled_evidence`): their heatmaps from the audit
    against the rest of their class's, on their images as the model sees them; the attacked
    set's donors (``plan.attack_donors``) left out, so that the correction is not judged on
    evidence it was shown. Rows of the evidence index ``plan.fit_images``."""
    fit_rows = np.arange(len(plan.fit_labels)) if plan.fit_rows is None else plan.fit_rows
    members = np.asarray(plan.artifact_rows, dtype=np.int64)
    rest = np.setdiff1d(np.flatnonzero(plan.fit_labels == class_id), members)
    shown = members if plan.attack_donors is None else np.setdiff1d(members, plan.attack_donors)
    return sampled_evidence(
        shown, rest, lambda rows: read_audit_heatmaps(spec, fit_rows[rows], len(inputs.labels)),
        lambda rows: inputs.space.to_model(inputs.display[fit_rows[rows]]), seed,
    )


def unseen_check(spec: JobSpec, inputs: JobInputs, plan: EvaluationPlan, class_id: int, corrected: nn.Module, seed: int) -> dict[str, Any]:
    """:func:`spray.correction.unseen.unseen_members_check` of the flag's members in the
    held-out part (``plan.unseen_rows``), against a seeded sample of at most
    :data:`~spray.correction.counterfactual.MAX_REST` of the rest of their class in the fitting part."""
    unseen = np.asarray(plan.unseen_rows, dtype=np.int64)
    fit_rows = plan.fit_rows if plan.fit_rows is not None else np.arange(len(plan.fit_labels))
    rest = np.setdiff1d(fit_rows[plan.fit_labels == class_id], fit_rows[plan.artifact_rows])
    if len(rest) > MAX_REST:
        rest = np.sort(np.random.default_rng([seed, 17]).choice(rest, size=MAX_REST, replace=False))

    def read(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return inputs.space.to_model(np.asarray(inputs.display[rows])), read_audit_heatmaps(spec, rows, len(inputs.labels))

    return unseen_members_check(inputs.model, corrected, *read(unseen), *read(rest), class_id)


def correct_job(spec: JobSpec, flag: dict[str, Any], config: CorrectionConfig | None = None, *, progress: bool = False) -> CorrectionReport:
    """Correct the model of job ``spec`` for ``flag`` (an entry of its ``summary.json`` flags) and evaluate it.

    ``config``: the correction's parameters (default: the job's ``[correct]``, see
    :func:`spray.correction.run.job_config`). See the module docstring for the evaluation
    data, the input space and the layer. The reports index above the job's folder is
    written again and lists the correction.
    """
    config = config or job_config(spec)
    with load_job_inputs(spec) as inputs:
        explicit_layer = config.layer != AUTO_LAYER
        if not explicit_layer:
            config = dataclasses.replace(config, layer=auto_layer(inputs.model, inputs.attribution.layers))
        class_id, members = flag_members(flag, len(inputs.labels))
        folder = spec.folders.correction(config.method)
        if inputs.planted is not None:
            plan = planted_evaluation(inputs.planted, inputs.display, inputs.labels, members)
        else:
            plan = held_out_evaluation(
                spec, inputs.display, inputs.labels, members, class_id, config, folder, overlay=confirmed_as_overlay(flag.get("confirmation")),
            )
        space = inputs.space
        # the search and the correction ask for the flagged class's rows again and again: each is read once
        fit_images = (
            plan.fit_images.mapped(space.to_model).remembering() if isinstance(plan.fit_images, RowImages) else space.to_model(plan.fit_images)
        )
        evidence = flag_evidence(spec, inputs, plan, class_id, config.seed) if config.method == "counterfactual" else None
        searched, chosen = None, None
        if config.search:
            layers = [config.layer] if explicit_layer else cut_points(inputs.model, inputs.attribution.layers) or [config.layer]
            config, searched, chosen = search(
                inputs.model, fit_images, plan.fit_labels, plan.artifact_rows, config, layers,
                space.stamp_inputs(plan.stamp if plan.search_stamp is None else plan.search_stamp), build_correction,
                class_id=class_id, n_classes=inputs.n_classes, evidence=evidence,
            )
        report = correct_model(
            inputs.model, fit_images, plan.fit_labels, space.to_model(plan.test_images), plan.test_labels,
            plan.artifact_rows, stamp=space.stamp_inputs(plan.stamp), mask=plan.mask,
            config=config, output_dir=folder, n_classes=inputs.n_classes, class_id=class_id, job=spec.job.name,
            attribution=inputs.attribution, evaluation_set=plan.facts, evidence=evidence, corrected=chosen,
        )
        report.search = searched
        if plan.unseen_rows is not None:
            report.unseen = unseen_check(spec, inputs, plan, class_id, report.model, config.seed)
        report.images_read = {"read": inputs.reader.images_read, "distinct": len(inputs.reader.distinct_rows), "audited": len(inputs.labels)}
    if config.reaudit:
        report.reaudit = run_reaudit(spec, inputs.model, report.model, flag, spec.folders.reaudit(config.method), progress=progress)
        report.seconds["reaudit"] = report.reaudit["seconds"]
    report.judge()  # the re-audit is the final word
    write_correction_files(report.to_dict(), folder, spec.job.name)
    refresh_index(spec.folders.root.parent)
    return report
