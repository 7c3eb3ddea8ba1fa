"""The concept atlas: distinguishing concepts, reference samples, pictures, and its page section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spray.attribution.lrp import AttributionConfigError, Explainer, make_composite
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings
from spray.data.arrays import ArraySource
from spray.models.demo import DemoNet
from spray.report.atlas import AtlasSettings, build_concept_atlas, concept_distinction, relevance_shares
from spray.report.context import ReportContext
from spray.report.render import render_report

PLANTED = 5
LAYER = "features.conv4"


def _zennit(model: torch.nn.Module, layers: tuple[str, ...] = (LAYER,)) -> Explainer:
    """zennit's engine with the demo's composite: the reference the fast engine is compared with."""
    return Explainer(model, make_composite("epsilon_plus_flat"), layers)


@pytest.fixture(scope="module")
def atlas_inputs(report_context: ReportContext) -> dict:
    """A random demo-shaped model, 32 px images and stored concepts where the flagged
    cluster of class 0 leans on channel ``PLANTED``."""
    torch.manual_seed(0)
    model = DemoNet(3, width=4).eval()
    rng = np.random.default_rng(3)
    n = len(report_context.sample_ids)
    images = rng.random((n, 3, 32, 32)).astype(np.float32)
    concepts = np.abs(rng.normal(size=(n, 16))).astype(np.float32)
    flagged = report_context.analyses[2].clusters[0]
    assert flagged.flagged and report_context.analyses[2].class_index == 0
    concepts[flagged.member_rows, PLANTED] += 4.0
    concepts[33, PLANTED] = 50.0  # the dataset-wide top reference of the channel
    attributions = SimpleNamespace(
        concepts={LAYER: concepts},
        targets=np.asarray(report_context.labels),
        sample_ids=report_context.sample_ids,
    )
    source = ArraySource(images, np.asarray(report_context.labels), report_context.sample_ids, report_context.class_names)
    settings = AtlasSettings(n_concepts=3, n_references=4, display_side=16)
    atlas = build_concept_atlas(_zennit(model), source, attributions, report_context.analyses, LAYER, settings)
    return {"atlas": atlas, "concepts": concepts, "images": images}


def test_one_atlas_per_flagged_cluster_in_score_order(atlas_inputs: dict) -> None:
    atlas = atlas_inputs["atlas"]
    assert [(item.class_index, item.cluster_id) for item in atlas] == [(0, 1), (1, 0)]
    assert all(item.layer == LAYER and 1 <= len(item.concepts) <= 3 for item in atlas)


def test_the_planted_concept_comes_first_with_its_top_references(
    atlas_inputs: dict, report_context: ReportContext
) -> None:
    item = atlas_inputs["atlas"][0]
    concept = item.concepts[0]
    assert concept.channel == PLANTED and concept.distinction > 1.0
    assert concept.cluster_share > concept.rest_share
    rows = [picture.row for picture in concept.references]
    stored = atlas_inputs["concepts"][:, PLANTED]
    assert rows == np.argsort(-stored, kind="stable")[:4].tolist() and rows[0] == 33
    assert [picture.relevance for picture in concept.references] == pytest.approx(stored[rows].tolist())
    members = report_context.analyses[2].clusters[0].member_rows
    assert item.representative_row in members.tolist()
    assert concept.representative.row == item.representative_row
    assert concept.representative.box == (0, 32, 0, 32)


def test_pictures_are_small_cropped_and_finite(atlas_inputs: dict) -> None:
    for item in atlas_inputs["atlas"]:
        for concept in item.concepts:
            for picture in [concept.representative, *concept.references]:
                top, bottom, left, right = picture.box
                assert 0 <= top < bottom <= 32 and 0 <= left < right <= 32
                assert picture.image.shape[0] == 3 and max(picture.image.shape[1:]) <= 16
                assert max(picture.heatmap.shape) <= 16
                assert np.isfinite(picture.heatmap).all() and 0 <= picture.image.min() <= picture.image.max() <= 1
                assert isinstance(picture.sample_id, str)


def test_distinction_is_a_standardised_difference() -> None:
    shares = relevance_shares(np.array([[2.0, 2.0], [1.0, 3.0], [3.0, 1.0], [4.0, 0.0]]))
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    d, inside, outside = concept_distinction(shares, np.array([False, False, True, True]))
    np.testing.assert_allclose(inside, [0.875, 0.125])
    np.testing.assert_allclose(outside, [0.375, 0.625])
    assert d[0] > 0 > d[1] and d[0] == pytest.approx(-d[1])


def test_missing_layer_is_a_clear_error(report_context: ReportContext) -> None:
    attributions = SimpleNamespace(concepts={}, targets=np.zeros(3), sample_ids=["a", "b", "c"])
    with pytest.raises(KeyError, match="features.conv9"):
        build_concept_atlas(_zennit(DemoNet(3, width=4)), None, attributions, report_context.analyses, "features.conv9")


def test_report_shows_the_atlas_and_summary_lists_concepts(
    atlas_inputs: dict, report_context: ReportContext, tmp_path: Path
) -> None:
    context = dataclasses.replace(report_context, concept_atlas=atlas_inputs["atlas"])
    page = render_report(context, tmp_path / "out")
    html = page.read_text(encoding="utf-8")
    flag = html[html.index('id="flag-0"') : html.index('id="flag-1"')]
    assert "Concept atlas" in flag and f"channel {PLANTED}" in flag
    assert flag.count('<figure class="pic"') == sum(
        1 + len(concept.references) for concept in atlas_inputs["atlas"][0].concepts
    )
    assert "<img src=x" not in html
    summary = json.loads((page.parent / "summary.json").read_text(encoding="utf-8"))
    concepts = summary["flags"][0]["concepts"]
    assert concepts[0]["channel"] == PLANTED and concepts[0]["layer"] == LAYER
    assert concepts[0]["reference_rows"][0] == 33
    plain = render_report(report_context, tmp_path / "plain").read_text(encoding="utf-8")
    assert "Concept atlas" not in plain


def test_model_input_is_applied_before_the_model(report_context: ReportContext, atlas_inputs: dict) -> None:
    seen: list[tuple[float, float]] = []

    def normalise(images: np.ndarray) -> torch.Tensor:
        seen.append((float(images.min()), float(images.max())))
        return torch.from_numpy((images - 0.5) / 0.25)

    torch.manual_seed(0)
    model = DemoNet(3, width=4).eval()
    attributions = SimpleNamespace(
        concepts={LAYER: atlas_inputs["concepts"]}, targets=np.asarray(report_context.labels),
        sample_ids=report_context.sample_ids,
    )
    source = ArraySource(atlas_inputs["images"], np.asarray(report_context.labels), report_context.sample_ids, report_context.class_names)
    atlas = build_concept_atlas(
        _zennit(model), source, attributions, report_context.analyses[2:],
        LAYER, AtlasSettings(n_concepts=1, n_references=1, display_side=16), model_input=normalise,
    )
    assert seen and 0.0 <= seen[0][0] and seen[0][1] <= 1.0  # display images went in
    picture = atlas[0].concepts[0].references[0]
    assert 0.0 <= picture.image.min() and picture.image.max() <= 1.0  # display pixels came out


def test_the_fast_engine_gives_the_same_atlas(atlas_inputs: dict, report_context: ReportContext) -> None:
    """The audit builds the atlas with the factory's explainer, spray's fast engine for the demo net;
    its pictures must be those of zennit's hooks (same channels, references, crops and conditional heatmaps)."""
    torch.manual_seed(0)
    model = DemoNet(3, width=4).eval()
    labels = np.asarray(report_context.labels)
    source = ArraySource(atlas_inputs["images"], labels, report_context.sample_ids, report_context.class_names)
    attributions = SimpleNamespace(
        concepts={LAYER: atlas_inputs["concepts"]}, targets=labels, sample_ids=report_context.sample_ids,
    )
    explainer = make_explainer(model, AttributionSettings(layers=("features.conv3", LAYER), device="cpu"))
    assert explainer.engine == "fast"
    fast = build_concept_atlas(
        explainer, source, attributions, report_context.analyses, LAYER, AtlasSettings(n_concepts=3, n_references=4, display_side=16),
    )
    reference = atlas_inputs["atlas"]
    assert [(a.class_index, a.cluster_id) for a in fast] == [(a.class_index, a.cluster_id) for a in reference]
    for mine, theirs in zip(fast, reference):
        assert [c.channel for c in mine.concepts] == [c.channel for c in theirs.concepts]
        for c_mine, c_theirs in zip(mine.concepts, theirs.concepts):
            for p_mine, p_theirs in zip([c_mine.representative, *c_mine.references], [c_theirs.representative, *c_theirs.references]):
                assert (p_mine.row, p_mine.box) == (p_theirs.row, p_theirs.box)
                scale = max(float(np.abs(p_theirs.heatmap).max()), 1e-12)
                assert np.abs(p_mine.heatmap - p_theirs.heatmap).max() / scale < 1e-4


def test_the_explainer_must_condition_at_the_atlas_layer(atlas_inputs: dict, report_context: ReportContext) -> None:
    labels = np.asarray(report_context.labels)
    source = ArraySource(atlas_inputs["images"], labels, report_context.sample_ids, report_context.class_names)
    attributions = SimpleNamespace(concepts={LAYER: atlas_inputs["concepts"]}, targets=labels, sample_ids=report_context.sample_ids)
    with pytest.raises(AttributionConfigError, match="not a concept layer"):
        build_concept_atlas(
            _zennit(DemoNet(3, width=4).eval(), ("features.conv3",)), source, attributions, report_context.analyses, LAYER,
        )


def test_a_finding_flagged_in_two_spaces_gets_one_atlas(atlas_inputs: dict, report_context: ReportContext) -> None:
    """The class-0 flag seen again in a concept space is one card in the report, so one atlas:
    its conditional heatmaps are not computed twice."""
    class0 = report_context.analyses[2]
    again = dataclasses.replace(class0, space="concept:features.conv4", clusters=[
        dataclasses.replace(c, artifact_score=0.85) if c.flagged else c for c in class0.clusters
    ])
    labels = np.asarray(report_context.labels)
    source = ArraySource(atlas_inputs["images"], labels, report_context.sample_ids, report_context.class_names)
    attributions = SimpleNamespace(concepts={LAYER: atlas_inputs["concepts"]}, targets=labels, sample_ids=report_context.sample_ids)
    torch.manual_seed(0)
    atlas = build_concept_atlas(
        _zennit(DemoNet(3, width=4).eval()), source, attributions,
        [*report_context.analyses, again], LAYER, AtlasSettings(n_concepts=2, n_references=2, display_side=16),
    )
    assert [(item.class_index, item.space, item.cluster_id) for item in atlas] == [(0, "heatmap", 1), (1, "heatmap", 0)]
