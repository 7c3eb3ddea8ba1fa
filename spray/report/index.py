"""``<reports root>/index.html``: one page listing every audit under a reports folder.

Each audit folder holds ``summary.json`` beside its ``index.html`` (see
``spray.report.render``). The listing reads only the summaries: date, job, model,
dataset (the ``model`` and ``dataset`` metadata entries), number of samples and flags,
and links each audit's page by a relative link, so the folder can be moved, zipped or
served as it is. Comparisons written below the root (``compare.json`` from
``spray.report.compare``) are listed too, and so are model corrections (``report.json``
beside a correction's page, see ``spray.correction.page``) with their re-audit's outcome. Folders are searched up to ``MAX_DEPTH`` levels below the root
(``reports/<job>/`` and ``reports/<group>/<job>/``); ``stages`` folders are skipped.
A summary that cannot be read is listed with the reason instead of failing the page.

Like the audit page, the index is static, escapes every string and loads nothing.
"""

from __future__ import annotations

import json
import os
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from spray.report.render import REPORT_FILE, environment
from spray.store.common import write_text_atomic
from spray.store.folders import STAGES, SUMMARY_FILE, VIRELAY
from spray.verdict import ERROR

log = logging.getLogger(__name__)

INDEX_FILE = "index.html"
#: Marks a page as a spray audit index, so ``write_index`` replaces only its own pages.
GENERATOR = "spray audit index"
MAX_DEPTH = 3
SKIPPED_FOLDERS = frozenset({STAGES, VIRELAY, "__pycache__"})


@dataclass
class AuditEntry:
    """One audit as listed in the index."""

    folder: str
    link: str
    has_page: bool
    created: str
    job: str
    model: str
    dataset: str
    n_samples: int | None
    n_flags: int | None
    top_flag: str
    error: str = ""
    verdict: str = ""


@dataclass
class ComparisonEntry:
    """One comparison (``compare.json``) as listed in the index."""

    folder: str
    link: str
    before: str
    after: str
    appeared: int | None
    disappeared: int | None
    persisted: int | None


@dataclass
class CorrectionEntry:
    """One model correction (``<job>/correction/<method>/report.json``) as listed in the index."""

    folder: str
    link: str
    job: str
    method: str
    recovered_share: float | None
    flag_gone: bool | None


def find_summaries(root: Path, max_depth: int = MAX_DEPTH, name: str = SUMMARY_FILE) -> list[Path]:
    """Every file called ``name`` in folders below ``root`` (not in ``root`` itself), sorted.

    Symbolic links to folders are not followed, so the search stays inside ``root``.
    """
    found: list[Path] = []
    root = Path(root)

    def visit(folder: Path, depth: int) -> None:
        if depth > max_depth:
            return
        try:
            children = sorted(folder.iterdir(), key=lambda path: path.name)
        except OSError:
            return
        for child in children:
            if child.is_symlink() or not child.is_dir() or child.name in SKIPPED_FOLDERS:
                continue
            if child.name.startswith("."):
                continue
            if (child / name).is_file():
                found.append(child / name)
            visit(child, depth + 1)

    visit(root, 1)
    return found


def read_entry(root: Path, summary_path: Path) -> AuditEntry:
    """The index row of one audit; a broken summary gives a row carrying the error."""
    folder = summary_path.parent
    relative = folder.relative_to(root)
    link = "/".join(quote(part) for part in relative.parts) + "/" + REPORT_FILE
    base = {
        "folder": relative.as_posix(),
        "link": link,
        "has_page": (folder / REPORT_FILE).is_file(),
    }
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
        metadata = summary.get("metadata") or {}
        flags = summary.get("flags")
        flags = flags if isinstance(flags, list) else None
        failed = summary.get("verdict") == ERROR
        return AuditEntry(
            **base,
            created=str(summary.get("created", "")),
            job=str(summary.get("job", relative.name)),
            model=_text(metadata.get("model")),
            dataset=_text(metadata.get("dataset")),
            n_samples=_int(summary.get("n_samples")),
            n_flags=None if flags is None else len(flags),
            top_flag=_top_flag(flags),
            error=f"run failed: {_text(summary.get('error'))}" if failed else "",
            verdict=_text(summary.get("verdict")),
        )
    except (OSError, ValueError, TypeError, AttributeError) as error:
        return AuditEntry(
            **base, created="", job=relative.name, model="", dataset="", n_samples=None,
            n_flags=None, top_flag="", error=f"summary.json unreadable: {error}",
        )


def build_index(root: str | os.PathLike[str]) -> list[AuditEntry]:
    """The audits under ``root``, newest first (ties and undated audits by folder)."""
    root = Path(root).resolve()
    entries = [read_entry(root, path) for path in find_summaries(root)]
    entries.sort(key=lambda entry: entry.folder)
    entries.sort(key=lambda entry: entry.created, reverse=True)
    return entries


def read_comparison(root: Path, path: Path) -> ComparisonEntry | None:
    """The index row of one ``compare.json``; None when it cannot be read."""
    relative = path.parent.relative_to(root)
    try:
        diff = json.loads(path.read_text(encoding="utf-8"))
        counts = diff.get("counts") or {}
        return ComparisonEntry(
            folder=relative.as_posix(),
            link="/".join(quote(part) for part in relative.parts) + "/compare.html",
            before=str((diff.get("before") or {}).get("job", "")),
            after=str((diff.get("after") or {}).get("job", "")),
            appeared=_int(counts.get("appeared")),
            disappeared=_int(counts.get("disappeared")),
            persisted=_int(counts.get("persisted")),
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def read_correction(root: Path, path: Path) -> CorrectionEntry | None:
    """The index row of a correction's ``report.json``; None when it is not one (or unreadable)."""
    folder = path.parent
    relative = folder.relative_to(root)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or "recovered_share" not in record or not (folder / INDEX_FILE).is_file():
            return None
        reaudit = record.get("reaudit")
        recovered = record.get("recovered_share")
        return CorrectionEntry(
            folder=relative.as_posix(),
            link="/".join(quote(part) for part in relative.parts) + "/" + INDEX_FILE,
            job=relative.parts[0] if len(relative.parts) > 2 else "",
            method=str(record.get("method", "")),
            recovered_share=float(recovered) if isinstance(recovered, (int, float)) else None,
            flag_gone=bool(reaudit["flag_gone"]) if isinstance(reaudit, dict) and "flag_gone" in reaudit else None,
        )
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def write_index(root: str | os.PathLike[str]) -> Path:
    """Write ``<root>/index.html`` listing every audit below ``root``; return its path.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: ``root`` is itself an audit folder (its ``index.html`` is the
            audit's page and would be overwritten).
        FileExistsError: ``root/index.html`` exists and is not a spray audit index.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; give the folder that holds the audit folders.")
    if (root / SUMMARY_FILE).exists():
        raise ValueError(
            f"{root} is an audit folder (it has {SUMMARY_FILE}); give the folder above it."
        )
    path = root / INDEX_FILE
    if path.exists() and not _is_our_index(path):
        raise FileExistsError(
            f"{path} exists and was not written by spray; move it away or choose another folder."
        )
    entries = build_index(root)
    comparisons = [
        entry
        for path in find_summaries(root, name="compare.json")
        if (entry := read_comparison(root, path)) is not None
    ]
    corrections = [
        entry
        for path in find_summaries(root, name="report.json")
        if (entry := read_correction(root, path)) is not None
    ]
    html = environment().get_template("index.html").render(
        root=root.name, entries=entries, comparisons=comparisons, corrections=corrections, generator=GENERATOR
    )
    write_text_atomic(path, html)
    return path


def _is_our_index(path: Path) -> bool:
    """Whether ``path`` is an index page this module wrote (its generator tag in the head)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as stream:
            head = stream.read(2048)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">' in head


def _top_flag(flags: list[Any] | None) -> str:
    if not flags or not isinstance(flags[0], dict):
        return ""
    flag = flags[0]
    score = flag.get("artifact_score")
    score_text = f"{score:.3f}" if isinstance(score, (int, float)) else "n/a"
    return f"{flag.get('class_name', '?')} · cluster {flag.get('cluster_id', '?')} (score {score_text})"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def refresh_index(root: Path) -> None:
    """Write the index of the reports folder ``root`` again after a run (a warning, not an
    error, when it cannot: the run's own report is already written)."""
    try:
        write_index(root)
    except (OSError, ValueError) as error:
        log.warning("audit index not updated: %s", error)
