"""Bad input is refused with the file or key, the value and the fix: decompression bombs and
huge declared arrays, images outside [0, 1], settings a source would ignore, entry points
outside the job's folder, user code that exits, mismatched weights and normalisation."""

from __future__ import annotations

import struct
import zipfile
import zlib
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from spray.attribution.engine import attribute_dataset
from spray.attribution.lrp import AttributionConfigError
from spray.attribution.settings import AttributionSettings
from spray.config import ConfigError
from spray.data.arrays import ArrayFileSource, ArraySource
from spray.data.base import DataSourceError, ImageTooLargeError
from spray.data.config import DataConfig
from spray.data.entrypoint import EntryPointError, load_entry_point
from spray.data.folder import FolderSource, open_image
from spray.data.h5 import open_h5_source
from spray.data.open import open_data
from spray.jobs import JobSpecError, parse_job
from spray.models.sources import ModelSourceError, entry_point_model, load_state_dict


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares a ``width``×``height`` RGB image (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def _class_folder(root: Path, n: int = 3) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(root / label / f"{index}.png")
    return root


# ---------------------------------------------------------------------------------------------
# [data] max_image_pixels


def test_a_png_declaring_12000_by_12000_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "images")
    bomb = root / "b" / "bomb.png"
    bomb.write_bytes(_png_declaring(12000, 12000))
    assert bomb.stat().st_size < 400
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: .*max_image_pixels = 50,000,000 allows \(144,000,000 pixels\).*raise max_image_pixels"):
        FolderSource(root)  # refused although strict = false: it is not unreadable, and the fix is a setting
    # Pillow's process-wide limit is never lowered: other Pillow users in the process keep working
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 50_000_000
    # With the limit raised the file is scanned like any other (and is not decoded here).
    assert len(FolderSource(root, max_pixels=200_000_000)) == 7
    assert Image.MAX_IMAGE_PIXELS == 200_000_000


def test_pillows_warning_zone_is_an_error_too(tmp_path: Path) -> None:
    """Pillow only warns between its limit and twice it; spray refuses there as well."""
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ImageTooLargeError, match=r"big\.png: .*max_image_pixels = 6,000"):
        open_image(path, 6000)
    with open_image(path, 10_000) as image:
        assert image.size == (100, 100)


def test_an_h5_declaring_30000_by_30000_images_is_refused_before_a_batch_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", shape=(2, 1, 30000, 30000), dtype=np.float32, chunks=(1, 1, 64, 64))
        handle["label"] = np.array([0, 1])
    assert path.stat().st_size < 100_000  # nothing written, everything declared
    with pytest.raises(ImageTooLargeError, match=r"huge\.h5: images of shape \(2, 1, 30000, 30000\) hold 900,000,000 pixels.*max_image_pixels = 50,000,000"):
        open_h5_source(path, None)
    assert open_h5_source(path, None, max_pixels=10**9).max_pixels == 10**9


def test_an_npz_declaring_huge_images_is_refused_from_its_header(tmp_path: Path) -> None:
    header = BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (4, 20000, 20000, 3)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.npy", header.getvalue())  # the header alone: loading it would fail, or take 19 GB
        buffer = BytesIO()
        np.save(buffer, np.zeros(4, dtype=np.int64))
        archive.writestr("label.npy", buffer.getvalue())
    with pytest.raises(ImageTooLargeError, match=r"huge\.npz: images of shape \(4, 20000, 20000, 3\) hold 400,000,000 pixels.*max_image_pixels"):
        ArrayFileSource(path)


def test_the_limit_is_a_declared_setting_that_reaches_every_source(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", data=np.zeros((2, 3, 8, 8), np.float32), label=np.array([0, 1]))
    config = DataConfig(source="npz", path="d.npz", max_image_pixels=63)
    with pytest.raises(ImageTooLargeError, match=r"d\.npz: .*64 pixels each.*max_image_pixels = 63"):
        open_data(config, tmp_path, 0, tmp_path)
    with pytest.raises(ConfigError, match="max_image_pixels must be at least 1"):
        DataConfig(max_image_pixels=0)


@pytest.mark.parametrize("keep", [200, -40])
def test_a_truncated_npz_names_the_file(tmp_path: Path, keep: int) -> None:
    """Cut in the zip directory (a BadZipFile) or inside an array: a DataSourceError, not a traceback."""
    np.savez(tmp_path / "d.npz", data=np.zeros((40, 3, 8, 8), np.float32), label=np.zeros(40, np.int64))
    (tmp_path / "d.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:keep])
    with pytest.raises(DataSourceError, match=r"d\.npz: cannot read"):
        ArrayFileSource(tmp_path / "d.npz")


# ---------------------------------------------------------------------------------------------
# Float images outside [0, 1]


def test_float_images_in_0_255_are_refused_with_the_file_and_the_fix(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", data=images, label=np.array([0, 1, 0, 1]))
    with pytest.raises(DataSourceError, match=r"d\.npz: float32 images hold values from .* to 25\d.*must lie in \[0, 1\].*divide them by 255"):
        ArrayFileSource(tmp_path / "d.npz")
    with h5py.File(tmp_path / "d.h5", "w") as handle:
        handle["data"] = images.astype(np.float64)
        handle["label"] = np.array([0, 1, 0, 1])
    with pytest.raises(DataSourceError, match=r"d\.h5: float64 images .*divide them by 255"):
        open_data(DataConfig(source="h5", path="d.h5"), tmp_path, 0, tmp_path)


def test_normalised_images_are_refused_and_a_small_overshoot_is_clipped(tmp_path: Path) -> None:
    images = np.random.default_rng(0).normal(0, 1, size=(4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "n.npz", data=images, label=np.array([0, 1, 0, 1]))
    with pytest.raises(DataSourceError, match=r"n\.npz: .*look normalised already.*\[data\] mean and std"):
        ArrayFileSource(tmp_path / "n.npz")
    slightly = np.clip(images, 0, 1) * 1.005 - 0.002
    np.savez(tmp_path / "ok.npz", data=slightly, label=np.array([0, 1, 0, 1]))
    read = ArrayFileSource(tmp_path / "ok.npz").read(np.arange(4))
    assert read.min() == 0.0 and read.max() == 1.0


def test_an_entry_point_dataset_in_0_255_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.py").write_text(
        "import torch\n"
        "def load():\n"
        "    return [(torch.full((3, 4, 4), 200.0), i % 2) for i in range(4)]\n"
    )
    with pytest.raises(DataSourceError, match=r"data\.py:load: float32 images .*divide them by 255"):
        open_data(DataConfig(source="entrypoint", entrypoint="data.py:load"), tmp_path, 0, tmp_path)


# ---------------------------------------------------------------------------------------------
# Settings a source would ignore; normalisation of the wrong length


@pytest.mark.parametrize("source", ["h5", "npz", "entrypoint", "demo"])
def test_resize_and_crop_are_refused_for_sources_that_do_not_apply_them(source: str) -> None:
    extra = 'entrypoint = "d.py:f"\n' if source == "entrypoint" else ('path = "x"\n' if source != "demo" else "")
    with pytest.raises(JobSpecError, match=rf"x\.toml:5: data\.resize applies to source = 'folder' only, but source = '{source}'"):
        parse_job(f'[job]\nname = "a"\n[data]\nsource = "{source}"\nresize = [32]\n{extra}', source="x.toml")
    with pytest.raises(ConfigError, match="^crop applies to source = 'folder' only") as raised:
        DataConfig(source=source, crop=(8,), path="x", entrypoint="d.py:f")
    assert raised.value.key == "crop"
    assert DataConfig(source="folder", resize=(32,), crop=(28,)).resize == (32,)


def test_three_means_on_one_channel_images_name_the_key_and_the_fix(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(0, 1, size=(4, 1, 8, 8)).astype(np.float32)
    source = ArraySource(images, np.array([0, 1, 0, 1]), list("abcd"), ["x", "y"])
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    settings = AttributionSettings(layers=(), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), batch_size=4)
    with pytest.raises(AttributionConfigError, match=r"\[data\] mean = \[0.5, 0.5, 0.5\] and std = \[0.2, 0.2, 0.2\] hold 3 values, but the images have 1 channel\(s\).*give 1 value\(s\)"):
        attribute_dataset(source, model, settings, tmp_path / "a.h5", "d", progress=False)
    one = AttributionSettings(layers=(), mean=(0.5,), std=(0.2,), batch_size=4)  # one value for every channel is fine
    assert attribute_dataset(source, model, one, tmp_path / "a.h5", "d", progress=False).is_file()


# ---------------------------------------------------------------------------------------------
# Entry points: inside the job's folder, and user code cannot end the process


@pytest.mark.parametrize("spec", ["../outside.py:f", "../../outside.py:f", "ABSOLUTE:f"])
def test_an_entry_point_file_outside_the_jobs_folder_is_refused(tmp_path: Path, spec: str) -> None:
    job_folder = tmp_path / "a" / "job"
    job_folder.mkdir(parents=True)
    for folder in (tmp_path, tmp_path / "a"):
        (folder / "outside.py").write_text("def f():\n    return 1\n")
    spec = spec.replace("ABSOLUTE", str(tmp_path / "outside.py"))
    with pytest.raises(EntryPointError, match=r"outside\.py.*outside the job's folder .*job; put the file in that folder"):
        load_entry_point(spec, job_folder)
    (job_folder / "inside.py").write_text("def f():\n    return 2\n")
    assert load_entry_point(f"{job_folder / 'inside.py'}:f", job_folder)() == 2  # an absolute path inside is fine


@pytest.mark.parametrize("spec", ["../x:f", "/tmp/x:f", "my-module:f"])
def test_a_module_name_that_is_not_one_says_what_to_write(tmp_path: Path, spec: str) -> None:
    """``../x:f`` used to be a TypeError about the 'package' argument of a relative import."""
    with pytest.raises(EntryPointError, match=r"is neither a \.py file nor a module name; write 'file\.py:function'"):
        load_entry_point(spec, tmp_path)


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    with pytest.raises(EntryPointError, match=r"entry point 'no_such_module_xyz:f': cannot import 'no_such_module_xyz'"):
        load_entry_point("no_such_module_xyz:f", tmp_path)


EXITING = {
    "builder": "import sys\ndef build(num_classes):\n    sys.exit(0)\n",
    "module": "import sys\nsys.exit(0)\ndef build(num_classes):\n    pass\n",
    "base exception": "class Stop(BaseException):\n    pass\ndef build(num_classes):\n    raise Stop('stop')\n",
}


@pytest.mark.parametrize("where", sorted(EXITING))
def test_a_model_builder_cannot_exit_the_process(tmp_path: Path, where: str) -> None:
    (tmp_path / "m.py").write_text(EXITING[where])
    with pytest.raises(EntryPointError, match=r"^entry point m\.py:build raised (SystemExit\(0\)|Stop\('stop'\)) ") as raised:
        entry_point_model("m.py:build", tmp_path, 2)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value.__cause__, BaseException)


def test_a_dataset_cannot_exit_the_process_while_built_listed_or_read(tmp_path: Path) -> None:
    (tmp_path / "data.py").write_text(
        "import sys, torch\n"
        "class Exiting(torch.utils.data.Dataset):\n"
        "    targets = [0, 1, 0, 1]\n"
        "    def __len__(self):\n"
        "        return 4\n"
        "    def __getitem__(self, i):\n"
        "        if i == 3:\n"
        "            sys.exit(0)\n"
        "        return torch.zeros(3, 4, 4), self.targets[i]\n"
        "def load():\n"
        "    return Exiting()\n"
        "def exits():\n"
        "    sys.exit(7)\n"
    )
    with pytest.raises(EntryPointError, match=r"^entry point data\.py:load raised SystemExit\(0\) while reading dataset\[3\]"):
        open_data(DataConfig(source="entrypoint", entrypoint="data.py:load"), tmp_path, 0, tmp_path)
    with pytest.raises(EntryPointError, match=r"^entry point data\.py:exits raised SystemExit\(7\) while building the dataset"):
        open_data(DataConfig(source="entrypoint", entrypoint="data.py:exits"), tmp_path, 0, tmp_path)


def test_keyboard_interrupt_in_user_code_still_interrupts(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def build():\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        entry_point_model("m.py:build", tmp_path, 2)


def test_a_type_error_inside_a_builder_is_not_retried_without_arguments(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "from pathlib import Path\n"
        "def build(num_classes=None):\n"
        "    with open(Path(__file__).parent / 'calls.txt', 'a') as log:\n"
        "        log.write(f'{num_classes}\\n')\n"
        "    raise TypeError('bad layer')\n"
    )
    with pytest.raises(EntryPointError, match=r"raised TypeError\('bad layer'\) while building the model"):
        entry_point_model("m.py:build", tmp_path, 3)
    assert (tmp_path / "calls.txt").read_text().split() == ["3"]  # called once, with num_classes


# ---------------------------------------------------------------------------------------------
# Weights that do not fit


def test_a_weight_mismatch_lists_missing_unexpected_and_misshaped_keys_with_counts(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    state = {f"{i}.weight": torch.zeros(4, 4) for i in range(8)}  # every bias missing
    state["0.weight"] = torch.zeros(5, 4)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelSourceError) as raised:
        load_state_dict(model, tmp_path / "w.pt")
    message = str(raised.value)
    assert "8 missing key(s): 0.bias, 1.bias, 2.bias, 3.bias, 4.bias, ..." in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "1 key(s) of another shape: 0.weight ((5, 4) in the file, (4, 4) in the model)" in message
    assert "w.pt: the weights do not fit the model" in message and "5.bias" not in message


def test_weights_saved_from_data_parallel_get_the_fix(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(ModelSourceError, match=r"2 missing key\(s\): 0\.bias, 0\.weight; 2 unexpected key\(s\).*save model\.module\.state_dict\(\)"):
        load_state_dict(model, tmp_path / "w.pt")
