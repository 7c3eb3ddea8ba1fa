"""The correction's page and record: ``index.html`` and ``report.json`` in ``<audit>/correction/<method>/``.

``report.json`` is :meth:`spray.correction.run.CorrectionReport.to_dict`. ``index.html`` shows
the same for people: the before/after table (clean accuracy, attacked accuracy, the
artifact's share of relevance, the gate's firing rates and precision for R-ClArC), the
share of the attacked-accuracy loss recovered, the CAV, the re-audit's outcome (see
:mod:`spray.correction.reaudit`) and links to the re-audit's report, the audit's own
report, the comparison of the two audits and the exported files. For a user job it also says
how the held-out and attacked sets were made and, for the flagged samples' evidence, shows
the region whose relevance share is measured (``artifact_mask.png`` beside the page,
inlined as a ``data:`` URI).

Like the audit report, the page is static and self-contained (inline CSS, no script,
nothing loaded from the network; its Content-Security-Policy allows no more) and is
rendered by jinja2 with autoescaping (``spray/report/templates/correction.html``), so
every dataset-provided string (job and class names) reaches it escaped. Links are
relative and only point at fixed file names inside the job's folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from spray.report.render import environment
from spray.store.common import write_text_atomic

PAGE_FILE = "index.html"
REPORT_FILE = "report.json"
COMPARE_FILE = "compare.html"
MASK_PICTURE = "artifact_mask.png"
#: The only picture files the page inlines (fixed names inside the correction's folder).
PICTURES: tuple[str, ...] = (MASK_PICTURE,)
#: Rows of the before/after table: (key of EvaluationResult.to_dict(), label, higher is better).
TABLE_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("clean_accuracy", "clean accuracy", True),
    ("attacked_accuracy", "attacked accuracy (artifact stamped on the other classes)", True),
    ("attacked_to_class", "attacked images given the flagged class", False),
    ("artifact_relevance", "artifact's share of positive relevance (attacked images)", False),
    ("gate_rate_attacked", "gate fires on attacked images", True),
    ("gate_rate_clean", "gate fires on the same images without the artifact", False),
    ("gate_precision", "gate precision", True),
)


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (JSON has no NaN)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def table_rows(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The before/after rows that have a value on either side, with the change and whether it helps."""
    rows = []
    for key, label, higher_is_better in TABLE_ROWS:
        first, second = finite_number(before.get(key)), finite_number(after.get(key))
        if first is None and second is None:
            continue
        change = None if first is None or second is None else second - first
        better = None if change is None or change == 0 else (change > 0) == higher_is_better
        rows.append({"key": key, "label": label, "before": first, "after": second, "change": change, "better": better})
    return rows


def _link(folder: Path, target: Path) -> str | None:
    """A relative URL from ``folder`` to the file ``target``, or None when it does not exist."""
    if not target.is_file():
        return None
    return "/".join(quote(part) for part in Path(os.path.relpath(target, folder)).parts)


def page_links(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Links from the page to the re-audit's report, the audit's report, the comparison and the exported files."""
    reaudit = data.get("reaudit") or {}
    files = data.get("files") or {}
    exported = [Path(path) for key, path in files.items() if key != "folder" and path]
    exported += [path.with_suffix(".json") for path in exported if path.suffix == ".pt"]  # a CAV's metadata
    exported = sorted(set(exported + [folder / REPORT_FILE]), key=lambda path: path.name)
    return {
        "reaudit": _link(folder, folder / reaudit["report"]) if reaudit.get("report") else None,
        "audit": _link(folder, folder.parent.parent / PAGE_FILE),
        "compare": _link(folder, folder / COMPARE_FILE),
        "files": [(path.name, link) for path in exported if (link := _link(folder, path))],
    }


def export_checks(folder: Path) -> list[dict[str, Any]]:
    """One row per model format of the export beside the page: its file, or why it is
    missing, and how closely the reloaded file matched the corrected model (from
    ``correction.json``; empty when there is none)."""
    from spray.correction.export import CONFIG_NAME

    try:
        record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = []
    for name, key in (("torch.export program", "torch_export"), ("ONNX", "onnx")):
        entry = record.get(key) or {}
        why = entry.get("error") or entry.get("skipped") or ""
        note = entry.get("not_verified") or ""
        rows.append({"format": name, "file": entry.get("file"), "max_abs_diff": entry.get("max_abs_diff"), "why": why or note})
    if record.get("torchscript_file") or "torchscript_file" in record:
        rows.append({"format": "TorchScript", "file": record.get("torchscript_file"), "max_abs_diff": record.get("torchscript_max_abs_diff"),
                     "why": "" if record.get("torchscript_file") else "not written ([correct] torchscript = false)"})
    return rows


def page_pictures(folder: Path, data: dict[str, Any]) -> dict[str, str]:
    """The artifact pictures that ``data`` lists and ``folder`` holds, as ``data:`` URIs by file name."""
    from spray.report.plots import data_uri

    listed = ((data.get("evaluation_set") or {}).get("attack") or {}).get("pictures") or []
    return {name: data_uri((folder / name).read_bytes()) for name in PICTURES if name in listed and (folder / name).is_file()}


def write_correction_files(data: dict[str, Any], folder: str | os.PathLike[str], job: str = "") -> tuple[Path, Path]:
    """Write ``report.json`` (``data``) and ``index.html`` into ``folder``; return their paths."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / REPORT_FILE
    write_text_atomic(record, json.dumps(data, indent=2) + "\n")
    html = environment().get_template("correction.html").render(
        job=job,
        data=data,
        rows=table_rows(data["before"], data["after"]),
        links=page_links(folder, data),
        pictures=page_pictures(folder, data),
        exports=export_checks(folder),
    )
    page = folder / PAGE_FILE
    write_text_atomic(page, html)
    return record, page
