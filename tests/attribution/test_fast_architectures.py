"""Attribution defaults per architecture."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from spray.attribution.architectures import attribution_defaults
from spray.attribution.lrp import resolve_layers
from spray.models.demo import DEMO_CONCEPT_LAYERS, DemoNet


def _on_meta(builder, **kwargs) -> nn.Module:
    """Build a torchvision model without allocating or initialising its weights."""
    with torch.device("meta"):
        return builder(**kwargs)


def test_resnet_defaults_use_the_resnet_canonizer_and_stage_outputs() -> None:
    for builder in (torchvision.models.resnet18, torchvision.models.resnet50):
        model = _on_meta(builder, num_classes=10)
        defaults = attribution_defaults(model)
        assert (defaults.architecture, defaults.composite, defaults.canonizers) == ("resnet", "epsilon_plus_flat", ("resnet",))
        assert defaults.layers == ("layer2", "layer3", "layer4")
        resolve_layers(model, defaults.layers)


def test_vgg_defaults_are_the_last_convolution_of_the_last_three_blocks() -> None:
    assert attribution_defaults(_on_meta(torchvision.models.vgg16, num_classes=10)).layers == (
        "features.14", "features.21", "features.28",
    )
    defaults = attribution_defaults(_on_meta(torchvision.models.vgg11_bn, num_classes=10))
    assert defaults.canonizers == ("vgg",)
    model = _on_meta(torchvision.models.vgg11_bn, num_classes=10)
    assert all(isinstance(m, nn.Conv2d) for m in resolve_layers(model, defaults.layers).values())


def test_demo_and_generic_defaults() -> None:
    assert attribution_defaults(DemoNet(4)).layers == DEMO_CONCEPT_LAYERS
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    defaults = attribution_defaults(net)
    assert (defaults.architecture, defaults.canonizers, defaults.layers) == ("generic", ("merge_batchnorm",), ("0", "2"))
