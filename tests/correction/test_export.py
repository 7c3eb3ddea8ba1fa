"""Export: weights + JSON, torch.export, ONNX and TorchScript rebuild the gated model exactly (random small net, no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spray.correction import export
from spray.correction.cav import CAV
from spray.correction.clarc import ClarcModel, Gate
from spray.correction.export import export_corrected, load_corrected
from spray.models.demo import DemoNet

#: The tests load the TorchScript files on purpose; torch 2.14 warns that torch.jit is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _cav(seed: int, pooling: str) -> CAV:
    size = 32 if pooling == "max" else 32 * 8 * 8
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    spatial = (8, 8) if pooling == "max" else ()
    return CAV(
        layer="features.relu3", pooling=pooling, direction=v / v.norm(), clean_mean=torch.zeros(size),
        reference=torch.rand(spatial), artifact_reference=torch.ones(spatial), intercept=0.1, estimator="pattern",
        auc=0.97, n_artifact=12, n_clean=30, class_id=1, activation_shape=(32, 8, 8),
    )


def _gated(pooling: str, x: torch.Tensor) -> tuple[DemoNet, ClarcModel, CAV]:
    """A random demo net with an R-ClArC gate ("both") that fires on some, not all, of ``x``."""
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    cav, detector = _cav(1, pooling), _cav(2, "max")
    with torch.no_grad():
        probe = ClarcModel(net, cav, Gate(kind="detector"), detector)
        threshold = float(probe.detector_score(probe.prefix(x)).quantile(0.3))
        target = int(net(x).argmax(1).mode().values)
    gate = Gate(kind="both", target_classes=(target,), threshold=threshold)
    return net, ClarcModel(net, cav, gate, detector), cav


def _without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``importlib.util.find_spec`` report the packages ``names`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(export.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("pooling", ["max", "flatten"])
def test_torchscript_program_and_rebuilt_model_match_the_in_memory_gated_model(tmp_path: Path, pooling: str) -> None:
    x = torch.rand(24, 3, 32, 32)
    net, corrected, cav = _gated(pooling, x)
    paths = export_corrected(corrected, tmp_path, method="r-clarc", cav=cav, example_input=x, onnx=False)
    other = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected, weight = corrected.forward_gated(x)
        scripted = torch.jit.load(str(paths.torchscript))
        got, got_weight = scripted.forward_gated(x)
        rebuilt = load_corrected(tmp_path, DemoNet(4))
        again, again_weight = rebuilt.forward_gated(x)
        program = torch.export.load(paths.torch_export).module()
        from_program, from_program_other = program(x), program(other)
        expected_other = corrected(other)
    fired = weight > 0
    assert 0 < int(fired.sum()) < len(x)
    assert torch.equal(got_weight, weight) and torch.equal(again_weight, weight)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(again, expected)
    assert torch.equal(got[~fired], net(x)[~fired].detach())
    torch.testing.assert_close(from_program, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_program_other, expected_other, rtol=0, atol=1e-5)
    assert not torch.allclose(from_program[fired], net(x)[fired].detach())  # the program does correct
    config = json.loads(paths.config.read_text())
    assert config["gate"] == {"kind": "both", "target_classes": [corrected.gate.target_classes[0]],
                              "threshold": corrected.gate.threshold, "soft": False, "temperature": 1.0, "min_weight": 0.01}
    assert config["detector_file"] == "detector.pt" and config["torchscript_max_abs_diff"] <= 1e-5
    record = config["torch_export"]
    assert record["file"] == "model.pt2" and record["error"] is None and record["dynamic_batch"] is True
    assert record["checked_batch_sizes"] == [24, 12] and record["max_abs_diff"] <= 1e-5
    assert config["onnx"] == {"file": None, "error": None, "skipped": "disabled ([correct] onnx = false)"}
    assert paths.onnx is None and not (tmp_path / "model.onnx").exists()
    for name in ("weights.pt", "cav.pt", "detector.pt"):
        torch.load(tmp_path / name, weights_only=True)


def test_p_clarc_program_runs_any_batch_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    cav = _cav(4, "max")
    corrected = ClarcModel(net, cav, Gate(kind="always"))
    x = torch.rand(1, 3, 32, 32)  # batch 1: export traces a doubled batch, still dynamic
    paths = export_corrected(corrected, tmp_path, method="p-clarc", cav=cav, example_input=x, onnx=False, torchscript=False)
    program = torch.export.load(paths.torch_export).module()
    with torch.no_grad():
        for batch in (1, 3, 7):
            inputs = torch.rand(batch, 3, 32, 32)
            torch.testing.assert_close(program(inputs), corrected(inputs), rtol=0, atol=1e-5)
        assert not torch.allclose(program(x), net(x), atol=1e-3)  # the projection is in the program
    record = json.loads(paths.config.read_text())["torch_export"]
    assert record["checked_batch_sizes"] == [1, 2] and record["max_abs_diff"] <= 1e-5
    assert paths.torchscript is None and not (tmp_path / "model.torchscript.pt").exists()


def test_rr_export_is_a_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    paths = export_corrected(net, tmp_path, method="rr-clarc", cav=_cav(3, "flatten"))
    rebuilt = load_corrected(tmp_path, DemoNet(4))
    x = torch.rand(4, 3, 32, 32)
    assert type(rebuilt) is DemoNet
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
        assert torch.equal(torch.jit.load(str(tmp_path / "model.torchscript.pt"))(x), net(x))
    config = json.loads((tmp_path / "correction.json").read_text())
    assert config["gate"] is None
    # Without an example input there is nothing to trace: recorded, not failed.
    reason = "no example input to trace the model with"
    assert config["torch_export"] == {"file": None, "error": None, "skipped": reason}
    assert config["onnx"]["file"] is None and config["onnx"]["error"] is None
    assert config["onnx"]["skipped"] == reason or config["onnx"]["skipped"].endswith("pip install 'spray[onnx]'")
    assert paths.torch_export is None and paths.onnx is None and not (tmp_path / "model.pt2").exists()


def test_a_failing_torch_export_is_recorded_and_the_other_files_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(8, 3, 32, 32)
    _, corrected, cav = _gated("max", x)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", refuse)
    _without(monkeypatch)  # ONNX as installed: it depends on the program, so it fails (or is skipped) too
    (tmp_path / "model.pt2").write_bytes(b"an earlier export's program")  # must not pass for this one
    paths = export_corrected(corrected, tmp_path, method="r-clarc", cav=cav, example_input=x)
    config = json.loads(paths.config.read_text())
    assert config["torch_export"] == {"file": None, "error": "RuntimeError: data-dependent control flow", "skipped": None}
    if export._missing_onnx_packages():
        assert "pip install 'spray[onnx]'" in config["onnx"]["skipped"]
    else:
        assert config["onnx"]["file"] is None
        assert config["onnx"]["error"] == "torch.export, which the ONNX export needs, failed: RuntimeError: data-dependent control flow"
    assert paths.torch_export is None and paths.onnx is None
    assert not (tmp_path / "model.pt2").exists() and not (tmp_path / "model.onnx").exists()
    for path in (paths.weights, paths.cav, paths.detector, paths.torchscript):
        assert path is not None and path.exists()
    assert config["torchscript_max_abs_diff"] <= 1e-5


def test_a_batch_pinned_model_is_exported_for_the_example_batch(tmp_path: Path) -> None:
    class Pinned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(6, 12))  # the batch size is fixed at 6

    torch.manual_seed(0)
    model = Pinned().eval()
    x = torch.rand(6, 3, 2, 2)
    paths = export_corrected(model, tmp_path, method="rr-clarc", cav=_cav(5, "max"), example_input=x, onnx=False, torchscript=False)
    record = json.loads(paths.config.read_text())["torch_export"]
    assert record["file"] == "model.pt2" and record["dynamic_batch"] is False
    assert record["checked_batch_sizes"] == [6] and record["max_abs_diff"] == 0.0
    with torch.no_grad():
        assert torch.equal(torch.export.load(paths.torch_export).module()(x), model(x))


def test_onnx_is_skipped_with_the_install_hint_when_its_packages_are_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(4, 3, 32, 32)
    _, corrected, cav = _gated("max", x)
    _without(monkeypatch, "onnxscript")
    paths = export_corrected(corrected, tmp_path, method="r-clarc", cav=cav, example_input=x, torch_export=False, torchscript=False)
    config = json.loads(paths.config.read_text())
    assert config["onnx"]["file"] is None and config["onnx"]["error"] is None
    assert config["onnx"]["skipped"].endswith("not installed: pip install 'spray[onnx]'")
    assert "onnxscript" in config["onnx"]["skipped"]
    assert config["torch_export"]["skipped"] == "disabled ([correct] torch_export = false)"
    assert paths.onnx is None and sorted(p.name for p in tmp_path.iterdir()) == [
        "cav.json", "cav.pt", "correction.json", "detector.json", "detector.pt", "weights.pt"]


def _onnx_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in export.ONNX_PACKAGES)


@pytest.mark.skipif(not _onnx_installed(), reason="the onnx extra is not installed (pip install 'spray[onnx]')")
def test_onnx_file_matches_the_gated_model(tmp_path: Path) -> None:
    x = torch.rand(12, 3, 32, 32)
    _, corrected, cav = _gated("flatten", x)
    paths = export_corrected(corrected, tmp_path, method="r-clarc", cav=cav, example_input=x, torch_export=False, torchscript=False)
    record = json.loads(paths.config.read_text())["onnx"]
    assert paths.onnx == tmp_path / "model.onnx" and paths.onnx.exists() and record["file"] == "model.onnx"
    assert record["error"] is None and record["dynamic_batch"] is True and record["data_file"] is None
    if importlib.util.find_spec("onnxruntime") is None:
        assert record["verified"] is False and record["not_verified"] == "onnxruntime is not installed"
        return
    assert record["verified"] is True and record["not_verified"] is None
    assert record["checked_batch_sizes"] == [12, 6] and record["max_abs_diff"] <= 1e-5
    import onnxruntime

    session = onnxruntime.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
    other = torch.rand(3, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), corrected(other), rtol=0, atol=1e-5)


@pytest.mark.skipif(not _onnx_installed(), reason="the onnx extra is not installed (pip install 'spray[onnx]')")
def test_onnx_without_onnxruntime_is_written_but_not_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    _without(monkeypatch, "onnxruntime")
    x = torch.rand(4, 3, 2, 2)
    paths = export_corrected(model, tmp_path, method="rr-clarc", cav=_cav(6, "max"), example_input=x, torch_export=False, torchscript=False)
    record = json.loads(paths.config.read_text())["onnx"]
    assert paths.onnx is not None and paths.onnx.exists() and record["file"] == "model.onnx"
    assert record["verified"] is False and record["max_abs_diff"] is None
    assert record["not_verified"] == "onnxruntime is not installed"
