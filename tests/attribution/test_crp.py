"""CRP: conditional heatmaps partition the full heatmap; reference rows; relevance boxes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from spray.attribution.crp import (
    channel_masks,
    conditional_heatmaps_for_rows,
    explain_channels,
    relevance_box,
    top_rows_by_concept,
)
from spray.attribution.fast import FastExplainer
from spray.attribution.lrp import AttributionConfigError, Explainer, make_composite
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings
from spray.models.demo import DemoNet

LAYERS = ("features.conv3", "features.conv4")


def _demo_net(zero_bias: bool) -> nn.Module:
    """The demo architecture in float64 with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = DemoNet(4, width=4).double()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            if zero_bias:
                module.running_mean.zero_()
                module.bias.data.zero_()
        if zero_bias and getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return net.eval()


@pytest.mark.parametrize("zero_bias", [True, False])
@pytest.mark.parametrize("layer", LAYERS)
def test_conditional_heatmaps_of_all_channels_sum_to_full_heatmap(zero_bias: bool, layer: str) -> None:
    """One condition per channel partitions the layer's relevance: the heatmaps add up (float64)."""
    net = _demo_net(zero_bias)
    image = torch.rand(3, 32, 32, dtype=torch.float64)
    target = 2
    with Explainer(net, make_composite("epsilon_plus_flat"), [layer]) as explainer:
        full = explainer.explain(image[None], torch.tensor([target]))
    with Explainer(net, make_composite("epsilon_plus_flat"), [layer]) as conditional:
        n_channels = conditional.n_channels(layer, image[None])
        parts = explain_channels(conditional, image, target, layer, [[c] for c in range(n_channels)])
    torch.testing.assert_close(parts.heatmaps.sum(dim=0), full.heatmaps[0], rtol=1e-9, atol=1e-12)
    # Each condition carries exactly its channel's stored concept relevance.
    torch.testing.assert_close(parts.relevance, full.concepts[layer][0], rtol=1e-9, atol=1e-12)


def test_all_ones_mask_gives_the_ordinary_heatmap_and_disjoint_sets_add_up() -> None:
    net = _demo_net(zero_bias=False)
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 3])
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv4"]) as explainer:
        full = explainer.explain(images, targets).heatmaps
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv4"]) as conditional:
        ones = conditional.explain_conditional(images, targets, "features.conv4", torch.ones(2, 16, dtype=torch.float64))
        halves = explain_channels(conditional, images[1], 3, "features.conv4", [range(0, 5), range(5, 16)])
    torch.testing.assert_close(ones.heatmaps, full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(halves.heatmaps.sum(dim=0), full[1], rtol=1e-9, atol=1e-12)


def test_explainer_restores_the_model() -> None:
    net = _demo_net(zero_bias=False)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    before = net(x)
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv3"]) as conditional:
        explain_channels(conditional, x[0], 1, "features.conv3", [[0]])
    assert all(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net(x), before)
    assert not net.features.conv3._forward_hooks


def test_masks_reject_unknown_channels() -> None:
    assert channel_masks(4, [[0, 2], [3]]).tolist() == [[1, 0, 1, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="outside 0..3"):
        channel_masks(4, [[4]])


def test_top_rows_by_concept_matches_a_full_sort_in_chunks() -> None:
    rng = np.random.default_rng(1)
    concepts = rng.normal(size=(1000, 6)).astype(np.float32)
    concepts[17, 2] = concepts[18, 2] = 50.0  # a tie: the lower row comes first
    top = top_rows_by_concept(concepts, [2, 5], k=4, chunk=64)
    assert top[2][:2].tolist() == [17, 18]
    expected = np.argsort(-concepts[:, 5], kind="stable")[:4]
    assert top[5].tolist() == expected.tolist()
    subset = np.arange(100, 200)
    only = top_rows_by_concept(concepts, [5], k=3, rows=subset, chunk=7)[5]
    assert set(only.tolist()) <= set(subset.tolist())
    assert only.tolist() == (subset[np.argsort(-concepts[subset, 5], kind="stable")[:3]]).tolist()


def test_top_rows_from_h5py(tmp_path) -> None:
    import h5py

    values = np.arange(40, dtype=np.float32).reshape(20, 2)
    with h5py.File(tmp_path / "c.h5", "w") as handle:
        handle["concepts"] = values
        top = top_rows_by_concept(handle["concepts"], [0, 1], k=3, chunk=6)
    assert top[0].tolist() == [19, 18, 17] and top[1].tolist() == [19, 18, 17]


def test_relevance_box_bounds_the_positive_mass() -> None:
    heatmap = np.zeros((32, 32))
    heatmap[20:24, 25:29] = 1.0
    heatmap[0:4, 0:4] = -5.0  # negative evidence is ignored
    top, bottom, left, right = relevance_box(heatmap, mass=0.99, pad=0.0, min_fraction=0.0)
    assert (top, bottom, left, right) == (20, 24, 25, 29)
    padded = relevance_box(heatmap, mass=0.99, pad=0.1, min_fraction=0.0)
    assert padded == (17, 27, 22, 32)
    wide = relevance_box(heatmap, mass=0.99, pad=0.0, min_fraction=0.5)
    assert wide[1] - wide[0] == 16 and wide[3] - wide[2] == 16
    assert wide[0] <= 20 and wide[1] >= 24 and wide[2] <= 25 and wide[3] >= 29
    assert relevance_box(-np.ones((8, 8))) == (0, 8, 0, 8)


def test_batched_requests_equal_single_explanations() -> None:
    net = _demo_net(zero_bias=False)
    images = np.random.default_rng(2).random((5, 3, 32, 32))
    requests = [(4, 1, 7), (0, 2, 3), (4, 1, 9), (2, 0, 7)]
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv4"]) as conditional:
        batched = conditional_heatmaps_for_rows(conditional, "features.conv4", lambda rows: images[rows], requests, batch_size=3)
        single = explain_channels(conditional, torch.from_numpy(images[4]), 1, "features.conv4", [[9]]).heatmaps[0]
    assert set(batched) == {(4, 7), (0, 3), (4, 9), (2, 7)}
    np.testing.assert_allclose(batched[(4, 9)], single.numpy(), rtol=1e-9, atol=1e-12)


def test_a_layer_run_twice_per_pass_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with Explainer(Twice(), make_composite("epsilon_plus_flat", ()), ["conv"]) as conditional:
        with pytest.raises(AttributionConfigError, match="more than once"):
            conditional.explain_conditional(torch.rand(1, 3, 8, 8), torch.tensor([0]), "conv", torch.ones(1, 3))


def test_conditional_requests_are_checked_by_both_engines() -> None:
    net = _demo_net(zero_bias=False)
    x, targets = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1])
    for explainer in (
        Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv4"]),
        FastExplainer(net, "epsilon_plus_flat", ("merge_batchnorm",), ["features.conv4"]),
    ):
        with explainer:
            with pytest.raises(AttributionConfigError, match="not a concept layer"):
                explainer.explain_conditional(x, targets, "features.conv3", torch.ones(2, 16, dtype=torch.float64))
            with pytest.raises(ValueError, match="one row per pick"):
                explainer.explain_conditional(x, targets, "features.conv4", torch.ones(3, 16, dtype=torch.float64))
            with pytest.raises(ValueError, match="one mask of 16 channels per row"):
                explainer.explain_conditional(x, targets, "features.conv4", torch.ones(2, 15, dtype=torch.float64))


def test_the_factory_picks_the_fast_engine_for_conditional_heatmaps_and_falls_back(caplog) -> None:
    import logging

    net = _demo_net(zero_bias=False)
    settings = AttributionSettings(composite="epsilon_plus_flat", canonizers=("merge_batchnorm",), layers=("features.conv4",), device="cpu")
    assert make_explainer(net, settings).engine == "fast"
    assert make_explainer(net, dataclasses.replace(settings, engine="zennit")).engine == "zennit"

    class Gated(nn.Module):
        """A product of two tensors: no fast rule."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.head((h * torch.sigmoid(h)).mean(dim=(2, 3)))

    gated = dataclasses.replace(settings, canonizers=(), layers=("conv",))
    with caplog.at_level(logging.WARNING, logger="spray.attribution.select"):
        fallback = make_explainer(Gated(), gated)
    assert fallback.engine == "zennit"
    assert len([record for record in caplog.records if "falling back to zennit's hooks" in record.getMessage()]) == 1
    with fallback:
        parts = explain_channels(fallback, torch.rand(3, 8, 8), 1, "conv", [[0, 1], [2, 3]])
    assert parts.heatmaps.shape == (2, 8, 8)
    with pytest.raises(AttributionConfigError, match="fast LRP engine cannot explain"):
        make_explainer(Gated(), dataclasses.replace(gated, engine="fast"))


def test_batched_requests_are_the_same_with_both_engines() -> None:
    """Requests sharing a row (and one row with two targets) explained by the fast engine equal zennit's."""
    net = _demo_net(zero_bias=False)
    images = np.random.default_rng(3).random((5, 3, 32, 32))
    requests = [(4, 1, 7), (0, 2, 3), (4, 1, 9), (2, 0, 7), (4, 3, 7), (0, 2, 11)]
    read = lambda rows: images[rows]  # noqa: E731
    with Explainer(net, make_composite("epsilon_plus_flat"), ["features.conv4"]) as zennit:
        expected = conditional_heatmaps_for_rows(zennit, "features.conv4", read, requests, batch_size=4)
    with FastExplainer(net, "epsilon_plus_flat", ("merge_batchnorm",), ["features.conv4"]) as fast:
        ours = conditional_heatmaps_for_rows(fast, "features.conv4", read, requests, batch_size=4)
    assert set(ours) == set(expected) == {(4, 7), (0, 3), (4, 9), (2, 7), (0, 11)}
    for key, heatmap in expected.items():
        np.testing.assert_allclose(ours[key], heatmap, rtol=1e-9, atol=1e-12 * np.abs(heatmap).max())
