"""Model correction for a found artifact: CAVs, P-/R-/RR-ClArC, before/after evaluation and export.

Typical use, after an audit flagged a cluster::

    from spray.correction import CorrectionConfig, correct_model
    report = correct_model(model, train_x, train_y, test_x, test_y, flag_rows, stamp=my_stamp)
    print(report.table())

Modules: ``cav`` (activations and CAV estimation), ``clarc`` (the corrections),
``evaluate`` (clean/attacked accuracy, artifact relevance, gate quality), ``export``
(weights + JSON, TorchScript), ``reaudit`` (the audit of the corrected model and whether
the flag is gone), ``page`` (``report.json`` and the correction's HTML page), ``errors``,
``run`` (the glue, the job's ``[correct]`` settings and the demo entry point ``correct_demo``)
and ``user`` (``correct_user``: the same for a job's own data and model, with a held-out split
and an attacked set from the job's stamping function or the artifact cut out of the flag).
"""

from spray.correction.cav import CAV, fit_cav, fit_direction, layer_activations, pool_activation
from spray.correction.clarc import (
    ClarcModel,
    ExplainableClarc,
    Gate,
    RRHistory,
    calibrate_threshold,
    p_clarc,
    project_activation,
    r_clarc,
    rr_clarc,
    split_model,
)
from spray.correction.errors import CAVError, CorrectionError
from spray.correction.evaluate import EvaluationResult, attack, evaluate, format_table, recovered_share
from spray.correction.export import ExportPaths, export_corrected, load_corrected
from spray.correction.reaudit import REAUDIT_FOLDER, match_flag, run_reaudit
from spray.correction.user import correct_user, cutout_mask, held_out_split
from spray.correction.run import (
    CorrectionConfig,
    CorrectionReport,
    correct_demo,
    correct_model,
    flag_entry,
    flag_rows,
    job_config,
    load_demo,
)

__all__ = [
    "CAV",
    "CAVError",
    "ClarcModel",
    "ExplainableClarc",
    "CorrectionConfig",
    "CorrectionError",
    "CorrectionReport",
    "EvaluationResult",
    "ExportPaths",
    "REAUDIT_FOLDER",
    "Gate",
    "RRHistory",
    "attack",
    "calibrate_threshold",
    "correct_demo",
    "correct_model",
    "correct_user",
    "cutout_mask",
    "evaluate",
    "export_corrected",
    "fit_cav",
    "fit_direction",
    "flag_entry",
    "flag_rows",
    "format_table",
    "held_out_split",
    "job_config",
    "layer_activations",
    "load_corrected",
    "load_demo",
    "match_flag",
    "p_clarc",
    "pool_activation",
    "project_activation",
    "r_clarc",
    "recovered_share",
    "rr_clarc",
    "run_reaudit",
    "split_model",
]
