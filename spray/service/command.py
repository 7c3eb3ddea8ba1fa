"""``spray serve``: the service over a reports folder, and its housekeeping options.

Without an option it serves (uvicorn, ``--host 127.0.0.1 --port 8000`` by default; with
``--workers N``, N processes share the port and the database, and one of them schedules). The
options do one thing each and exit: ``--create-token NAME`` prints a new API token once,
``--revoke-token NAME`` revokes one,
``--rebuild`` scans the reports folder into the database, ``--export-waivers FILE`` writes
the current review decisions as a waiver file, ``--import-waivers FILE`` loads one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: What ``spray serve`` prints when it starts.
BANNER = "spray service: http://{host}:{port}/ over {reports} (database {database})"


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser("serve", help="serve a reports folder: runs, trends, flag reviews the gate honours, schedules, a JSON API")
    serve.add_argument("--reports", type=Path, default=Path("reports"), help="reports folder to serve (default: reports)")
    serve.add_argument("--jobs", type=Path, default=None, help="folder of job specs the service may run and schedule (default: jobs, when it exists)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--workers", type=positive, default=1, help="server processes sharing the port and the database (default: 1; one of them schedules; a team server: one per core)")
    serve.add_argument("--threads", type=positive, default=4, help="requests a process works on at once; the rest wait in order (default: 4)")
    serve.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: sqlite:///<reports>/spray.db; e.g. postgresql+psycopg://user@host/spray)")
    serve.add_argument("--secure-cookies", action="store_true", help="send the session cookie over HTTPS only (behind a TLS proxy)")
    serve.add_argument("--base-url", default="", help="public URL of the service, used in notifications' links")
    serve.add_argument("--create-token", metavar="NAME", default=None, help="make an API token, print it once, store its hash, and exit")
    serve.add_argument("--revoke-token", metavar="NAME", default=None, help="revoke an API token (its sessions end too) and exit")
    serve.add_argument("--rebuild", action="store_true", help="scan the reports folder into the database (reviews kept) and exit")
    serve.add_argument("--export-waivers", metavar="FILE", type=Path, default=None, help="write the current reviews as a waiver file (.toml or .json) and exit")
    serve.add_argument("--import-waivers", metavar="FILE", type=Path, default=None, help="load the reviews of a waiver file into the database and exit")
    serve.add_argument("--job", default=None, help="with --export-waivers: only this job's reviews (its folder under the reports folder)")


def positive(text: str) -> int:
    """A whole number of at least 1 (``--workers``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Carry out ``spray serve``; returns the exit code."""
    from sqlalchemy import func, select

    from spray.service.app import CONFIG_VARIABLE, ServiceConfig, create_app, open_service, tune_collector
    from spray.service.models import Job, Run
    from spray.service.reviews import import_reviews, job_reviews
    from spray.service.scan import scan
    from spray.service.tokens import create_token, revoke_token
    from spray.service.waivers import read_waivers, write_waivers

    jobs_dir = args.jobs if args.jobs is not None else (Path("jobs") if Path("jobs").is_dir() else None)
    config = ServiceConfig(
        reports=args.reports, database_url=args.database_url, jobs_dir=jobs_dir,
        secure_cookies=args.secure_cookies, base_url=args.base_url, threads=args.threads,
    )
    housekeeping = args.create_token or args.revoke_token or args.rebuild or args.export_waivers or args.import_waivers
    if housekeeping:
        service = open_service(config)  # never schedules, so it leaves a live service's runs alone
        with service.sessions() as session:
            if args.import_waivers is not None:
                added = import_reviews(session, read_waivers(args.import_waivers))
                print(f"imported {added} review(s) from {args.import_waivers}")
            if args.rebuild:
                result = scan(session, service.reports)
                runs, jobs = session.scalar(select(func.count(Run.id))), session.scalar(select(func.count(Job.id)))
                print(f"rebuilt: {runs} run(s) of {jobs} job(s) in the database; {len(result.unreadable)} unreadable summary file(s)")
            if args.export_waivers is not None:
                path = write_waivers(args.export_waivers, job_reviews(session, args.job))
                print(f"waivers: {path}")
            if args.revoke_token:
                revoke_token(session, args.revoke_token)
                print(f"token {args.revoke_token} revoked")
            if args.create_token:
                secret = create_token(session, args.create_token)
                print(f"token {args.create_token} (shown once; only its hash is stored):\n{secret}")
        service.engine.dispose()
        return 0
    import uvicorn

    if args.workers == 1:
        app = create_app(config)
        tune_collector()
        database = app.state.service.engine.url.render_as_string(hide_password=True)
        print(BANNER.format(host=args.host, port=args.port, reports=app.state.service.reports, database=database), flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    # several processes: the database is prepared once here, then each worker builds its app
    service = open_service(config)
    database = service.engine.url.render_as_string(hide_password=True)
    service.engine.dispose()
    os.environ[CONFIG_VARIABLE] = config.to_environment()
    print(BANNER.format(host=args.host, port=args.port, reports=service.reports, database=database) + f", {args.workers} worker processes", flush=True)
    uvicorn.run("spray.service.app:app_from_environment", factory=True, workers=args.workers, host=args.host, port=args.port, log_level="warning")
    return 0
