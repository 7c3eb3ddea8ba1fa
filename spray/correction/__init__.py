"""Model correction for a found artifact: CAVs, P-/R-/RR-ClArC, before/after evaluation and export.

Typical use, after an audit flagged a cluster::

    from spray.correction import CorrectionConfig, correct_model
    report = correct_model(model, train_x, train_y, test_x, test_y, flag_rows, stamp=my_stamp)
    print(report.table())

Modules: ``cav`` (activations and CAV estimation), ``clarc`` (the corrections),
``evaluate`` (clean/attacked accuracy, artifact relevance, gate quality), ``export``
(weights + JSON, TorchScript), ``reaudit`` (the audit of the corrected model and whether
the flag is gone), ``page`` (``report.json`` and the correction's HTML page), ``errors``,
``run`` (the glue: ``correct_model`` for any model and data, the job's ``[correct]`` settings and
its flag), ``job`` (``correct_job``: what ``spray correct`` runs, on a job's data and model as
the audit opened them) and ``user`` (the evaluation data of data without a planted artifact: a
held-out split and an attacked set from the job's stamping function or the flag's own
evidence, :mod:`spray.correction.attack`).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it. Imported on first use, so that importing a
#: light submodule (``spray.correction.config``) does not load torch and every correction.
_EXPORTS: dict[str, str] = {
    "CAV": "spray.correction.cav",
    "CAVError": "spray.correction.errors",
    "ClarcModel": "spray.correction.clarc",
    "CorrectionConfig": "spray.correction.config",
    "CorrectionError": "spray.correction.errors",
    "CorrectionReport": "spray.correction.run",
    "EvaluationPlan": "spray.correction.run",
    "EvaluationResult": "spray.correction.evaluate",
    "ExplainableClarc": "spray.correction.clarc",
    "ExportPaths": "spray.correction.export",
    "Gate": "spray.correction.clarc",
    "RRHistory": "spray.correction.clarc",
    "attack": "spray.correction.evaluate",
    "calibrate_threshold": "spray.correction.clarc",
    "correct_job": "spray.correction.job",
    "correct_model": "spray.correction.run",
    "cutout_mask": "spray.correction.user",
    "evaluate": "spray.correction.evaluate",
    "export_corrected": "spray.correction.export",
    "fit_cav": "spray.correction.cav",
    "fit_direction": "spray.correction.cav",
    "flag_entry": "spray.correction.run",
    "flag_rows": "spray.correction.run",
    "format_table": "spray.correction.evaluate",
    "held_out_evaluation": "spray.correction.user",
    "held_out_split": "spray.correction.user",
    "job_config": "spray.correction.run",
    "layer_activations": "spray.correction.cav",
    "load_corrected": "spray.correction.export",
    "load_job_inputs": "spray.correction.job",
    "match_flag": "spray.correction.reaudit",
    "p_clarc": "spray.correction.clarc",
    "pool_activation": "spray.correction.cav",
    "project_activation": "spray.correction.clarc",
    "r_clarc": "spray.correction.clarc",
    "recovered_share": "spray.correction.evaluate",
    "rr_clarc": "spray.correction.clarc",
    "run_reaudit": "spray.correction.reaudit",
    "split_model": "spray.correction.clarc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public name ``name``, imported from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
