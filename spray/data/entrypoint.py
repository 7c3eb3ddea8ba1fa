"""Python entry points: ``package.module:function`` or ``file.py:function`` next to the job file.

:func:`load_entry_point` resolves one (for data, models and stamping functions alike);
:class:`DatasetSource` wraps the torch ``Dataset`` that a ``data.source = "entrypoint"``
function returns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spray.data.base import DataSourceError, checked_class_names, to_display


@dataclass
class DatasetSource:
    """Wraps a torch ``Dataset`` returned by an entry point: items are (image tensor, label)."""

    dataset: Any
    class_names: list[str]
    name: str
    labels: np.ndarray = field(init=False)
    sample_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            targets = [int(self.dataset[i][1]) for i in range(len(self.dataset))]
        self.labels = np.asarray(targets, dtype=np.int64)
        self.sample_ids = [str(i) for i in range(len(self.labels))]
        self.class_names = checked_class_names(self.labels, self.class_names or None, Path(self.name))

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return to_display(np.stack([np.asarray(self.dataset[int(r)][0]) for r in rows]), Path(self.name))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        digest.update(self.labels.tobytes())
        digest.update(self.read(np.arange(min(len(self), 16))).tobytes())
        return digest.hexdigest()[:16]


def load_entry_point(spec: str, base_dir: Path) -> Callable[..., Any]:
    """Resolve ``package.module:function`` or ``file.py:function`` (relative to ``base_dir``)."""
    if ":" not in spec:
        raise DataSourceError(f"entry point {spec!r} must look like 'package.module:function' or 'file.py:function'.")
    module_name, function_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = (base_dir / module_name).resolve()
        if not path.is_file():
            raise DataSourceError(f"entry point file {path} not found; give its path relative to the job file.")
        module_spec = importlib.util.spec_from_file_location(f"spray_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise DataSourceError(f"entry point {spec!r}: cannot import {module_name!r} ({error}).") from error
        finally:
            sys.path.remove(str(base_dir))
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataSourceError(f"entry point {spec!r}: {module_name!r} has no function {function_name!r}.")
    return function
