"""LRP heatmaps and concept relevances against zennit and against conservation."""

from __future__ import annotations

import pytest
import torch
import zennit.attribution as za
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.rules import Epsilon, Pass
from zennit.types import Activation, Convolution

from spray.attribution.lrp import AttributionConfigError, Explainer, make_composite
from spray.models.demo import DemoNet


def _zero_bias_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5),
    ).double()
    for module in net.modules():
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return net.eval()


def _epsilon_composite() -> LayerMapComposite:
    return LayerMapComposite(layer_map=[(Activation, Pass()), (Convolution, Epsilon(1e-12)), (nn.Linear, Epsilon(1e-12))])


def test_heatmap_sum_equals_explained_logit_with_zero_bias() -> None:
    """LRP-epsilon (epsilon 1e-12) on a zero-bias net conserves relevance to 1e-8 relative (float64)."""
    net = _zero_bias_net()
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    with Explainer(net, _epsilon_composite(), ["3", "7"]) as explainer:
        result = explainer.explain(x, targets)
    logits = result.logits[torch.arange(6), targets]
    torch.testing.assert_close(result.heatmaps.sum(dim=(1, 2)), logits, rtol=1e-8, atol=1e-12)
    # The same relevance flows through every layer: each layer's concept vector sums to the logit.
    for name in ("3", "7"):
        torch.testing.assert_close(result.concepts[name].sum(dim=1), logits, rtol=1e-8, atol=1e-12)


def test_heatmaps_equal_zennit_gradient_attributor_on_demo_net() -> None:
    """The one-pass explainer gives zennit's own EpsilonPlusFlat + BatchNorm-merge heatmaps (float64)."""
    torch.manual_seed(0)
    net = DemoNet(4).double()
    for module in net.modules():  # non-trivial BatchNorm statistics, so the canonizer matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3])
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv3"]) as explainer:
        ours = explainer.explain(x, targets).heatmaps
    with za.Gradient(net, make_composite("epsilon_plus_flat")) as attributor:
        _, reference = attributor(x, lambda out: torch.eye(4, dtype=torch.float64)[targets] * out)
    torch.testing.assert_close(ours, reference.sum(dim=1), rtol=1e-6, atol=1e-12)


def test_explainer_restores_parameter_gradients_and_hooks() -> None:
    net = DemoNet(4)
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv4"]) as explainer:
        explainer.explain(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert all(p.requires_grad for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


def test_unknown_layer_lists_valid_layers() -> None:
    with pytest.raises(AttributionConfigError, match=r"features\.conv9.*valid layers.*features\.conv1"):
        Explainer(DemoNet(4), make_composite("epsilon_plus_flat"), ["features.conv9"])


def test_unknown_composite_is_named() -> None:
    with pytest.raises(AttributionConfigError, match="unknown composite 'lrp_magic'"):
        make_composite("lrp_magic")
