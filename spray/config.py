"""Declared settings: every field of a stage's configuration says its default, type and
allowed values once, and one validator checks them all.

Each stage owns one frozen dataclass next to its code (``spray.data.config.DataConfig``,
``spray.models.config.ModelConfig``, ``spray.attribution.settings.AttributionSettings``,
``spray.attribution.settings.ClusterSettings``, ``spray.analysis.config.SprayConfig``,
``spray.report.config.ReportConfig``, ``spray.correction.config.CorrectionConfig``); a job
spec's sections *are* these objects (``spray.jobs``). A field is declared with
:func:`setting`::

    batch_size: int = setting(64, Range(1), doc="samples explained together")

The type comes from the annotation; the constraints (:class:`Choice`, :class:`Range`,
:class:`Length`, :class:`Each`, :class:`Pattern`) from the declaration. :func:`validate`
checks both and raises :class:`ConfigError`, whose ``key`` names the field, so a job file
can point at the line of that key. :func:`build` makes a config from a TOML table,
refusing unknown keys. In the spirit of scikit-learn's ``_parameter_constraints``: the
checks are data, so ``spray validate`` knows everything a run would reject, and the tests
can walk every field with a bad value.

This module imports nothing heavy (no torch, no numpy): validating a job spec is instant.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class ConfigError(ValueError):
    """A setting with a wrong type or value; ``key`` is the field, and the message starts with it."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key} {problem}")


class Constraint(Protocol):
    """One rule a setting's value must follow."""

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else what is wrong (completing "<key> ...")."""

    def counterexample(self) -> Any:
        """A value of the right type that breaks the rule (for the tests that walk every field)."""


@dataclass(frozen=True)
class Choice:
    """The value is one of ``values``."""

    values: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        if value in self.values:
            return None
        return f"must be one of {', '.join(repr(v) for v in self.values)}; got {value!r}"

    def counterexample(self) -> Any:
        return "not-a-choice" if isinstance(self.values[0], str) else max(self.values) + 1


@dataclass(frozen=True)
class Range:
    """A finite number with ``low <= value <= high`` (``<`` for an open end); None is no bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.describe()}, got {value!r}" if below or above else None

    def describe(self) -> str:
        lower = "" if self.low is None else f"{'above' if self.low_open else 'at least'} {self.low:g}"
        upper = "" if self.high is None else f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return " and ".join(part for part in (lower, upper) if part) or "a finite number"

    def counterexample(self) -> Any:
        if self.low is not None:
            return self.low - 1 if not self.low_open else self.low
        if self.high is not None:
            return self.high + 1 if not self.high_open else self.high
        return math.nan


@dataclass(frozen=True)
class Length:
    """A list (tuple) of one of the allowed lengths."""

    allowed: tuple[int, ...]

    def problem(self, value: Any) -> str | None:
        if len(value) in self.allowed:
            return None
        return f"must hold {' or '.join(str(n) for n in self.allowed)} values, got {len(value)}"

    def counterexample(self) -> Any:
        return tuple(range(1, max(self.allowed) + 2))


@dataclass(frozen=True)
class Each:
    """Every item of a list follows ``constraint``."""

    constraint: Any

    def problem(self, value: Any) -> str | None:
        for index, item in enumerate(value):
            issue = self.constraint.problem(item)
            if issue:
                return f"item {index}: {issue}"
        return None

    def counterexample(self) -> Any:
        return (self.constraint.counterexample(),)


@dataclass(frozen=True)
class Pattern:
    """A string matching ``regex`` as a whole (``what`` says it in words); ``""`` is allowed when ``optional``."""

    regex: str
    what: str
    optional: bool = True

    def problem(self, value: Any) -> str | None:
        if self.optional and value == "":
            return None
        if re.fullmatch(self.regex, value):
            return None
        return f"must be {self.what}; got {value!r}"

    def counterexample(self) -> Any:
        return "\n"


#: ``module:function`` or ``file.py:function``, the shape of every entry point in a job spec.
ENTRY_POINT = Pattern(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_]*", "'package.module:function' or 'file.py:function'")


def setting(default: Any, *constraints: Any, doc: str = "", job_key: bool = True) -> Any:
    """Declare a config field: its default, its constraints and a one-line description.

    ``job_key=False`` marks a field a job spec cannot set in this section, because the job
    fills it from another one (the job's seed, the data's normalisation).
    """
    metadata = {"constraints": constraints, "doc": doc, "job_key": job_key}
    return field(default=default, metadata=metadata)


def declared_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
    """``(field, type annotation)`` of every field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        yield item, hints[item.name]


def job_keys(cls: type) -> list[str]:
    """The keys a job spec may set in this config's section."""
    return [item.name for item, _ in declared_fields(cls) if item.metadata.get("job_key", True)]


def constraints_of(item: dataclasses.Field) -> tuple[Any, ...]:
    """The constraints declared for a field (empty when it only has a type)."""
    return tuple(item.metadata.get("constraints", ()))


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the annotated type (ints count as floats, bools never as numbers)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        item = typing.get_args(annotation)[0]
        return isinstance(value, (tuple, list)) and all(type_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def type_name(annotation: Any) -> str:
    """A readable name of a type annotation (``tuple[int, ...]`` reads "a list of int")."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "none"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(annotation, str(annotation))


def coerce(value: Any, annotation: Any) -> Any:
    """A TOML value in the field's Python form: lists become tuples, ints become floats where a float is declared."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None) and type_matches(value, arg):
                return coerce(value, arg)
        return value
    if origin in (tuple, list) and isinstance(value, (tuple, list)):
        item = typing.get_args(annotation)[0]
        return tuple(coerce(v, item) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def validate(instance: Any) -> None:
    """Check every field of a config dataclass against its type and declared constraints.

    Raises :class:`ConfigError` for the first field that fails. None passes the constraints
    of an optional field (its meaning is documented on the field).
    """
    for item, annotation in declared_fields(type(instance)):
        value = getattr(instance, item.name)
        if not type_matches(value, annotation):
            raise ConfigError(item.name, f"must be {type_name(annotation)}, got {type(value).__name__} {value!r}")
        if value is None:
            continue
        for constraint in constraints_of(item):
            issue = constraint.problem(value)
            if issue:
                raise ConfigError(item.name, issue)


def build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """A config of ``cls`` from a TOML table: unknown keys and wrong types are a ConfigError.

    Keys that the job fills itself (``job_key=False``) count as unknown here. A class may
    name keys it no longer has, with the reason, in ``RETIRED_KEYS`` (a dict), so that an
    old job file gets the reason rather than a bare "unknown key".
    """
    hints = dict((item.name, annotation) for item, annotation in declared_fields(cls))
    allowed = job_keys(cls)
    retired = getattr(cls, "RETIRED_KEYS", {})
    for key, value in values.items():
        if key in retired:
            raise ConfigError(key, f"was removed: {retired[key]}")
        if key not in allowed:
            raise ConfigError(key, f"is not a key of [{section}]; valid keys: {', '.join(allowed)}")
        if not type_matches(value, hints[key]):
            raise ConfigError(key, f"must be {type_name(hints[key])}, got {type(value).__name__} {value!r}")
    return cls(**{key: coerce(value, hints[key]) for key, value in values.items()})


def to_dict(instance: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict (tuples become lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(instance).items()}
