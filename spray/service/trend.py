"""A job's trend: its findings and their scores across runs, as a table and an SVG plot.

Flags of successive runs are linked into findings with the matching rule of
``spray.service.matching`` (each flag joins the finding whose latest appearance it matches,
else starts a new one, named ``F1``, ``F2``... in order of first appearance). The plot shows
each finding's artifact score per run and the number of flags per run; it carries no text
from the dataset (findings are named by number, the table beside it names their class), so
the inline SVG needs no escaping of its own. Where a run's job folder holds a model
correction (``correction/<method>/report.json``), its clean and attacked accuracies are
listed too.

:func:`job_trend` gives a job's trend as the trend page shows it, computed once per set of
runs: a stored run's summary never changes, so the findings and the plot of the same runs
are the same, and parsing every run's summary (megabytes for a large audit) and drawing
the plot (matplotlib, which is not thread-safe) happen only when a run is added.
"""

from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from spray.service.matching import Fingerprint, best_match
from spray.service.memo import Memo
from spray.service.models import Job
from spray.service.reviews import cache_scope
from spray.service.views import run_json


@dataclass
class Finding:
    """One finding followed across runs: its label, class, space and score per run index."""

    label: str
    class_name: str
    space: str
    scores: dict[int, float | None] = field(default_factory=dict)
    last: Fingerprint | None = None


@dataclass
class Trend:
    """The rows of the trend table and the findings plotted."""

    runs: list[dict[str, Any]]
    findings: list[Finding]


def build_trend(runs: list[dict[str, Any]]) -> Trend:
    """Link the flags of ``runs`` (oldest first; each with ``summary``) into findings."""
    findings: list[Finding] = []
    rows = []
    for index, run in enumerate(runs):
        labels = []
        for flag in run["summary"].get("flags") or []:
            if not isinstance(flag, dict):
                continue
            fingerprint = Fingerprint.of_flag(flag)
            candidates = [(finding.last, str(position)) for position, finding in enumerate(findings) if finding.last is not None]
            hit = best_match(fingerprint, candidates)  # type: ignore[arg-type]
            if hit is None:
                finding = Finding(f"F{len(findings) + 1}", fingerprint.class_name, fingerprint.space)
                findings.append(finding)
            else:
                finding = findings[int(candidates[hit[0]][1])]
            finding.scores[index] = fingerprint.artifact_score
            finding.last = fingerprint
            labels.append(finding.label)
        rows.append({**{key: value for key, value in run.items() if key != "summary"}, "findings": labels})
    return Trend(rows, findings)


def correction_accuracies(job_folder: Path) -> list[dict[str, Any]]:
    """Clean and attacked accuracy before and after each correction of the job (if any)."""
    found = []
    for path in sorted((job_folder / "correction").glob("*/report.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or "recovered_share" not in record:
            continue
        before = record.get("before") if isinstance(record.get("before"), dict) else {}
        after = record.get("after") if isinstance(record.get("after"), dict) else {}
        reaudit = record.get("reaudit") if isinstance(record.get("reaudit"), dict) else {}
        found.append({
            "method": str(record.get("method", path.parent.name)),
            "clean_before": before.get("clean_accuracy"), "clean_after": after.get("clean_accuracy"),
            "attacked_before": before.get("attacked_accuracy"), "attacked_after": after.get("attacked_accuracy"),
            "recovered_share": record.get("recovered_share"), "flag_gone": reaudit.get("flag_gone"),
            "folder": path.parent.relative_to(job_folder).as_posix(),
        })
    return found


def plot_svg(trend: Trend) -> str:
    """The trend as an inline SVG (no XML prologue, no comments, no dataset text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "spray"}):
        figure, (scores, counts) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=(3, 1))
        positions = list(range(len(trend.runs)))
        for finding in trend.findings:
            xs = sorted(finding.scores)
            ys = [finding.scores[x] if finding.scores[x] is not None else float("nan") for x in xs]
            scores.plot(xs, ys, marker="o", label=finding.label)
        scores.set_ylabel("artifact score")
        scores.set_ylim(0, 1.05)
        scores.grid(alpha=0.3)
        if trend.findings:
            scores.legend(loc="upper left", fontsize=8, ncol=min(6, len(trend.findings)))
        counts.bar(positions, [len(run["findings"]) for run in trend.runs], color="#888")
        counts.set_ylabel("flags")
        counts.set_xlabel("run (oldest first)")
        counts.set_xticks(positions, [str(position + 1) for position in positions])
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(figure)
    text = buffer.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return text.strip()


#: Trends of recent jobs: ``(engine, job id, (run id, folder, created) of each run)`` -> the
#: finding labels of each run, the findings and the SVG. Runs are keyed by their id and
#: creation time, which a stored run never changes, so an entry is never stale. A trend is
#: made once while concurrent requests for it wait.
_TRENDS: Memo[tuple[list[list[str]], list[Finding], str]] = Memo(16, single_flight=True)
#: matplotlib's pyplot state is global: one figure is drawn at a time.
_DRAWING = threading.Lock()


def job_trend(session: Session, job: Job) -> tuple[Trend, str]:
    """The trend of ``job``'s runs (re-audits aside, oldest first) and its plot as SVG."""
    runs = [run for run in sorted(job.runs, key=lambda item: (item.created, item.id)) if run.kind != "reaudit"]
    key = (cache_scope(session), job.id, tuple((run.id, run.path, run.created) for run in runs))

    def make() -> tuple[list[list[str]], list[Finding], str]:
        trend = build_trend([{"summary": run.summary} for run in runs])
        with _DRAWING:
            svg = plot_svg(trend)
        return [row["findings"] for row in trend.runs], trend.findings, svg

    labels, findings, svg = _TRENDS.get_or_make(key, make)
    rows = [{**run_json(run), "findings": labels[index]} for index, run in enumerate(runs)]
    return Trend(rows, findings), svg
