"""Python entry points: ``package.module:function`` or ``file.py:function`` inside the job's folder.

:func:`resolve_entry_point` resolves one (for data, models and stamping functions alike) and
says where its code lives (:class:`EntryPointCode`, which the model's fingerprint hashes);
:func:`load_entry_point` gives just the function. :func:`call_user_code` runs user code so
that whatever it raises, ``SystemExit`` included, becomes an :class:`EntryPointError` naming
the entry point: user code cannot end spray's process or choose its exit code (only
``KeyboardInterrupt`` passes through). :class:`DatasetSource` wraps the torch ``Dataset``
that a ``data.source = "entrypoint"`` function returns.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from spray.data.base import DataSourceError, checked_class_names, content_fingerprint, to_display

T = TypeVar("T")
#: A dotted module name: ``package.module``.
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
#: Prefix of the ``sys.modules`` names of entry-point files (``file.py:function``).
FILE_MODULE_PREFIX = "spray_user_"


class EntryPointError(DataSourceError):
    """An entry point that cannot be resolved, or whose code raised; the message names the entry point.

    A ``DataSourceError`` (a ``ValueError``), so every caller that reports bad data reports it.
    """


@dataclass(frozen=True)
class EntryPointCode:
    """Where an entry point's code lives: its spec, the module that defines the function and
    that module's source file ("" when it has none). Small and picklable, so it can travel
    with the model it built (``spray.models.fingerprint``)."""

    spec: str
    module: str
    file: str


@dataclass(frozen=True)
class EntryPoint:
    """A resolved entry point: the function and where its code lives."""

    function: Callable[..., Any]
    code: EntryPointCode


def call_user_code(spec: str, what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)``, where ``function`` is (or runs) the code of entry point ``spec``.

    Any exception it raises except ``KeyboardInterrupt``, ``SystemExit`` and other
    ``BaseException``s included, becomes an :class:`EntryPointError` naming the entry point
    and ``what`` it was doing ("while building the model"), chained to the original. So a
    ``sys.exit(0)`` in a dataset cannot make ``spray check`` exit 0, as if it had found nothing.
    """
    try:
        return function(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # user code: anything it raises is its error, reported as one
        fix = "raise an exception there instead of calling sys.exit" if isinstance(error, SystemExit) else "fix that code"
        raise EntryPointError(f"entry point {spec} raised {error!r} {what}; nothing was audited: {fix}.") from error


@dataclass
class DatasetSource:
    """Wraps a torch ``Dataset`` returned by an entry point: items are (image tensor, label).

    ``name`` is the entry point; every call into the dataset goes through
    :func:`call_user_code`, so what it raises names it.
    """

    dataset: Any
    class_names: list[str]
    name: str
    labels: np.ndarray = field(init=False)
    sample_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        targets = call_user_code(self.name, "while listing the dataset's labels", self._targets)
        self.labels = np.asarray(targets, dtype=np.int64)
        self.sample_ids = [str(i) for i in range(len(self.labels))]
        self.class_names = checked_class_names(self.labels, self.class_names or None, Path(self.name))

    def _targets(self) -> Any:
        """The dataset's ``targets``, or every item's label when it has none."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            targets = [int(self.dataset[i][1]) for i in range(len(self.dataset))]
        return targets

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, row: int) -> np.ndarray:
        """The image of item ``row``, as an array."""
        return np.asarray(self.dataset[row][0])

    def read(self, rows: np.ndarray) -> np.ndarray:
        images = [call_user_code(self.name, f"while reading dataset[{int(r)}]", self._image, int(r)) for r in rows]
        return to_display(np.stack(images), Path(self.name))

    def fingerprint(self) -> str:
        """Hash of every sample's pixels and label (:func:`spray.data.base.content_fingerprint`)."""
        return content_fingerprint(self)


def resolve_entry_point(spec: str, base_dir: Path) -> EntryPoint:
    """Resolve ``package.module:function`` or ``file.py:function`` (a file inside ``base_dir``,
    the job's folder, named relative to it).

    Importing the module runs user code, through :func:`call_user_code`. A file outside the
    job's folder (``../x.py``, an absolute path elsewhere) or a name that is neither a ``.py``
    file nor a dotted module name is an :class:`EntryPointError` saying what to write instead.
    """
    if ":" not in spec:
        raise EntryPointError(f"entry point {spec!r} must look like 'package.module:function' or 'file.py:function'.")
    module_name, function_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        module = _import_file(spec, Path(base_dir))
    elif MODULE_NAME.fullmatch(module_name):
        module = _import_module(spec, module_name, Path(base_dir))
    else:
        raise EntryPointError(
            f"entry point {spec!r}: {module_name!r} is neither a .py file nor a module name; write 'file.py:function' "
            "(a file inside the job's folder, relative to the job file) or 'package.module:function' (an importable module)."
        )
    function = getattr(module, function_name, None)
    if not callable(function):
        raise EntryPointError(f"entry point {spec!r}: {module_name!r} has no function {function_name!r}.")
    return EntryPoint(function, EntryPointCode(spec, module.__name__, str(getattr(module, "__file__", None) or "")))


def load_entry_point(spec: str, base_dir: Path) -> Callable[..., Any]:
    """The function of entry point ``spec`` (see :func:`resolve_entry_point`)."""
    return resolve_entry_point(spec, base_dir).function


def entry_point_file(spec: str, base_dir: Path) -> Path | None:
    """The file a ``file.py:function`` entry point names (None for ``package.module:function``).

    Raises :class:`EntryPointError` when the file lies outside ``base_dir`` (the job's folder)
    or does not exist. Checks only paths, runs nothing: ``spray validate`` uses it too.
    """
    relative = spec.rsplit(":", 1)[0] if ":" in spec else ""
    if not relative.endswith(".py"):
        return None
    folder = Path(base_dir).resolve()
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder):
        raise EntryPointError(
            f"entry point {spec!r} names {path}, outside the job's folder {folder}; put the file in that folder (or "
            "below it) and name it relative to the job file, or install it as a package and write 'package.module:function'."
        )
    if not path.is_file():
        raise EntryPointError(f"entry point file {path} not found; give its path relative to the job file.")
    return path


def _import_file(spec: str, base_dir: Path) -> Any:
    """Run the entry-point file of ``spec`` (inside ``base_dir``) as a module of its own.

    The module's name includes a hash of the file's path, so two files of the same name (a
    data and a model entry point, say) never replace each other in ``sys.modules``.
    """
    path = entry_point_file(spec, base_dir)
    name = f"{FILE_MODULE_PREFIX}{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise EntryPointError(f"entry point file {path} cannot be loaded as Python; give a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    call_user_code(spec, "while running its file", module_spec.loader.exec_module, module)
    return module


def _import_module(spec: str, module_name: str, base_dir: Path) -> Any:
    """Import ``module_name``, with the job's folder first on the module search path meanwhile."""
    sys.path.insert(0, str(base_dir))
    try:
        return call_user_code(spec, "while importing it", importlib.import_module, module_name)
    except EntryPointError as error:
        if isinstance(error.__cause__, ImportError):
            raise EntryPointError(f"entry point {spec!r}: cannot import {module_name!r} ({error.__cause__}).") from error.__cause__
        raise
    finally:
        sys.path.remove(str(base_dir))
