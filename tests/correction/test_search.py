"""The search's rule: the most recovered among the settings that keep the clean accuracy;
when none does, the one that loses least."""

from __future__ import annotations

from spray.correction.config import CorrectionConfig
from spray.correction.search import Candidate, candidates_for, choose


def _measured(layer: str, recovered: float, clean_change: float, auc: float = 0.9) -> Candidate:
    return Candidate(layer, "pattern", None, cav_auc=auc, recovered=recovered, clean_change=clean_change)


def test_the_most_recovered_among_those_that_keep_the_clean_accuracy_wins() -> None:
    collapse = _measured("a", 0.99, -0.15)  # recovers all, but at P-ClArC's price
    kept = _measured("b", 0.80, -0.004)
    better = _measured("c", 0.85, 0.0)
    assert choose([collapse, kept, better], 0.005) is better
    assert choose([collapse, kept], 0.005) is kept
    assert choose([_measured("d", 0.85, 0.0, auc=0.7), _measured("e", 0.85, 0.0, auc=0.95)], 0.005).layer == "e"  # ties: the AUC


def test_when_none_keeps_the_clean_accuracy_the_least_loss_wins() -> None:
    assert choose([_measured("a", 0.99, -0.15), _measured("b", 0.30, -0.01), _measured("c", 0.9, -0.02)], 0.005).layer == "b"


def test_candidates_cover_layers_and_estimators_or_rr_strengths() -> None:
    tried = candidates_for(CorrectionConfig(method="r-clarc"), ["l1", "l2", "l3", "l4"])
    assert [(item.layer, item.estimator) for item in tried] == [
        (layer, estimator) for layer in ("l4", "l3", "l2") for estimator in ("pattern", "logistic")
    ]
    strengths = candidates_for(CorrectionConfig(method="rr-clarc", layer="l2", rr_lambda=50.0), ["l1", "l2"])
    assert [(item.layer, item.rr_lambda) for item in strengths] == [("l2", 5.0), ("l2", 50.0), ("l2", 500.0)]
