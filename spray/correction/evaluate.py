"""Before/after evaluation of a correction: accuracy, attacked accuracy, artifact relevance, gate quality.

* **clean accuracy**: top-1 accuracy on the test images as they are.
* **attacked accuracy**: top-1 accuracy on the *attacked* test set: the artifact stamped on
  every test image whose label is not the artifact class (those of the artifact class stay
  as they are), labels unchanged. A model that uses the artifact as a shortcut for its
  class loses accuracy here.
* **share of the attacked-accuracy loss recovered** by a correction:
  ``(attacked_after - attacked_before) / (clean_before - attacked_before)``.
* **artifact relevance**: on attacked images of the other classes, the share of positive
  LRP relevance that falls inside the artifact's mask (mean over samples). By default the
  explained logit is the artifact class's: how much of the evidence *for* that class comes
  from the artifact. The heatmaps are the audit's (its ``[attribution]`` rules, engine,
  device and precision; ``spray.attribution.select.make_explainer``).
* **gate rates** (R-ClArC): how often the gate fires on the attacked images and on the same
  images without the artifact, and its precision on the union of the two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings
from spray.correction.clarc import ClarcModel, CorrectionError
from spray.models.demo import predict, softmax_probabilities

Stamp = Callable[[np.ndarray], np.ndarray]
RELEVANCE_TARGETS: tuple[str, ...] = ("artifact", "predicted", "label")


@dataclass
class EvaluationResult:
    """One model's row of the before/after table.

    Gate fields are None for models without a gate (the original model, RR-ClArC);
    ``artifact_relevance`` is None when no mask was given. ``attacked_to_class`` and
    ``clean_to_class``: the share of the other classes' images the model puts in the
    artifact's class, stamped and not (None when no image was attacked). Their difference is
    what the attack does through the shortcut; the attacked accuracy also counts errors into
    other classes, which a pasted evidence region (part of another object) can cause in any
    model. ``attacked_class_probability`` and ``clean_class_probability``: the mean softmax
    probability of the artifact's class on the same images, stamped and not.
    """

    name: str
    clean_accuracy: float
    attacked_accuracy: float
    artifact_relevance: float | None = None
    gate_rate_attacked: float | None = None
    gate_rate_clean: float | None = None
    gate_precision: float | None = None
    n_clean: int = 0
    n_attacked: int = 0
    seconds: float | None = None
    attacked_to_class: float | None = None
    clean_to_class: float | None = None
    attacked_class_probability: float | None = None
    clean_class_probability: float | None = None

    @property
    def moved_to_class(self) -> float | None:
        """The other classes' images the attack moved into the artifact's class: the share
        given it stamped less the share given it unstamped (None when not measured). The
        verdict needs the original model's to reach ``[correct] min_attack_moves``."""
        if self.attacked_to_class is None or self.clean_to_class is None:
            return None
        return float(self.attacked_to_class - self.clean_to_class)

    @property
    def raised_class_probability(self) -> float | None:
        """The mean rise of P(artifact class) that stamping gave the other classes' images
        (None when not measured): the other half of the bar ``[correct] min_attack_raise``,
        for an attack that raises the class's probability without moving argmaxes."""
        if self.attacked_class_probability is None or self.clean_class_probability is None:
            return None
        return float(self.attacked_class_probability - self.clean_class_probability)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (NaN as None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def attack(images: np.ndarray, labels: np.ndarray, artifact_class: int, stamp: Stamp) -> tuple[np.ndarray, np.ndarray]:
    """The attacked test set and the mask of the rows that were stamped (label != artifact class)."""
    attacked = np.array(images, copy=True)
    others = np.asarray(labels) != artifact_class
    if others.any():
        stamped = np.asarray(stamp(attacked[others]), dtype=attacked.dtype)
        if stamped.shape != attacked[others].shape:
            raise CorrectionError(f"the stamping function changed the shape {attacked[others].shape} to {stamped.shape}.")
        attacked[others] = stamped
    return attacked, others


def recovered_share(before: EvaluationResult, after: EvaluationResult) -> float:
    """``(attacked_after - attacked_before) / (clean_before - attacked_before)``; NaN when there was no loss."""
    loss = before.clean_accuracy - before.attacked_accuracy
    if loss <= 0:
        return float("nan")
    return (after.attacked_accuracy - before.attacked_accuracy) / loss


def _as_mask(mask: np.ndarray | tuple[slice, slice], shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, tuple):
        boolean = np.zeros(shape, dtype=bool)
        boolean[mask] = True
        return boolean
    boolean = np.asarray(mask, dtype=bool)
    if boolean.shape != shape:
        raise CorrectionError(f"the artifact mask has shape {boolean.shape}, the heatmaps {shape}.")
    return boolean


def explained_view(model: nn.Module, attribution: AttributionSettings) -> tuple[nn.Module, AttributionSettings]:
    """The module whose heatmaps stand for ``model``'s, and the settings to explain it with (no concept layers).

    ``"auto"`` choices of ``attribution`` are resolved for the model itself or, for a ClArC
    model, for the model it corrects. A ClArC model is explained through its explainable view
    (one head pass) with zennit's engine: the fast engine cannot trace its gate.
    """
    if isinstance(model, ClarcModel):
        settings = attribution.for_model(model.model)
        return model.explainable(), dataclasses.replace(settings, engine="zennit", layers=())
    return model, dataclasses.replace(attribution.for_model(model), layers=())


def artifact_relevance(
    model: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray | tuple[slice, slice],
    attribution: AttributionSettings = AttributionSettings(),
    *,
    batch_size: int = 32,
) -> float:
    """Mean share of positive LRP relevance inside ``mask`` for ``images`` explained at ``targets``.

    ``images`` are model inputs (already normalised), explained as they are. ``mask`` is a
    boolean (H, W) array or a (rows, columns) pair of slices (e.g. the demo's
    ``tag_region()``). ``attribution``: the audit's ``[attribution]`` settings (composite,
    canonizers, engine, device, precision; the input range for ``epsilon_gamma_box``), see
    :func:`explained_view`. Samples without positive relevance are left out of the mean.
    """
    view, settings = explained_view(model, attribution)
    boolean = _as_mask(mask, tuple(images.shape[-2:]))
    shares: list[np.ndarray] = []
    with make_explainer(view, settings) as explainer:
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(images[start : start + batch_size]))
            heatmaps = explainer.explain(x, torch.as_tensor(targets[start : start + batch_size], dtype=torch.long)).heatmaps
            positive = heatmaps.clamp(min=0).double().numpy()
            total = positive.sum(axis=(1, 2))
            inside = positive[:, boolean].sum(axis=1)
            keep = total > 0
            shares.append(inside[keep] / total[keep])
    values = np.concatenate(shares) if shares else np.zeros(0)
    return float(values.mean()) if values.size else float("nan")


@torch.no_grad()
def gate_statistics(model: ClarcModel, clean: np.ndarray, stamped: np.ndarray, batch_size: int = 256) -> tuple[float, float, float]:
    """(firing rate on ``stamped``, firing rate on ``clean``, precision on their union) of a ClArC gate."""
    model.eval()

    def fired(images: np.ndarray) -> np.ndarray:
        out = [model.forward_gated(torch.as_tensor(images[i : i + batch_size]))[1].numpy() > 0 for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, bool)

    on_stamped, on_clean = fired(stamped), fired(clean)
    rate_stamped = float(on_stamped.mean()) if on_stamped.size else float("nan")
    rate_clean = float(on_clean.mean()) if on_clean.size else float("nan")
    n_fired = int(on_stamped.sum() + on_clean.sum())
    precision = float(on_stamped.sum() / n_fired) if n_fired else float("nan")
    return rate_stamped, rate_clean, precision


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    artifact_class: int,
    stamp: Stamp,
    *,
    mask: np.ndarray | tuple[slice, slice] | None = None,
    name: str = "",
    relevance_samples: int = 64,
    relevance_target: str = "artifact",
    attribution: AttributionSettings = AttributionSettings(),
    random_state: int = 0,
) -> EvaluationResult:
    """Evaluate ``model`` on clean and attacked test images (see the module docstring).

    Args:
        model: the original or a corrected model (a :class:`ClarcModel` also gets gate rates).
        images, labels: the test set.
        artifact_class: the class the artifact stands for; the other classes are attacked.
        stamp: puts the artifact on a batch of images (N, C, H, W) -> same shape.
        mask: where the artifact is, for the relevance share; None skips relevance.
        relevance_samples: attacked images explained (a fixed random subset).
        relevance_target: explained logit: ``"artifact"`` class, the ``"predicted"`` class or the ``"label"``.
        attribution: the audit's ``[attribution]`` settings, for the relevance (:func:`artifact_relevance`).
        random_state: seed of the relevance subset (same subset for every model).
    """
    if relevance_target not in RELEVANCE_TARGETS:
        raise CorrectionError(f"unknown relevance target {relevance_target!r}; choose one of {list(RELEVANCE_TARGETS)}.")
    labels = np.asarray(labels)
    attacked, others = attack(images, labels, artifact_class, stamp)
    clean_logits, attacked_logits = predict(model, images), predict(model, attacked)
    clean_predicted, attacked_predicted = clean_logits.argmax(1), attacked_logits.argmax(1)
    result = EvaluationResult(
        name=name, clean_accuracy=float((clean_predicted == labels).mean()), attacked_accuracy=float((attacked_predicted == labels).mean()),
        n_clean=len(images), n_attacked=int(others.sum()),
    )
    if others.any():
        result.attacked_to_class = float((attacked_predicted[others] == artifact_class).mean())
        result.clean_to_class = float((clean_predicted[others] == artifact_class).mean())
        result.attacked_class_probability = float(softmax_probabilities(attacked_logits[others])[:, artifact_class].mean())
        result.clean_class_probability = float(softmax_probabilities(clean_logits[others])[:, artifact_class].mean())
    other_rows = np.flatnonzero(others)
    if mask is not None and relevance_samples > 0 and other_rows.size:
        rng = np.random.default_rng(random_state)
        chosen = np.sort(rng.choice(other_rows, size=min(relevance_samples, other_rows.size), replace=False))
        subset = attacked[chosen]
        if relevance_target == "artifact":
            targets = np.full(len(chosen), artifact_class)
        elif relevance_target == "label":
            targets = labels[chosen]
        else:
            targets = predict(model, subset).argmax(1)
        result.artifact_relevance = artifact_relevance(model, subset, targets, mask, attribution)
    if isinstance(model, ClarcModel) and other_rows.size:
        result.gate_rate_attacked, result.gate_rate_clean, result.gate_precision = gate_statistics(
            model, images[other_rows], attacked[other_rows]
        )
    return result


def _cell(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def format_table(results: Sequence[EvaluationResult], baseline: EvaluationResult | None = None) -> str:
    """A plain-text table (percentages) of ``results``; with ``baseline``, the recovered share and clean-accuracy change too."""
    header = [
        "model", "clean %", "attacked %", "attacked to class %", "recovered %", "d clean pt", "tag rel. %", "gate stamped %", "gate clean %",
        "gate prec. %", "time s",
    ]
    rows = [header]
    for r in results:
        recovered = recovered_share(baseline, r) if baseline is not None else None
        delta = 100 * (r.clean_accuracy - baseline.clean_accuracy) if baseline is not None else None
        rows.append([
            r.name, _cell(r.clean_accuracy), _cell(r.attacked_accuracy), _cell(r.attacked_to_class), _cell(recovered),
            "-" if delta is None else f"{delta:+.1f}", _cell(r.artifact_relevance),
            _cell(r.gate_rate_attacked), _cell(r.gate_rate_clean), _cell(r.gate_precision), _cell(r.seconds, percent=False),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
