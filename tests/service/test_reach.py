"""Concept reach: a flag's concepts looked up in the stored concept relevances of every class."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from spray.service.reach import concept_reach

from .conftest import flag, iso, serve, summary, write_run


def _attributions(path: Path) -> list[str]:
    """A small ``attributions.h5``: 3 classes of 20; channel 2 of ``l4`` lights up on
    samples 0-9 (class 1's flagged members) and on samples 40-44 of class 2."""
    ids = [f"s{i}" for i in range(60)]
    labels = np.repeat([1, 0, 2], 20)
    relevance = np.full((60, 4), 0.1, dtype=np.float32)
    relevance[0:10, 2] = 5.0
    relevance[40:45, 2] = 5.0 + np.arange(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.attrs.update({"format": "spray-attributions", "format_version": 1, "metadata": "{}", "fingerprint": "test"})
        handle["attribution"] = np.zeros((60, 2, 2), dtype=np.float32)
        handle["prediction"] = np.zeros((60, 3), dtype=np.float32)
        handle["label"] = labels
        handle["target"] = labels
        handle["sample_id"] = np.array(ids, dtype=h5py.string_dtype())
        handle.create_group("concepts")["l4"] = relevance
    return ids


def test_reach_counts_the_classes_the_concepts_drive(tmp_path: Path) -> None:
    ids = _attributions(tmp_path / "a.h5")
    reach = concept_reach(tmp_path / "a.h5", [{"layer": "l4", "channel": 2}], ids[:10], 1, ["zero", "one", "two"], top=3)
    assert reach.n_members_found == 10 and reach.bar == 5.0
    by_class = {item.class_name: item for item in reach.classes}
    assert (by_class["two"].n_reaching, by_class["two"].n_samples) == (5, 20)
    assert [sample for sample, _ in by_class["two"].top] == ["s44", "s43", "s42"]
    assert by_class["zero"].n_reaching == 0
    assert by_class["one"].n_samples == 10 and by_class["one"].n_reaching == 0  # members left out
    assert reach.classes[0].class_name == "two"  # highest share first


def test_reach_page_and_api(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    ids = _attributions(reports / "demo" / "stages" / "attributions.h5")
    entry = flag(ids[:10], class_name="<b>one</b>", concepts=[("l4", 2)])
    write_run(reports, "demo", "20260101T020000Z", summary("demo", iso("20260101T020000Z"), [entry, flag(range(100, 110), cluster_id=2)], class_names=["zero", "<b>one</b>", "two"]))
    served = serve(reports)
    flags = served.client.get(f"/api/runs/{served.latest_run()['id']}/flags").json()
    reach = served.client.get(f"/api/flags/{flags[0]['id']}/reach").json()
    assert reach["classes"][0]["class_name"] == "two" and reach["classes"][0]["n_reaching"] == 5
    assert served.client.get(f"/api/flags/{flags[1]['id']}/reach").status_code == 409  # no concepts
    page = served.client.get(f"/flags/{flags[0]['id']}/reach").text
    assert "s44" in page and "&lt;b&gt;one&lt;/b&gt;" in page and "<b>one</b>" not in page
    assert f"/flags/{flags[0]['id']}/reach" in served.client.get(f"/runs/{flags[0]['run_id']}").text
    json.dumps(reach)
    served.app.state.service.engine.dispose()
