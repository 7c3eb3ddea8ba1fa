"""Attribution defaults per architecture: composite, canonizers and concept layers.

Used when a job spec leaves them out. Recognised: torchvision ResNets (ResNet canonizer,
concept layers at the outputs of ``layer2``-``layer4``), torchvision VGGs (VGG canonizer,
the last convolution of each of the last three blocks), the demo net, and anything else
(BatchNorm merging, the last three convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models import VGG, ResNet

from spray.models.demo import DEMO_CONCEPT_LAYERS, DemoNet

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class AttributionDefaults:
    """What to explain a model with when nothing is specified."""

    architecture: str
    composite: str
    canonizers: tuple[str, ...]
    layers: tuple[str, ...]


def attribution_defaults(model: nn.Module, n_layers: int = 3) -> AttributionDefaults:
    """The defaults for ``model``: ``architecture`` is "resnet", "vgg", "demo" or "generic"."""
    if isinstance(model, ResNet):
        stages = tuple(f"layer{i}" for i in (2, 3, 4))[-n_layers:]
        return AttributionDefaults("resnet", "epsilon_plus_flat", ("resnet",), stages)
    if isinstance(model, VGG):
        return AttributionDefaults("vgg", "epsilon_plus_flat", ("vgg",), _vgg_block_ends(model, n_layers))
    if isinstance(model, DemoNet):
        return AttributionDefaults("demo", "epsilon_plus_flat", ("merge_batchnorm",), DEMO_CONCEPT_LAYERS)
    convs = [name for name, module in model.named_modules() if isinstance(module, _CONV)]
    return AttributionDefaults("generic", "epsilon_plus_flat", ("merge_batchnorm",), tuple(convs[-n_layers:]))


def _vgg_block_ends(model: VGG, n_layers: int) -> tuple[str, ...]:
    """The last convolution before each max pool of ``model.features``, for the last ``n_layers`` blocks."""
    ends, last_conv = [], None
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            last_conv = f"features.{name}"
        elif isinstance(module, nn.MaxPool2d) and last_conv is not None:
            ends.append(last_conv)
            last_conv = None
    return tuple(ends[-n_layers:])
