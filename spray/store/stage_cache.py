"""One caching rule for every stage file: reuse it when it records the fingerprint of the
inputs it was computed from, else compute it again.

A stage file (``input.h5``, ``attributions.h5``, ``analysis.h5``) carries a ``fingerprint``
attribute: a hash of everything its content depends on (data, model, settings). A file
whose fingerprint matches is reused; a missing, unreadable or stale one is computed again
and written atomically (the writers use ``spray.store.common.atomic_h5``). The attribution
stage resumes a partial file chunk by chunk under the same rule
(``spray.attribution.engine``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import h5py

from spray.store.common import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


def fingerprint(payload: Any) -> str:
    """A short, stable hash of a JSON-able description of a stage's inputs."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_fingerprint(path: Path) -> str | None:
    """The ``fingerprint`` attribute of an HDF5 stage file; None when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("fingerprint")
    except OSError:
        return None
    return value if isinstance(value, str) else None


def mark(path: Path, key: str) -> None:
    """Record ``key`` as the fingerprint of the finished stage file at ``path``."""
    with h5py.File(path, "a") as handle:
        handle.attrs["fingerprint"] = key


def cached(path: Path, key: str, compute: Callable[[], T], write: Callable[[Path, T], None], read: Callable[[Path], T]) -> T:
    """The stage's result: ``read(path)`` when ``path`` was computed from inputs of fingerprint
    ``key``; else ``compute()``, written with ``write(path, result)`` and marked with ``key``.

    A file that matches but cannot be read (truncated, another format version) is logged and
    computed again.
    """
    if stored_fingerprint(path) == key:
        try:
            return read(path)
        except StoreError as error:
            log.warning("%s is not reusable (%s); computing it again", path, error)
    result = compute()
    write(path, result)
    mark(path, key)
    return result
