"""Job spec parsing: defaults, precise errors with file and line, safe output paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from spray.jobs import JobSpecError, load_job, parse_job

REPO = Path(__file__).resolve().parents[1]


def test_demo_job_file_is_valid_and_writes_under_reports() -> None:
    spec = load_job(REPO / "jobs" / "demo.toml")
    assert spec.job.name == "demo"
    assert spec.output_dir == REPO / "reports" / "demo"
    assert spec.attribution.layers == ("features.conv3", "features.conv4")
    assert spec.data.artifact_fraction == pytest.approx(0.3)


def test_defaults_fill_missing_sections() -> None:
    spec = parse_job('[job]\nname = "tiny"\n')
    assert spec.analysis.n_neighbors == 10 and spec.attribution.composite == "auto" and spec.attribution.layers == ("auto",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[job]\nname = "a"\n[data]\nn_per_clas = 5\n', r"x\.toml:4: data\.n_per_clas is not a key of \[data\]; valid keys: .*n_per_class"),
        ('[job]\nname = "a"\n\n[attribution]\nbatch_size = "64"\n', r"x\.toml:5: attribution\.batch_size must be an integer, got str '64'"),
        ('[job]\nname = "a"\n[analyss]\n', r"x\.toml:3: unknown section \[analyss\]"),
        ('[job]\nname = "../../etc"\n', r"x\.toml:2: job\.name must be 1-100 letters, digits.*got '\.\./\.\./etc'"),
        ('[job]\nname = "a"\n[data]\nartifact_fraction = true\n', r"x\.toml:4: data\.artifact_fraction must be a number, got bool"),
        ("[job\nname=1", r"x\.toml: not valid TOML"),
        ('[job]\nname = "a"\n[analysis]\nmax_cluster_fraction = 0.5\n', r"x\.toml:4: analysis\.max_cluster_fraction was removed: .*causal test"),
    ],
)
def test_bad_specs_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        parse_job(text, source="jobs/x.toml")


def test_unsupported_source_is_named() -> None:
    with pytest.raises(JobSpecError, match=r"x\.toml:4: data\.source must be one of 'demo', 'folder', 'h5', 'npz', 'entrypoint'; got 'web'"):
        parse_job('[job]\nname = "a"\n[data]\nsource = "web"\n', source="jobs/x.toml")


def test_missing_job_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=r"missing\.toml: cannot read the job spec"):
        load_job(tmp_path / "missing.toml")


def test_example_job_without_its_data_names_the_missing_folder_and_line() -> None:
    with pytest.raises(JobSpecError, match=r"example-folder\.toml:12: data\.path '\.\./data/my-images' is not a folder"):
        load_job(REPO / "jobs" / "example-folder.toml")


def test_torchvision_model_needs_an_architecture(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    job = tmp_path / "j.toml"
    job.write_text('[job]\nname = "a"\n[data]\nsource = "folder"\npath = "imgs"\n[model]\nsource = "torchvision"\nweights = "w.pt"\n')
    with pytest.raises(JobSpecError, match=r"j\.toml:7: model\.source 'torchvision' needs model\.architecture"):
        load_job(job)


def test_analysis_spaces_default_to_heatmap_and_every_concept_layer() -> None:
    spec = parse_job('[job]\nname = "a"\n')
    assert spec.analysis.spaces == ("heatmap", "concept:*") and spec.analysis.dataset_wide is False


@pytest.mark.parametrize(
    ("spaces", "message"),
    [
        ("[]", r"x\.toml:4: analysis\.spaces must name at least one space"),
        ('["heatmap", "heatmap"]', r"x\.toml:4: analysis\.spaces repeats a space"),
        ('["pixels"]', r"x\.toml:4: analysis\.spaces item 0: must be 'heatmap', 'concept:\*' or 'concept:<layer>'; got 'pixels'"),
        ('["concept:"]', r"x\.toml:4: analysis\.spaces item 0: must be .*; got 'concept:'"),
        ('["concept:layer9"]', r"x\.toml:4: analysis\.spaces names 'concept:layer9', which needs its layer in attribution\.layers \(\['layer3'\]\)"),
    ],
)
def test_bad_analysis_spaces_name_the_line_and_the_fix(spaces: str, message: str) -> None:
    text = f'[job]\nname = "a"\n[analysis]\nspaces = {spaces}\n[attribution]\nlayers = ["layer3"]\n'
    with pytest.raises(JobSpecError, match=message):
        parse_job(text, source="jobs/x.toml")


def test_concept_wildcard_expands_to_the_stored_layers_in_order_and_a_missing_layer_is_named() -> None:
    import numpy as np

    from spray.analysis.pipeline import analyze_spaces
    from spray.analysis.preprocess import AnalysisInputError

    spec = parse_job('[job]\nname = "a"\n[analysis]\nspaces = ["concept:*", "heatmap"]\nmin_class_size = 5\nn_neighbors = 3\nembedding = "spectral"\n')
    rng = np.random.default_rng(0)
    maps, labels = rng.random((12, 4, 4)), np.zeros(12, int)
    concepts = {"layer2": rng.random((12, 3)), "layer4": rng.random((12, 5))}
    results = analyze_spaces(maps, labels, ["a"], spec.analysis, concepts=concepts)
    assert [r.space for r in results] == ["concept:layer2", "concept:layer4", "heatmap"]
    assert [r.space for r in analyze_spaces(maps, labels, ["a"], spec.analysis)] == ["heatmap"]
    named = parse_job('[job]\nname = "a"\n[analysis]\nspaces = ["concept:layer4"]\n')
    with pytest.raises(AnalysisInputError, match=r"unknown analysis space 'concept:layer4'; available: \['heatmap', 'concept:layer2'\]"):
        analyze_spaces(maps, labels, ["a"], named.analysis, concepts={"layer2": concepts["layer2"]})


def test_cluster_write_defaults_to_client_and_accepts_workers() -> None:
    assert parse_job('[job]\nname = "a"\n').cluster.write == "client"
    spec = parse_job('[job]\nname = "a"\n[cluster]\nkind = "local"\nwrite = "workers"\n')
    assert spec.cluster.write == "workers"


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ('kind = "local"\nwrite = "shared"', r"x\.toml:5: cluster\.write must be one of 'client', 'workers'; got 'shared'"),
        ('write = "workers"', r"x\.toml:4: cluster\.write 'workers' needs Dask workers; set cluster\.kind"),
        ('kind = "local"\nwrite = "workers"\n[data]\nsource = "entrypoint"\nentrypoint = "m:f"\n[model]\nsource = "entrypoint"\nentrypoint = "m:g"',
         r"x\.toml:5: cluster\.write 'workers' needs data the workers can open from files.*use write = 'client'"),
    ],
)
def test_bad_cluster_write_names_file_line_and_fix(cluster: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        parse_job(f'[job]\nname = "a"\n[cluster]\n{cluster}\n', source="jobs/x.toml")


def test_a_file_entry_point_outside_the_job_folder_or_missing_is_refused_by_validate(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "elsewhere.py").write_text("def build(num_classes):\n    raise SystemExit\n")
    job = tmp_path / "jobs" / "j.toml"
    job.write_text('[job]\nname = "a"\n[data]\nsource = "npz"\npath = "d.npz"\n[model]\nsource = "entrypoint"\nentrypoint = "../elsewhere.py:build"\n')
    (tmp_path / "jobs" / "d.npz").write_bytes(b"")
    with pytest.raises(JobSpecError, match=r"j\.toml:8: model\.entrypoint: entry point '\.\./elsewhere\.py:build' names .*outside the job's folder"):
        load_job(job)
    job.write_text(job.read_text().replace("../elsewhere.py", "missing.py"))
    with pytest.raises(JobSpecError, match=r"j\.toml:8: model\.entrypoint: entry point file .*missing\.py not found"):
        load_job(job)
