"""The analysis stage on a Dask cluster: every (class, space) analysis is one task.

The client reads each task's rows (one class of one space, each HDF5 chunk once) and sends
them with the task, so workers need no shared filesystem; at most two tasks per worker
thread are in flight (:func:`spray.dask_tasks.bounded_map`), which bounds the memory of
the client to that many classes. A worker runs exactly the code of the single-process
path (:func:`spray.analysis.pipeline.run_task`) on exactly the same numbers, so the results
are identical to an analysis in one process (``tests/analysis/test_analysis_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import AnalysisTask, TaskRunner, run_task
from spray.analysis.result import ClassAnalysis
from spray.dask_tasks import ordered_map
from spray.store.rows import take_rows


def _run_loaded(vectors: np.ndarray, task: AnalysisTask, config: SprayConfig) -> ClassAnalysis:
    return run_task(vectors, task, config, loaded=True)


def dask_runner(client: Any) -> TaskRunner:
    """A :data:`~spray.analysis.pipeline.TaskRunner` that runs the tasks on ``client``'s workers
    (a ``distributed.Client``) and returns their results in the tasks' order."""

    def run(tasks: Sequence[AnalysisTask], sources: Mapping[str, Any], config: SprayConfig) -> list[ClassAnalysis]:
        calls = ((take_rows(sources[task.space], task.rows), task, config) for task in tasks)
        return ordered_map(client, _run_loaded, calls)

    return run
