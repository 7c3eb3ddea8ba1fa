"""The ``[correct]`` section of job specs: keys onto CorrectionConfig, command-line overrides, precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from spray.correction.config import CorrectionConfig
from spray.correction.run import job_config
from spray.jobs import JobSpecError, load_job, parse_job

REPO = Path(__file__).resolve().parents[2]

SECTION = """[job]
name = "a"
seed = 7

[correct]
method = "rr-clarc"
flag = 1
reaudit = false
layer = "features.relu2"
pooling = "max"
estimator = "svm"
clean = "all"
gate = "both"
detector_estimator = "ridge"
target_fpr = 0.05
soft_gate = true
temperature = 2
rr_lambda = 10
rr_epochs = 2
rr_learning_rate = 0.0005
rr_target = "all"
rr_max_samples = 300
test_size = 0.3
relevance_samples = 0
torchscript = false
"""


def test_every_key_maps_onto_the_correction_config_and_the_job_seed() -> None:
    spec = parse_job(SECTION)
    assert (spec.correct.flag, spec.correct.reaudit) == (1, False)
    assert job_config(spec) == CorrectionConfig(
        method="rr-clarc", flag=1, reaudit=False, layer="features.relu2", pooling="max", estimator="svm", clean="all", gate="both",
        detector_estimator="ridge", target_fpr=0.05, soft_gate=True, temperature=2.0, rr_lambda=10.0, rr_epochs=2,
        rr_learning_rate=0.0005, rr_target="all", rr_max_samples=300, test_size=0.3, relevance_samples=0,
        seed=7, torchscript=False,
    )


def test_command_line_flags_override_the_section_and_unset_ones_do_not() -> None:
    spec = parse_job(SECTION)
    config = job_config(spec, method="p-clarc", layer=None, gate="class")
    assert (config.method, config.layer, config.gate, config.pooling) == ("p-clarc", "features.relu2", "class", "max")


def test_without_the_section_the_defaults_apply() -> None:
    spec = parse_job('[job]\nname = "a"\n')
    assert (spec.correct.flag, spec.correct.reaudit) == (0, True)
    assert job_config(spec) == CorrectionConfig()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('method = "q-clarc"', r"x\.toml:4: correct\.method must be one of 'r-clarc', 'p-clarc', 'rr-clarc', 'counterfactual'; got 'q-clarc'"),
        ('gate = "always"', r"x\.toml:4: correct\.gate 'always' is P-ClArC: set method = 'p-clarc'"),
        ('pooling = "sum"', r"x\.toml:4: correct\.pooling must be one of 'max', 'mean', 'flatten'; got 'sum'"),
        ('method = "p-clarc"\ntarget_fpr = 1.0', r"x\.toml:5: correct\.target_fpr must be at least 0 and below 1, got 1\.0"),
        ('rr_epochs = 0', r"x\.toml:4: correct\.rr_epochs must be at least 1, got 0"),
        ('rr_epochs = 1.5', r"x\.toml:4: correct\.rr_epochs must be an integer, got float 1\.5"),
        ('rr_max_samples = 1.5', r"x\.toml:4: correct\.rr_max_samples must be an integer or none, got float 1\.5"),
        ('flag = -1', r"x\.toml:4: correct\.flag must be at least 0"),
        ('layer = ""', r"x\.toml:4: correct\.layer must be a module name from model\.named_modules\(\), or 'auto'"),
        ('lambda = 3', r"x\.toml:4: correct\.lambda is not a key of \[correct\]; valid keys: method, flag, reaudit, layer, .*rr_lambda"),
        ('seed = 3', r"x\.toml:4: correct\.seed is not a key of \[correct\]"),
    ],
)
def test_bad_keys_name_file_line_and_fix(lines: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        parse_job(f'[job]\nname = "a"\n[correct]\n{lines}\n', source="jobs/x.toml")


def test_the_demo_jobs_commented_correct_example_is_valid_and_the_job_still_is() -> None:
    path = REPO / "jobs" / "demo.toml"
    assert job_config(load_job(path)) == CorrectionConfig()
    text = path.read_text()
    example = "\n".join(line.removeprefix("# ") for line in text[text.index("# [correct]"):].splitlines())
    spec = parse_job(f'[job]\nname = "a"\n{example}\n')
    # the example spells out the defaults, naming the layer that "auto" chooses for the demo net
    assert job_config(spec) == CorrectionConfig(layer="features.relu3")
