"""Write an audit's report folder: ``index.html`` (self-contained) and ``summary.json``.

``index.html`` carries its CSS, its one script and its pictures inline (``data:`` URIs)
and loads nothing from the network, so it can be mailed, attached to a CI run or opened
from ``file://`` offline. Its Content-Security-Policy allows images from ``data:`` only and
exactly one script, named by its SHA-256 hash: the package's ``templates/report.js``
(class filter, click-to-zoom; the page is complete without it). Nothing else can run,
even if a dataset string slipped through escaping. Templates live in
``spray/report/templates`` and are rendered by jinja2 with autoescaping on: every dataset
string (class names, sample ids, metadata) reaches the page escaped.

Only the two fixed file names are written, inside the resolved ``out_dir``; no file
name is ever built from dataset strings. Both files are written atomically.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import os
from pathlib import Path

import jinja2
from markupsafe import Markup

from spray.report.context import ReportContext
from spray.report.summary import build_summary, write_summary
from spray.dask_tasks import StarMap, starmap_here
from spray.store.common import write_text_atomic
from spray.store.folders import SUMMARY_FILE
from spray.report.config import ReportConfig
from spray.report.views import build_page

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPORT_FILE = "index.html"


def render_report(
    context: ReportContext,
    out_dir: str | os.PathLike[str],
    limits: ReportConfig = ReportConfig(),
    starmap: StarMap = starmap_here,
) -> Path:
    """Render the report of one audit into ``out_dir`` and return the path of ``index.html``.

    Args:
        context: the audit's results and the arrays to draw pictures from.
        out_dir: folder to write into; created if missing.
        limits: caps on the sample grids (see ``ReportConfig``).
        starmap: where the class sections' pictures are drawn (see ``build_page``).

    Raises:
        NotADirectoryError: ``out_dir`` exists and is not a folder.
    """
    folder = Path(out_dir).resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: exists and is not a folder; choose another out_dir.")
    folder.mkdir(parents=True, exist_ok=True)
    summary = build_summary(context)
    page = build_page(context, summary, limits, starmap)
    script, script_hash = page_script()
    html = environment().get_template("report.html").render(
        page=page, script=script, script_hash=script_hash
    )
    write_summary(folder / SUMMARY_FILE, summary)
    report = folder / REPORT_FILE
    write_text_atomic(report, html)
    return report


@functools.cache
def page_script() -> tuple[Markup, str]:
    """The page's inline script and its CSP source expression ``sha256-<base64>``.

    The script is a fixed file of this package (no dataset data), so it is inserted
    unescaped; the hash is computed over exactly the inserted text.
    """
    text = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    if "</" in text:
        raise ValueError("templates/report.js must not contain '</' (it would end the script).")
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return Markup(text), f"sha256-{digest}"


@functools.cache
def environment() -> jinja2.Environment:
    """The jinja2 environment: templates from the package, autoescape on, strict names."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    env.filters["pct"] = format_percent
    env.filters["signed"] = format_signed
    return env


def format_number(value: float | int | None, digits: int = 3) -> str:
    """A score for people: ``digits`` decimals, ``n/a`` for missing or non-finite values."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def format_percent(value: float | None, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage, ``n/a`` when missing."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100.0 * float(value):.{digits}f}%"


def format_signed(value: float | None, digits: int = 3) -> str:
    """A change with its sign (``+0.412``, ``-0.050``), ``n/a`` when missing."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):+.{digits}f}"
