"""The ClArC projection and gate, on small random networks (no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spray.correction.cav import CAV
from spray.correction.clarc import ClarcModel, CorrectionError, Gate, calibrate_threshold, project_activation, split_model
from spray.models.demo import DemoNet


def _unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def _orthogonal_to(v: torch.Tensor, seed: int) -> torch.Tensor:
    u = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed), dtype=v.dtype)
    u = u - (u @ v) * v
    return u / u.norm()


def test_per_position_projection_sets_component_to_reference_and_keeps_orthogonal_parts() -> None:
    a = torch.randn(5, 6, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = _unit(6, 1)
    reference = torch.randn(4, 3, dtype=torch.float64)
    out = project_activation(a, v, reference, torch.ones(5, dtype=torch.float64), per_position=True)
    torch.testing.assert_close(torch.einsum("bchw,c->bhw", out, v), reference.expand(5, 4, 3), rtol=0, atol=1e-12)
    u = _orthogonal_to(v, 2)
    torch.testing.assert_close(torch.einsum("bchw,c->bhw", out, u), torch.einsum("bchw,c->bhw", a, u), rtol=0, atol=1e-12)


def test_flat_projection_removes_cav_component_and_keeps_orthogonal_parts() -> None:
    a = torch.randn(7, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = _unit(18, 4)
    out = project_activation(a, v, torch.tensor(0.5, dtype=torch.float64), torch.ones(7, dtype=torch.float64), per_position=False)
    torch.testing.assert_close(out.flatten(1) @ v, torch.full((7,), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)
    u = _orthogonal_to(v, 5)
    torch.testing.assert_close(out.flatten(1) @ u, a.flatten(1) @ u, rtol=0, atol=1e-12)
    # Projecting twice changes nothing more (a projection is idempotent).
    again = project_activation(out, v, torch.tensor(0.5, dtype=torch.float64), torch.ones(7, dtype=torch.float64), per_position=False)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-12)


def _cav(direction: torch.Tensor, layer: str, shape: tuple[int, ...], pooling: str = "max") -> CAV:
    spatial = shape[1:] if pooling != "flatten" else ()
    return CAV(
        layer=layer, pooling=pooling, direction=direction.float(), clean_mean=torch.zeros(direction.shape[0]),
        reference=torch.zeros(spatial), artifact_reference=torch.ones(spatial), intercept=0.0, estimator="pattern",
        auc=1.0, n_artifact=10, n_clean=10, class_id=1, activation_shape=shape,
    )


def _net_and_inputs() -> tuple[DemoNet, torch.Tensor]:
    torch.manual_seed(0)
    return DemoNet(4).eval(), torch.rand(16, 3, 32, 32)


@pytest.mark.parametrize("pooling", ["max", "flatten"])
def test_r_clarc_outputs_are_bit_identical_where_the_gate_does_not_fire(pooling: str) -> None:
    net, x = _net_and_inputs()
    size = 32 if pooling == "max" else 32 * 8 * 8
    cav = _cav(_unit(size, 7).float() * 1.0, "features.relu3", (32, 8, 8), pooling)
    with torch.no_grad():
        original = net(x)
        plain = ClarcModel(net, cav, Gate(kind="detector", threshold=0.0))
        scores = plain.detector_score(plain.prefix(x))
        threshold = float(scores.median())
        corrected = ClarcModel(net, cav, Gate(kind="detector", threshold=threshold))
        out, weight = corrected.forward_gated(x)
    fired = weight > 0
    assert 0 < int(fired.sum()) < len(x)
    assert torch.equal(out[~fired], original[~fired])
    assert not torch.allclose(out[fired], original[fired])


def test_class_gate_fires_exactly_on_the_target_prediction() -> None:
    net, x = _net_and_inputs()
    cav = _cav(_unit(32, 8), "features.relu3", (32, 8, 8))
    with torch.no_grad():
        original = net(x)
        target = int(original.argmax(1)[0])
        out, weight = ClarcModel(net, cav, Gate(kind="class", target_classes=(target,))).forward_gated(x)
    assert torch.equal(weight > 0, original.argmax(1) == target)
    assert torch.equal(out[weight == 0], original[weight == 0])


def test_soft_gate_below_min_weight_leaves_samples_untouched() -> None:
    net, x = _net_and_inputs()
    cav = _cav(_unit(32, 9), "features.relu3", (32, 8, 8))
    with torch.no_grad():
        original = net(x)
        model = ClarcModel(net, cav, Gate(kind="detector", threshold=0.0))
        threshold = float(model.detector_score(model.prefix(x)).median())
        soft = ClarcModel(net, cav, Gate(kind="detector", threshold=threshold, soft=True, temperature=0.05, min_weight=0.2))
        out, weight = soft.forward_gated(x)
    assert ((weight == 0) | (weight >= 0.2)).all() and (weight < 1).any()
    assert torch.equal(out[weight == 0], original[weight == 0])


def test_split_model_rejects_a_layer_inside_a_skip_connection() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.conv(x)) + x)

    with pytest.raises(CorrectionError, match=r"'conv' is not a cut point.*skip connection"):
        split_model(Residual(), "conv")
    with pytest.raises(CorrectionError, match=r"'act' is not a cut point"):
        split_model(Residual(), "act")  # the input still crosses to the add after it
    model = Residual().eval()
    prefix, head = split_model(model, "head.0")  # after the add: a valid cut
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(head(prefix(x)), model(x))


def test_gate_rejects_bad_settings() -> None:
    with pytest.raises(CorrectionError, match="needs target_classes"):
        Gate(kind="class")
    with pytest.raises(CorrectionError, match="unknown gate kind 'sometimes'"):
        Gate(kind="sometimes")
    net, _ = _net_and_inputs()
    with pytest.raises(CorrectionError, match=r"target class\(es\) \[9\] out of range: the model has 4 outputs .*Pass the id of the class"):
        ClarcModel(net, _cav(_unit(32, 1), "features.relu3", (32, 8, 8)), Gate(kind="class", target_classes=(9,)))


def test_calibrated_threshold_meets_the_false_positive_target() -> None:
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0)).numpy()
    threshold = calibrate_threshold(scores, 0.05)
    assert (scores >= threshold).mean() <= 0.05
    assert (scores >= threshold).mean() >= 0.04


def test_explainable_view_gives_the_same_logits_and_unchanged_heatmaps_where_the_gate_is_closed() -> None:
    from spray.attribution.lrp import Explainer, make_composite

    net, x = _net_and_inputs()
    x = x[:8]
    cav = _cav(_unit(32, 11), "features.relu3", (32, 8, 8))
    with torch.no_grad():
        target = int(net(x).argmax(1)[0])
    corrected = ClarcModel(net, cav, Gate(kind="class", target_classes=(target,)))
    with torch.no_grad():
        logits, weight = corrected.forward_gated(x)
        same = corrected.explainable()(x)
    closed = weight == 0
    assert torch.equal(same[closed], logits[closed])  # gated rows: same values up to batch-size rounding
    torch.testing.assert_close(same, logits, rtol=1e-5, atol=1e-6)
    targets = torch.zeros(len(x), dtype=torch.long)
    with Explainer(net, make_composite("epsilon_plus_flat")) as explainer:
        original = explainer.explain(x, targets).heatmaps
    with Explainer(corrected.explainable(), make_composite("epsilon_plus_flat")) as explainer:
        view = explainer.explain(x, targets).heatmaps
    assert 0 < int(closed.sum()) < len(x)
    torch.testing.assert_close(view[closed], original[closed], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(view[~closed], original[~closed])


def test_artifact_relevance_explains_with_the_audits_settings_and_a_clarc_view_with_zennit(caplog) -> None:
    """The share is measured with the audit's composite, here epsilon_gamma_box bounded by the
    normalised input range; a ClArC model is explained through its view with zennit's engine
    (resolved for the model it corrects), without a fallback warning."""
    import logging

    import numpy as np

    from spray.attribution.lrp import Explainer, make_composite
    from spray.attribution.settings import AttributionSettings
    from spray.correction.evaluate import artifact_relevance, explained_view

    net, x = _net_and_inputs()
    images, targets, mask = x[:6].numpy(), np.zeros(6, dtype=np.int64), (slice(20, 28), slice(20, 28))
    settings = AttributionSettings(composite="epsilon_gamma_box", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu")
    with Explainer(net, make_composite("epsilon_gamma_box", ("merge_batchnorm",), low=-2.0, high=2.0)) as explainer:
        positive = explainer.explain(x[:6], torch.zeros(6, dtype=torch.long)).heatmaps.clamp(min=0).double()
    expected = float((positive[:, 20:28, 20:28].sum(dim=(1, 2)) / positive.sum(dim=(1, 2))).mean())
    assert artifact_relevance(net, images, targets, mask, settings) == pytest.approx(expected, rel=1e-5)

    corrected = ClarcModel(net, _cav(_unit(32, 11), "features.relu3", (32, 8, 8)), Gate(kind="always"))
    view, used = explained_view(corrected, settings)
    assert view is not corrected and (used.engine, used.canonizers, used.layers) == ("zennit", ("merge_batchnorm",), ())
    with caplog.at_level(logging.WARNING, logger="spray.attribution.select"):
        share = artifact_relevance(corrected, images, targets, mask, settings)
    assert 0.0 <= share <= 1.0 and not caplog.records
