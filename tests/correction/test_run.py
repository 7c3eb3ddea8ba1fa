"""Glue: rows from an audit summary, configuration checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spray.config import ConfigError
from spray.correction import CorrectionConfig, CorrectionError, flag_rows


def test_flag_rows_reads_the_strongest_flag(tmp_path: Path) -> None:
    summary = {"flags": [{"class_index": 1, "member_rows": [4, 9, 12]}, {"class_index": 2, "member_rows": [1]}]}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    rows, class_index = flag_rows(path)
    assert rows.tolist() == [4, 9, 12] and rows.dtype == np.int64 and class_index == 1
    assert flag_rows(summary, 1)[1] == 2
    with pytest.raises(CorrectionError, match=r"flag 2 does not exist: the audit has 2 flag\(s\)"):
        flag_rows(summary, 2)
    with pytest.raises(CorrectionError, match="flagged no cluster"):
        flag_rows({"flags": []})
    with pytest.raises(CorrectionError, match="not found: run the audit first"):
        flag_rows(tmp_path / "missing.json")


def test_config_rejects_unknown_choices_and_impossible_numbers_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^method must be one of 'r-clarc', 'p-clarc', 'rr-clarc', 'counterfactual'; got 'q-clarc'"):
        CorrectionConfig(method="q-clarc")
    with pytest.raises(ConfigError, match=r"^gate 'always' is P-ClArC: set method = 'p-clarc'"):
        CorrectionConfig(gate="always")
    with pytest.raises(ConfigError, match=r"^pooling must be one of 'max', 'mean', 'flatten'; got 'median'"):
        CorrectionConfig(pooling="median")
    with pytest.raises(ConfigError, match=r"^target_fpr must be at least 0 and below 1, got 1.5"):
        CorrectionConfig(target_fpr=1.5)
    with pytest.raises(ConfigError, match=r"^rr_epochs must be at least 1, got 0"):
        CorrectionConfig(rr_epochs=0)