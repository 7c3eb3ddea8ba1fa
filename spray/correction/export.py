"""Save a corrected model two ways: weights plus a JSON description, and a TorchScript file.

Layout of an export folder::

    correction.json          what to rebuild: method, layer, gate, thresholds, file names
    weights.pt               the model's state dict (fine-tuned for RR-ClArC), weights_only-loadable
    cav.pt, cav.json         the projected (or penalised) CAV, see spray.correction.cav.CAV.save
    detector.pt, .json       the detector CAV of a detector gate (only when there is one)
    model.torchscript.pt     the corrected model compiled with torch.jit.script (gate included)

``load_corrected(folder, base_model)`` rebuilds the corrected model around a fresh instance of
the model's architecture; the TorchScript file needs no Python code of ours:
``torch.jit.load(folder / "model.torchscript.pt")``.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spray.correction.cav import CAV
from spray.correction.clarc import ClarcModel, CorrectionError, Gate

EXPORT_FORMAT_VERSION = 1
CONFIG_NAME = "correction.json"
WEIGHTS_NAME = "weights.pt"
CAV_NAME = "cav.pt"
DETECTOR_NAME = "detector.pt"
TORCHSCRIPT_NAME = "model.torchscript.pt"


@dataclass
class ExportPaths:
    """Where an export wrote its files."""

    folder: Path
    config: Path
    weights: Path
    cav: Path
    detector: Path | None
    torchscript: Path | None


def _base_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, ClarcModel) else model


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """Compile ``model`` with ``torch.jit.script`` (its deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.jit.script(model.eval())


def export_corrected(
    model: nn.Module,
    folder: str | Path,
    *,
    method: str,
    cav: CAV,
    extra: dict[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
    torchscript: bool = True,
) -> ExportPaths:
    """Write ``model`` (a :class:`ClarcModel`, or the fine-tuned model of RR-ClArC) to ``folder``.

    Args:
        model: the corrected model.
        folder: output folder (created).
        method: ``"p-clarc"``, ``"r-clarc"`` or ``"rr-clarc"`` (recorded in the config).
        cav: the CAV used (for RR-ClArC the penalised one, kept for reference).
        extra: more JSON-ready facts to record under ``"extra"`` (e.g. training history).
        example_input: when given, the TorchScript file is reloaded and its outputs on this
            input compared with ``model``'s; the largest difference is recorded.
        torchscript: write the TorchScript file too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = _base_model(model)
    weights = folder / WEIGHTS_NAME
    torch.save(base.state_dict(), weights)
    cav_path = cav.save(folder / CAV_NAME)
    detector_path = None
    config: dict[str, Any] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "method": method,
        "layer": cav.layer,
        "model_class": f"{type(base).__module__}.{type(base).__qualname__}",
        "weights_file": WEIGHTS_NAME,
        "cav_file": CAV_NAME,
        "detector_file": None,
        "gate": None,
        "torchscript_file": None,
        "torchscript_max_abs_diff": None,
        "extra": extra or {},
    }
    if isinstance(model, ClarcModel):
        config["gate"] = asdict(model.gate) | {"target_classes": list(model.gate.target_classes)}
        if model.gate.uses_detector:
            detector_path = model.detector_cav.save(folder / DETECTOR_NAME)
            config["detector_file"] = DETECTOR_NAME
    torchscript_path = None
    if torchscript:
        scripted = script_model(model)
        torchscript_path = folder / TORCHSCRIPT_NAME
        scripted.save(str(torchscript_path))
        config["torchscript_file"] = TORCHSCRIPT_NAME
        if example_input is not None:
            reloaded = torch.jit.load(str(torchscript_path), map_location="cpu")
            with torch.no_grad():
                diff = (reloaded(example_input) - model.eval()(example_input)).abs().max()
            config["torchscript_max_abs_diff"] = float(diff)
    config_path = folder / CONFIG_NAME
    config_path.write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    return ExportPaths(folder, config_path, weights, cav_path, detector_path, torchscript_path)


def load_corrected(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild a corrected model from an export folder (or its ``correction.json``).

    ``base_model`` is an instance of the model's architecture (its weights are not used
    and not changed: a copy receives the exported weights). Everything is loaded with
    ``weights_only=True``.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME if path.is_dir() else path
    folder = config_path.parent
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CorrectionError(f"{config_path} is missing: not a correction export folder.") from error
    if config.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CorrectionError(f"{config_path}: export format version {config.get('format_version')!r} is not supported.")
    model = copy.deepcopy(base_model)
    state = torch.load(folder / config["weights_file"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    if config["method"] == "rr-clarc" or config["gate"] is None:
        return model
    cav = CAV.load(folder / config["cav_file"])
    gate_fields = dict(config["gate"])
    gate_fields["target_classes"] = tuple(gate_fields["target_classes"])
    gate = Gate(**gate_fields)
    detector = CAV.load(folder / config["detector_file"]) if config.get("detector_file") else None
    return ClarcModel(model, cav, gate, detector).eval()
