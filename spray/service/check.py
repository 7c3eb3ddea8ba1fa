"""``spray check`` with a waiver file: the gate that honours reviews, without the service.

When a job spec names a waiver file (``[check] waivers = "path"``, relative to the job
file), ``spray check`` reads its reviews (those of the job's folder name), applies the
gate of ``spray.service.gate`` to the new ``summary.json``, prints the verdict and one line
per flag (which review waived it, or why it fails), writes the same as ``gate.json`` beside
the summary, and exits with the gate's code. The service's API answers the same for the
same reviews (``GET /api/jobs/{id}/gate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spray.jobs import JobSpec
from spray.service.gate import Review, evaluate
from spray.service.waivers import read_waivers
from spray.store.common import write_text_atomic

#: The gate's verdict, written beside ``summary.json`` by ``spray check`` with waivers.
GATE_FILE = "gate.json"


def reviews_of_job(reviews: list[Review], folder_name: str) -> list[Review]:
    """The reviews of the job whose output folder is called ``folder_name``."""
    return [review for review in reviews if review.job == folder_name or review.job.endswith("/" + folder_name)]


def gate_with_waivers(spec: JobSpec, summary: dict[str, Any], summary_path: Path) -> int:
    """Print and write the gate's verdict on ``summary`` given the spec's waiver file; its exit code."""
    path = spec.resolve(spec.check.waivers)
    if not path.exists():
        print(f"waivers: {path} does not exist; no flag is waived")
    reviews = reviews_of_job(read_waivers(path), spec.output_dir.name)
    result = evaluate(summary, reviews)
    for line in result.lines():
        print(line)
    record = {"waivers": str(path), **result.as_json()}
    write_text_atomic(Path(summary_path).with_name(GATE_FILE), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return result.exit_code
