"""The fast LRP engine against zennit: heatmaps, concept relevances, conservation, fallback."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
import zennit.attribution as za
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import make_layers
from zennit.types import Activation, Convolution

from spray.attribution import fast_rules as fr
from spray.attribution.fast import FastExplainer, UnsupportedModel
from spray.attribution.lrp import COMPOSITES, AttributionConfigError, Explainer, make_composite
from spray.attribution.select import make_explainer
from spray.attribution.settings import COMPOSITE_NAMES, AttributionSettings
from spray.models.demo import DemoNet

BOUNDS = {"low": -3.0, "high": 3.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 networks run fastest on one thread (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bounds(composite: str) -> dict[str, float]:
    return BOUNDS if composite == "epsilon_gamma_box" else {}


def _settings(composite: str, canonizers, layers=(), engine: str = "auto") -> AttributionSettings:
    """Settings naming everything (no "auto"), on the CPU."""
    return AttributionSettings(composite=composite, canonizers=tuple(canonizers), layers=tuple(layers), engine=engine, device="cpu")


def _randomize_batchnorms(net: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that merging them matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
    return net


def _block(inplanes: int, planes: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample))


class TinyResNet(nn.Module):
    """A narrow ResNet from torchvision's BasicBlocks (BatchNorm, residual additions, downsampling)."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.layer3 = _block(8, 8), _block(8, 16, 2), _block(16, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_batchnorms(TinyResNet()).double().eval()


class TinyVGG(nn.Module):
    """torchvision's VGG layout (``make_layers`` with BatchNorm, adaptive pool, dropout head), narrow."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.features = make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_vgg() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_batchnorms(TinyVGG()).double().eval()


def _inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(4, 3, 32, 32, generator=generator).to(dtype), torch.tensor([0, 1, 2, 3])


def zennit_heatmaps(net: nn.Module, composite: str, canonizers, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Heatmaps from zennit's own Gradient attributor (the reference)."""
    composite_ = make_composite(composite, canonizers, **_bounds(composite))
    with za.Gradient(net, composite_) as attributor:
        _, relevance = attributor(x, lambda out: F.one_hot(targets, out.shape[1]).to(out) * out)
    return relevance.sum(dim=1)


def assert_matches_zennit(net, composite, canonizers, layers, x, targets, rtol=1e-6) -> None:
    with FastExplainer(net, composite, canonizers, layers, **_bounds(composite)) as explainer:
        ours = explainer.explain(x, targets)
    reference = zennit_heatmaps(net, composite, canonizers, x, targets)
    scale = reference.abs().amax()
    torch.testing.assert_close(ours.heatmaps, reference, rtol=rtol, atol=rtol * scale)
    with Explainer(net, make_composite(composite, canonizers, **_bounds(composite)), layers) as hooked:
        expected = hooked.explain(x, targets)
    torch.testing.assert_close(ours.logits, expected.logits, rtol=rtol, atol=rtol * expected.logits.abs().amax())
    for name in layers:
        concept_scale = expected.concepts[name].abs().amax()
        torch.testing.assert_close(ours.concepts[name], expected.concepts[name], rtol=rtol, atol=rtol * concept_scale)


@pytest.mark.parametrize("composite", COMPOSITE_NAMES)
def test_resnet_heatmaps_and_concepts_equal_zennit(composite: str) -> None:
    """BasicBlocks with merged BatchNorms and canonized residual sums, float64, rtol 1e-6."""
    x, targets = _inputs()
    layers = ["layer2", "layer3.0.conv1", "layer1.0.bn2", "layer3.0.relu"]
    assert_matches_zennit(tiny_resnet(), composite, ("resnet",), layers, x, targets)


def test_torchvision_resnet_equals_zennit() -> None:
    """torchvision's own ResNet class (BasicBlock, [1, 1, 1, 1]) with the ResNet canonizer."""
    torch.manual_seed(0)
    net = _randomize_batchnorms(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)).double().eval()
    x, targets = _inputs()
    assert_matches_zennit(net, "epsilon_plus_flat", ("resnet",), ["layer2", "layer4"], x[:2, :, :16, :16], targets[:2])


@pytest.mark.parametrize("composite", COMPOSITE_NAMES)
def test_vgg_heatmaps_and_concepts_equal_zennit(composite: str) -> None:
    x, targets = _inputs()
    assert_matches_zennit(tiny_vgg(), composite, ("vgg",), ["features.4", "features.11", "classifier.0"], x, targets)


def test_resnet_without_residual_canonizer_equals_zennit() -> None:
    """Without the ResNet canonizer the additions stay plain (gradient) sums, in zennit and here."""
    x, targets = _inputs()
    assert_matches_zennit(tiny_resnet(), "epsilon_plus_flat", ("merge_batchnorm",), ["layer2"], x, targets)


NETS = {"resnet": (tiny_resnet, ("resnet",), ["layer2", "layer3"]), "vgg": (tiny_vgg, ("vgg",), ["features.4", "features.11"])}


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().amax() / reference.abs().amax()).item()


@pytest.mark.parametrize("composite", COMPOSITE_NAMES)
@pytest.mark.parametrize("net_name", sorted(NETS))
def test_float32_default_heatmaps_and_concepts_equal_zennit_to_1e4(net_name: str, composite: str) -> None:
    """The default float32 path (zennit's forward, channels-last backward) agrees with zennit within 1e-4."""
    build, canonizers, layers = NETS[net_name]
    net = build().float()
    x, targets = _inputs(torch.float32)
    explainer = FastExplainer(net, composite, canonizers, layers, **_bounds(composite))
    assert not explainer.plan.channels_last and explainer.plan.backward_channels_last
    ours = explainer.explain(x, targets)
    assert _relative(ours.heatmaps, zennit_heatmaps(net, composite, canonizers, x, targets)) < 1e-4
    with Explainer(net, make_composite(composite, canonizers, **_bounds(composite)), layers) as hooked:
        expected = hooked.explain(x, targets)
    for name in layers:
        assert _relative(ours.concepts[name], expected.concepts[name]) < 1e-4


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_default_forward_pass_is_zennits_bit_for_bit(net_name: str) -> None:
    """The default forward pass computes zennit's hooked model's values exactly (float32 logits equal),
    which is what keeps float32 heatmaps at zennit's; ``forward="fast"`` rounds differently."""
    build, canonizers, _ = NETS[net_name]
    net = build().float()
    x, targets = _inputs(torch.float32)
    with za.Gradient(net, make_composite("epsilon_plus_flat", canonizers)) as attributor:
        logits, _ = attributor(x, lambda out: F.one_hot(targets, out.shape[1]).to(out) * out)
    ours = FastExplainer(net, "epsilon_plus_flat", canonizers).explain(x, targets).logits
    assert torch.equal(ours, logits)
    folded = FastExplainer(net, "epsilon_plus_flat", canonizers, forward="fast")
    assert folded.plan.channels_last
    torch.testing.assert_close(folded.explain(x, targets).logits, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_float32_fast_forward_agrees_with_zennit_to_1e4_on_small_nets(net_name: str) -> None:
    """``forward="fast"`` (channels-last, BatchNorm folded) on small nets; on 224-pixel networks it
    differs by up to a few 1e-3 (bench/attribution.py measures it)."""
    build, canonizers, _ = NETS[net_name]
    net = build().float()
    x, targets = _inputs(torch.float32)
    ours = FastExplainer(net, "epsilon_plus_flat", canonizers, forward="fast").explain(x, targets).heatmaps
    assert _relative(ours, zennit_heatmaps(net, "epsilon_plus_flat", canonizers, x, targets)) < 1e-4


def test_unknown_forward_mode_is_rejected() -> None:
    with pytest.raises(AttributionConfigError, match="forward must be one of"):
        FastExplainer(tiny_vgg(), "epsilon_plus_flat", ("vgg",), forward="folded")


CONDITION_LAYERS = [
    ("resnet", "layer2"), ("resnet", "layer3.0.conv1"), ("resnet", "layer1.0.bn2"),
    ("vgg", "features.11"), ("vgg", "classifier.0"),
]


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
@pytest.mark.parametrize(("net_name", "layer"), CONDITION_LAYERS)
def test_fast_conditional_heatmaps_equal_zennit_crp(net_name: str, layer: str, composite: str) -> None:
    """Random channel sets, one to three per image (picks, unordered): the heatmaps and the
    relevance each condition carries equal zennit's CRP in float64. Around
    ``layer3.0.conv1`` a skip connection carries relevance that is not masked, in both."""
    build, canonizers, _ = NETS[net_name]
    net = build()
    x, targets = _inputs()
    explainer = FastExplainer(net, composite, canonizers, [layer], **_bounds(composite))
    channels = explainer.concept_shapes(x[:1])[layer][1]
    picks = torch.tensor([3, 0, 0, 1, 3, 2, 3])
    masks = (torch.rand(len(picks), channels, generator=torch.Generator().manual_seed(3)) > 0.6).double()
    ours = explainer.explain_conditional(x, targets, layer, masks, picks)
    with Explainer(net, make_composite(composite, canonizers, **_bounds(composite)), [layer]) as hooked:
        expected = hooked.explain_conditional(x, targets, layer, masks, picks)
    assert ours.heatmaps.shape == (len(picks), 32, 32)
    torch.testing.assert_close(ours.heatmaps, expected.heatmaps, rtol=1e-9, atol=1e-9 * expected.heatmaps.abs().amax())
    torch.testing.assert_close(ours.relevance, expected.relevance, rtol=1e-9, atol=1e-9 * expected.relevance.abs().amax())
    torch.testing.assert_close(ours.logits, expected.logits, rtol=1e-12, atol=1e-12)


def test_conditional_heatmaps_of_all_channels_add_up_to_the_heatmap() -> None:
    """One condition per channel of ``layer2`` (every path crosses it): the parts sum to the full
    heatmap, and each part carries its channel's concept relevance."""
    net = tiny_resnet()
    x, targets = _inputs()
    explainer = FastExplainer(net, "epsilon_plus_flat", ("resnet",), ["layer2"])
    full = explainer.explain(x[:2], targets[:2])
    channels = full.concepts["layer2"].shape[1]
    picks = torch.arange(2).repeat_interleave(channels)
    masks = torch.eye(channels, dtype=torch.float64).repeat(2, 1)
    parts = explainer.explain_conditional(x[:2], targets[:2], "layer2", masks, picks)
    torch.testing.assert_close(parts.heatmaps.reshape(2, channels, 32, 32).sum(dim=1), full.heatmaps, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(parts.relevance.reshape(2, channels), full.concepts["layer2"], rtol=1e-9, atol=1e-12)


def test_conditional_requests_are_checked() -> None:
    explainer = FastExplainer(tiny_vgg(), "epsilon_plus_flat", ("vgg",), ["features.4"])
    x, targets = _inputs()
    with pytest.raises(AttributionConfigError, match="not a concept layer"):
        explainer.explain_conditional(x, targets, "features.11", torch.ones(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="one row per pick"):
        explainer.explain_conditional(x, targets, "features.4", torch.ones(3, 16, dtype=torch.float64))


def test_conservation_with_zero_bias_and_epsilon_rule() -> None:
    """All-epsilon rules (1e-12) on a zero-bias net: the heatmap and every concept vector sum to the logit."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5),
    ).double().eval()
    for module in net.modules():
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    spec = fr.CompositeSpec(
        [
            (Activation, fr.Pass()), (nn.AvgPool2d, fr.Norm(1e-12)),
            (Convolution, fr.Epsilon(1e-12)), (nn.Linear, fr.Epsilon(1e-12)),
        ]
    )
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    result = FastExplainer(net, spec, (), ["3", "7"]).explain(x, targets)
    logits = result.logits[torch.arange(6), targets]
    torch.testing.assert_close(result.heatmaps.sum(dim=(1, 2)), logits, rtol=1e-8, atol=1e-12)
    for name in ("3", "7"):
        torch.testing.assert_close(result.concepts[name].sum(dim=1), logits, rtol=1e-8, atol=1e-12)


def test_demo_net_runs_on_the_fast_path() -> None:
    net = _randomize_batchnorms(DemoNet(4)).double().eval()
    x, targets = _inputs()
    explainer = make_explainer(net, _settings("epsilon_plus_flat", ("merge_batchnorm",), ["features.conv3", "features.conv4"]))
    assert explainer.engine == "fast"
    assert_matches_zennit(net, "epsilon_plus_flat", ("merge_batchnorm",), ["features.conv3", "features.conv4"], x, targets)


class Swish(nn.Module):
    """x·sigmoid(x) written out: a product of two tensors, which the fast engine has no rule for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _net_with(activation: nn.Module) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), activation, nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 5),
    ).double().eval()


@pytest.mark.parametrize("activation", [Swish(), nn.Mish()], ids=["custom-op", "mish"])
def test_unsupported_parts_fall_back_to_zennit_with_one_warning(activation, caplog) -> None:
    net = _net_with(activation)
    x, targets = _inputs()
    with caplog.at_level(logging.WARNING, logger="spray.attribution.select"):
        explainer = make_explainer(net, _settings("epsilon_plus_flat", ("merge_batchnorm",), ["0"]))
    assert explainer.engine == "zennit"
    assert len([r for r in caplog.records if "falling back" in r.getMessage()]) == 1
    with explainer:
        heatmaps = explainer.explain(x, targets).heatmaps
    reference = zennit_heatmaps(net, "epsilon_plus_flat", ("merge_batchnorm",), x, targets)
    torch.testing.assert_close(heatmaps, reference, rtol=1e-6, atol=1e-6 * reference.abs().amax())
    with pytest.raises(AttributionConfigError, match="fast LRP engine cannot explain"):
        make_explainer(net, _settings("epsilon_plus_flat", ("merge_batchnorm",), engine="fast"))


def test_elu_uses_zennit_pass_rule_on_the_fast_path() -> None:
    """zennit treats ELU as an activation (Pass rule); the following z+ layer then sees negative inputs."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ELU(), nn.Conv2d(6, 6, 3, padding=1), nn.ELU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5),
    ).double().eval()
    x, targets = _inputs()
    assert make_explainer(net, _settings("epsilon_alpha2_beta1_flat", ())).engine == "fast"
    for composite in ("epsilon_plus_flat", "epsilon_alpha2_beta1_flat", "epsilon_gamma_box"):
        assert_matches_zennit(net, composite, (), ["2"], x, targets)


class FunctionalNet(nn.Module):
    """Functional relu and pooling, torch.cat, a plain addition and view(size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 3, padding=1)
        self.right = nn.Conv2d(6, 4, 1)
        self.mix = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.mix2 = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1) + 0.1
        x = F.max_pool2d(F.relu(self.mix(x) + self.mix2(x)), 2)
        x = F.adaptive_avg_pool2d(x, (4, 4))
        return self.head(x.view(x.size(0), -1))


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_functional_ops_follow_the_plain_gradient_as_in_zennit(composite: str) -> None:
    torch.manual_seed(4)
    net = FunctionalNet().double().eval()
    x, targets = _inputs()
    assert_matches_zennit(net, composite, (), ["left", "mix"], x, targets)


def test_a_layer_called_twice_falls_back() -> None:
    """zennit's rule hooks keep one input per module; such models go to zennit itself."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3 * 32 * 32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.flatten(self.conv(torch.relu(self.conv(x))), 1))

    with pytest.raises(UnsupportedModel, match="called 2 times"):
        FastExplainer(Twice().double(), "epsilon_plus_flat", ())
    assert make_explainer(Twice().double(), _settings("epsilon_plus_flat", ())).engine == "zennit"


def test_model_is_left_unchanged() -> None:
    net = tiny_resnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    FastExplainer(net, "epsilon_plus_flat", ("resnet",), ["layer2"]).explain(*_inputs())
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "canonizer_sum") or "forward" in vars(m) for m in net.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_configuration_errors_are_reported() -> None:
    net = tiny_resnet()
    with pytest.raises(AttributionConfigError, match="unknown composite"):
        FastExplainer(net, "lrp_magic")
    with pytest.raises(AttributionConfigError, match="needs 'low' and 'high'"):
        FastExplainer(net, "epsilon_gamma_box", ("resnet",))
    with pytest.raises(AttributionConfigError, match="unknown canonizer"):
        FastExplainer(net, "epsilon_plus_flat", ("resnet50",))
    with pytest.raises(AttributionConfigError, match="layer9.*valid layers"):
        make_explainer(net, _settings("epsilon_plus_flat", ("resnet",), ["layer9"]))


def test_gamma_box_gets_the_settings_input_range() -> None:
    """The factory bounds epsilon_gamma_box by the normalised display range, for both engines."""
    net = tiny_resnet()
    x, targets = _inputs()
    settings = dataclasses.replace(_settings("epsilon_gamma_box", ("resnet",)), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert settings.input_range == (-2.0, 2.0)
    expected = FastExplainer(net, "epsilon_gamma_box", ("resnet",), low=-2.0, high=2.0).explain(x, targets).heatmaps
    for engine in ("fast", "zennit"):
        with make_explainer(net, dataclasses.replace(settings, engine=engine)) as explainer:
            ours = explainer.explain(x, targets).heatmaps
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6 * expected.abs().amax())


def test_the_composite_table_names_every_composite_of_the_settings_once() -> None:
    """One table: every composite a job may name has zennit's class and the fast rule maps."""
    assert tuple(COMPOSITES) == COMPOSITE_NAMES
    for name, rules in COMPOSITES.items():
        assert isinstance(make_composite(name, (), **BOUNDS), rules.zennit)
        assert rules.fast_spec(**BOUNDS).layer_map
