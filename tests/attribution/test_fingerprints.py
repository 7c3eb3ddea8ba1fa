"""Stage fingerprints that cannot lie: the attribution stage is reused only for the very same
samples (every pixel), model (weights and code) and settings (and spray's version)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import spray
import spray.attribution.engine as engine
from spray.attribution.engine import attribution_fingerprint
from spray.attribution.settings import RESULT_INDEPENDENT, AttributionSettings
from spray.audit import run_audit
from spray.data.arrays import ArrayFileSource
from spray.data.entrypoint import DatasetSource
from spray.data.folder import FolderSource, ImagePreprocessing
from spray.data.h5 import open_h5_source
from spray.jobs import load_job
from spray.models.fingerprint import model_fingerprint
from spray.models.sources import entry_point_model

N = 20  # more than the 16 samples an entry-point dataset's fingerprint used to cover

MODEL_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        x = x
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def build(num_classes):
    torch.manual_seed(0)
    return Net(num_classes)
"""

DATA_PY = """
from pathlib import Path

import numpy as np
import torch


def load():
    pixels = np.load(Path(__file__).parent / "pixels.npy")
    return [(torch.from_numpy(image).float() / 255, i % 2) for i, image in enumerate(pixels)]
"""


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(N, 3, 8, 8), dtype=np.uint8)


def _change_last_pixel(pixels: np.ndarray) -> np.ndarray:
    changed = pixels.copy()
    changed[-1, -1, -1, -1] ^= 1
    return changed


def test_the_attribution_stage_is_recomputed_for_a_pixel_a_line_of_forward_or_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.py").write_text(MODEL_PY)
    (tmp_path / "data.py").write_text(DATA_PY)
    np.save(tmp_path / "pixels.npy", _pixels())
    job = tmp_path / "job.toml"
    job.write_text(
        '[job]\nname = "fp"\noutput = "out"\n'
        '[data]\nsource = "entrypoint"\nentrypoint = "data.py:load"\n'
        '[model]\nsource = "entrypoint"\nentrypoint = "model.py:build"\n'
        '[attribution]\nlayers = ["conv"]\nbatch_size = 8\n'
        '[analysis]\nembedding = "spectral"\npooled_size = 4\n'
    )
    computed: list[int] = []
    write_here = engine._write_here
    monkeypatch.setattr(engine, "_write_here", lambda *args: (computed.append(1), write_here(*args))[1])

    def audit() -> int:
        before = len(computed)
        run_audit(load_job(job), progress=False)
        return len(computed) - before

    assert audit() == 1
    assert audit() == 0  # nothing changed: reused
    np.save(tmp_path / "pixels.npy", _change_last_pixel(_pixels()))
    assert audit() == 1
    (tmp_path / "model.py").write_text(MODEL_PY.replace("x = x", "x = 1.0 - x"))
    assert audit() == 1
    job.write_text(job.read_text().replace("batch_size = 8\n", 'batch_size = 8\ntarget = "prediction"\n'))
    assert audit() == 1
    assert audit() == 0


# ---------------------------------------------------------------------------------------------
# Data: every format's fingerprint covers every sample


def _write_h5(path: Path, pixels: np.ndarray) -> None:
    with h5py.File(path, "w") as handle:
        handle["data"] = pixels
        handle["label"] = np.arange(len(pixels)) % 2


def _write_folder(root: Path, pixels: np.ndarray) -> None:
    for index, image in enumerate(pixels):
        folder = root / "ab"[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{index:02d}.png")


def _entry_point_source(folder: Path, pixels: np.ndarray) -> DatasetSource:
    np.save(folder / "pixels.npy", pixels)
    namespace: dict = {"__file__": str(folder / "data.py")}
    exec(DATA_PY, namespace)
    return DatasetSource(namespace["load"](), [], "data.py:load")


FORMATS = {
    "h5": lambda folder, pixels: (_write_h5(folder / "d.h5", pixels), open_h5_source(folder / "d.h5", None))[1],
    "npz": lambda folder, pixels: (np.savez(folder / "d.npz", data=pixels, label=np.arange(N) % 2), ArrayFileSource(folder / "d.npz"))[1],
    "folder": lambda folder, pixels: (_write_folder(folder / "images", pixels), FolderSource(folder / "images"))[1],
    "entrypoint": _entry_point_source,
}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_format_fingerprints_every_sample(tmp_path: Path, kind: str) -> None:
    make = FORMATS[kind]
    first = make(tmp_path, _pixels()).fingerprint()
    assert make(tmp_path, _pixels()).fingerprint() == first  # the same samples: the same fingerprint
    assert make(tmp_path, _change_last_pixel(_pixels())).fingerprint() != first


def test_an_h5_file_whose_pixels_live_in_another_file_is_fingerprinted_by_its_pixels(tmp_path: Path) -> None:
    """External storage: the .h5 file's bytes stay the same when the pixels change, so a hash
    of the file would reuse attributions of other images."""
    raw = tmp_path / "pixels.raw"
    raw.write_bytes(_pixels().tobytes())
    with h5py.File(tmp_path / "d.h5", "w") as handle:
        handle.create_dataset("data", shape=(N, 3, 8, 8), dtype=np.uint8, external=[(str(raw), 0, raw.stat().st_size)])
        handle["label"] = np.arange(N) % 2
    h5_bytes = (tmp_path / "d.h5").read_bytes()
    before = open_h5_source(tmp_path / "d.h5", None).fingerprint()
    raw.write_bytes(_change_last_pixel(_pixels()).tobytes())
    assert (tmp_path / "d.h5").read_bytes() == h5_bytes
    assert open_h5_source(tmp_path / "d.h5", None).fingerprint() != before


def test_a_folders_fingerprint_covers_its_resize_and_crop(tmp_path: Path) -> None:
    _write_folder(tmp_path / "images", _pixels())
    plain = FolderSource(tmp_path / "images").fingerprint()
    assert FolderSource(tmp_path / "images", ImagePreprocessing(resize=(6,))).fingerprint() != plain


# ---------------------------------------------------------------------------------------------
# Model: weights, the code of its classes, the user's own modules, library versions


def test_the_model_fingerprint_covers_forward_of_an_entry_point_file(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(MODEL_PY)
    first = model_fingerprint(entry_point_model("model.py:build", tmp_path, 2))
    assert model_fingerprint(entry_point_model("model.py:build", tmp_path, 2)) == first
    (tmp_path / "model.py").write_text(MODEL_PY.replace("x = x", "x = 1.0 - x"))
    assert model_fingerprint(entry_point_model("model.py:build", tmp_path, 2)) != first


def test_the_model_fingerprint_covers_the_entry_points_file_and_the_users_modules_it_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A builder can change the model without touching a class: a hook, a helper of its package."""
    package = tmp_path / "fp_user_nets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("def hook(module, inputs, output):\n    return output * 2\n")
    (package / "build.py").write_text(
        "from torch import nn\n"
        "from .ops import hook\n"
        "def build(num_classes):\n"
        "    model = nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))\n"
        "    model.register_forward_hook(hook)\n"
        "    return model\n"
    )
    for name in ("fp_user_nets", "fp_user_nets.ops", "fp_user_nets.build"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    model = entry_point_model("fp_user_nets.build:build", tmp_path, 2)
    first = model_fingerprint(model)
    (package / "ops.py").write_text("def hook(module, inputs, output):\n    return output * 3\n")
    assert model_fingerprint(model) != first  # the helper module of the user's package
    second = model_fingerprint(model)
    (package / "build.py").write_text((package / "build.py").read_text().replace("model.register_forward_hook(hook)", "pass"))
    assert model_fingerprint(model) != second  # the entry point's own file
    for name in [n for n in sys.modules if n.startswith("fp_user_nets")]:
        monkeypatch.delitem(sys.modules, name)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_the_model_fingerprint_covers_plain_attributes_and_the_torch_version(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _Scaled()
    first = model_fingerprint(model)
    model.scale = 2.0
    assert model_fingerprint(model) != first
    model.scale = 1.0
    assert model_fingerprint(model) == first
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert model_fingerprint(model) != first


def test_the_model_fingerprint_survives_a_class_without_source() -> None:
    """Classes made at run time have no source; they count by name (and their weights) instead."""
    dynamic = type("Dynamic", (nn.Linear,), {})
    assert len(model_fingerprint(nn.Sequential(dynamic(2, 2)))) == 16


# ---------------------------------------------------------------------------------------------
# Settings and versions

#: A value other than the default for every setting whose change must change the result.
OTHER_VALUES = {
    "composite": "epsilon_plus",
    "canonizers": ("vgg",),
    "layers": ("linear",),
    "target": "prediction",
    "batch_size": 7,
    "engine": "zennit",
    "device": "cpu",
    "precision": "amp",
    "heatmap_size": (4,),
    "mean": (0.5,),
    "std": (0.25,),
}


def test_every_attribution_setting_but_the_declared_exceptions_is_in_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {item.name for item in dataclasses.fields(AttributionSettings)}
    assert set(OTHER_VALUES) | set(RESULT_INDEPENDENT) == names  # a new setting must be sorted into one of them
    model, base = _Scaled(), AttributionSettings()
    first = attribution_fingerprint("data", model, base, {})
    for key, value in OTHER_VALUES.items():
        changed = {key: value, **({"std": (0.25,)} if key == "mean" else {}), **({"mean": (0.5,)} if key == "std" else {})}
        assert attribution_fingerprint("data", model, dataclasses.replace(base, **changed), {}) != first, key
    for key in RESULT_INDEPENDENT:
        assert attribution_fingerprint("data", model, dataclasses.replace(base, **{key: 0}), {}) == first
    assert attribution_fingerprint("other data", model, base, {}) != first
    monkeypatch.setattr(spray, "__version__", "9.9.9")
    assert attribution_fingerprint("data", model, base, {}) != first
    monkeypatch.undo()
    monkeypatch.setattr(engine, "FORMAT_VERSION", 99)
    assert attribution_fingerprint("data", model, base, {}) != first
