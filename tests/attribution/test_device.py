"""Where the attribution runs: the device and precision options, from the job spec to the explainer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from spray.attribution.settings import AttributionSettings
from spray.attribution.engine import attribute_dataset
from spray.attribution.fast import FastExplainer
from spray.attribution.lrp import AttributionConfigError, ieee_float32, on_device
from spray.config import ConfigError
from spray.attribution.select import autocast_dtype, make_explainer, resolve_device
from spray.data.arrays import ArraySource
from spray.jobs import JobSpecError, parse_job
from spray.models.demo import DemoNet
from spray.store.attributions import read_attributions


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, also where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _net() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet(4).eval()


def test_auto_is_the_cpu_and_cuda_is_an_error_without_a_gpu(no_cuda) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AttributionConfigError, match=r"device = 'cuda' but CUDA is not available.*'auto'"):
        resolve_device("cuda")
    with pytest.raises(AttributionConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_auto_is_cuda_where_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_amp_is_float16_on_cuda_only() -> None:
    assert autocast_dtype("float32", torch.device("cpu")) is None
    assert autocast_dtype("amp", torch.device("cuda")) is torch.float16
    with pytest.raises(AttributionConfigError, match=r"precision = 'amp'.*needs CUDA.*runs on cpu"):
        autocast_dtype("amp", torch.device("cpu"))
    with pytest.raises(AttributionConfigError, match="unknown precision"):
        autocast_dtype("float16", torch.device("cpu"))


def test_settings_check_device_and_precision(no_cuda) -> None:
    with pytest.raises(ConfigError, match="device must be one of"):
        AttributionSettings(device="gpu")
    with pytest.raises(ConfigError, match="precision must be one of"):
        AttributionSettings(precision="half")
    with pytest.raises(AttributionConfigError, match="needs CUDA"):
        make_explainer(_net(), AttributionSettings(precision="amp", device="auto"))
    with pytest.raises(AttributionConfigError, match="CUDA is not available"):
        make_explainer(_net(), AttributionSettings(device="cuda"))


def test_cpu_placement_keeps_the_model_and_gives_the_engines_results(no_cuda) -> None:
    net = _net()
    x, targets = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 3])
    explainer = make_explainer(net, AttributionSettings(layers=("features.conv3",), device="auto"))
    assert explainer.model is net and explainer.device == torch.device("cpu") and explainer.engine == "fast"
    with explainer:
        ours = explainer.explain(x, targets)
    direct = FastExplainer(net, "epsilon_plus_flat", ("merge_batchnorm",), ["features.conv3"]).explain(x, targets)
    assert torch.equal(ours.heatmaps, direct.heatmaps) and torch.equal(ours.concepts["features.conv3"], direct.concepts["features.conv3"])
    assert torch.equal(explainer.predict(x), net(x).argmax(1))


def test_a_model_elsewhere_is_copied_not_moved() -> None:
    net = _net()
    moved = on_device(net, torch.device("meta"))
    assert moved is not net and next(moved.parameters()).device.type == "meta"
    assert next(net.parameters()).device.type == "cpu"


@pytest.mark.parametrize("engine", ["fast", "zennit"])
def test_autocast_runs_both_engines_and_returns_float32(engine: str) -> None:
    """The mixed-precision path (float16 autocast on CUDA) exercised with CPU bfloat16 autocast:
    relevance of mixed dtypes flows through every step; heatmaps come back float32, close to float32's."""
    net = _net()
    x, targets = torch.rand(4, 3, 32, 32), torch.arange(4)
    explainer = make_explainer(net, AttributionSettings(layers=("features.conv3",), device="cpu", engine=engine))
    with explainer:
        reference = explainer.explain(x, targets).heatmaps
    explainer.autocast = torch.bfloat16  # the factory refuses amp off CUDA; the arithmetic path is the same
    with explainer:
        ours = explainer.explain(x, targets)
    assert ours.heatmaps.dtype == ours.logits.dtype == ours.concepts["features.conv3"].dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([ours.heatmaps.flatten(), reference.flatten()]))[0, 1]
    assert correlation > 0.99


def test_ieee_float32_restores_the_flags() -> None:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has only the allow_tf32 flags")
    before = conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    with ieee_float32():
        assert conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_ieee_float32_overlapping_blocks_in_threads_keep_the_flags_until_the_last_ends() -> None:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has only the allow_tf32 flags")
    before = conv.fp32_precision
    first_inside, first_may_leave, first_left = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with ieee_float32():
            first_inside.set()
            first_may_leave.wait(10)
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert first_inside.wait(10)
    with ieee_float32():
        first_may_leave.set()
        assert first_left.wait(10)
        # The other thread's block has ended; this one still runs with IEEE float32.
        assert conv.fp32_precision == "ieee"
    thread.join(10)
    assert conv.fp32_precision == before


def test_dataset_pass_on_auto_device_records_the_precision(tmp_path, no_cuda) -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(12, 3, 32, 32)).astype(np.float32)
    source = ArraySource(images, np.arange(12) % 4, [f"s{i}" for i in range(12)], ["a", "b", "c", "d"])
    net = _net()
    auto = AttributionSettings(layers=("features.conv4",), batch_size=8, device="auto", target="prediction")
    path = attribute_dataset(source, net, auto, tmp_path / "auto" / "attributions.h5", "d", progress=False)
    cpu = AttributionSettings(layers=("features.conv4",), batch_size=8, device="cpu", target="prediction")
    other = attribute_dataset(source, net, cpu, tmp_path / "cpu" / "attributions.h5", "d", progress=False)
    with read_attributions(path) as a, read_attributions(other) as b:
        np.testing.assert_array_equal(a.heatmaps[...], b.heatmaps[...])
        np.testing.assert_array_equal(a.targets, net(torch.from_numpy(images)).argmax(1).numpy())
        assert a.metadata["precision"] == "float32"


JOB = '[job]\nname = "a"\n\n[attribution]\n'


def test_job_spec_device_and_precision_defaults_and_plumbing() -> None:
    spec = parse_job(JOB, "x.toml")
    assert (spec.attribution.device, spec.attribution.precision) == ("auto", "float32")
    spec = parse_job(JOB + 'device = "cuda"\nprecision = "amp"\n', "x.toml")
    settings = spec.attribution.for_model(DemoNet(4))
    assert (settings.device, settings.precision) == ("cuda", "amp")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('device = "gpu"\n', r"x\.toml:5: attribution\.device must be one of 'auto', 'cpu', 'cuda'; got 'gpu'"),
        ('precision = "fp16"\n', r"x\.toml:5: attribution\.precision must be one of 'float32', 'amp'; got 'fp16'"),
        ('device = "cpu"\nprecision = "amp"\n', r"x\.toml:6: attribution\.precision 'amp'.*CUDA only.*'cpu'"),
        ("device = 0\n", r"x\.toml:5: attribution\.device must be a string, got int 0"),
    ],
)
def test_job_spec_rejects_bad_device_and_precision(lines: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        parse_job(JOB + lines, "x.toml")
