"""The attribution stage's settings (``[attribution]``) and where it runs (``[cluster]``).

Both are declared once here (:mod:`spray.config`): a job spec's sections are these objects,
and library callers build the same ones. Torch is only imported by the methods that need
it, so a job spec validates without loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spray.config import Choice, ConfigError, Each, Length, Pattern, Range, setting, validate

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

#: Written for composite, canonizers or layers: chosen for the model's architecture
#: (``spray.attribution.architectures``) when the stage starts.
AUTO = "auto"
#: Composite names (the zennit class and fast rules of each: ``spray.attribution.lrp.COMPOSITES``).
COMPOSITE_NAMES: tuple[str, ...] = (
    "epsilon_plus_flat",
    "epsilon_plus",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
)
#: Canonizer names (zennit classes: ``spray.attribution.lrp.CANONIZERS``).
CANONIZER_NAMES: tuple[str, ...] = ("merge_batchnorm", "resnet", "vgg")
#: ``engine``: ``auto`` is the fast engine where it supports the model, zennit's hooks otherwise.
ENGINES: tuple[str, ...] = ("auto", "fast", "zennit")
#: ``device``: ``auto`` is CUDA when available, else the CPU.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: ``precision``: ``float32`` (IEEE float32, also on CUDA: no TF32) or ``amp`` (float16 autocast, CUDA only).
PRECISIONS: tuple[str, ...] = ("float32", "amp")
#: ``target``: explain the true label's logit or the predicted one.
TARGETS: tuple[str, ...] = ("label", "prediction")
#: ``[cluster] kind``: in this process, a local Dask cluster, or a scheduler's address.
CLUSTER_KINDS: tuple[str, ...] = ("none", "local", "address")
#: ``[cluster] write``: who writes the results (see ``spray.attribution.distributed``).
WRITE_MODES: tuple[str, ...] = ("client", "workers")

_SIZES = (Length((0, 1, 2)), Each(Range(1)))
#: Settings that cannot change an attribution file's content, so its fingerprint leaves them
#: out (``spray.attribution.engine.attribution_fingerprint``): every other one is in it.
RESULT_INDEPENDENT: tuple[str, ...] = ("loader_threads",)


@dataclass(frozen=True)
class AttributionSettings:
    """How to explain: composite, canonizers, concept layers, target rule, batch size, engine, device.

    ``"auto"`` (the default of composite, canonizers and layers) picks them for the model's
    architecture: :meth:`for_model` returns the settings with them filled in, which is what
    the attribution pass records. ``device`` and ``precision`` are resolved where the
    explainer is built (``spray.attribution.select.make_explainer``), so each Dask worker
    uses its own GPU. ``mean`` and ``std`` are the
    data's normalisation (``[data] mean``/``std``; a job fills them in): the model sees
    ``(image - mean) / std`` while heatmaps stay aligned with the display images in [0, 1].
    Results do not depend on ``loader_threads``.
    """

    composite: str = setting(AUTO, Choice((AUTO, *COMPOSITE_NAMES)), doc="LRP composite (rules per layer type)")
    canonizers: tuple[str, ...] = setting((AUTO,), Each(Choice((AUTO, *CANONIZER_NAMES))), doc="model canonizers applied before the rules")
    layers: tuple[str, ...] = setting((AUTO,), doc="concept layers (named_modules() names) whose per-channel relevance is stored")
    target: str = setting("label", Choice(TARGETS), doc="explained output: the true label's logit or the prediction's")
    batch_size: int = setting(64, Range(1), doc="samples explained together (also the HDF5 chunk)")
    engine: str = setting("auto", Choice(ENGINES), doc="LRP engine: fast where it applies, or zennit's hooks")
    device: str = setting("auto", Choice(DEVICES), doc="where the model runs")
    precision: str = setting("float32", Choice(PRECISIONS), doc="arithmetic: float32, or amp (float16 autocast, CUDA only)")
    loader_threads: int = setting(2, Range(0), doc="background threads reading the next batches (0: read inline)")
    heatmap_size: tuple[int, ...] = setting((), *_SIZES, doc="stored heatmap grid: [] the images' size, [side] or [height, width]")
    mean: tuple[float, ...] = setting((), Each(Range()), doc="per-channel input mean (from [data] mean)", job_key=False)
    std: tuple[float, ...] = setting((), Each(Range(0, low_open=True)), doc="per-channel input std (from [data] std)", job_key=False)

    def __post_init__(self) -> None:
        validate(self)
        if AUTO in self.canonizers and len(self.canonizers) > 1:
            raise ConfigError("canonizers", f"must be ['auto'] alone or a list of names, got {list(self.canonizers)}")
        if AUTO in self.layers and len(self.layers) > 1:
            raise ConfigError("layers", f"must be ['auto'] alone or a list of layer names, got {list(self.layers)}")
        if self.precision == "amp" and self.device == "cpu":
            raise ConfigError(
                "precision",
                "'amp' (float16 autocast) runs on CUDA only, but device is 'cpu'; use precision = 'float32' or device = 'cuda'/'auto'",
            )
        if len(self.mean) != len(self.std):
            raise ConfigError("std", "needs as many values as mean (one per channel)")

    @property
    def resolved(self) -> bool:
        """Whether no ``"auto"`` is left in composite, canonizers and layers."""
        return AUTO not in (self.composite, *self.canonizers, *self.layers)

    def for_model(self, model: nn.Module) -> AttributionSettings:
        """These settings with every ``"auto"`` filled in for ``model``'s architecture."""
        if self.resolved:
            return self
        from spray.attribution.architectures import attribution_defaults

        defaults = attribution_defaults(model)
        return dataclasses.replace(
            self,
            composite=defaults.composite if self.composite == AUTO else self.composite,
            canonizers=tuple(defaults.canonizers) if self.canonizers == (AUTO,) else self.canonizers,
            layers=tuple(defaults.layers) if self.layers == (AUTO,) else self.layers,
        )

    def model_input(self, images: np.ndarray) -> torch.Tensor:
        """Display images in [0, 1] -> the model's input (normalised with ``mean``/``std`` if given).

        Heatmaps are taken at this tensor, so they stay aligned with the display images. A
        ``mean`` of one value applies to every channel; one of another length than the images'
        channels is an ``AttributionConfigError`` naming ``[data] mean``/``std`` (broadcasting
        would silently turn one channel into three).
        """
        import numpy as np
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self.mean and (x.ndim != 4 or len(self.mean) not in (1, x.shape[1])):
            from spray.attribution.lrp import AttributionConfigError

            channels = x.shape[1] if x.ndim == 4 else 0
            raise AttributionConfigError(
                f"[data] mean = {list(self.mean)} and std = {list(self.std)} hold {len(self.mean)} values, but the images "
                f"have {channels} channel(s) (shape {tuple(x.shape[1:])}); give {channels} value(s), one per channel, "
                f"or one for all (e.g. mean = [{self.mean[0]}] and std = [{self.std[0]}])."
            )
        if self.mean:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    @property
    def input_range(self) -> tuple[float, float]:
        """Smallest and largest model input (display range [0, 1] after normalisation), for box rules."""
        if not self.mean:
            return 0.0, 1.0
        lows = [(0.0 - m) / s for m, s in zip(self.mean, self.std)]
        highs = [(1.0 - m) / s for m, s in zip(self.mean, self.std)]
        return min(lows), max(highs)


#: Dask's memory sizes: a number of bytes, with an optional unit (``4GiB``, ``500MB``), or ``auto``.
MEMORY_SIZE = Pattern(r"auto|\d+(\.\d+)?\s*([kKMGTP]i?B|B)?", "a memory size such as '4GiB', '500MB' or 'auto'", optional=False)
ADDRESS = Pattern(r"(tcp|tls|inproc|ucx)://\S+", "a scheduler address such as 'tcp://scheduler:8786'")


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: where the attribution pass and the (class, space) analyses run: in this process, a local Dask cluster, or a scheduler.

    ``write``: who writes the results: ``client`` (this process; no shared filesystem needed)
    or ``workers`` (each worker reads its chunks and writes shards, joined at the end; the
    data and the output folder must be on a filesystem every worker sees).
    """

    kind: str = setting("none", Choice(CLUSTER_KINDS), doc="none (in this process), local (a LocalCluster) or address")
    workers: int = setting(2, Range(1), doc="local: number of worker processes")
    threads_per_worker: int = setting(1, Range(1), doc="local: threads per worker")
    memory_limit: str = setting("4GiB", MEMORY_SIZE, doc="local: memory limit per worker")
    address: str = setting("", ADDRESS, doc="address: the scheduler, e.g. 'tcp://scheduler:8786'")
    write: str = setting("client", Choice(WRITE_MODES), doc="who writes results: client or workers")

    def __post_init__(self) -> None:
        validate(self)
        if self.kind == "address" and not self.address:
            raise ConfigError("kind", "'address' needs cluster.address (e.g. 'tcp://scheduler:8786')")
        if self.write == "workers" and self.kind == "none":
            raise ConfigError("write", "'workers' needs Dask workers; set cluster.kind = 'local' or 'address', or write = 'client'")
