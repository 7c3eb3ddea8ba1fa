"""torch.fx traces and model runs in other threads are kept apart (``spray.attribution.lrp.TRACING_GATE``)."""

from __future__ import annotations

import threading
import time

import torch

from spray.attribution.lrp import _TracingGate
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings
from spray.models.demo import DemoNet


def test_a_trace_waits_for_running_explanations_and_runs_wait_for_a_trace() -> None:
    gate, order = _TracingGate(), []
    running_started, trace_done = threading.Event(), threading.Event()

    def run() -> None:
        with gate.running():
            running_started.set()
            time.sleep(0.3)
            order.append("run ended")

    def trace() -> None:
        running_started.wait()
        with gate.tracing():
            order.append("trace")
            time.sleep(0.3)
        trace_done.set()

    threads = [threading.Thread(target=run), threading.Thread(target=trace)]
    for thread in threads:
        thread.start()
    running_started.wait()
    time.sleep(0.05)
    with gate.running():  # a second run may not start while the trace waits or runs... unless it got in first
        order.append("second run")
    for thread in threads:
        thread.join()
    assert order.index("run ended") < order.index("trace")
    assert trace_done.is_set()


def test_explaining_in_threads_while_others_compile_the_fast_engine_gives_the_same_results() -> None:
    torch.manual_seed(0)
    net, x, targets = DemoNet(4).eval(), torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    settings = AttributionSettings(layers=("features.conv3",), device="cpu")
    with make_explainer(net, settings) as explainer:
        reference = explainer.explain(x, targets).heatmaps
    results, errors = [], []

    def work() -> None:
        try:
            for _ in range(3):
                with make_explainer(net, settings) as each:
                    results.append(each.explain(x, targets).heatmaps)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 12 and all(torch.equal(result, reference) for result in results)
