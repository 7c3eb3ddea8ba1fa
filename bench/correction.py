"""Q2 — correction: clean and attacked accuracy before/after P-, R- and RR-ClArC.

Cases:

* **demo, stamped rows**: the demo job's model; the CAV comes from the training rows that
  truly carry the tag.
* **demo, audit flag** (full run, when ``reports/demo/summary.json`` exists): the CAV comes
  from the members of the audit's top flagged cluster, as a user would do it.
* **MNIST planted**: a small CNN trained on 10k MNIST digits with an artifact (corner patch,
  text-like tag, border) on 30% of one class.

For each case and method: clean and attacked accuracy (artifact stamped on every test image
of the other classes), the share of the attacked-accuracy loss recovered, the clean-accuracy
change, the share of positive LRP relevance on the artifact (attacked images, artifact-class
logit), the R-ClArC gate's firing rates and precision, and the method's time (CAV + fitting).

Goal: R-ClArC or RR-ClArC recovers >= 80% of the loss with clean accuracy dropping <= 0.5 points.

    python3 bench/correction.py            # full: demo job (jobs/demo.toml), audit flag, 3 MNIST artifacts
    python3 bench/correction.py --quick    # small demo (300 per class), one MNIST artifact, fewer epochs
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mnist import MnistTrainConfig, artifact_region, load_mnist, load_or_train_mnist_model, make_planted, stamper  # noqa: E402
from spray.correction import CorrectionConfig, correct_model, evaluate, format_table  # noqa: E402
from spray.correction.cav import fit_cav  # noqa: E402
from spray.correction.evaluate import recovered_share  # noqa: E402
from spray.jobs import demo_job, load_job  # noqa: E402
from spray.models.demo import DEMO_CAV_LAYER  # noqa: E402
from spray.store.folders import SUMMARY_FILE  # noqa: E402

CACHE = REPO / ".bench-cache" / "correction"


def methods(quick: bool, layer: str, rr_samples: int | None) -> list[tuple[str, CorrectionConfig]]:
    """The compared corrections, all at ``layer`` with a flattened pattern CAV."""
    base = CorrectionConfig(layer=layer, relevance_samples=32 if quick else 64, rr_max_samples=rr_samples)
    return [
        ("P-ClArC", replace(base, method="p-clarc")),
        ("R-ClArC class gate", replace(base, method="r-clarc", gate="class")),
        ("R-ClArC detector gate", replace(base, method="r-clarc", gate="detector")),
        ("R-ClArC class+detector", replace(base, method="r-clarc", gate="both")),
        ("RR-ClArC", replace(base, method="rr-clarc", rr_epochs=2 if quick else 3)),
    ]


def run_case(title: str, model, train_x, train_y, test_x, test_y, rows, stamp, mask, configs, class_id=None) -> dict:
    """Evaluate the original model once, then every correction; print and return the rows."""
    print(f"\n## {title}", flush=True)
    first = configs[0][1]
    start = time.perf_counter()
    cav = fit_cav(model, train_x, train_y, rows, first.layer, class_id=class_id, pooling=first.pooling, random_state=first.seed)
    cav_seconds = time.perf_counter() - start
    before = evaluate(model, test_x, test_y, cav.class_id, stamp, mask=mask, name="original", relevance_samples=first.relevance_samples)
    print(f"artifact rows: {len(rows)} (class {cav.class_id}); CAV {cav.layer} {cav.pooling} {cav.estimator}: held-out AUC {cav.auc:.3f} ({cav_seconds:.1f} s)")
    results, entries = [before], []
    for name, config in configs:
        report = correct_model(model, train_x, train_y, test_x, test_y, rows, stamp=stamp, mask=mask, config=config, before=before, cav=cav, class_id=class_id)
        report.after.name = name
        report.after.seconds = report.seconds["correction"] + cav_seconds
        results.append(report.after)
        entries.append({"method": name, **report.after.to_dict(), "recovered": report.recovered, "clean_change": report.clean_change,
                        "threshold": report.threshold, "detector_auc": report.detector_auc})
        print(f"  {name}: recovered {100 * report.recovered:.1f}%, clean {100 * report.clean_change:+.1f} pt ({report.after.seconds:.1f} s)", flush=True)
    print()
    print(format_table(results, baseline=before))
    met = [r.name for r in results[1:] if recovered_share(before, r) >= 0.8 and r.clean_accuracy - before.clean_accuracy >= -0.005]
    print(f"goal (>= 80% recovered, clean drop <= 0.5 pt) met by: {', '.join(met) or 'none'}")
    return {"case": title, "cav_auc": cav.auc, "n_rows": int(len(rows)), "before": before.to_dict(), "methods": entries}


def demo_cases(quick: bool) -> list[dict]:
    from spray.correction.job import load_job_inputs

    if quick:
        spec = demo_job(output=CACHE, name="demo-quick", n_per_class=300)
        spec = replace(spec, model=replace(spec.model, epochs=6))
    else:
        spec = load_job(REPO / "jobs" / "demo.toml")
    start = time.perf_counter()
    inputs = load_job_inputs(spec)
    planted = inputs.planted
    te = planted.test
    print(f"demo: {len(inputs.labels)} training / {len(te.labels)} test images, model cache {spec.folders.model_cache} ({time.perf_counter() - start:.1f} s)")
    configs = methods(quick, DEMO_CAV_LAYER, None)
    out = [run_case(f"demo ({spec.data.n_per_class} per class), CAV from the truly stamped rows", inputs.model,
                    inputs.display, inputs.labels, te.images, te.labels, planted.rows, planted.stamp, planted.region, configs)]
    summary_path = spec.folders.root / SUMMARY_FILE
    if not quick:
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary.get("flags"):
                flag = summary["flags"][0]
                rows = np.asarray(flag["member_rows"], dtype=np.int64)
                title = (f"demo, CAV from the audit's top flag (class {flag['class_name']}, {flag['space']}, cluster {flag['cluster_id']}, "
                         f"precision {flag.get('precision')}, recall {flag.get('recall')})")
                out.append(run_case(title, inputs.model, inputs.display, inputs.labels, te.images, te.labels, rows, planted.stamp,
                                    planted.region, configs, class_id=int(flag["class_index"])))
            else:
                print(f"\n{summary_path} has no flags: audit-flag case skipped.")
        else:
            print(f"\n{summary_path} not found (run `spray audit jobs/demo.toml`): audit-flag case skipped.")
    return out


def mnist_cases(quick: bool) -> list[dict]:
    data = load_mnist()
    kinds = ("patch",) if quick else ("patch", "tag", "border")
    target = 3
    n_train = 5000 if quick else 10000
    out = []
    for kind in kinds:
        planted = make_planted(data, kind, target, fraction=0.3, n_train=n_train, n_test=2000 if quick else None, seed=0)
        start = time.perf_counter()
        model, trained = load_or_train_mnist_model(planted.train_images, planted.train_labels, MnistTrainConfig(epochs=2 if quick else 3))
        print(f"\nMNIST {kind}: model {'trained' if trained else 'from cache'} in {time.perf_counter() - start:.1f} s")
        configs = methods(quick, "features.relu2", 3000 if quick else 5000)
        out.append(run_case(
            f"MNIST, {kind} on 30% of digit {target} ({n_train} training images), CAV from the stamped rows",
            model, planted.train_images, planted.train_labels, planted.test_images, planted.test_labels,
            np.flatnonzero(planted.stamped), stamper(kind), artifact_region(kind), configs,
        ))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small demo, one MNIST artifact, fewer epochs")
    parser.add_argument("--skip-mnist", action="store_true", help="only the demo cases")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    start = time.perf_counter()
    print("# Q2 correction benchmark")
    print(f"command: python3 bench/correction.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, python {platform.python_version()}")
    print("columns: accuracies in %; recovered = (att_after - att_before) / (clean_before - att_before); "
          "tag rel. = share of positive LRP relevance (artifact-class logit) inside the artifact mask; "
          "gate = firing rate on attacked / clean images of the other classes and precision; time = CAV + correction fitting")
    results = demo_cases(args.quick)
    if not args.skip_mnist:
        results += mnist_cases(args.quick)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
