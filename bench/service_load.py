"""S5: concurrent clients against a local ``spray serve`` over a 60k-sample audit (not a test).

Builds a reports folder holding one job with ``--runs`` dated runs of a synthetic audit
(``--classes`` x ``--per-class`` samples; schema of ``spray.report.summary``: every class
clustered, every cluster with its member ids, ``--flags`` flags of thousands of members
each, a small static ``index.html`` per run), creates a token with ``spray serve
--create-token``, starts ``spray serve --workers N`` as a real subprocess (uvicorn on 127.0.0.1, a free
port, SQLite in WAL mode) and lets ``--clients`` threads work for ``--seconds``: each
request is a page read (jobs list, job page, newest run's page, trend page, gate API,
flags API) or, with probability ``--review-share``, a review posted through the API with the
bearer token. Then it counts the reviews the service holds (through the API and in the
database file) against the reviews it was told were recorded (201): none may be lost.

    python3 bench/service_load.py --clients 20 --seconds 30

Prints a markdown table: requests, requests/s, p50/p99/max latency per request kind and
per group (page reads, review posts), errors (non-2xx or transport failures), reviews lost,
and the load average of the machine before and after (the numbers depend on what else it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

#: Page reads, by name: the path (filled in with the job's, newest run's ids).
READS = {
    "jobs page": "/",
    "job page": "/jobs/{job}",
    "run page": "/runs/{run}",
    "trend page": "/jobs/{job}/trend",
    "gate API": "/api/jobs/{job}/gate",
    "flags API": "/api/runs/{run}/flags",
}
REVIEW = "review post"
#: Statuses posted, in turn (``legitimate`` carries the reason it needs).
STATUSES = ("legitimate", "needs_look", "confirmed_shortcut")
CLUSTERS_PER_CLASS = 8


def class_name(index: int) -> str:
    return f"class-{index}"


def synthetic_summary(job: str, created: str, n_classes: int, per_class: int, n_flags: int, shift: int) -> dict[str, Any]:
    """A ``summary.json`` (schema version 1) of an audit of ``n_classes * per_class`` samples.

    Every class is split into ``CLUSTERS_PER_CLASS`` clusters listed with their member ids
    and rows (as a real audit lists them); the first cluster of the first ``n_flags``
    classes is flagged, with a third to a half of the class as members. ``shift`` moves
    each flag's members by a few samples, as a later run of the same model would.
    """
    classes, flags = [], []
    for index in range(n_classes):
        name = class_name(index)
        rows = list(range(index * per_class, (index + 1) * per_class))
        flagged_size = per_class // 3 + (index * per_class) // (6 * max(1, n_classes))
        start = min(shift, per_class - flagged_size)
        members = rows[start : start + flagged_size]
        rest = rows[:start] + rows[start + flagged_size :]
        groups = [members] + [rest[part :: CLUSTERS_PER_CLASS - 1] for part in range(CLUSTERS_PER_CLASS - 1)]
        clusters = []
        for cluster_id, group in enumerate(groups):
            is_flag = cluster_id == 0 and index < n_flags
            score = round(0.95 - 0.02 * index, 4) if is_flag else round(0.1 + 0.05 * cluster_id, 4)
            clusters.append({
                "cluster_id": cluster_id, "size": len(group), "artifact_score": score, "flagged": is_flag,
                "candidate": is_flag, "confirmation": {"status": "confirmed", "reason": "the evidence moves other classes"} if is_flag else None,
                "score_components": {"focus": score, "outlier": score}, "member_ids": [f"train/{row:06d}_{name}" for row in group],
                "member_rows": group, "accuracy": 0.98,
            })
        classes.append({
            "class_index": index, "class_name": name, "space": "heatmap", "analysable": True, "reason": "",
            "n_samples": per_class, "n_clusters": CLUSTERS_PER_CLASS,
            "eigenvalues": [round(0.01 * value, 4) for value in range(CLUSTERS_PER_CLASS + 1)], "clusters": clusters,
        })
        if index < n_flags:
            flagged = clusters[0]
            flags.append({
                "class_index": index, "class_name": name, "space": "heatmap", "cluster_id": 0, "size": flagged["size"],
                "artifact_score": flagged["artifact_score"], "member_ids": flagged["member_ids"], "member_rows": flagged["member_rows"],
                "accuracy": 0.98, "candidate": True, "confirmation": flagged["confirmation"],
                "revealed_by": [{"class_index": index, "space": "heatmap", "cluster_id": 0, "artifact_score": flagged["artifact_score"], "jaccard": 1.0}],
            })
    flags.sort(key=lambda item: (-item["artifact_score"], item["class_index"]))
    return {
        "schema_version": 1, "job": job, "created": created, "verdict": "flagged" if flags else "clean", "complete": True,
        "unanalysed": [], "skipped_images": 0, "untested_flags": 0, "threshold": 0.75, "n_samples": n_classes * per_class,
        "class_names": [class_name(index) for index in range(n_classes)], "metadata": {"model": "synthetic", "samples": n_classes * per_class},
        "artifact_check": None, "ground_truth": None, "classes": classes, "flags": flags,
    }


def build_reports(folder: Path, runs: int, n_classes: int, per_class: int, n_flags: int) -> Path:
    """``folder/reports/load/runs/<UTC time>/`` with ``runs`` synthetic audits; the reports folder."""
    reports = folder / "reports"
    first = datetime(2026, 1, 1, 2, 0, tzinfo=timezone.utc)
    for number in range(runs):
        moment = first + timedelta(days=number)
        run = reports / "load" / "runs" / moment.strftime("%Y%m%dT%H%M%SZ")
        run.mkdir(parents=True, exist_ok=True)
        content = synthetic_summary("load", moment.isoformat(), n_classes, per_class, n_flags, shift=3 * number)
        (run / "summary.json").write_text(json.dumps(content), encoding="utf-8")
        (run / "index.html").write_text(f"<!DOCTYPE html><title>load {run.name}</title><p>static report</p>", encoding="utf-8")
    return reports


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) a process and its live children (``--workers``) have
    used so far, from ``/proc`` (0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(process_cpu(int(child)) for child in children)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spray(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "spray.cli", *arguments]


def create_token(reports: Path) -> str:
    """A token made by ``spray serve --create-token`` (the secret is its output's last line)."""
    done = subprocess.run(spray("serve", "--reports", str(reports), "--create-token", "bench"), capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def start_server(reports: Path, port: int, log: Path, workers: int) -> subprocess.Popen[bytes]:
    """``spray serve --workers N`` on 127.0.0.1:``port``, once it answers."""
    with log.open("wb") as stream:
        process = subprocess.Popen(spray("serve", "--reports", str(reports), "--port", str(port), "--workers", str(workers)), stdout=stream, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"spray serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/jobs", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("spray serve did not answer within 120 s")


@dataclass
class Tally:
    """What the clients saw: latencies per kind, errors, reviews recorded."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_samples: list[str] = field(default_factory=list)
    recorded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float, problem: str | None, recorded: bool) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            if problem is not None:
                self.errors[kind] += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(f"{kind}: {problem}")
            if recorded:
                self.recorded += 1


def client(number: int, base: str, paths: dict[str, str], flag_ids: list[int], token: str, stop_at: float, review_share: float, tally: Tally) -> None:
    """One client: requests one after the other (keep-alive) until ``stop_at``."""
    chance = random.Random(number)
    headers = {"Authorization": f"Bearer {token}"}
    count = 0
    with httpx.Client(base_url=base, timeout=60) as http:
        while time.monotonic() < stop_at:
            count += 1
            if chance.random() < review_share:
                kind = REVIEW
                status = STATUSES[count % len(STATUSES)]
                body = {"status": status, "reviewer": f"client-{number}", "reason": "the tag is the product's logo" if status == "legitimate" else "", "comment": f"review {count} of client {number}"}
                request = ("POST", f"/api/flags/{chance.choice(flag_ids)}/reviews", body)
            else:
                kind = chance.choice(list(paths))
                request = ("GET", paths[kind], None)
            started = time.perf_counter()
            problem, recorded = None, False
            try:
                response = http.request(request[0], request[1], json=request[2], headers=headers if request[2] is not None else None)
                if not 200 <= response.status_code < 300:
                    problem = f"HTTP {response.status_code} {response.text[:200]}"
                recorded = kind == REVIEW and response.status_code == 201
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
            tally.add(kind, time.perf_counter() - started, problem, recorded)


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (nearest rank), in milliseconds."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(share * len(ordered) + 0.5)) - 1))
    return ordered[rank] * 1000


def table(tally: Tally, seconds: float) -> str:
    """The markdown table of the run."""
    lines = ["| requests | count | req/s | p50 ms | p99 ms | max ms | errors |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(name: str, kinds: list[str]) -> None:
        values = [value for kind in kinds for value in tally.latencies.get(kind, [])]
        errors = sum(tally.errors.get(kind, 0) for kind in kinds)
        if values:
            lines.append(f"| {name} | {len(values)} | {len(values) / seconds:.1f} | {percentile(values, 0.5):.0f} | {percentile(values, 0.99):.0f} | {max(values) * 1000:.0f} | {errors} |")

    for kind in READS:
        row(kind, [kind])
    row("**page reads**", list(READS))
    row("**review posts**", [REVIEW])
    row("**all**", [*READS, REVIEW])
    return "\n".join(lines)


def held_reviews(base: str, flag_ids: list[int], database: Path) -> tuple[int, int]:
    """The reviews of ``flag_ids`` as the API lists them, and the rows of the database's ``reviews`` table."""
    through_api = sum(len(httpx.get(f"{base}/api/flags/{flag_id}/reviews", timeout=120).json()) for flag_id in flag_ids)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        in_database = int(connection.execute("SELECT count(*) FROM reviews").fetchone()[0])
    return through_api, in_database


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default: 20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long they work (default: 30)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthetic audit (default: 10)")
    parser.add_argument("--per-class", type=int, default=6000, help="samples per class (default: 6000)")
    parser.add_argument("--flags", type=int, default=6, help="flagged classes, one flag each (default: 6)")
    parser.add_argument("--runs", type=int, default=5, help="dated runs of the job (default: 5)")
    parser.add_argument("--workers", type=int, default=2, help="server processes, spray serve --workers (default: 2, one per core here)")
    parser.add_argument("--review-share", type=float, default=0.2, help="share of requests that post a review (default: 0.2)")
    parser.add_argument("--out", type=Path, default=None, help="folder to build in (default: a temporary one, removed)")
    args = parser.parse_args()

    holder = None if args.out is not None else tempfile.TemporaryDirectory(prefix="spray-s5-")
    folder = args.out if args.out is not None else Path(holder.name)  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reports = build_reports(folder, args.runs, args.classes, args.per_class, args.flags)
    size = sum(path.stat().st_size for path in reports.rglob("summary.json")) / 2**20
    print(f"built {args.runs} runs of {args.classes * args.per_class} samples ({size:.1f} MiB of summary.json) in {time.perf_counter() - started:.1f}s", flush=True)
    token = create_token(reports)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = start_server(reports, port, folder / "serve.log", args.workers)
    print(f"spray serve answered after {time.perf_counter() - started:.1f}s on {base}", flush=True)
    try:
        job = httpx.get(f"{base}/api/jobs", timeout=60).json()[0]
        run = httpx.get(f"{base}/api/jobs/{job['id']}/runs", timeout=60).json()[0]
        flag_ids = [flag["id"] for flag in httpx.get(f"{base}/api/runs/{run['id']}/flags", timeout=60).json()]
        paths = {kind: path.format(job=job["id"], run=run["id"]) for kind, path in READS.items()}
        for path in paths.values():  # one warm-up read each (first parse, matplotlib import)
            httpx.get(base + path, timeout=60).raise_for_status()
        before = os.getloadavg()
        server_cpu, client_cpu = process_cpu(server.pid), own_cpu()
        tally = Tally()
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=client, args=(number, base, paths, flag_ids, token, stop_at, args.review_share, tally))
            for number in range(args.clients)
        ]
        begun = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - begun
        after = os.getloadavg()
        server_cpu, client_cpu = process_cpu(server.pid) - server_cpu, own_cpu() - client_cpu
        through_api, in_database = held_reviews(base, flag_ids, reports / "spray.db")
    finally:
        server.terminate()
        server.wait(timeout=30)
    lost = tally.recorded - min(through_api, in_database)
    print()
    print(f"{args.clients} clients for {elapsed:.1f}s against spray serve --workers {args.workers} over {args.classes * args.per_class} samples "
          f"({args.classes} classes, {args.flags} flags, {args.runs} runs), {args.review_share:.0%} review posts")
    print()
    print(table(tally, elapsed))
    print()
    print(f"reviews: {tally.recorded} recorded (201); the API lists {through_api}, the database holds {in_database}; lost: {lost}")
    print(f"load average (1, 5, 15 min): before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}; {os.cpu_count()} CPUs")
    print(f"CPU used during the run: server {server_cpu:.1f}s ({server_cpu / elapsed:.2f} cores), clients {client_cpu:.1f}s ({client_cpu / elapsed:.2f} cores)")
    for sample in tally.error_samples:
        print(f"error: {sample}")
    if holder is not None:
        holder.cleanup()
    errors = sum(tally.errors.values())
    return 0 if errors == 0 and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
