"""Export: weights + JSON and TorchScript rebuild the gated model exactly (random small net, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spray.correction.cav import CAV
from spray.correction.clarc import ClarcModel, Gate
from spray.correction.export import export_corrected, load_corrected
from spray.models.demo import DemoNet


def _cav(seed: int, pooling: str) -> CAV:
    size = 32 if pooling == "max" else 32 * 8 * 8
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    spatial = (8, 8) if pooling == "max" else ()
    return CAV(
        layer="features.relu3", pooling=pooling, direction=v / v.norm(), clean_mean=torch.zeros(size),
        reference=torch.rand(spatial), artifact_reference=torch.ones(spatial), intercept=0.1, estimator="pattern",
        auc=0.97, n_artifact=12, n_clean=30, class_id=1, activation_shape=(32, 8, 8),
    )


@pytest.mark.parametrize("pooling", ["max", "flatten"])
def test_torchscript_and_rebuilt_model_match_the_in_memory_gated_model(tmp_path: Path, pooling: str) -> None:
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    x = torch.rand(24, 3, 32, 32)
    cav, detector = _cav(1, pooling), _cav(2, "max")
    with torch.no_grad():
        probe = ClarcModel(net, cav, Gate(kind="detector"), detector)
        threshold = float(probe.detector_score(probe.prefix(x)).quantile(0.3))
        target = int(net(x).argmax(1).mode().values)
    gate = Gate(kind="both", target_classes=(target,), threshold=threshold)
    corrected = ClarcModel(net, cav, gate, detector)
    paths = export_corrected(corrected, tmp_path, method="r-clarc", cav=cav, example_input=x)
    with torch.no_grad():
        expected, weight = corrected.forward_gated(x)
        scripted = torch.jit.load(str(paths.torchscript))
        got, got_weight = scripted.forward_gated(x)
        rebuilt = load_corrected(tmp_path, DemoNet(4))
        again, again_weight = rebuilt.forward_gated(x)
    fired = weight > 0
    assert 0 < int(fired.sum()) < len(x)
    assert torch.equal(got_weight, weight) and torch.equal(again_weight, weight)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(again, expected)
    assert torch.equal(got[~fired], net(x)[~fired].detach())
    config = json.loads(paths.config.read_text())
    assert config["gate"] == {"kind": "both", "target_classes": [target], "threshold": threshold, "soft": False,
                              "temperature": 1.0, "min_weight": 0.01}
    assert config["detector_file"] == "detector.pt" and config["torchscript_max_abs_diff"] <= 1e-5
    for name in ("weights.pt", "cav.pt", "detector.pt"):
        torch.load(tmp_path / name, weights_only=True)


def test_rr_export_is_a_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    export_corrected(net, tmp_path, method="rr-clarc", cav=_cav(3, "flatten"))
    rebuilt = load_corrected(tmp_path, DemoNet(4))
    x = torch.rand(4, 3, 32, 32)
    assert type(rebuilt) is DemoNet
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
        assert torch.equal(torch.jit.load(str(tmp_path / "model.torchscript.pt"))(x), net(x))
    assert json.loads((tmp_path / "correction.json").read_text())["gate"] is None
