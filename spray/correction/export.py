"""Save a corrected model: weights plus a JSON description, a ``torch.export`` program, ONNX and TorchScript.

Layout of an export folder::

    correction.json          what to rebuild: method, layer, gate, thresholds, file names, checks
    weights.pt               the model's state dict (fine-tuned for RR-ClArC), weights_only-loadable
    cav.pt, cav.json         the projected (or penalised) CAV, see spray.correction.cav.CAV.save
    detector.pt, .json       the detector CAV of a detector gate (only when there is one)
    model.pt2                the corrected model as a torch.export program, any batch size (gate included)
    model.onnx               the same program as ONNX (only with ``pip install spray[onnx]``)
    model.onnx.data          the ONNX file's weights, only for models too large for one file
    model.torchscript.pt     the corrected model compiled with torch.jit.script (gate included)

``load_corrected(folder, base_model)`` rebuilds the corrected model around a fresh instance of
the model's architecture. The other model files need no Python code of ours.
``model.pt2`` is the recommended one: ``torch.export.load(folder / "model.pt2").module()``
is a module computing the corrected logits. ``model.onnx`` runs in ONNX Runtime and other
ONNX runtimes. ``model.torchscript.pt`` (``torch.jit.load``) is kept for runtimes that predate
``torch.export``; torch 2.14 deprecates ``torch.jit`` and warns when such a file is loaded.

The program and the ONNX file need an example input (``export_corrected(example_input=...)``)
and are optional: when one cannot be written (no example input, a model ``torch.export``
cannot trace, the ONNX packages not installed) ``correction.json`` records why, and the
other files are written all the same. Each written model file is reloaded and run on the
example input (the program and ONNX also on a second batch size), and the largest absolute
difference to the in-memory corrected model is recorded.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spray.correction.cav import CAV
from spray.correction.clarc import ClarcModel, CorrectionError, Gate, project_activation

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
CONFIG_NAME = "correction.json"
WEIGHTS_NAME = "weights.pt"
CAV_NAME = "cav.pt"
DETECTOR_NAME = "detector.pt"
TORCHSCRIPT_NAME = "model.torchscript.pt"
TORCH_EXPORT_NAME = "model.pt2"
ONNX_NAME = "model.onnx"
#: Packages the ONNX export needs (the ``onnx`` extra); onnxruntime only verifies the file.
ONNX_PACKAGES: tuple[str, ...] = ("onnx", "onnxscript")
ONNX_INSTALL_HINT = "pip install 'spray[onnx]'"
#: Above this many bytes of weights the ONNX weights go to a separate ``.data`` file
#: (a single ONNX protobuf cannot exceed 2 GiB).
ONNX_SINGLE_FILE_BYTES = 1 << 30
#: Longest error message recorded in correction.json (torch.export's messages include graph dumps).
MAX_ERROR_CHARS = 800


@dataclass
class ExportPaths:
    """Where an export wrote its files (None: that file was not written; ``correction.json`` says why)."""

    folder: Path
    config: Path
    weights: Path
    cav: Path
    detector: Path | None
    torchscript: Path | None
    torch_export: Path | None = None
    onnx: Path | None = None


def _base_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, ClarcModel) else model


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """Compile ``model`` with ``torch.jit.script`` (its deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.jit.script(model.eval())


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` onto the CPU, its deprecation warning silenced (the file is our own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


class DenseGateClarc(nn.Module):
    """R-ClArC's corrected logits without data-dependent control flow, for ``torch.export`` and ONNX.

    :meth:`ClarcModel.forward_gated` re-runs the head only on the samples whose gate fires,
    and returns early when none does; the number of such samples depends on the data, which
    ``torch.export`` cannot trace. This view projects *every* sample with its gate weight
    (weight 0 leaves an activation unchanged), runs the head once more on the whole batch,
    and keeps the uncorrected logits where the gate does not fire. The logits are the
    ClarcModel's: unchanged samples bit for bit, corrected ones up to the rounding of a
    different batch size. It shares the ClarcModel's modules and buffers.
    """

    def __init__(self, clarc: ClarcModel) -> None:
        super().__init__()
        self.clarc = clarc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clarc = self.clarc
        activation = clarc.prefix(x)
        logits = clarc.head(activation)
        weight = clarc.gate_weights(activation, logits)
        projected = project_activation(activation, clarc.direction, clarc.reference, weight, clarc.per_position)
        corrected = clarc.head(projected).to(logits.dtype)
        return torch.where((weight > 0)[:, None], corrected, logits)


def exportable_module(model: nn.Module) -> nn.Module:
    """The module ``torch.export`` traces for ``model``: a gated ClarcModel's dense view, else the model itself."""
    if isinstance(model, ClarcModel) and model.gate_kind != "always":
        return DenseGateClarc(model).eval()
    return model.eval()


def _error_text(error: BaseException) -> str:
    """``"<type>: <message>"``, cut to :data:`MAX_ERROR_CHARS` (the JSON stays readable)."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _check_inputs(example_input: torch.Tensor) -> list[torch.Tensor]:
    """The example input and a second batch of another size (the example's first half, or it twice)."""
    batch = int(example_input.shape[0])
    other = example_input[: batch // 2] if batch > 1 else torch.cat([example_input, example_input])
    return [example_input, other]


def _max_abs_diff(run: Any, reference: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest absolute difference between ``run(x)`` and ``reference(x)`` over ``inputs``."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            got = torch.as_tensor(run(x))
            expected = reference(x).detach().cpu()
            worst = max(worst, float((got.detach().cpu().to(expected.dtype) - expected).abs().max()))
    return worst


def export_program(model: nn.Module, example_input: torch.Tensor) -> tuple[torch.export.ExportedProgram, bool]:
    """``torch.export`` the corrected ``model``, with a dynamic batch dimension where the model allows.

    Returns the program and whether its batch size is dynamic. Traces with the batch
    dimension as ``Dim("batch", min=1)`` first (an example of batch 1 is doubled, as
    ``torch.export`` specialises sizes 0 and 1); when the model pins its batch size, it
    exports for the example's batch size only. Raises what ``torch.export`` raises when
    neither works.
    """
    module = exportable_module(model)
    sample = example_input if example_input.shape[0] > 1 else torch.cat([example_input, example_input])
    try:
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(module, (sample,), dynamic_shapes=({0: batch},)), True
    except Exception as dynamic_error:  # a pinned batch size fails here; try a static one below
        log.info("torch.export with a dynamic batch failed (%s); trying the example's batch size", _error_text(dynamic_error))
        try:
            return torch.export.export(module, (example_input,)), False
        except Exception:
            raise dynamic_error from None


def _write_torch_export(
    program: torch.export.ExportedProgram, dynamic: bool, model: nn.Module, folder: Path, example_input: torch.Tensor
) -> tuple[Path, dict[str, Any]]:
    """Save ``program`` as ``model.pt2``, reload it and compare it with ``model``; returns the path and its record."""
    path = folder / TORCH_EXPORT_NAME
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()
    inputs = _check_inputs(example_input) if dynamic else [example_input]
    record = {
        "file": TORCH_EXPORT_NAME,
        "error": None,
        "skipped": None,
        "dynamic_batch": dynamic,
        "checked_batch_sizes": [int(x.shape[0]) for x in inputs],
        "max_abs_diff": _max_abs_diff(reloaded, model, inputs),
    }
    return path, record


def _missing_onnx_packages() -> list[str]:
    """The packages of :data:`ONNX_PACKAGES` that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _onnx_runner(path: Path) -> Any | None:
    """A function running the ONNX file in ONNX Runtime on the CPU, or None when onnxruntime is missing."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def _write_onnx(
    model: nn.Module, program: torch.export.ExportedProgram, dynamic: bool, folder: Path, example_input: torch.Tensor
) -> tuple[Path, dict[str, Any]]:
    """Convert ``program`` to ``model.onnx`` (dynamo exporter) and check it in ONNX Runtime when installed."""
    path = folder / ONNX_NAME
    weight_bytes = sum(t.numel() * t.element_size() for t in _base_model(model).state_dict().values())
    external = weight_bytes > ONNX_SINGLE_FILE_BYTES
    torch.onnx.export(program, (example_input,), path, dynamo=True, external_data=external, verbose=False)
    record: dict[str, Any] = {
        "file": ONNX_NAME,
        "data_file": f"{ONNX_NAME}.data" if external else None,
        "error": None,
        "skipped": None,
        "dynamic_batch": dynamic,
        "verified": False,
        "not_verified": None,
        "checked_batch_sizes": [],
        "max_abs_diff": None,
    }
    runner = _onnx_runner(path)
    if runner is None:
        record["not_verified"] = "onnxruntime is not installed"
        return path, record
    inputs = _check_inputs(example_input) if dynamic else [example_input]
    record["verified"] = True
    record["checked_batch_sizes"] = [int(x.shape[0]) for x in inputs]
    record["max_abs_diff"] = _max_abs_diff(runner, model, inputs)
    return path, record


def _remove_stale(folder: Path, written: list[Path | None]) -> None:
    """Delete model files of an earlier export to ``folder`` that this export did not write.

    An old ``model.pt2`` next to a ``correction.json`` recording its export as failed would be
    taken for the current model.
    """
    names = (TORCH_EXPORT_NAME, ONNX_NAME, f"{ONNX_NAME}.data", TORCHSCRIPT_NAME)
    kept = {path.name for path in written if path is not None}
    for name in names:
        if name not in kept:
            (folder / name).unlink(missing_ok=True)


def _skipped(reason: str) -> dict[str, Any]:
    """The record of an optional format that was not attempted."""
    return {"file": None, "error": None, "skipped": reason}


def _failed(name: str, error: BaseException) -> dict[str, Any]:
    """The record of an optional format whose export failed (logged, never raised)."""
    text = _error_text(error)
    log.warning("the corrected model could not be exported as %s: %s", name, text)
    return {"file": None, "error": text, "skipped": None}


def export_corrected(
    model: nn.Module,
    folder: str | Path,
    *,
    method: str,
    cav: CAV,
    extra: dict[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
    torchscript: bool = True,
    torch_export: bool = True,
    onnx: bool = True,
) -> ExportPaths:
    """Write ``model`` (a :class:`ClarcModel`, or the fine-tuned model of RR-ClArC) to ``folder``.

    The weights, the CAV(s) and ``correction.json`` are always written. The model files are
    optional, and a failure to write one is recorded in ``correction.json`` (``"torch_export"``,
    ``"onnx"``: ``file``, ``error``, ``skipped``, ``max_abs_diff``...) instead of raised.

    Args:
        model: the corrected model.
        folder: output folder (created).
        method: ``"p-clarc"``, ``"r-clarc"`` or ``"rr-clarc"`` (recorded in the config).
        cav: the CAV used (for RR-ClArC the penalised one, kept for reference).
        extra: more JSON-ready facts to record under ``"extra"`` (e.g. training history).
        example_input: a batch of inputs. ``torch.export`` and ONNX trace the model on it
            (neither is written without it); every model file written is reloaded and its
            outputs compared with ``model``'s, and the largest difference is recorded.
        torchscript: write the TorchScript file (for runtimes without ``torch.export``).
        torch_export: write the ``torch.export`` program ``model.pt2``.
        onnx: write ``model.onnx`` when the ONNX packages are installed (recorded as skipped
            with the install hint when they are not).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = _base_model(model)
    model.eval()
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
        "torch_export": None,
        "onnx": None,
        "torchscript_file": None,
        "torchscript_max_abs_diff": None,
        "extra": extra or {},
    }
    if isinstance(model, ClarcModel):
        config["gate"] = asdict(model.gate) | {"target_classes": list(model.gate.target_classes)}
        if model.gate.uses_detector:
            detector_path = model.detector_cav.save(folder / DETECTOR_NAME)
            config["detector_file"] = DETECTOR_NAME

    no_example = "no example input to trace the model with"
    program: torch.export.ExportedProgram | None = None
    program_error: BaseException | None = None
    dynamic = False
    missing = _missing_onnx_packages() if onnx else []
    if (torch_export or (onnx and not missing)) and example_input is not None:
        try:
            program, dynamic = export_program(model, example_input)
        except Exception as error:  # any failure of an optional format is recorded, not raised
            program_error = error
    torch_export_path = None
    if not torch_export:
        config["torch_export"] = _skipped("disabled ([correct] torch_export = false)")
    elif example_input is None:
        config["torch_export"] = _skipped(no_example)
    elif program is None:
        config["torch_export"] = _failed(TORCH_EXPORT_NAME, program_error or CorrectionError("torch.export returned no program"))
    else:
        try:
            torch_export_path, config["torch_export"] = _write_torch_export(program, dynamic, model, folder, example_input)
        except Exception as error:  # as above
            config["torch_export"] = _failed(TORCH_EXPORT_NAME, error)

    onnx_path = None
    if not onnx:
        config["onnx"] = _skipped("disabled ([correct] onnx = false)")
    elif missing:
        verb = "is" if len(missing) == 1 else "are"
        config["onnx"] = _skipped(f"{' and '.join(missing)} {verb} not installed: {ONNX_INSTALL_HINT}")
    elif example_input is None:
        config["onnx"] = _skipped(no_example)
    elif program is None:
        reason = _error_text(program_error) if program_error is not None else "no program"
        config["onnx"] = {"file": None, "error": f"torch.export, which the ONNX export needs, failed: {reason}", "skipped": None}
    else:
        try:
            onnx_path, config["onnx"] = _write_onnx(model, program, dynamic, folder, example_input)
        except Exception as error:  # as above: recorded, the correction goes on
            onnx_path = None
            config["onnx"] = _failed(ONNX_NAME, error)

    torchscript_path = None
    if torchscript:
        scripted = script_model(model)
        torchscript_path = folder / TORCHSCRIPT_NAME
        scripted.save(str(torchscript_path))
        config["torchscript_file"] = TORCHSCRIPT_NAME
        if example_input is not None:
            config["torchscript_max_abs_diff"] = _max_abs_diff(_load_torchscript(torchscript_path), model, [example_input])
    onnx_data = folder / config["onnx"]["data_file"] if (config["onnx"] or {}).get("data_file") else None
    _remove_stale(folder, [torch_export_path, onnx_path, onnx_data, torchscript_path])
    config_path = folder / CONFIG_NAME
    config_path.write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    return ExportPaths(folder, config_path, weights, cav_path, detector_path, torchscript_path, torch_export_path, onnx_path)


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
