"""Webhook notifications: a JSON POST per event, never a crash.

A job's webhook (``[schedule] webhook`` in its spec, or ``PUT /api/jobs/{id}/schedule``)
receives ``{"text": ..., "job": ..., "event": ..., ...}`` when a run raises a new flag or
one that changed materially since the previous run (``spray.service.matching``), and when
a run fails. ``text`` is what Slack's incoming webhooks (and Mattermost's, Teams'
connectors) display. A webhook that is slow or down is logged and skipped: the POST has a
short timeout and every error is caught.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from spray.service.matching import Fingerprint, best_match, material_changes

log = logging.getLogger(__name__)

#: Seconds a webhook may take to answer.
TIMEOUT = 5.0


def post(url: str, payload: dict[str, Any], timeout: float = TIMEOUT) -> bool:
    """POST ``payload`` as JSON to ``url``; False (and a logged warning) when it fails."""
    if not url.startswith(("http://", "https://")):
        log.warning("webhook %r skipped: not an http(s) URL", url)
        return False
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json", "User-Agent": "spray-service"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only, checked above)
            response.read(1024)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as error:
        log.warning("webhook %s failed: %s", url, error)
        return False


def flag_changes(previous: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """``(kind, flag, why)`` for each flag of ``current`` that is ``new`` (matches none of
    ``previous``) or ``changed`` (matches one but changed materially)."""
    before = [(Fingerprint.of_flag(flag), "") for flag in previous]
    found = []
    for flag in current:
        fingerprint = Fingerprint.of_flag(flag)
        hit = best_match(fingerprint, before)
        if hit is None:
            found.append(("new", flag, []))
            continue
        changes = material_changes(fingerprint, before[hit[0]][0])
        if changes:
            found.append(("changed", flag, changes))
    return found


def flags_message(job: str, run: str, changes: Sequence[tuple[str, dict[str, Any], list[str]]], link: str = "") -> dict[str, Any]:
    """The payload announcing new and changed flags of a run."""
    lines = [f"spray: {len(changes)} new or changed flag(s) in job {job} (run {run})"]
    for kind, flag, why in changes:
        score = flag.get("artifact_score")
        score_text = f"{score:.3f}" if isinstance(score, (int, float)) else "n/a"
        extra = f" ({'; '.join(why)})" if why else ""
        lines.append(f"- {kind}: class {flag.get('class_name')!s} {flag.get('space')} cluster {flag.get('cluster_id')}, {flag.get('size')} samples, score {score_text}{extra}")
    if link:
        lines.append(link)
    return {
        "text": "\n".join(lines), "event": "flags", "job": job, "run": run,
        "flags": [{"kind": kind, "class_name": flag.get("class_name"), "space": flag.get("space"), "cluster_id": flag.get("cluster_id"),
                   "size": flag.get("size"), "artifact_score": flag.get("artifact_score"), "changes": why} for kind, flag, why in changes],
    }


def failure_message(job: str, task_id: int, exit_code: int | None, tail: str) -> dict[str, Any]:
    """The payload announcing a failed run, with the end of its log."""
    last = "\n".join(tail.strip().splitlines()[-5:])
    return {
        "text": f"spray: the audit of job {job} failed (run {task_id}, exit {exit_code}).\n{last}",
        "event": "failed", "job": job, "task": task_id, "exit_code": exit_code,
    }
