"""Job specs: TOML files in ``jobs/`` parsed into validated, typed configuration.

A job spec has the sections ``[job]``, ``[data]``, ``[model]``, ``[attribution]``,
``[analysis]``, ``[confirm]``, ``[report]``, ``[cluster]``, ``[correct]``, ``[check]`` and ``[schedule]``; every key is optional except ``job.name``. Unknown keys,
wrong types and impossible values are rejected with the file, line and key named.
Relative paths are resolved against the directory of the job file.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spray.analysis.config import SprayConfig, space_layer
from spray.attribution.settings import AttributionSettings, ClusterSettings
from spray.config import ConfigError, Pattern, Range, build, setting, validate
from spray.confirm.config import ConfirmConfig
from spray.correction.config import CorrectionConfig
from spray.data.config import DataConfig
from spray.models.config import ModelConfig
from spray.report.config import ReportConfig
from spray.store.folders import JobFolders
from spray.verdict import CheckConfig

#: What a job name may be: it names the output folder.
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"


class JobSpecError(ValueError):
    """A job spec that cannot be run; the message names the file, line and key, and the fix."""


class SpecProblem(ConfigError):
    """A value that is valid alone but not with the rest of the spec; names its section and key."""

    def __init__(self, section: str, key: str, problem: str) -> None:
        self.section = section
        super().__init__(key, problem)


@dataclass(frozen=True)
class JobSection:
    """``[job]``: name (also the output folder name), output root, seed, dated runs and retention."""

    name: str = setting("", Pattern(SAFE_NAME, "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit (it names the output folder)", optional=False), doc="the job's name and output folder")
    output: str = setting("../reports", doc="folder that receives <name>/ (relative to the job file)")
    seed: int = setting(0, Range(0, 2**32 - 1), doc="seed of every random step")
    dated: bool = setting(False, doc="give each run its own runs/<UTC time>/ report folder")
    keep_runs: int = setting(10, Range(1), doc="dated: newest runs kept")

    def folder(self, base_dir: Path) -> Path:
        """``<output>/<name>``, with ``output`` relative to ``base_dir`` (the job file's folder)."""
        return (Path(base_dir) / self.output).resolve() / self.name

    def __post_init__(self) -> None:
        validate(self)
        if self.name in (".", ".."):
            raise ConfigError("name", f"must name a folder, got {self.name!r}")


@dataclass(frozen=True)
class CronExpression:
    """A five-field cron expression (``minute hour day month weekday``), as ``croniter`` reads it."""

    def problem(self, value: Any) -> str | None:
        if value == "":
            return None
        from croniter import croniter

        if len(str(value).split()) == 5 and croniter.is_valid(value):
            return None
        return f"must be a cron expression of five fields such as '0 2 * * *' (02:00 UTC daily); got {value!r}"

    def counterexample(self) -> Any:
        return "every night"


@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: when ``spray serve`` runs the job by itself, and where it reports.

    ``cron``: a cron expression in UTC (``"0 2 * * *"``: every day at 02:00); empty: only
    runs that are asked for. ``webhook``: an ``http(s)://`` URL that receives a JSON POST
    (with a Slack-compatible ``text`` field) on a new or changed flag and on a failed run.
    """

    cron: str = setting("", CronExpression(), doc="cron expression (UTC) of scheduled runs")
    webhook: str = setting("", Pattern(r"https?://[^\s]+", "an http:// or https:// URL"), doc="URL notified of new flags and failed runs")

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class JobSpec:
    """A whole validated job spec; ``path`` is the TOML file it came from (None for built-ins).

    Each section is the configuration object of its stage. Fields one section takes from
    another are filled in here, once: the job's seed (analysis, correction) and the data's
    normalisation (attribution).
    """

    job: JobSection
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    analysis: SprayConfig = field(default_factory=SprayConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    correct: CorrectionConfig = field(default_factory=CorrectionConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.attribution = dataclasses.replace(self.attribution, mean=self.data.mean, std=self.data.std)
        self.analysis = dataclasses.replace(self.analysis, random_state=self.job.seed)
        self.confirm = dataclasses.replace(self.confirm, random_state=self.job.seed)
        self.correct = dataclasses.replace(self.correct, seed=self.job.seed)
        _check_together(self)

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    @property
    def output_dir(self) -> Path:
        """``<output>/<name>``: every file of the job is written below it."""
        return self.job.folder(self.base_dir)

    @property
    def folders(self) -> JobFolders:
        """The layout of the job's output folder (stages, dated runs, corrections)."""
        return JobFolders(self.output_dir)

    def resolve(self, relative: str) -> Path:
        """A path from the spec, relative to the job file's directory."""
        return (self.base_dir / relative).resolve()


SECTIONS: dict[str, type] = {
    "job": JobSection,
    "data": DataConfig,
    "model": ModelConfig,
    "attribution": AttributionSettings,
    "analysis": SprayConfig,
    "confirm": ConfirmConfig,
    "report": ReportConfig,
    "cluster": ClusterSettings,
    "correct": CorrectionConfig,
    "check": CheckConfig,
    "schedule": ScheduleConfig,
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
    if line is None and key is not None:
        line = _line_of(text, section, None)
    return f"{source}:{line}" if line else source


def parse_job(text: str, source: str = "<job>", path: Path | None = None) -> JobSpec:
    """Parse and validate a job spec's TOML text; ``source`` names it in error messages.

    Every declared setting of every section is checked here (type, allowed values, range),
    then the sections against each other, then the paths: what ``spray validate`` accepts,
    a run accepts up to the data and the model themselves.
    """
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
    built = {}
    for name, cls in SECTIONS.items():
        try:
            built[name] = build(cls, raw.get(name, {}), name)
        except ConfigError as error:
            raise JobSpecError(f"{_where(source, text, name, error.key)}: {name}.{error}.") from error
    try:
        spec = JobSpec(**built, path=path)
    except SpecProblem as error:
        raise JobSpecError(f"{_where(source, text, error.section, error.key)}: {error.section}.{error}.") from error
    _check_paths(spec, source, text)
    return spec


def _check_together(spec: JobSpec) -> None:
    """The checks that need more than one section; each names the key to change."""
    if spec.model.source == "demo" and spec.data.source != "demo":
        raise SpecProblem("model", "source", "'demo': the demo model only fits the demo data; set model.source")
    if spec.cluster.write == "workers" and spec.data.source == "entrypoint":
        raise SpecProblem(
            "cluster", "write",
            "'workers' needs data the workers can open from files (demo, folder, h5, npz), but data.source = "
            "'entrypoint' builds it in this process only; use write = 'client', or save the data as an .h5 or .npz file",
        )
    if spec.attribution.device == "cpu" and spec.attribution.precision == "amp":
        raise SpecProblem("attribution", "precision", "'amp' (float16 autocast) runs on CUDA only, but attribution.device is 'cpu'")
    layers = spec.attribution.layers
    for space in spec.analysis.spaces:
        layer = space_layer(space)
        if layer in (None, "*") or layers == ("auto",):
            continue
        if layer not in layers:
            raise SpecProblem(
                "analysis", "spaces",
                f"names {space!r}, which needs its layer in attribution.layers ({list(layers)}); add it there or use 'concept:*'",
            )
    if not layers and all(space_layer(space) is not None for space in spec.analysis.spaces):
        raise SpecProblem(
            "analysis", "spaces",
            "names only concept spaces, but attribution.layers = [] stores no concept relevances, so nothing would be analysed; "
            "add layers there or set spaces = [\"heatmap\"]",
        )


def _check_paths(spec: JobSpec, source: str, text: str) -> None:
    """The files and folders the spec names exist (relative to the job file)."""
    if spec.data.source in ("folder", "h5", "npz"):
        _check_path(spec, spec.data.path, "data", "path", source, text, folder=spec.data.source == "folder")
    if spec.model.source in ("torchvision", "pickle") or (spec.model.source == "entrypoint" and spec.model.weights):
        _check_path(spec, spec.model.weights, "model", "weights", source, text, folder=False)
    entry_points = [("data", "entrypoint", spec.data.entrypoint), ("model", "entrypoint", spec.model.entrypoint), ("correct", "stamp", spec.correct.stamp)]
    for section, key, value in entry_points:
        _check_entry_point_file(spec, value, section, key, source, text)


def _check_entry_point_file(spec: JobSpec, value: str, section: str, key: str, source: str, text: str) -> None:
    """A ``file.py:function`` entry point names an existing file inside the job's folder
    (``package.module:function`` is checked when it is imported)."""
    from spray.data.entrypoint import EntryPointError, entry_point_file

    try:
        entry_point_file(value, spec.base_dir)
    except EntryPointError as error:
        raise JobSpecError(f"{_where(source, text, section, key)}: {section}.{key}: {error}") from error


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


def declared_job(path: Path) -> JobSection | None:
    """The ``[job]`` name, output and dated keys of a job file that may be invalid elsewhere
    (other keys at their defaults), or None when they cannot be read: where a failed run
    says that it failed."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("job", {})
        where = {key: raw[key] for key in ("name", "output", "dated") if key in raw} if isinstance(raw, dict) else None
        return None if where is None else build(JobSection, where, "job")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ConfigError, TypeError):
        return None


def demo_job(output: Path | str = "reports", name: str = "demo", **data_overrides: Any) -> JobSpec:
    """The built-in demo audit (what ``spray demo`` runs), writing to ``<output>/<name>``."""
    output_path = Path(output).resolve()
    spec = JobSpec(job=JobSection(name=name, output=str(output_path)), data=DataConfig(**data_overrides))
    return spec
