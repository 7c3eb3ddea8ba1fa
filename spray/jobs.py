"""Job specs: TOML files in ``jobs/`` parsed into validated, typed configuration.

A job spec has the sections ``[job]``, ``[data]``, ``[model]``, ``[attribution]``,
``[analysis]``, ``[report]``, ``[cluster]`` and ``[correct]``; every key is optional except ``job.name``. Unknown keys,
wrong types and impossible values are rejected with the file, line and key named.
Relative paths are resolved against the directory of the job file.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class JobSpecError(ValueError):
    """A job spec that cannot be run; the message names the file, line and key, and the fix."""


@dataclass
class JobSection:
    """``[job]``: name (also the output folder name), output root, seed, dated runs and retention."""

    name: str = ""
    output: str = "../reports"
    seed: int = 0
    dated: bool = False
    keep_runs: int = 10


@dataclass
class DataSection:
    """``[data]``: where the samples come from and how they are preprocessed.

    ``source``: ``demo`` (generated), ``folder`` (one sub-folder per class), ``h5`` (ViRelAy
    input layout), ``npz`` or ``entrypoint`` (``module:function`` returning a torch Dataset).
    """

    source: str = "demo"
    path: str = ""
    entrypoint: str = ""
    class_names: list[str] = field(default_factory=list)
    resize: list[int] = field(default_factory=list)
    crop: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    strict: bool = False
    n_per_class: int = 600
    artifact_class: int = 1
    artifact_fraction: float = 0.3


@dataclass
class ModelSection:
    """``[model]``: which model to audit.

    ``source``: ``demo`` (trained once and cached), ``torchvision`` (``architecture`` plus
    ``weights``), ``entrypoint`` (``module:function`` or ``file.py:function`` returning an
    ``nn.Module``, plus optional ``weights``) or ``pickle`` (a whole pickled model in
    ``weights``; needs ``trust_pickle = true`` because unpickling can run code).
    """

    source: str = "demo"
    architecture: str = ""
    entrypoint: str = ""
    weights: str = ""
    trust_pickle: bool = False
    epochs: int = 8


@dataclass
class AttributionSection:
    """``[attribution]``: LRP composite, canonizers, concept layers, explained target, batch size.

    ``"auto"`` (the default for composite, canonizers and layers) picks them for the model's
    architecture (``spray.attribution.architectures``); ``engine`` chooses the LRP engine;
    ``device`` where it runs (``auto``: CUDA when available, else the CPU) and ``precision``
    its arithmetic (``float32``, or ``amp``: float16 autocast, CUDA only); ``heatmap_size``
    the grid heatmaps are stored at (``[]``: the images' resolution).
    """

    composite: str = "auto"
    canonizers: list[str] = field(default_factory=lambda: ["auto"])
    layers: list[str] = field(default_factory=lambda: ["auto"])
    target: str = "label"
    batch_size: int = 64
    engine: str = "auto"
    device: str = "auto"
    precision: str = "float32"
    loader_threads: int = 2
    heatmap_size: list[int] = field(default_factory=list)


@dataclass
class AnalysisSection:
    """``[analysis]``: SpRAy parameters (see ``spray.analysis.pipeline.SprayConfig``).

    ``spaces`` names what is clustered: ``"heatmap"`` (pooled LRP heatmaps),
    ``"concept:<layer>"`` (the concept-relevance vectors of one stored layer) or
    ``"concept:*"`` (every stored layer). ``dataset_wide`` adds an analysis of all classes
    together per space.
    """

    spaces: list[str] = field(default_factory=lambda: ["heatmap", "concept:*"])
    dataset_wide: bool = False
    pooled_size: int = 16
    normalisation: str = "l2"
    n_neighbors: int = 10
    n_eigen: int = 32
    max_clusters: int = 8
    embedding: str = "umap"
    threshold: float | None = None


@dataclass
class ReportSection:
    """``[report]``: how many samples a grid shows."""

    samples_per_grid: int = 24


@dataclass
class ClusterSection:
    """``[cluster]``: where the attribution pass runs: in-process, a local Dask cluster, or a scheduler.

    ``write``: who writes the results: ``client`` (this process; no shared filesystem needed)
    or ``workers`` (each worker reads its chunks and writes shards, joined at the end; the
    data and the output folder must be on a filesystem every worker sees).
    """

    kind: str = "none"
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"
    address: str = ""
    write: str = "client"


@dataclass
class CorrectSection:
    """``[correct]``: how ``spray correct`` corrects this job's model for a flag (ClArC).

    ``flag`` picks the flag (0: the top one), ``reaudit`` whether the corrected model is
    audited again and ``stamp`` (``module:function`` or ``file.py:function``, relative to the
    job file) the function that puts the artifact on images for the attacked test set of a
    user job (empty: cut the artifact out of the flagged samples; see
    ``spray.correction.user``). Every other key is a field of
    ``spray.correction.CorrectionConfig`` of the same name and meaning; a key left out (None
    here) keeps that class's default, and a flag of ``spray correct`` overrides the key.
    """

    method: str | None = None
    flag: int = 0
    reaudit: bool = True
    layer: str | None = None
    pooling: str | None = None
    estimator: str | None = None
    clean: str | None = None
    gate: str | None = None
    detector_estimator: str | None = None
    target_fpr: float | None = None
    soft_gate: bool | None = None
    temperature: float | None = None
    rr_lambda: float | None = None
    rr_epochs: int | None = None
    rr_learning_rate: float | None = None
    rr_target: str | None = None
    rr_max_samples: int | None = None
    test_size: float | None = None
    held_out: float | None = None
    relevance_samples: int | None = None
    torchscript: bool | None = None
    stamp: str = ""

    def config_values(self) -> dict[str, Any]:
        """The ``CorrectionConfig`` fields this section sets (the keys given in the job spec)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in ("flag", "reaudit", "stamp") and value is not None}


@dataclass
class JobSpec:
    """A whole validated job spec; ``path`` is the TOML file it came from (None for built-ins)."""

    job: JobSection
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    attribution: AttributionSection = field(default_factory=AttributionSection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    report: ReportSection = field(default_factory=ReportSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    correct: CorrectSection = field(default_factory=CorrectSection)
    path: Path | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    @property
    def output_dir(self) -> Path:
        """``<output>/<name>``: every file of the job is written below it."""
        return (self.base_dir / self.job.output).resolve() / self.job.name

    def resolve(self, relative: str) -> Path:
        """A path from the spec, relative to the job file's directory."""
        return (self.base_dir / relative).resolve()


SECTIONS: dict[str, type] = {
    "job": JobSection,
    "data": DataSection,
    "model": ModelSection,
    "attribution": AttributionSection,
    "analysis": AnalysisSection,
    "report": ReportSection,
    "cluster": ClusterSection,
    "correct": CorrectSection,
}


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """1-based line of ``key`` inside ``[section]`` (or of the header when key is None)."""
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[([^\]]+)\]", stripped)
        if header:
            current = header.group(1).strip()
            if key is None and current == section:
                return number
            continue
        if current == section and key is not None and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _where(source: str, text: str, section: str, key: str | None = None) -> str:
    line = _line_of(text, section, key)
    return f"{source}:{line}" if line else source


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "") if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))


def _build_section(cls: type, values: dict[str, Any], source: str, text: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in names:
            raise JobSpecError(
                f"{_where(source, text, section, key)}: unknown key '{key}' in [{section}]; valid keys: {', '.join(names)}."
            )
        if not _type_ok(value, hints[key]):
            raise JobSpecError(
                f"{_where(source, text, section, key)}: [{section}] {key} must be {_type_name(hints[key])}, "
                f"got {type(value).__name__} {value!r}."
            )
    converted = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    return cls(**converted)


def parse_job(text: str, source: str = "<job>", path: Path | None = None) -> JobSpec:
    """Parse and validate a job spec's TOML text; ``source`` names it in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise JobSpecError(f"{source}: not valid TOML: {error}.") from error
    for section, values in raw.items():
        if section not in SECTIONS:
            raise JobSpecError(
                f"{_where(source, text, section)}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}."
            )
        if not isinstance(values, dict):
            raise JobSpecError(f"{source}: '{section}' must be a [section] table, got {type(values).__name__}.")
    built = {name: _build_section(cls, raw.get(name, {}), source, text, name) for name, cls in SECTIONS.items()}
    spec = JobSpec(**built, path=path)
    _check_values(spec, source, text)
    return spec


def _check_values(spec: JobSpec, source: str, text: str) -> None:
    name = spec.job.name
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise JobSpecError(
            f"{_where(source, text, 'job', 'name')}: job.name {name!r} must be 1-100 letters, digits, '.', '_' or '-' "
            "(it names the output folder), starting with a letter or digit."
        )
    _check_choice(spec.data.source, ("demo", "folder", "h5", "npz", "entrypoint"), "data", "source", source, text)
    _check_choice(spec.model.source, ("demo", "torchvision", "entrypoint", "pickle"), "model", "source", source, text)
    _check_choice(spec.cluster.kind, ("none", "local", "address"), "cluster", "kind", source, text)
    if spec.model.source == "demo" and spec.data.source != "demo":
        raise JobSpecError(f"{_where(source, text, 'model', 'source')}: the demo model only fits the demo data; set model.source.")
    if spec.data.source in ("folder", "h5", "npz"):
        _check_path(spec, spec.data.path, "data", "path", source, text, folder=spec.data.source == "folder")
    if spec.model.source in ("torchvision", "pickle") or (spec.model.source == "entrypoint" and spec.model.weights):
        _check_path(spec, spec.model.weights, "model", "weights", source, text, folder=False)
    for section, key in (("data", "entrypoint"), ("model", "entrypoint")):
        needed = getattr(spec, section).source == "entrypoint"
        if needed and ":" not in getattr(getattr(spec, section), key):
            raise JobSpecError(f"{_where(source, text, section, key)}: [{section}] {key} must look like 'package.module:function' or 'file.py:function'.")
    if spec.model.source == "torchvision" and not spec.model.architecture:
        raise JobSpecError(f"{_where(source, text, 'model', 'source')}: model.source = 'torchvision' needs model.architecture (e.g. 'resnet18').")
    if len(spec.data.mean) != len(spec.data.std):
        raise JobSpecError(f"{_where(source, text, 'data', 'std')}: data.mean and data.std need the same length (one value per channel).")
    if any(v <= 0 for v in spec.data.std):
        raise JobSpecError(f"{_where(source, text, 'data', 'std')}: data.std values must be positive.")
    for section, key in (("data", "resize"), ("data", "crop"), ("attribution", "heatmap_size")):
        values = getattr(getattr(spec, section), key)
        if len(values) not in (0, 1, 2) or any(v < 1 for v in values):
            raise JobSpecError(f"{_where(source, text, section, key)}: {section}.{key} must be [], [side] or [height, width] with positive sizes.")
    if spec.cluster.kind == "address" and not spec.cluster.address:
        raise JobSpecError(f"{_where(source, text, 'cluster', 'kind')}: cluster.kind = 'address' needs cluster.address (e.g. 'tcp://scheduler:8786').")
    _check_cluster_write(spec, source, text)
    if spec.job.keep_runs < 1:
        raise JobSpecError(f"{_where(source, text, 'job', 'keep_runs')}: job.keep_runs must be at least 1.")
    from spray.data.demo import DemoConfig  # the demo's own checks, reported with the spec's line

    try:
        DemoConfig(n_per_class=spec.data.n_per_class, artifact_class=spec.data.artifact_class, artifact_fraction=spec.data.artifact_fraction)
    except ValueError as error:
        key = str(error).split(" ", 1)[0]
        raise JobSpecError(f"{_where(source, text, 'data', key)}: [data] {error}") from error
    _check_spaces(spec, source, text)
    _check_correct(spec, source, text)
    _check_choice(spec.attribution.engine, ("auto", "fast", "zennit"), "attribution", "engine", source, text)
    _check_choice(spec.attribution.target, ("label", "prediction"), "attribution", "target", source, text)
    if spec.attribution.loader_threads < 0:
        raise JobSpecError(f"{_where(source, text, 'attribution', 'loader_threads')}: loader_threads must be 0 (read inline) or more.")
    if spec.attribution.batch_size < 1:
        raise JobSpecError(f"{_where(source, text, 'attribution', 'batch_size')}: batch_size must be at least 1.")
    _check_choice(spec.attribution.device, ("auto", "cpu", "cuda"), "attribution", "device", source, text)
    _check_choice(spec.attribution.precision, ("float32", "amp"), "attribution", "precision", source, text)
    if spec.attribution.precision == "amp" and spec.attribution.device == "cpu":
        raise JobSpecError(
            f"{_where(source, text, 'attribution', 'precision')}: attribution.precision = 'amp' (float16 autocast) "
            "runs on CUDA only, but attribution.device is 'cpu'; use precision = 'float32' or device = 'cuda'/'auto'."
        )


def _check_cluster_write(spec: JobSpec, source: str, text: str) -> None:
    """``[cluster] write``: a known mode; ``workers`` needs a cluster and data the workers can open from files."""
    _check_choice(spec.cluster.write, ("client", "workers"), "cluster", "write", source, text)
    if spec.cluster.write != "workers":
        return
    where = _where(source, text, "cluster", "write")
    if spec.cluster.kind == "none":
        raise JobSpecError(f"{where}: cluster.write = 'workers' needs Dask workers; set cluster.kind = 'local' or 'address', or write = 'client'.")
    if spec.data.source == "entrypoint":
        raise JobSpecError(
            f"{where}: cluster.write = 'workers' needs data the workers can open from files (demo, folder, h5, npz), but "
            "data.source = 'entrypoint' builds it in this process only; use write = 'client', or save the data as an .h5 or .npz file."
        )


def _check_spaces(spec: JobSpec, source: str, text: str) -> None:
    """``[analysis] spaces``: known names, no repeats, concept layers among the stored ones."""
    spaces = spec.analysis.spaces
    where = _where(source, text, "analysis", "spaces")
    if not spaces:
        raise JobSpecError(f"{where}: analysis.spaces must name at least one space, e.g. [\"heatmap\"].")
    if len(set(spaces)) != len(spaces):
        raise JobSpecError(f"{where}: analysis.spaces repeats a space: {spaces}.")
    layers = spec.attribution.layers
    for space in spaces:
        if space == "heatmap" or space == "concept:*":
            continue
        if not space.startswith("concept:") or not space[len("concept:") :]:
            raise JobSpecError(f"{where}: unknown analysis space {space!r}; use 'heatmap', 'concept:*' or 'concept:<layer>'.")
        if layers != ["auto"] and space[len("concept:") :] not in layers:
            raise JobSpecError(
                f"{where}: analysis space {space!r} needs its layer in attribution.layers ({layers}); add it there or use 'concept:*'."
            )


def _check_correct(spec: JobSpec, source: str, text: str) -> None:
    """``[correct]``: its ClArC keys must make a valid ``CorrectionConfig``, whose own checks are
    reported here with the line of the key they name (each message starts with the key)."""
    if spec.correct.flag < 0:
        raise JobSpecError(f"{_where(source, text, 'correct', 'flag')}: correct.flag must be at least 0 (0: the top flag).")
    if spec.correct.stamp and ":" not in spec.correct.stamp:
        raise JobSpecError(
            f"{_where(source, text, 'correct', 'stamp')}: [correct] stamp must look like 'package.module:function' or 'file.py:function'."
        )
    values = spec.correct.config_values()
    if not values:
        return
    from spray.correction.run import CorrectionConfig  # imports torch: only for specs that set [correct] keys
    from spray.correction.errors import CorrectionError

    try:
        CorrectionConfig(**values)
    except CorrectionError as error:
        key = str(error).split(" ", 1)[0]
        raise JobSpecError(f"{_where(source, text, 'correct', key)}: [correct] {error}") from error


def _check_choice(value: str, choices: tuple[str, ...], section: str, key: str, source: str, text: str) -> None:
    if value not in choices:
        raise JobSpecError(f"{_where(source, text, section, key)}: {section}.{key} must be one of {', '.join(choices)}; got {value!r}.")


def _check_path(spec: JobSpec, value: str, section: str, key: str, source: str, text: str, folder: bool) -> None:
    kind = "folder" if folder else "file"
    resolved = spec.resolve(value) if value else None
    if resolved is None or not (resolved.is_dir() if folder else resolved.is_file()):
        raise JobSpecError(
            f"{_where(source, text, section, key)}: {section}.{key} {value!r} is not a {kind} (resolved to {resolved}); "
            "give its path relative to the job file."
        )


def load_job(path: Path) -> JobSpec:
    """Read and validate the job spec at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise JobSpecError(f"{path}: cannot read the job spec ({error.strerror}); check the path.") from error
    return parse_job(text, source=str(path), path=path.resolve())


def demo_job(output: Path | str = "reports", name: str = "demo", **data_overrides: Any) -> JobSpec:
    """The built-in demo audit (what ``spray demo`` runs), writing to ``<output>/<name>``."""
    output_path = Path(output).resolve()
    spec = JobSpec(job=JobSection(name=name, output=str(output_path)), data=DataSection(**data_overrides))
    return spec
