"""A model's fingerprint: a hash of everything its outputs depend on, so a stage computed
from one model is never reused for another.

The weights are not enough: the same weights give other outputs when ``forward`` changes
(``x = 1.0 - x``). :func:`model_fingerprint` covers

* the weights (the state dict), every module's printed form and its plain attributes (a
  ``scale`` or an unregistered tensor that a builder set);
* the source of every class the model's modules are instances of, base classes included
  (``inspect.getsource``; a class without source, a compiled one, counts by its name), and
  the TorchScript code of scripted modules;
* the user's own code: the entry-point file that built the model (``[model] entrypoint``,
  remembered on the model by :func:`record_entry_point`), the files of the modules that
  define the model's classes when they are not part of the Python installation, and every
  module of the user's code that these import, directly or not (found from their
  ``import`` statements; a module counts when it lies outside the Python installation and
  its installed packages, or belongs to the entry point's own package). spray's own modules
  are left to spray's version, which the attribution file's fingerprint holds;
* the torch and torchvision versions.

A file is hashed by its content, not its path, so a moved job folder keeps its stages.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import site
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spray.data.entrypoint import FILE_MODULE_PREFIX, EntryPointCode

#: The attribute under which a model built by an entry point keeps its :class:`EntryPointCode`.
ENTRY_POINT_ATTRIBUTE = "_spray_entry_point"
#: Module attributes left out of the fingerprint: the train/eval switch (the stages set eval
#: mode themselves) and the entry point, which is hashed by its code instead.
_IGNORED_ATTRIBUTES = frozenset({"training", ENTRY_POINT_ATTRIBUTE})
#: Top-level packages whose code the fingerprint leaves to their versions.
_VERSIONED_PACKAGES = frozenset({"spray", "torch", "torchvision"})


def record_entry_point(model: nn.Module, code: EntryPointCode) -> None:
    """Remember on ``model`` the entry point that built it; it travels with copies of the model
    (``copy.deepcopy``, a corrected model wrapping it), so their fingerprints cover that code too."""
    model.__dict__[ENTRY_POINT_ATTRIBUTE] = code


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's weights, code and library versions (see the module docstring)."""
    digest = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
    digest.update(repr(model).encode())
    for name, module in model.named_modules():
        digest.update(name.encode())
        _hash_attributes(digest, module)
    for name, source in class_sources(model):
        digest.update(name.encode())
        digest.update(source.encode())
    for file_digest in user_code_digests(model):
        digest.update(file_digest.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """The versions of torch and torchvision (``"none"`` where torchvision is not installed)."""
    try:
        vision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        vision = "none"
    return {"torch": torch.__version__, "torchvision": vision}


def _hash_attributes(digest: Any, module: nn.Module) -> None:
    """Feed a module's plain attributes (numbers, strings, their tuples, unregistered tensors) into ``digest``."""
    for key, value in sorted(vars(module).items()):
        if key in _IGNORED_ATTRIBUTES:
            continue
        if isinstance(value, torch.Tensor):
            digest.update(f"{key}={tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif _is_plain(value):
            digest.update(f"{key}={value!r}".encode())


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a number, string, bool, None, or a tuple or list of those."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def class_sources(model: nn.Module) -> list[tuple[str, str]]:
    """``(qualified name, source)`` of every class in the MRO of the model's modules, sorted by name.

    The source is ``inspect.getsource``'s ("" where there is none, e.g. a compiled class);
    a scripted module adds its TorchScript code under its class's name.
    """
    classes: dict[str, type] = {}
    scripted: dict[str, str] = {}
    for module in model.modules():
        for cls in type(module).__mro__[:-1]:  # all but object
            classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
        if isinstance(module, torch.jit.ScriptModule):
            name = f"{type(module).__module__}.{type(module).__qualname__}:{getattr(module, 'original_name', '')}"
            scripted[name] = scripted.get(name, "") + _script_code(module)
    sources = {name: _class_source(cls) for name, cls in classes.items()}
    sources.update({f"{name} (TorchScript)": code for name, code in scripted.items()})
    return sorted(sources.items())


def _class_source(cls: type) -> str:
    """The source of a class, or "" where it is not available."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _script_code(module: torch.jit.ScriptModule) -> str:
    """A scripted module's TorchScript code ("" where it has none)."""
    try:
        return str(module.code)
    except (RuntimeError, AttributeError):
        return ""


def user_code_digests(model: nn.Module) -> list[str]:
    """SHA-256 of every file of the user's code the model depends on, sorted (see the module docstring)."""
    entries = [module.__dict__[ENTRY_POINT_ATTRIBUTE] for module in model.modules() if ENTRY_POINT_ATTRIBUTE in module.__dict__]
    own_packages = {code.module.split(".")[0] for code in entries if not code.module.startswith(FILE_MODULE_PREFIX)}
    seeds = [(code.module, code.file) for code in entries if code.file]
    for cls in {type(module) for module in model.modules()}:
        for base in cls.__mro__[:-1]:
            file = getattr(sys.modules.get(base.__module__), "__file__", None)
            if file and _is_user_module(base.__module__, file, own_packages):
                seeds.append((base.__module__, file))
    return sorted(_file_digest(file) for file in _imported_files(seeds, own_packages))


def _imported_files(seeds: list[tuple[str, str]], own_packages: set[str]) -> set[str]:
    """The files of ``seeds`` (module name, file) and of every user module they import, transitively."""
    seen: set[str] = set()
    pending = list(seeds)
    while pending:
        name, file = pending.pop()
        if file in seen:
            continue
        seen.add(file)
        for imported in _imports_of(name, file):
            module_file = getattr(sys.modules.get(imported), "__file__", None)
            if module_file and module_file not in seen and _is_user_module(imported, module_file, own_packages):
                pending.append((imported, module_file))
    return seen


def _imports_of(name: str, file: str) -> Iterator[str]:
    """Every module name that ``file`` (module ``name``) imports, anywhere in it, with the
    packages on the way (``import a.b`` runs ``a`` too). Resolved against ``sys.modules`` by
    the caller, so a module counts once something has imported it."""
    try:
        tree = ast.parse(Path(file).read_bytes(), filename=file)
    except (OSError, SyntaxError, ValueError):
        return
    package = name if Path(file).name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module or ""
            except (ImportError, ValueError):
                continue
            yield from _with_parents(base)
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _with_parents(dotted: str) -> Iterator[str]:
    """``a``, ``a.b``, ``a.b.c`` for ``a.b.c``."""
    parts = dotted.split(".")
    yield from (".".join(parts[: i + 1]) for i in range(len(parts)) if parts[0])


def _is_user_module(name: str, file: str, own_packages: set[str]) -> bool:
    """Whether module ``name`` (at ``file``) is the user's code: its source lies outside the
    Python installation and installed packages, or it belongs to the entry point's package;
    spray's, torch's and torchvision's modules are covered by their versions instead."""
    top = name.split(".")[0]
    if top in _VERSIONED_PACKAGES or not file.endswith(".py"):
        return False
    if top in own_packages:
        return True
    path = Path(file).resolve()
    return not any(path.is_relative_to(root) for root in _installation_roots())


@functools.cache
def _installation_roots() -> tuple[Path, ...]:
    """The folders of the Python installation: the standard library and the site-packages folders."""
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    folders.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    folders.add(site.getusersitepackages())
    return tuple(Path(folder).resolve() for folder in folders)


def _file_digest(file: str) -> str:
    """SHA-256 of a file's bytes ("missing:<name>" when it cannot be read)."""
    try:
        return hashlib.sha256(Path(file).read_bytes()).hexdigest()
    except OSError:
        return f"missing:{Path(file).name}"
