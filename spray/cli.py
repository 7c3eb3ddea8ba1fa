"""The ``spray`` command line: ``demo``, ``audit``, ``check``, ``report``, ``validate``, ``correct``,
``index``, ``compare``, ``export-virelay`` and ``serve`` (``spray.service.command``).

Exit codes (``spray.verdict``): 0 success (for ``check``: the verdict is clean: every class
analysed in every space, no flag), 1 a flag was raised (``check`` only), 2 an error (bad job
spec, missing file, a model that does not fit the data, user code that raised or exited...),
3 incomplete (``check`` only: no flag, but something could not be checked), 4 busy (another
run holds the job's folder), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

from spray.correction.config import METHODS
from spray.verdict import EXIT_BUSY, EXIT_ERROR, EXIT_FLAGGED, EXIT_INCOMPLETE, EXIT_OK, describe_incomplete, describe_scope, exit_code

#: The conventional exit status of a command stopped by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
__all__ = ["EXIT_BUSY", "EXIT_ERROR", "EXIT_FLAGGED", "EXIT_INCOMPLETE", "EXIT_INTERRUPTED", "EXIT_OK", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spray", description="Dataset-wide Clever Hans detection for PyTorch image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage's progress")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="audit the embedded Clever Hans demo (dataset and model built in)")
    demo.add_argument("--output", default="reports", help="folder that receives demo/ (default: reports)")
    demo.add_argument("--n-per-class", type=int, default=600, help="training images per class (default: 600)")
    demo.add_argument("--clean", action="store_true", help="plant no artifact (a clean model should raise no flag)")

    for name, text in (
        ("audit", "run an audit from a job spec"),
        ("check", "audit, then exit 0 only when every class was checked and nothing flagged (1: flag, 2: error, 3: incomplete, 4: busy)"),
        ("report", "re-render the report of a job (stages that are up to date are reused)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job", type=Path, help="job spec (TOML)")
        sub.add_argument("--wait", action="store_true", help="wait for another run of the job to finish instead of exiting 4")

    validate = commands.add_parser("validate", help="check a job spec without running it")
    validate.add_argument("job", type=Path, help="job spec (TOML)")

    correct = commands.add_parser(
        "correct", help="correct the model of an audited job for one of its flags (ClArC), then audit the corrected model again"
    )
    correct.add_argument("job", type=Path, help="job spec (TOML) whose audit has run; its [correct] section sets the defaults")
    correct.add_argument("--method", choices=METHODS, default=None, help="correction (default: [correct] method, else r-clarc)")
    correct.add_argument("--flag", type=int, default=None, help="which flag of summary.json, 0 = the top one (default: [correct] flag, else 0)")
    correct.add_argument(
        "--layer", default=None,
        help="layer of the CAV (default: [correct] layer, else features.relu3 of the demo net, or the last of the audit's concept layers where a user model can be cut)",
    )
    correct.add_argument("--gate", choices=("class", "detector", "both"), default=None, help="R-ClArC gate (default: [correct] gate, else class)")
    correct.add_argument("--wait", action="store_true", help="wait for another run of the job to finish instead of exiting 4")
    correct.add_argument(
        "--reaudit", action=argparse.BooleanOptionalAction, default=None,
        help="audit the corrected model again and report whether the flag is gone (default: [correct] reaudit, else on)",
    )

    index = commands.add_parser("index", help="write reports/index.html listing every audit below a folder")
    index.add_argument("root", nargs="?", type=Path, default=Path("reports"), help="reports folder (default: reports)")

    compare = commands.add_parser("compare", help="compare two audits: flags that appeared, disappeared, moved")
    compare.add_argument("before", type=Path, help="folder of the earlier audit (holds summary.json)")
    compare.add_argument("after", type=Path, help="folder of the later audit")
    compare.add_argument("--output", type=Path, required=True, help="folder that receives compare.html and compare.json")

    export = commands.add_parser("export-virelay", help="write an audit as a ViRelAy project")
    export.add_argument("job", type=Path, help="job spec (TOML) whose audit has run")
    export.add_argument("--output", type=Path, default=None, help="folder (default: <audit>/virelay)")

    from spray.service.command import add_parser as add_serve

    add_serve(commands)
    return parser


def _run_other(args: argparse.Namespace) -> int:
    """The commands that work on finished audits: correct, index, compare, export-virelay."""
    from spray.jobs import load_job

    if args.command == "index":
        from spray.report.index import write_index

        print(f"index: {write_index(args.root)}")
    elif args.command == "compare":
        from spray.report.compare import write_comparison

        print(f"comparison: {write_comparison(args.before, args.after, args.output)}")
    elif args.command == "export-virelay":
        from spray.audit import open_job_data
        from spray.report.virelay import export_virelay

        spec = load_job(args.job)
        data = open_job_data(spec)
        print(f"ViRelAy project: {export_virelay(spec.folders.root, args.output, source=data.source)}")
    else:
        return _run_correct(args)
    return EXIT_OK


def _run_correct(args: argparse.Namespace) -> int:
    """``spray correct``: ClArC for one flag of the job's audit, the re-audit, and what they
    found; the exit code is the outcome's (0 fixed, 1 not fixed, 3 unverified)."""
    from spray.correction.job import correct_job
    from spray.correction.page import PAGE_FILE
    from spray.correction.reaudit import describe_outcome
    from spray.correction.run import flag_entry, job_config
    from spray.jobs import load_job
    from spray.store.folders import SUMMARY_FILE
    from spray.store.lock import job_lock

    spec = load_job(args.job)
    config = job_config(spec, method=args.method, flag=args.flag, layer=args.layer, gate=args.gate, reaudit=args.reaudit)
    with job_lock(spec.folders.root, wait=args.wait):
        flag = flag_entry(spec.folders.latest_report(spec.job.dated) / SUMMARY_FILE, config.flag)
        report = correct_job(spec, flag, config, progress=not args.no_progress)
    if report.evaluation_set is not None:
        print(f"attacked set: {report.evaluation_set['attack']['description']}")
    print(report.table())
    print(f"recovered share of the attacked-accuracy loss: {report.recovered:.3f}; clean accuracy change: {report.clean_change:+.4f}")
    if report.reaudit is not None:
        print(describe_outcome(report.reaudit))
        print(f"re-audit report: {spec.folders.correction(config.method) / report.reaudit['report']}")
    if report.unseen is not None:
        from spray.correction.unseen import describe

        print(describe(report.unseen))
    if report.export is not None:
        print(f"exported: {report.export.folder}")
        print(f"correction page: {report.export.folder / PAGE_FILE}")
    outcome = report.outcome or report.judge()
    print(outcome.describe())
    return outcome.exit_code


def _print_summary(result: object, elapsed: float) -> None:
    from spray.audit import AuditResult

    assert isinstance(result, AuditResult)
    flags = result.summary["flags"]
    print(f"report:  {result.report}")
    print(f"summary: {result.summary_path}")
    for key, value in result.facts.items():
        print(f"{key}: {value}")
    print(f"flags: {len(flags)}")
    for flag in flags[:5]:
        print(f"  class {flag['class_name']!r} cluster {flag['cluster_id']}: {flag['size']} samples, score {flag['artifact_score']:.3f}")
    complete = "every class checked" if result.summary["complete"] else "NOT every class checked"
    print(f"verdict: {result.summary['verdict']} ({complete})")
    for line in describe_incomplete(result.summary)[:20]:
        print(f"  {line}")
    scope = describe_scope(result.summary)
    if scope:
        print(f"seen as one strategy (nothing to compare within the class): {len(scope)} class(es)")
        for line in scope[:10]:
            print(f"  {line}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"time: {elapsed:.1f}s ({stages}); peak memory {peak_mib:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spray`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from spray.jobs import JobSpecError, demo_job, load_job
    from spray.store.common import StoreError
    from spray.store.lock import JobBusyError

    started = time.perf_counter()
    try:
        if args.command in ("correct", "index", "compare", "export-virelay"):
            return _run_other(args)
        if args.command == "serve":
            from spray.service.command import run as serve

            return serve(args)
        if args.command == "demo":
            spec = demo_job(args.output, n_per_class=args.n_per_class, artifact_fraction=0.0 if args.clean else 0.3)
        else:
            spec = load_job(args.job)
        if args.command == "validate":
            print(f"{args.job}: valid; output goes to {spec.output_dir}")
            return EXIT_OK
        from spray.audit import run_audit

        result = run_audit(spec, progress=not args.no_progress, wait=getattr(args, "wait", False))
    except JobBusyError as error:
        print(f"spray: busy: {error}", file=sys.stderr)
        return EXIT_BUSY
    except KeyboardInterrupt:
        print("spray: interrupted; the job's summary.json says verdict 'error' until it runs again.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except JobSpecError as error:
        print(f"spray: error: {error}", file=sys.stderr)
        if args.command in ("audit", "check", "report"):
            _record_spec_failure(args.job, str(error))
        return EXIT_ERROR
    except (StoreError, ValueError, OSError) as error:
        print(f"spray: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except BaseException as error:  # anything else, SystemExit from user code included, is an error (exit 2), never a verdict
        logging.getLogger("spray").debug("unexpected error", exc_info=True)
        print(f"spray: error: {_describe_unexpected(error)} (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR
    _print_summary(result, time.perf_counter() - started)
    if args.command == "check" and spec.check.waivers:
        from spray.service.check import gate_with_waivers

        try:
            return gate_with_waivers(spec, result.summary, result.summary_path)
        except (ValueError, OSError) as error:  # an unreadable waiver file: no verdict
            print(f"spray: error: {error}", file=sys.stderr)
            return EXIT_ERROR
    return exit_code(result.summary) if args.command == "check" else EXIT_OK


def _record_spec_failure(job_file: Path, error: str) -> None:
    """Leave verdict ``error`` in the job's folder when its spec is invalid, so an earlier
    ``summary.json`` is not read as this run's verdict (see ``spray.report.failed``)."""
    from spray.jobs import declared_job
    from spray.report.failed import record_failure

    job = declared_job(job_file)
    if job is not None:
        record_failure(job.folder(Path(job_file).resolve().parent), job.name, job.dated, f"the job spec is invalid: {error}")


def _describe_unexpected(error: BaseException) -> str:
    """An error the command did not expect, in words; a ``SystemExit`` can only come from user code."""
    if isinstance(error, SystemExit):
        return (
            f"user code (a model, dataset or stamp entry point of the job) called sys.exit({error.code!r}); "
            "nothing was audited. Raise an exception there instead, or remove the call"
        )
    return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
