"""The layout of a job's output folder, named in one place.

::

    <output>/<job>/                      JobFolders.root: the latest report (index.html, summary.json)
      stages/                            input.h5, attributions.h5, analysis.h5
        model/                           the demo model's cached weights
      runs/<UTC time>/                   with [job] dated = true: one report folder per run
      correction/<method>/               spray correct: page, report.json, exported model
        reaudit/                         the corrected model's audit (its own stages/ and report)
      virelay/                           spray export-virelay

Every module that builds a path into a job's folder asks :class:`JobFolders`; nothing is
written outside ``root`` (:meth:`JobFolders.inside`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

STAGES = "stages"
RUNS = "runs"
CORRECTION = "correction"
REAUDIT = "reaudit"
VIRELAY = "virelay"
MODEL_CACHE = "model"
INPUT_FILE = "input.h5"
ATTRIBUTIONS_FILE = "attributions.h5"
ANALYSIS_FILE = "analysis.h5"
SUMMARY_FILE = "summary.json"
#: A dated run's folder name: UTC time to the microsecond.
RUN_NAME = re.compile(r"^\d{8}T\d{6}(\d{6})?Z$")


@dataclass(frozen=True)
class JobFolders:
    """The folders of one job (``root`` = ``<output>/<job>``)."""

    root: Path

    @property
    def stages(self) -> Path:
        """The job's stage files (data, attributions, analysis, model cache)."""
        return self.root / STAGES

    @property
    def model_cache(self) -> Path:
        return self.stages / MODEL_CACHE

    @property
    def runs(self) -> Path:
        """Dated runs' report folders."""
        return self.root / RUNS

    def correction(self, method: str) -> Path:
        """Where ``spray correct --method METHOD`` writes."""
        return self.root / CORRECTION / method

    def reaudit(self, method: str) -> Path:
        """The audit of the model corrected by ``method``."""
        return self.correction(method) / REAUDIT

    @property
    def virelay(self) -> Path:
        return self.root / VIRELAY

    def inside(self, path: Path) -> Path:
        """``path`` resolved, if it lies inside ``root``; a ValueError otherwise: nothing is written outside."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise ValueError(f"{resolved} lies outside the output folder {self.root}; refusing to write there.")
        return resolved

    def dated_runs(self) -> list[Path]:
        """The run folders (``runs/<UTC time>``), oldest first; none when there are none."""
        if not self.runs.is_dir():
            return []
        return sorted(p for p in self.runs.iterdir() if p.is_dir() and RUN_NAME.match(p.name))

    def new_run(self) -> Path:
        """A new, empty ``runs/<UTC time>/`` folder."""
        folder = self.runs / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def latest_report(self, dated: bool) -> Path:
        """The folder of the latest finished report: ``root``, or with dated runs the newest
        ``runs/<UTC time>/`` that holds a ``summary.json``.

        Raises FileNotFoundError, naming the command to run, when there is none yet.
        """
        if dated:
            finished = [p for p in self.dated_runs() if (p / SUMMARY_FILE).is_file()]
            if finished:
                return finished[-1]
            raise FileNotFoundError(f"no finished run under {self.runs}; run 'spray audit' on the job first.")
        if not (self.root / SUMMARY_FILE).is_file():
            raise FileNotFoundError(f"{self.root / SUMMARY_FILE} not found; run 'spray audit' on the job first.")
        return self.root
