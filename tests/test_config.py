"""Declared settings: every field of every job section is checked before any stage runs, and
every error names the file, the line and the key; the README's key table and the
declarations agree."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from spray.config import Choice, ConfigError, Each, Length, Pattern, Range, constraints_of, declared_fields, job_keys, type_matches
from spray.jobs import SECTIONS, JobSpecError, parse_job

REPO = Path(__file__).resolve().parents[1]


def _toml(value: Any) -> str:
    """``value`` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _wrong_type(annotation: Any) -> Any:
    """A value that is not of the annotated type."""
    return next(v for v in (12, "twelve", True, [1], 1.5) if not type_matches(v, annotation))


def _bad_values() -> list[tuple[str, str, Any]]:
    """(section, key, bad value): a wrong type for every job key, and a value breaking each of its constraints."""
    cases = []
    for section, cls in SECTIONS.items():
        keys = job_keys(cls)
        for item, annotation in declared_fields(cls):
            if item.name not in keys:
                continue
            cases.append((section, item.name, _wrong_type(annotation)))
            cases.extend((section, item.name, constraint.counterexample()) for constraint in constraints_of(item))
    return cases


CASES = _bad_values()


def test_every_section_declares_its_fields_with_constraints() -> None:
    """Every choice-like or numeric setting carries a declared constraint (the walk below relies on it)."""
    unconstrained = [
        f"{section}.{item.name}"
        for section, cls in SECTIONS.items()
        for item, annotation in declared_fields(cls)
        if not constraints_of(item) and any(type_matches(v, annotation) for v in (1, 1.5)) and not type_matches(True, annotation)
    ]
    assert unconstrained == []
    assert len(CASES) > 150


@pytest.mark.parametrize(("section", "key", "value"), CASES, ids=[f"{s}.{k}={v!r}" for s, k, v in CASES])
def test_every_bad_value_of_every_key_names_file_line_and_key(section: str, key: str, value: Any) -> None:
    lines = ["[job]", 'name = "a"'] if section != "job" else []
    lines += [f"[{section}]"] + (['name = "a"'] if section == "job" and key != "name" else [])
    lines.append(f"{key} = {_toml(value)}")
    text = "\n".join(lines) + "\n"
    line = len(lines)
    with pytest.raises(JobSpecError) as raised:
        parse_job(text, source="jobs/x.toml")
    assert str(raised.value).startswith(f"jobs/x.toml:{line}: {section}.{key} "), str(raised.value)


def test_unknown_keys_and_keys_filled_by_the_job_are_refused() -> None:
    with pytest.raises(JobSpecError, match=r"x\.toml:4: analysis\.random_state is not a key of \[analysis\]"):
        parse_job('[job]\nname = "a"\n[analysis]\nrandom_state = 3\n', source="x.toml")
    with pytest.raises(JobSpecError, match=r"x\.toml:4: attribution\.mean is not a key of \[attribution\]"):
        parse_job('[job]\nname = "a"\n[attribution]\nmean = [0.5]\n', source="x.toml")


def test_the_job_fills_seed_and_normalisation_into_the_sections_that_use_them() -> None:
    text = '[job]\nname = "a"\nseed = 7\n[data]\nsource = "entrypoint"\nentrypoint = "m:g"\nmean = [0.5]\nstd = [0.25]\n'
    spec = parse_job(text + '[model]\nsource = "entrypoint"\nentrypoint = "m:f"\n')
    assert spec.analysis.random_state == 7 and spec.correct.seed == 7
    assert (spec.attribution.mean, spec.attribution.std) == ((0.5,), (0.25,))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[analysis]\nmax_clusters = 40\n", r"x\.toml:4: analysis\.max_clusters \(40\) must be below n_eigen \(32\)"),
        ('[analysis]\nnormalisation = "foo"\n', r"x\.toml:4: analysis\.normalisation must be one of 'l2', 'max', 'sum', 'none'; got 'foo'"),
        ("[analysis]\nthreshold = nan\n", r"x\.toml:4: analysis\.threshold must be a finite number, got nan"),
        ("[analysis]\nthreshold = inf\n", r"x\.toml:4: analysis\.threshold must be a finite number, got inf"),
        ("[cluster]\nworkers = 0\n", r"x\.toml:4: cluster\.workers must be at least 1, got 0"),
        ('[cluster]\nmemory_limit = "lots"\n', r"x\.toml:4: cluster\.memory_limit must be a memory size such as '4GiB'"),
        ('[data]\nmean = [0.5, 0.5]\nstd = [0.2]\n', r"x\.toml:5: data\.std needs as many values as mean"),
        ('[attribution]\nlayers = []\n[analysis]\nspaces = ["concept:*"]\n', r"x\.toml:6: analysis\.spaces names only concept spaces, but attribution\.layers = \[\]"),
        ('[attribution]\ncanonizers = ["auto", "vgg"]\n', r"x\.toml:4: attribution\.canonizers must be \['auto'\] alone"),
        ("[report]\nsamples_per_grid = 0\n", r"x\.toml:4: report\.samples_per_grid must be at least 1, got 0"),
    ],
)
def test_values_that_used_to_fail_only_inside_the_run_are_refused_by_validate(text: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        parse_job('[job]\nname = "a"\n' + text, source="x.toml")


def test_a_job_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(JobSpecError, match=r"x\.toml:2: job\.name must be 1-100 letters"):
        parse_job('[job]\nname = "ok\\n"\n', source="x.toml")


def _readme_keys() -> dict[str, set[str]]:
    """Section -> keys listed in the README's job-spec key table (the table headed "| section | key |")."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| section | key |"))
    keys: dict[str, set[str]] = {}
    section = None
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        header = re.fullmatch(r"`\[(\w+)\]`", cells[0])
        if header:
            section = header.group(1)
        keys.setdefault(str(section), set()).update(re.findall(r"`(\w+)`", cells[1]))
    return keys


def test_the_readme_table_lists_exactly_the_declared_keys() -> None:
    documented = _readme_keys()
    declared = {section: set(job_keys(cls)) for section, cls in SECTIONS.items()}
    assert documented == declared


def test_constraints_report_what_is_wrong() -> None:
    assert Choice(("a", "b")).problem("c") == "must be one of 'a', 'b'; got 'c'"
    assert Range(0.0, 1.0, high_open=True).problem(1.0) == "must be at least 0 and below 1, got 1.0"
    assert Range(1).problem(math.inf) == "must be a finite number, got inf"
    assert Length((0, 2)).problem((1,)) == "must hold 0 or 2 values, got 1"
    assert Each(Range(1)).problem((3, 0)) == "item 1: must be at least 1, got 0"
    assert Pattern(r"\d+", "digits").problem("x") == "must be digits; got 'x'"
    assert str(ConfigError("k", "must be 1")) == "k must be 1"


def test_a_job_spec_validates_without_loading_torch_or_the_analysis_steps() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from spray.jobs import load_job; load_job(sys.argv[1]); "
        "heavy = sorted({'torch', 'sklearn', 'h5py', 'umap'} & set(sys.modules)); print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "jobs" / "demo.toml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
