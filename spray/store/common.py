"""Helpers shared by the HDF5 layouts: atomic file replacement and format checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py


#: h5py's chunk cache per open dataset when reading (h5py's default is 1 MiB, less than
#: one chunk of 64 images of 64x64x3 float32): the causal test and the report read
#: scattered rows several times, and a cached chunk is decompressed once, not per read.
READ_CACHE = {"rdcc_nbytes": 64 * 2**20, "rdcc_nslots": 10007}


class StoreError(RuntimeError):
    """A stage file is missing, unreadable, truncated or of another format version."""


def writable_folder(folder: Path, fix: str) -> Path:
    """Create ``folder`` (with its parents) and check that a file can be written in it.

    Done before a stage starts, so a folder that cannot be written (under a file, on a
    read-only or full disk, without permission) stops the run with one clear error before
    any work, instead of h5py's message halfway through. ``fix`` says what to change.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".spray-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise StoreError(f"{folder}: cannot write here ({reason}); {fix}") from error
    return folder


@contextlib.contextmanager
def atomic_h5(path: Path) -> Iterator[h5py.File]:
    """Write an HDF5 file under a temporary name and move it to ``path`` only on success.

    A crash leaves at most ``<name>.partial`` behind, never a half-written file under the
    final name, so a later stage never reads an incomplete result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as handle:
            yield handle
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def open_h5(path: Path, kind: str, version: int, mode: str = "r") -> h5py.File:
    """Open a spray HDF5 file and check its ``format`` and ``format_version`` attributes.

    Raises:
        StoreError: naming the file and the fix when it is missing, unreadable, of another
            kind or of another format version.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: file not found; run the stage that writes it first.")
    try:
        handle = h5py.File(path, mode, **(READ_CACHE if mode == "r" else {}))
    except OSError as error:
        raise StoreError(
            f"{path}: not a readable HDF5 file ({error}); it may be truncated. "
            "Delete it and re-run the stage that writes it."
        ) from error
    found_kind = handle.attrs.get("format")
    found_version = handle.attrs.get("format_version")
    if found_kind != kind or found_version is None or int(found_version) != version:
        handle.close()
        raise StoreError(
            f"{path}: expected a spray '{kind}' file of format version {version}, found "
            f"format={found_kind!r} version={found_version!r}. Delete it and re-run the stage."
        )
    return handle


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and ``os.replace``.

    Replacing the name never follows a symlink at ``path``, so the write stays in the
    folder the caller chose. The file is made world-readable (0644): reports are shared.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".partial", dir=path.parent
    )
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
