"""Property tests: any job spec or array file either works or fails with spray's own clear error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spray.data.arrays import ArrayFileSource
from spray.data.base import DataSourceError
from spray.jobs import SECTIONS, JobSpecError, parse_job

KEYS = sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__} | {"nme", "weights_only", ""})
SCALARS = st.one_of(
    st.integers(-3, 2000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=12), st.lists(st.integers(-2, 300), max_size=3), st.lists(st.text(max_size=5), max_size=3),
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else ("-inf" if value == float("-inf") else repr(value)))
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(SECTIONS) + ["extra"]),
        st.dictionaries(st.sampled_from([k for k in KEYS if k]), SCALARS, max_size=5),
        max_size=4,
    ),
    st.sampled_from(["demo", "a b", "", "../x", "ok-name"]),
)
def test_any_job_spec_parses_or_raises_job_spec_error(sections: dict, name: str) -> None:
    lines = ["[job]", f"name = {_toml_value(name)}"]
    for section, values in sections.items():
        if section == "job":
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if k != "name"]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    try:
        spec = parse_job("\n".join(lines), source="fuzz.toml")
    except JobSpecError as error:
        assert str(error).startswith("fuzz.toml"), error
    else:
        assert spec.output_dir.name == spec.job.name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=5),
    st.sampled_from([np.uint8, np.float32, np.float64, np.int64]),
    st.integers(0, 6),
    st.sampled_from(["data", "images", "pixels"]),
)
def test_any_npz_loads_or_raises_data_source_error(shape: list[int], dtype: type, n_labels: int, key: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.npz"
        np.savez(path, **{key: np.zeros(shape, dtype=dtype), "label": np.zeros(n_labels, dtype=np.int64)})
        try:
            source = ArrayFileSource(path)
        except DataSourceError as error:
            assert "d.npz" in str(error)
        else:
            assert source.read(np.arange(len(source))).ndim == 4
