"""Users' own models: a torchvision architecture plus a weights file, or a Python entry point.

Weights are loaded with ``torch.load(..., weights_only=True)``: a state dict cannot run
code. A fully pickled model can run arbitrary code when loaded, so it is refused unless the
job spec says ``trust_pickle = true``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from spray.data.entrypoint import load_entry_point


class ModelSourceError(ValueError):
    """A model that cannot be built or loaded; the message names the file and the fix."""


def load_state_dict(model: nn.Module, path: Path) -> nn.Module:
    """Load a state dict (safely) into ``model``; clear errors for pickles and mismatched keys."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"{path}: weights file not found; give its path relative to the job file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelSourceError(
            f"{path}: not a plain state dict (it needs unpickling of arbitrary objects, which can run code). "
            "Save it with torch.save(model.state_dict(), path), or, if you trust the file, use "
            "model.source = \"pickle\" with trust_pickle = true."
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise ModelSourceError(f"{path}: cannot read the weights ({error}); the file may be truncated.") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSourceError(f"{path}: holds a {type(state).__name__}, not a state dict.")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelSourceError(f"{path}: the weights do not fit the model: {str(error).splitlines()[0]} ...") from error
    return model


def torchvision_model(architecture: str, n_classes: int) -> nn.Module:
    """An untrained torchvision architecture with ``n_classes`` outputs (no download)."""
    import torchvision

    try:
        return torchvision.models.get_model(architecture, weights=None, num_classes=n_classes)
    except ValueError as error:
        names = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:40])
        raise ModelSourceError(f"unknown torchvision architecture {architecture!r}; e.g. {names}, ...") from error


def entry_point_model(spec: str, base_dir: Path, n_classes: int) -> nn.Module:
    """Call ``module:function`` (or ``file.py:function`` next to the job file) to build the model.

    The function is called with ``num_classes`` when it accepts it, else with no argument.
    """
    function = load_entry_point(spec, base_dir)
    try:
        model = function(num_classes=n_classes)
    except TypeError:
        model = function()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"entry point {spec!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def pickled_model(path: Path, trust_pickle: bool) -> nn.Module:
    """A fully pickled model; loading it runs code from the file, hence the explicit opt-in."""
    if not trust_pickle:
        raise ModelSourceError(
            f"{path}: loading a pickled model can run arbitrary code; refused. Export a state dict instead, "
            "or set trust_pickle = true in [model] if you trust this file."
        )
    if not Path(path).is_file():
        raise ModelSourceError(f"{path}: model file not found; give its path relative to the job file.")
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{path}: holds a {type(model).__name__}, not a torch.nn.Module.")
    return model
