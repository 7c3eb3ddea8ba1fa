"""Choose the correction's layer, CAV estimator and strength by measurement, on a validation
split carved from the fitting data (never the held-out test set).

``[correct] search = true`` (the default) tries candidates before the correction is made:

* **layer**: each of the audit's concept layers at which the model can be cut (the last
  :data:`MAX_LAYERS` of them), unless ``[correct] layer`` names one;
* **CAV estimator**: each of :data:`ESTIMATORS`;
* **strength**, for RR-ClArC only: the gradient penalty ``rr_lambda`` at a tenth, once and ten
  times the configured value (at the configured layer and estimator: each is a fine-tuning);
* for counterfactual fine-tuning (no CAV is used): its learning rate at
  :data:`spray.correction.counterfactual.LEARNING_RATE_FACTORS` times ``cf_learning_rate``,
  each with every share of pasted images of :data:`~spray.correction.counterfactual.PASTE_SHARES`.
  The fine-tuning sees the evidence of the fitting split's members only, so the validation
  attack (made from all members, or from the job's stamp) also tests members it never saw.

:data:`VALIDATION_SHARE` of each class of the fitting data is set aside (seeded, stratified),
and the flag's members among it are left out of the validation: their labels are what the flag
calls into question (a backdoor's members are other classes' objects under the flagged label),
and a correction that undoes the shortcut would lose them as "clean" accuracy (on Q3's dev
backdoors on 90 % of a class, every candidate lost 10 pt that way and the weakest won). Each candidate's CAV is fitted on the rest, the corrected model is evaluated on the
validation images, clean and attacked with the correction's stamp, and the candidate that
recovers the most of the attacked-accuracy loss while costing at most ``max_clean_loss`` of
clean accuracy wins (ties: the higher CAV AUC, then the order above). When no candidate
keeps the clean accuracy, the one that loses least wins, and the outcome will say so. The
correction itself is then fitted on all the fitting data with the winner's settings, and
evaluated once on the held-out test set. Every candidate and its validation numbers go to
``report.json`` (``search``) and the correction page.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from spray.correction.cav import fit_cav
from spray.correction.config import CorrectionConfig
from spray.correction.counterfactual import LEARNING_RATE_FACTORS, PASTE_SHARES, Evidence
from spray.correction.errors import CorrectionError
from spray.correction.evaluate import evaluate, recovered_share
from spray.correction.images import RowImages
from spray.correction.outcome import ROUNDING

#: Share of each class of the fitting data set aside to choose on.
VALIDATION_SHARE = 0.2
#: CAV estimators tried.
ESTIMATORS = ("pattern", "logistic")
#: Concept layers tried, the last ones (closest to the output) first.
MAX_LAYERS = 3
#: Methods whose chosen candidate is kept as the correction, not fitted again on all the
#: fitting data: a fine-tuning's outcome varies with its data and draws, and the model that
#: was validated is the one to ship (counterfactual fine-tuning; on the demo, the refit
#: lost 1.2 pt of test accuracy where the validated candidate had lost 0.2 pt on validation).
VALIDATED_METHODS: tuple[str, ...] = ("counterfactual",)
#: RR-ClArC's penalty is tried at these multiples of ``rr_lambda``.
RR_LAMBDA_FACTORS = (0.1, 1.0, 10.0)


@dataclass
class Candidate:
    """One setting tried, with its validation numbers (None where it failed: ``error``)."""

    layer: str
    estimator: str
    rr_lambda: float | None
    learning_rate: float | None = None
    paste_share: float | None = None
    cav_auc: float | None = None
    clean_accuracy: float | None = None
    attacked_accuracy: float | None = None
    recovered: float | None = None
    clean_change: float | None = None
    seconds: float = 0.0
    error: str = ""
    chosen: bool = False

    def settings(self, config: CorrectionConfig) -> CorrectionConfig:
        changes: dict[str, Any] = {"layer": self.layer, "estimator": self.estimator}
        if self.rr_lambda is not None:
            changes["rr_lambda"] = self.rr_lambda
        if self.learning_rate is not None:
            changes["cf_learning_rate"] = self.learning_rate
        if self.paste_share is not None:
            changes["cf_paste_share"] = self.paste_share
        return dataclasses.replace(config, **changes)


def candidates_for(config: CorrectionConfig, layers: Sequence[str]) -> list[Candidate]:
    """The settings to try (see the module docstring); ``layers``: the cut points among the
    audit's concept layers, in the model's order, or the one the job names."""
    if config.method == "rr-clarc":
        return [Candidate(config.layer, config.estimator, config.rr_lambda * factor) for factor in RR_LAMBDA_FACTORS]
    if config.method == "counterfactual":
        return [
            Candidate(config.layer, config.estimator, None, learning_rate=config.cf_learning_rate * factor, paste_share=share)
            for factor in LEARNING_RATE_FACTORS
            for share in PASTE_SHARES
        ]
    tried = list(layers)[-MAX_LAYERS:][::-1]
    return [Candidate(layer, estimator, None) for layer in tried for estimator in ESTIMATORS]


def validation_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitting positions, validation positions) of ``labels``, stratified and seeded."""
    from spray.correction.user import held_out_split

    return held_out_split(labels, VALIDATION_SHARE, seed + 1)


def _better(first: Candidate, second: Candidate, max_clean_loss: float) -> bool:
    """Whether ``first`` beats ``second`` by the rule of the module docstring."""

    def key(item: Candidate) -> tuple[float, ...]:
        keeps = item.clean_change is not None and item.clean_change >= -max_clean_loss - ROUNDING
        recovered = -math.inf if item.recovered is None else item.recovered
        clean = -math.inf if item.clean_change is None else item.clean_change
        auc = -math.inf if item.cav_auc is None else item.cav_auc
        return (1.0, recovered, auc) if keeps else (0.0, clean, recovered)

    return key(first) > key(second)


def choose(candidates: Sequence[Candidate], max_clean_loss: float) -> Candidate:
    """The winner among measured ``candidates`` (the first of equals)."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if _better(candidate, best, max_clean_loss):
            best = candidate
    return best


def search(
    model: nn.Module,
    images: Any,
    labels: np.ndarray,
    artifact_rows: np.ndarray,
    config: CorrectionConfig,
    layers: Sequence[str],
    stamp: Callable[[np.ndarray], np.ndarray],
    build: Callable[..., tuple[nn.Module, dict[str, Any]]],
    *,
    class_id: int,
    n_classes: int,
    evidence: Evidence | None = None,
) -> tuple[CorrectionConfig, dict[str, Any], tuple[nn.Module, dict[str, Any]] | None]:
    """Try every candidate on a validation split of ``images`` (model inputs, an array or a
    :class:`~spray.correction.images.RowImages`; rows indexed by ``artifact_rows``) and
    return the winner's settings, the search's record (:func:`search_record`) and, for the
    methods of :data:`VALIDATED_METHODS`, the winner's ``(corrected model, facts)`` itself
    (else None).

    ``build(model, cav, images, labels, artifact_rows, config, evidence)`` makes the corrected
    model and its facts (:func:`spray.correction.run.build_correction`); ``evidence``: the flag's members'
    evidence for counterfactual fine-tuning (restricted here to the fitting split's members).
    """
    fit, held = validation_split(labels, config.seed)
    members = np.intersect1d(np.asarray(artifact_rows), fit)
    held = np.setdiff1d(held, np.asarray(artifact_rows))  # the flagged members' labels are in question: not "clean"
    if members.size == 0 or held.size == 0:
        raise CorrectionError("the validation split leaves no flagged member to fit on; set [correct] search = false.")
    # every candidate reads the same rows (the flagged class for its CAV): each is read from the source once
    fit_images = images.subset(fit).remembering() if isinstance(images, RowImages) else images[fit]
    fit_labels = labels[fit]
    rows = np.searchsorted(fit, members)
    held_images, held_labels = images[held], labels[held]
    fit_evidence = None if evidence is None else evidence.among(members)

    def measure(candidate: nn.Module) -> Any:
        return evaluate(candidate, held_images, held_labels, class_id, stamp, relevance_samples=0, random_state=config.seed)

    before = measure(model)
    tried = candidates_for(config, layers)
    failures: list[Exception] = []
    cavs: dict[tuple[str, str], Any] = {}  # candidates that differ only in strength share their CAV
    keep_model = config.method in VALIDATED_METHODS
    leader: tuple[Candidate, tuple[nn.Module, dict[str, Any]]] | None = None
    for candidate in tried:
        start = time.perf_counter()
        settings = candidate.settings(config)
        try:
            key = (settings.layer, settings.estimator)
            if key not in cavs:
                cavs[key] = fit_cav(
                    model, fit_images, fit_labels, rows, settings.layer, class_id=class_id, n_classes=n_classes,
                    clean=settings.clean, pooling=settings.pooling, estimator=settings.estimator, test_size=settings.test_size,
                    random_state=settings.seed,
                )
            cav = cavs[key]
            built = build(model, cav, fit_images, fit_labels, rows, settings, fit_evidence)
            after = measure(built[0])
        except (CorrectionError, ValueError, RuntimeError) as error:
            candidate.error = f"{type(error).__name__}: {error}"[:300]
            failures.append(error)
        else:
            candidate.cav_auc = float(cav.auc)
            candidate.clean_accuracy, candidate.attacked_accuracy = after.clean_accuracy, after.attacked_accuracy
            share = recovered_share(before, after)
            candidate.recovered = None if math.isnan(share) else float(share)
            candidate.clean_change = after.clean_accuracy - before.clean_accuracy
        candidate.seconds = time.perf_counter() - start
        if keep_model and not candidate.error and (leader is None or _better(candidate, leader[0], config.max_clean_loss)):
            leader = (candidate, built)
    working = [candidate for candidate in tried if not candidate.error]
    if not working:
        raise failures[0]  # every setting failed: the first error names the cause and its fix
    best = choose(working, config.max_clean_loss)
    best.chosen = True
    record = search_record(tried, len(held), (before.clean_accuracy, before.attacked_accuracy))
    return best.settings(config), record, (None if leader is None else leader[1])  # the leader is ``best``: same rule, same order


def search_record(candidates: Sequence[Candidate], n_validation: int, original: tuple[float, float]) -> dict[str, Any]:
    """What ``report.json`` keeps of a search: the rule, the validation size, the original
    model's validation accuracies and every candidate."""
    return {
        "validation_share": VALIDATION_SHARE,
        "n_validation": int(n_validation),
        "original_clean_accuracy": original[0],
        "original_attacked_accuracy": original[1],
        "rule": "most recovered with at most max_clean_loss of clean accuracy lost (else the least loss)",
        "candidates": [dataclasses.asdict(candidate) for candidate in candidates],
    }
