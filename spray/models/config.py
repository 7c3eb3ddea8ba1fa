"""The model stage's settings (``[model]``), declared once (:mod:`spray.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from spray.config import ENTRY_POINT, Choice, ConfigError, Range, setting, validate

#: ``source``: the demo net (trained once, cached), a torchvision architecture, an entry point, or a whole pickled model.
MODEL_SOURCES: tuple[str, ...] = ("demo", "torchvision", "entrypoint", "pickle")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which model to audit.

    ``source``: ``demo`` (trained once and cached), ``torchvision`` (``architecture`` plus
    ``weights``), ``entrypoint`` (``module:function`` or ``file.py:function`` returning an
    ``nn.Module``, plus optional ``weights``) or ``pickle`` (a whole pickled model in
    ``weights``; needs ``trust_pickle = true`` because unpickling can run code).
    """

    source: str = setting("demo", Choice(MODEL_SOURCES), doc="which model")
    architecture: str = setting("", doc="torchvision: architecture name, e.g. 'resnet18'")
    entrypoint: str = setting("", ENTRY_POINT, doc="module:function or file.py:function building the model")
    weights: str = setting("", doc="state dict file (weights_only), or the pickled model")
    trust_pickle: bool = setting(False, doc="allow unpickling a whole model (it can run code)")
    epochs: int = setting(8, Range(1), doc="demo: training epochs")

    def __post_init__(self) -> None:
        validate(self)
        if self.source == "torchvision" and not self.architecture:
            raise ConfigError("source", "'torchvision' needs model.architecture (e.g. 'resnet18')")
        if self.source == "entrypoint" and not self.entrypoint:
            raise ConfigError("entrypoint", "must be set when source = 'entrypoint' ('package.module:function' or 'file.py:function')")
