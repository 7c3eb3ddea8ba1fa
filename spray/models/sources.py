"""Users' own models: a torchvision architecture plus a weights file, or a Python entry point.

Weights are loaded with ``torch.load(..., weights_only=True)``: a state dict cannot run
code. A fully pickled model can run arbitrary code when loaded, so it is refused unless the
job spec says ``trust_pickle = true``.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spray.data.entrypoint import call_user_code, resolve_entry_point
from spray.models.fingerprint import record_entry_point

#: Keys of each kind listed by a weight-mismatch message (the rest are counted).
SHOWN_KEYS = 5


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
        details = state_dict_mismatch(model.state_dict(), state) or " ".join(str(error).split())
        raise ModelSourceError(
            f"{path}: the weights do not fit the model: {details}. Give the state dict of this very architecture "
            "(torch.save(model.state_dict(), path)), or build the model the weights were saved from."
        ) from error
    return model


def state_dict_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """How a state dict ``given`` differs from a model's ``expected`` one: its missing, unexpected
    and mis-shaped keys, each kind counted with the first ``SHOWN_KEYS`` named ("" when none)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{key} ({tuple(given[key].shape)} in the file, {tuple(expected[key].shape)} in the model)"
        for key in sorted(set(expected) & set(given))
        if hasattr(given[key], "shape") and hasattr(expected[key], "shape") and tuple(given[key].shape) != tuple(expected[key].shape)
    ]
    parts = [
        f"{len(keys)} {kind}: {', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''}"
        for kind, keys in (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("key(s) of another shape", misshaped))
        if keys
    ]
    if unexpected and all(key.startswith("module.") for key in unexpected):
        parts.append("the file's keys start with 'module.' (saved from a DataParallel wrapper): save model.module.state_dict() instead")
    return "; ".join(parts)


def torchvision_model(architecture: str, n_classes: int) -> nn.Module:
    """An untrained torchvision architecture with ``n_classes`` outputs (no download)."""
    import torchvision

    try:
        return torchvision.models.get_model(architecture, weights=None, num_classes=n_classes)
    except ValueError as error:
        names = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:40])
        raise ModelSourceError(f"unknown torchvision architecture {architecture!r}; e.g. {names}, ...") from error


def entry_point_model(spec: str, base_dir: Path, n_classes: int) -> nn.Module:
    """Call ``module:function`` (or ``file.py:function`` inside the job's folder) to build the model.

    The function is called with ``num_classes`` when its signature accepts it, else with no
    argument; whatever it raises (``SystemExit`` included) is an ``EntryPointError`` naming
    it. The model remembers the entry point's code, which its fingerprint covers
    (``spray.models.fingerprint``).
    """
    entry = resolve_entry_point(spec, base_dir)
    kwargs = {"num_classes": n_classes} if _accepts_num_classes(entry.function) else {}
    model = call_user_code(spec, "while building the model", entry.function, **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"entry point {spec!r} returned {type(model).__name__}, not a torch.nn.Module.")
    record_entry_point(model, entry.code)
    return model


def _accepts_num_classes(function: Callable[..., Any]) -> bool:
    """Whether ``function`` takes a ``num_classes`` keyword (True when its signature cannot be read)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "num_classes" and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in parameters)


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
