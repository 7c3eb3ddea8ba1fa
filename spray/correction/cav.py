"""Concept activation vectors (CAVs): the direction in a layer's activation space that an artifact takes.

A CAV is estimated from two groups of samples: *artifact* samples (rows the caller names,
e.g. the members of a flagged SpRAy cluster) and *clean* samples (by default the other
samples of the same class, so the CAV separates the artifact rather than the class).

Activations are read at a named layer and reduced to one vector per sample:

* ``"max"``: the per-channel maximum over space. A small localised artifact (a corner tag)
  lights up a few channels at a few positions; the maximum keeps that signal, the mean
  dilutes it by the image area. The default.
* ``"mean"``: the per-channel mean over space.
* ``"flatten"``: the whole activation tensor as one vector (channels × positions). It also
  encodes *where* the artifact sits, which suits artifacts with a fixed position.

Estimators:

* ``"pattern"`` (default): the difference of the class means, unit-normalised. A *pattern*
  says in which direction the artifact moves the activations; it is the right direction
  to remove (project out) or to make the model insensitive to.
* ``"svm"``, ``"logistic"``, ``"ridge"``: linear *filters* (a linear SVM, logistic regression
  or a ridge classifier) that best tell the groups apart; class-balanced, with the
  regularisation strength chosen by stratified cross-validation. A filter plus its
  intercept is a good *detector*, but its direction also suppresses noise and correlated
  features, so it is a worse direction to project out.

Every CAV records its detection AUC, measured on a held-out part of the samples (a
stratified split with a fixed ``random_state``) with the direction fitted on the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from spray.correction.config import CLEAN_SCOPES, ESTIMATORS, POOLINGS
from spray.correction.errors import CAVError


#: The fewest artifact samples a CAV is estimated from.
MIN_ARTIFACT_SAMPLES = 5
#: The fewest clean samples a CAV is estimated from.
MIN_CLEAN_SAMPLES = 5
#: Cross-validation folds used to choose a filter CAV's regularisation.
CV_FOLDS = 3
CAV_FORMAT_VERSION = 1
#: Layer names listed at most in the error for an unknown layer.
MAX_LISTED_LAYERS = 60


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module called ``layer`` in ``model.named_modules()``; a :class:`CAVError` listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    names = [name for name in modules if name]
    listed = ", ".join(names[:MAX_LISTED_LAYERS]) + (f", ... ({len(names) - MAX_LISTED_LAYERS} more)" if len(names) > MAX_LISTED_LAYERS else "")
    raise CAVError(
        f"layer {layer!r} not found in the model; valid layers: {listed or 'none (the model has no sub-modules)'}. "
        "Choose a layer whose output is all the later layers see (e.g. the activation at the end of a block) "
        "and pass it as the CAV layer ([correct] layer in the job spec, or spray correct --layer)."
    )


def pool_activation(activation: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce activations (B, C, *spatial) to feature vectors (B, D) as ``pooling`` says.

    Activations that are already flat (B, D) are returned unchanged for every pooling.
    """
    if pooling not in POOLINGS:
        raise CAVError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}.")
    if activation.ndim <= 2:
        return activation
    if pooling == "max":
        return activation.flatten(2).amax(dim=2)
    if pooling == "mean":
        return activation.flatten(2).mean(dim=2)
    return activation.flatten(1)


class _Recorder:
    """Forward hook that keeps the latest output of one module."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            raise CAVError(f"the layer's output must be a single tensor, got {type(output).__name__}.")
        self.output = output.detach()


@torch.no_grad()
def layer_activations(
    model: nn.Module,
    images: np.ndarray,
    layer: str,
    pooling: str = "max",
    batch_size: int = 256,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pooled activations (N, D) float32 of ``layer`` for numpy ``images``, and one sample's activation shape.

    The model runs in eval mode without gradients; only the named layer's output is kept,
    pooled batch by batch, so memory stays at one batch of full activations.
    """
    module = layer_module(model, layer)
    if pooling not in POOLINGS:
        raise CAVError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}.")
    model.eval()
    recorder = _Recorder()
    handle = module.register_forward_hook(recorder)
    pooled: list[np.ndarray] = []
    shape: tuple[int, ...] = ()
    try:
        for start in range(0, len(images), batch_size):
            model(torch.as_tensor(np.ascontiguousarray(images[start : start + batch_size])))
            assert recorder.output is not None
            shape = tuple(recorder.output.shape[1:])
            pooled.append(pool_activation(recorder.output, pooling).float().numpy())
    finally:
        handle.remove()
    if not pooled:
        raise CAVError("no images given: activations need at least one sample.")
    return np.concatenate(pooled), shape


@torch.no_grad()
def mean_activation(model: nn.Module, images: np.ndarray, layer: str, batch_size: int = 256) -> torch.Tensor:
    """The mean full activation (C, *spatial) of ``layer`` over ``images`` (float64 accumulation)."""
    module = layer_module(model, layer)
    model.eval()
    recorder = _Recorder()
    handle = module.register_forward_hook(recorder)
    total: torch.Tensor | None = None
    try:
        for start in range(0, len(images), batch_size):
            model(torch.as_tensor(np.ascontiguousarray(images[start : start + batch_size])))
            assert recorder.output is not None
            batch_sum = recorder.output.double().sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
    finally:
        handle.remove()
    if total is None:
        raise CAVError("no images given: a mean activation needs at least one sample.")
    return (total / len(images)).float()


@dataclass
class CAV:
    """One concept activation vector and what is needed to use it.

    Attributes:
        layer: the model layer (name in ``named_modules()``) whose output the CAV lives in.
        pooling: how activations were reduced to vectors (``"max"``, ``"mean"``, ``"flatten"``).
        direction: unit vector (D,), pointing from clean towards artifact samples.
        clean_mean: mean feature vector (D,) of the clean samples the CAV was fitted on.
        reference: the clean samples' value of ``direction · activation`` where a projection
            applies it: one value per spatial position (shape = spatial shape) for a pooled
            CAV on a convolutional layer, a scalar (shape ()) otherwise. See
            :mod:`spray.correction.clarc` for why per position.
        artifact_reference: the same for the artifact samples (same shape as ``reference``):
            where along the direction the artifact puts the activations.
        intercept: detector offset: ``score = direction · features + intercept`` is positive
            on the artifact side (for a pattern CAV, the midpoint between the two means).
        estimator: ``"pattern"``, ``"svm"``, ``"logistic"`` or ``"ridge"``.
        auc: detection ROC AUC of ``score`` on the held-out samples.
        n_artifact: artifact samples used (fit and held-out together).
        n_clean: clean samples used (fit and held-out together).
        class_id: the class the artifact samples belong to (their most common label).
        clean_scope: ``"same_class"`` or ``"all"``: where the clean samples came from.
        activation_shape: one sample's activation shape at ``layer`` (C, *spatial).
        random_state: seed of the held-out split and the cross-validation.
    """

    layer: str
    pooling: str
    direction: torch.Tensor
    clean_mean: torch.Tensor
    reference: torch.Tensor
    artifact_reference: torch.Tensor
    intercept: float
    estimator: str
    auc: float
    n_artifact: int
    n_clean: int
    class_id: int
    clean_scope: str = "same_class"
    activation_shape: tuple[int, ...] = field(default_factory=tuple)
    random_state: int = 0

    @property
    def per_position(self) -> bool:
        """True when the CAV is applied at every spatial position (pooled CAV, spatial activation)."""
        return self.pooling != "flatten" and len(self.activation_shape) > 1

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Detector score ``direction · features + intercept`` for pooled features (B, D)."""
        return features @ self.direction.to(features.dtype) + self.intercept

    def metadata(self) -> dict[str, object]:
        """Everything but the tensors, as JSON-ready values."""
        return {
            "format_version": CAV_FORMAT_VERSION,
            "layer": self.layer,
            "pooling": self.pooling,
            "intercept": float(self.intercept),
            "estimator": self.estimator,
            "auc": float(self.auc) if math.isfinite(self.auc) else None,
            "n_artifact": int(self.n_artifact),
            "n_clean": int(self.n_clean),
            "class_id": int(self.class_id),
            "clean_scope": self.clean_scope,
            "activation_shape": [int(s) for s in self.activation_shape],
            "random_state": int(self.random_state),
        }

    def save(self, path: str | Path) -> Path:
        """Write the tensors to ``path`` (``torch.save``, loadable with ``weights_only=True``) and
        the metadata to the same name with suffix ``.json``; return ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "direction": self.direction.detach().cpu().contiguous(),
            "clean_mean": self.clean_mean.detach().cpu().contiguous(),
            "reference": self.reference.detach().cpu().contiguous(),
            "artifact_reference": self.artifact_reference.detach().cpu().contiguous(),
        }
        torch.save(tensors, path)
        path.with_suffix(".json").write_text(json.dumps(self.metadata(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CAV:
        """Read a CAV written by :meth:`save` (tensors with ``weights_only=True``, metadata from JSON)."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as error:
            raise CAVError(f"cannot load the CAV: {error.filename} is missing (a CAV is a .pt file and a .json beside it).") from error
        if meta.get("format_version") != CAV_FORMAT_VERSION:
            raise CAVError(f"{meta_path}: CAV format version {meta.get('format_version')!r} is not supported (expected {CAV_FORMAT_VERSION}).")
        auc = meta["auc"]
        return cls(
            layer=meta["layer"],
            pooling=meta["pooling"],
            direction=tensors["direction"],
            clean_mean=tensors["clean_mean"],
            reference=tensors["reference"],
            artifact_reference=tensors["artifact_reference"],
            intercept=float(meta["intercept"]),
            estimator=meta["estimator"],
            auc=float("nan") if auc is None else float(auc),
            n_artifact=int(meta["n_artifact"]),
            n_clean=int(meta["n_clean"]),
            class_id=int(meta["class_id"]),
            clean_scope=meta["clean_scope"],
            activation_shape=tuple(meta["activation_shape"]),
            random_state=int(meta["random_state"]),
        )


def _filter_search(estimator: str, random_state: int) -> tuple[object, dict[str, list[float]]]:
    """The class-balanced linear classifier and its regularisation grid for ``estimator``."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.svm import LinearSVC

    if estimator == "svm":
        return LinearSVC(class_weight="balanced", max_iter=20000, random_state=random_state), {"C": [1e-3, 1e-2, 1e-1, 1.0]}
    if estimator == "logistic":
        return LogisticRegression(class_weight="balanced", max_iter=5000), {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
    return RidgeClassifier(class_weight="balanced"), {"alpha": [1e-1, 1.0, 10.0, 100.0, 1000.0]}


def fit_direction(features: np.ndarray, is_artifact: np.ndarray, estimator: str = "pattern", random_state: int = 0) -> tuple[np.ndarray, float]:
    """Unit direction (D,) and intercept separating artifact (``is_artifact`` True) from clean features.

    ``features @ direction + intercept`` is positive on the artifact side. Filter estimators
    run on standardised features and their weights are mapped back to the raw feature
    space before normalising, so the direction applies to raw activations.
    """
    if estimator not in ESTIMATORS:
        raise CAVError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}.")
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(is_artifact, dtype=bool)
    if estimator == "pattern":
        mean_artifact, mean_clean = x[y].mean(axis=0), x[~y].mean(axis=0)
        weights = mean_artifact - mean_clean
        norm = float(np.linalg.norm(weights))
        if norm == 0.0:
            raise CAVError("artifact and clean samples have identical mean activations: no direction to estimate; try another layer.")
        direction = weights / norm
        return direction, float(-direction @ (mean_artifact + mean_clean) / 2.0)
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    model, grid = _filter_search(estimator, random_state)
    folds = min(CV_FOLDS, int(y.sum()), int((~y).sum()))
    search = GridSearchCV(model, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=random_state), scoring="roc_auc")
    search.fit(scaler.transform(x), y.astype(int))
    best = search.best_estimator_
    w_std = np.ravel(best.coef_)
    b_std = float(np.ravel(best.intercept_)[0])
    w_raw = w_std / scale
    b_raw = b_std - float(w_raw @ scaler.mean_)
    norm = float(np.linalg.norm(w_raw))
    if norm == 0.0:
        raise CAVError(f"the {estimator} filter has all-zero weights: the groups are not separable at this layer; try another layer or estimator.")
    return w_raw / norm, b_raw / norm


def _check_rows(rows: np.ndarray, n_samples: int, what: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise CAVError(f"{what} must be a 1-D array of integer row indices, got dtype {rows.dtype} and shape {rows.shape}.")
    rows = np.unique(rows.astype(np.int64))
    bad = rows[(rows < 0) | (rows >= n_samples)]
    if bad.size:
        raise CAVError(f"{what} contain {bad.size} index(es) outside 0..{n_samples - 1} (e.g. {bad[:5].tolist()}).")
    return rows


def _held_out_counts(n: int, test_size: float) -> tuple[int, int]:
    """(fit, held-out) sizes of one group under a stratified split with ``test_size``."""
    n_test = math.ceil(test_size * n)
    return n - n_test, n_test


def _check_counts(n_artifact: int, n_clean: int, test_size: float, estimator: str) -> None:
    """Raise a clear error when the split or the cross-validation lacks samples."""
    need_fit = CV_FOLDS if estimator != "pattern" else 2
    fit_art, test_art = _held_out_counts(n_artifact, test_size)
    if n_artifact < MIN_ARTIFACT_SAMPLES or fit_art < need_fit or test_art < 1:
        need = MIN_ARTIFACT_SAMPLES
        while True:
            fit_n, test_n = _held_out_counts(need, test_size)
            if fit_n >= need_fit and test_n >= 1:
                break
            need += 1
        raise CAVError(
            f"too few artifact samples for a CAV: got {n_artifact}, need at least {need} "
            f"({'at least ' + str(MIN_ARTIFACT_SAMPLES) + ', with ' if need > MIN_ARTIFACT_SAMPLES else ''}"
            f"{need_fit} to fit and 1 held out at test_size={test_size}). "
            "Pass more rows (e.g. all members of the flagged cluster, or a larger cluster), or lower test_size."
        )
    fit_clean, test_clean = _held_out_counts(n_clean, test_size)
    if n_clean < MIN_CLEAN_SAMPLES or fit_clean < need_fit or test_clean < 1:
        raise CAVError(
            f"too few clean samples for a CAV: got {n_clean}, need at least {max(MIN_CLEAN_SAMPLES, need_fit + 1)}. "
            "Use clean='all' to take clean samples from every class, or pass fewer artifact rows."
        )


def fit_cav(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    artifact_rows: Sequence[int] | np.ndarray,
    layer: str,
    *,
    class_id: int | None = None,
    n_classes: int | None = None,
    clean: str = "same_class",
    pooling: str = "max",
    estimator: str = "pattern",
    test_size: float = 0.25,
    max_clean: int | None = 2000,
    batch_size: int = 256,
    random_state: int = 0,
) -> CAV:
    """Estimate the CAV of the artifact carried by ``images[artifact_rows]`` at ``layer``.

    Args:
        model: the classifier (eval mode is set; weights are not changed).
        images: all samples (N, C, H, W) float32, e.g. the audited training set.
        labels: their class labels (N,).
        artifact_rows: rows of ``images`` that carry the artifact (e.g. a flagged cluster's
            ``member_rows`` from ``summary.json``).
        layer: module name as in ``model.named_modules()``.
        class_id: the artifact class; by default the most common label of the artifact rows.
        n_classes: number of classes, for the range check of ``class_id`` (default: from labels).
        clean: ``"same_class"`` (default: the class's other samples) or ``"all"`` (every
            other sample, of any class).
        pooling: ``"max"`` (default), ``"mean"`` or ``"flatten"`` (see the module docstring).
        estimator: ``"pattern"`` (default), ``"svm"``, ``"logistic"`` or ``"ridge"``.
        test_size: share of each group held out to measure the detection AUC.
        max_clean: clean samples are subsampled to at most this many (None: all).
        batch_size: images per forward pass.
        random_state: seed of the clean subsample, the held-out split and the cross-validation.
    """
    layer_module(model, layer)
    if pooling not in POOLINGS:
        raise CAVError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}.")
    if estimator not in ESTIMATORS:
        raise CAVError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}.")
    if clean not in CLEAN_SCOPES:
        raise CAVError(f"unknown clean scope {clean!r}; choose one of {list(CLEAN_SCOPES)}.")
    if not 0.0 < test_size < 1.0:
        raise CAVError(f"test_size must be in (0, 1), got {test_size}.")
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise CAVError(f"images and labels differ in length: {len(images)} vs {len(labels)}.")
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    rows = _check_rows(np.asarray(artifact_rows), len(images), "artifact rows")
    if rows.size == 0:
        raise CAVError("no artifact rows given: pass the rows (indices into images) that carry the artifact.")
    if class_id is None:
        class_id = int(np.bincount(labels[rows]).argmax())
    if not 0 <= int(class_id) < n_classes:
        raise CAVError(
            f"class_id {class_id} is out of range: the data has {n_classes} classes (ids 0..{n_classes - 1}). "
            "Pass the id of the class the artifact rows belong to, or leave class_id out to take their most common label."
        )
    class_id = int(class_id)

    is_artifact_row = np.zeros(len(images), dtype=bool)
    is_artifact_row[rows] = True
    candidates = (labels == class_id) if clean == "same_class" else np.ones(len(images), dtype=bool)
    clean_rows = np.flatnonzero(candidates & ~is_artifact_row)
    rng = np.random.default_rng(random_state)
    if max_clean is not None and len(clean_rows) > max_clean:
        clean_rows = np.sort(rng.choice(clean_rows, size=max_clean, replace=False))
    _check_counts(len(rows), len(clean_rows), test_size, estimator)

    used = np.concatenate([rows, clean_rows])
    target = np.concatenate([np.ones(len(rows), bool), np.zeros(len(clean_rows), bool)])
    features, shape = layer_activations(model, images[used], layer, pooling, batch_size)
    fit_idx, test_idx = train_test_split(
        np.arange(len(used)), test_size=test_size, stratify=target, random_state=random_state
    )
    direction, intercept = fit_direction(features[fit_idx], target[fit_idx], estimator, random_state)
    scores = features[test_idx].astype(np.float64) @ direction + intercept
    auc = float(roc_auc_score(target[test_idx], scores))

    fit_clean = fit_idx[~target[fit_idx]]
    direction_t = torch.from_numpy(direction).float()
    clean_mean = torch.from_numpy(features[fit_clean].astype(np.float64).mean(axis=0)).float()
    cav = CAV(
        layer=layer,
        pooling=pooling,
        direction=direction_t,
        clean_mean=clean_mean,
        reference=torch.zeros(()),
        artifact_reference=torch.zeros(()),
        intercept=intercept,
        estimator=estimator,
        auc=auc,
        n_artifact=len(rows),
        n_clean=len(clean_rows),
        class_id=class_id,
        clean_scope=clean,
        activation_shape=shape,
        random_state=random_state,
    )
    fit_artifact = fit_idx[target[fit_idx]]
    if cav.per_position:
        # The mean activation at every position, seen along the CAV direction.
        for rows_of_group, attribute in ((fit_clean, "reference"), (fit_artifact, "artifact_reference")):
            position_mean = mean_activation(model, images[used[rows_of_group]], layer, batch_size)
            setattr(cav, attribute, torch.einsum("c...,c->...", position_mean, direction_t))
    else:
        cav.reference = (clean_mean @ direction_t).reshape(())
        artifact_mean = torch.from_numpy(features[fit_artifact].astype(np.float64).mean(axis=0)).float()
        cav.artifact_reference = (artifact_mean @ direction_t).reshape(())
    return cav
