"""Q3: held-out detection. Does spray flag the shortcuts a model relies on, and only those?

Cases come from ``bench/cases.py`` (artifact kinds x fractions x regimes x architectures x
datasets, clean models, legitimately multi-modal classes; a dev and a test split). For each
case: explain every training image with LRP (``epsilon_plus_flat``; concept relevances of
the architecture's two concept layers from the same pass), run spray's analysis in the
audit's default spaces (heatmap and both concept layers), and the causal test
(``spray.confirm``) of every cluster that reaches the score floor ``SCORE_FLOOR``, once per
evidence setting of ``EVIDENCE_GRID``. The raw per-cluster numbers are stored per case
(``.bench-cache/detection-q3/``), so a decision rule (score threshold, evidence setting,
``min_paste_rate``, ``min_lift``, and ``dominance`` for settling a class's confirmed
clusters with spray's own ``spray.confirm.resolve``) is applied afterwards without
recomputing anything.

Two steps, never mixed:

* ``--split dev --tune``: every rule of ``RULE_GRID`` (and each ``min_eigen_ratio`` of
  ``EIGEN_RATIOS``) is scored on the dev cases; the chosen one is printed. Those values are
  written into spray's defaults by hand (``spray/analysis/config.py``,
  ``spray/confirm/config.py``).
* ``--split test``: the test cases, judged with spray's *current defaults* only. This is
  the one number docs and notes report. ``--draw N`` takes a fresh draw of the test split
  (new seeds): a detector changed after a draw was judged is judged on the next one.

What is measured (audit level: flags of every space folded into findings, as
``summary.json`` does; and per space):

* **found** (relied-on planted cases only: the model's predictions move when the artifact
  is stamped on held-out images of other classes, ``cases.py``): the top finding is in the
  target class; **F1** of its members against the stamped samples; **side precision** for
  artifacts on 60-90 % of the class.
* **false flags**: every finding on a clean model, and every finding on a planted model
  that is not the planted artifact (outside the target class, or with under 50 % stamped
  members); the 95 % upper bound (Clopper-Pearson) of the per-model false-flag rate.
* **multi-modal**: findings in the multi-modal class (legitimate strategies must not be
  flagged) and the adjusted Rand index of the class's clusters against its two modes in
  the heatmap space (are they shown as the separate strategies they are).

Usage::

    python3 bench/detection.py --split dev --planted 42 --clean 24 --multimodal 12 --ratios 1.5 --tune
    python3 bench/detection.py --split test --draw 1 --planted 30 --clean 30 --multimodal 6
    # the same cases built by two processes, then the table from the cache
    python3 bench/detection.py --split test --draw 6 --planted 30 --clean 30 --multimodal 6 --shard 0/2 &
    python3 bench/detection.py --split test --draw 6 --planted 30 --clean 30 --multimodal 6 --shard 1/2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import adjusted_rand_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cases import Case, CaseSpec, build_case, extra_dev_cases, generate_cases  # noqa: E402
from spray.analysis.config import CONCEPT_PREFIX, HEATMAP_SPACE, SprayConfig, concept_space  # noqa: E402
from spray.analysis.pipeline import analyze_spaces  # noqa: E402
from spray.attribution.select import make_explainer  # noqa: E402
from spray.attribution.settings import AttributionSettings  # noqa: E402
from spray.confirm.config import ConfirmConfig, EvidenceSetting  # noqa: E402
from spray.confirm.predictor import model_predictor  # noqa: E402
from spray.confirm.resolve import YARDSTICK_OVERLAYS, YARDSTICK_WHERE_CONFIRMED, Contender, resolve  # noqa: E402
from spray.confirm.run import CandidateTester, confirm_analyses  # noqa: E402
from spray.findings import group_findings  # noqa: E402

CACHE = REPO / ".bench-cache" / "detection-q3"
RECORD_VERSION = "q3-v3"
#: Clusters scoring at least this are causally tested and recorded (the lowest threshold tried:
#: every cluster, so that "propose everything, let the causal test decide" is a rule on the grid).
SCORE_FLOOR = 0.0
EIGEN_RATIOS = (1.5, 5.0)
#: The causal test's evidence settings recorded per cluster, ``(evidence_area, evidence_mass)``:
#: the demo's (a tag is small), and larger ones that a global artifact (a texture over the
#: whole background) needs to be pasted at all. The rule picks one (``Rule.evidence``).
EVIDENCE_GRID = ((0.12, 0.5), (0.3, 0.5), (0.5, 0.9))
#: The record key of the members' mean overlay as evidence (``[confirm] overlay_evidence``).
OVERLAY = "overlay"
#: The same with the control scaled to the overlay's total ink (``overlay_control = "ink"``).
OVERLAY_INK = "overlay-ink"
#: The members' mean overlay against the hosts' mean image, its control at the same ink
#: (``[confirm] host_overlay_evidence``).
OVERLAY_HOSTS = "overlay-hosts"
#: The same with every image group summed up by its per-pixel median
#: (``[confirm] overlay_statistic = "median"``).
OVERLAY_HOSTS_MEDIAN = "overlay-hosts-median"
#: The overlays against the hosts, by record key, and the statistic each sums its images by:
#: both confirm with ``Rule.host_overlay_min_lift``.
HOST_OVERLAY_STATISTICS = {OVERLAY_HOSTS: "mean", OVERLAY_HOSTS_MEDIAN: "median"}
HOST_OVERLAY_KEYS = tuple(HOST_OVERLAY_STATISTICS)
#: The record keys of the overlay settings: they need no relevance, so a record made before
#: one existed gets it from the record's own clusters (:func:`_with_overlays`).
OVERLAY_KEYS = (OVERLAY, OVERLAY_INK, *HOST_OVERLAY_KEYS)
RULE_GRID = {
    "threshold": (0.0, 0.3, 0.5, 0.6, 0.75),
    "min_paste_rate": (0.05, 0.1, 0.2),
    "min_lift": (0.05, 0.1, 0.2),
    "dominance": (0.5, 0.7, 0.85, 0.95),
    # one setting, or several joined by "+": each cluster is judged at the one where its
    # evidence lifts most (a small tag pastes best small, a texture needs the larger one)
    "evidence": (
        *(f"{area}/{mass}" for area, mass in EVIDENCE_GRID),
        "0.3/0.5+0.5/0.9",
        "0.12/0.5+0.3/0.5+0.5/0.9",
    ),
    # a wide region carries more of the object, so the wide settings may need more lift
    "wide_min_lift": (None, 0.3, 0.4, 0.5, 0.6),
}
#: The second stage of ``--tune``: these constants, added after draw 6, are scored with the
#: first stage's best rule held fixed (the product of both grids is too large to score).
REFINE_GRID = {
    # the share of the anchor's lift a contender must keep at the wide settings
    "wide_dominance": (None, 0.3, 0.4, 0.5, 0.6, 0.7),
    # the lift that flags a cluster scoring under the threshold (None: not tested)
    "low_score_lift": (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
}
#: The third stage, around the second's best rule.
OVERLAY_GRID = {
    # the members' mean overlay as a third setting, and the lift that confirms with it
    "evidence": ("0.3/0.5+0.5/0.9", f"0.3/0.5+0.5/0.9+{OVERLAY}", f"0.3/0.5+0.5/0.9+{OVERLAY_INK}"),
    "overlay_min_lift": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    # an anchor is a yardstick only where it confirms (False: at every setting)
    "yardstick_confirmed": (False, True),
}
#: The fourth stage, around the third's best rule: the overlay against the hosts, beside the
#: overlay against the rest of the class or instead of it, and the lift that confirms with it.
HOST_OVERLAY_GRID = {
    "evidence": (
        f"0.3/0.5+0.5/0.9+{OVERLAY}", f"0.3/0.5+0.5/0.9+{OVERLAY}+{OVERLAY_HOSTS}", f"0.3/0.5+0.5/0.9+{OVERLAY_HOSTS}",
    ),
    "host_overlay_min_lift": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
}
#: The fifth stage, around spray's current defaults (``--refine``): the lift a cluster holding
#: most of its class must reach at every setting (None: no extra bar). Added after draw 11,
#: whose two clean models were flagged on a majority side that lifted +0.23 and +0.27 over a
#: control pasted from the small, atypical rest of the class.
MAJORITY_GRID = {
    "majority_min_lift": (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
}
#: A stage of ``--refine overlay-statistic``, around spray's current defaults: the overlay
#: against the hosts taken from per-pixel means or medians (``[confirm] overlay_statistic``),
#: the lift that confirms with it, and the lift that flags a cluster scoring under the
#: threshold (a median overlay lifts more, the low-scoring parts of a watermark included).
OVERLAY_STATISTIC_GRID = {
    "evidence": (f"0.3/0.5+0.5/0.9+{OVERLAY_HOSTS}", f"0.3/0.5+0.5/0.9+{OVERLAY_HOSTS_MEDIAN}"),
    "host_overlay_min_lift": (0.3, 0.4, 0.5, 0.6, 0.7),
    "low_score_lift": (0.4, 0.5, 0.6, 0.7),
}
#: A stage of ``--refine concept-low-score``, around spray's current defaults: a bar of its own
#: for concept-space clusters scoring under the threshold (None: ``low_score_lift``, as spray;
#: 1.0: practically never). Added after test draw 17, whose two false flags were such clusters
#: confirmed only by the median overlay. On the 108 dev cases 0.6-0.8 tie with none; with
#: the correction bench's 20 planted dev cases added (``--correction-cases``) every bar loses
#: relied-on backdoors found only there, so spray keeps one bar (docs/analysis.md).
CONCEPT_LOW_SCORE_GRID = {"concept_low_score_lift": (None, 0.5, 0.6, 0.7, 0.8, 1.0)}
#: Planted dev cases ``bench/correction_q3.py --split dev`` spreads over the split (``--correction-cases``).
CORRECTION_PLANTED = 30
#: The stages ``--refine`` can score around spray's current defaults.
REFINE_STAGES = {
    "majority": MAJORITY_GRID, "overlay-statistic": OVERLAY_STATISTIC_GRID, "concept-low-score": CONCEPT_LOW_SCORE_GRID,
}
AUDIT = "audit"


def explain(case: Case, batch: int = 500, rows: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Heatmaps (N, H, W) of the true label's logit and concept relevances per concept layer;
    with ``rows``, only those rows are explained and every other row stays zero (the arrays
    keep all N rows, so analyses and the causal test index them as usual)."""
    settings = AttributionSettings(
        composite="epsilon_plus_flat", canonizers=case.canonizers, layers=case.concept_layers, device="cpu"
    )
    explainer = make_explainer(case.model, settings)
    chosen = np.arange(len(case.train_images)) if rows is None else np.asarray(rows, dtype=np.int64)
    heatmaps, concepts = [], defaultdict(list)
    for start in range(0, len(chosen), batch):
        part = chosen[start : start + batch]
        explanation = explainer.explain(torch.from_numpy(case.train_images[part]), torch.from_numpy(case.train_labels[part]))
        heatmaps.append(explanation.heatmaps.numpy())
        for layer, values in explanation.concepts.items():
            concepts[layer].append(values.numpy())
    explained = np.concatenate(heatmaps), {layer: np.concatenate(parts) for layer, parts in concepts.items()}
    if rows is None:
        return explained

    def full(values: np.ndarray) -> np.ndarray:
        out = np.zeros((len(case.train_images), *values.shape[1:]), dtype=values.dtype)
        out[chosen] = values
        return out

    return full(explained[0]), {layer: full(values) for layer, values in explained[1].items()}


def evidence_key(area: float, mass: float) -> str:
    return f"{area}/{mass}"


#: Every evidence setting a record holds.
RECORD_KEYS: tuple[str, ...] = (*(evidence_key(area, mass) for area, mass in EVIDENCE_GRID), *OVERLAY_KEYS)


def cluster_records(case: Case, tested: dict[str, list], ratio: float) -> tuple[list[dict], dict]:
    """Per recorded cluster: where, size, score, overlap with the truth, and the causal
    numbers under each evidence setting (``tested``: the analyses confirmed with it)."""
    truth = np.flatnonzero(case.stamped)
    records, ari = [], {}
    first, *_ = tested.values()
    for index, analysis in enumerate(first):
        if case.modes is not None and analysis.class_index == case.target_label and analysis.analysable:
            ari[analysis.space] = float(adjusted_rand_score(case.modes[analysis.rows], analysis.labels))
        for position, cluster in enumerate(analysis.clusters):
            if cluster.artifact_score < SCORE_FLOOR:
                continue
            tests = {}
            for key, analyses in tested.items():
                conf = analyses[index].clusters[position].confirmation or {}
                tests[key] = {part: conf.get(part) for part in ("paste", "control", "removal", "status")}
            records.append({
                "ratio": ratio, "class": int(analysis.class_index), "space": analysis.space,
                "members": cluster.member_rows.tolist(), "size": int(cluster.size),
                "score": float(cluster.artifact_score), "hits": int(np.isin(cluster.member_rows, truth).sum()),
                "tests": tests,
            })
    return records, ari


#: The packages whose versions change a record (the embedding's and the clustering's numerics,
#: the model's training and attribution): every record stores them, and the table says when
#: its records were made under other versions than the running ones.
RECORD_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "scikit-learn", "umap-learn", "pynndescent", "torch", "zennit")


def package_versions() -> dict[str, str]:
    """The installed versions of :data:`RECORD_PACKAGES`."""
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in RECORD_PACKAGES}


def version_report(records: list[dict]) -> list[str]:
    """Lines naming the package versions the records were made with, and how many records
    were made under versions other than the running ones (or did not record them)."""
    running = package_versions()
    lines = ["records made with " + ", ".join(f"{name} {version}" for name, version in running.items())]
    unknown = sum("packages" not in record for record in records)
    other = [record["key"] for record in records if "packages" in record and record["packages"] != running]
    if other:
        lines.append(f"WARNING: {len(other)} records were made under other package versions (e.g. {other[0]}); "
                     "delete them from .bench-cache/detection-q3 to rebuild them under these")
    if unknown:
        lines.append(f"{unknown} records predate version recording (their versions are unknown)")
    return lines


class OverlayOnly(ConfirmConfig):
    """The causal test at the overlay settings only (the relevance settings of
    ``EVIDENCE_GRID`` are run one by one): the draws are those of an audit's overlay settings."""

    def evidence_settings(self, low_score: bool = False, majority: bool = False, concept: bool = False) -> tuple:
        return tuple(setting for setting in super().evidence_settings(low_score, majority, concept) if setting.overlay)


def overlay_config(key: str, seed: int) -> ConfirmConfig:
    """The causal test at the one overlay setting of record key ``key`` (:data:`OVERLAY_KEYS`)."""
    return OverlayOnly(
        max_candidates=10**6, random_state=seed, overlay_control="ink" if key == OVERLAY_INK else "peak",
        overlay_evidence=key not in HOST_OVERLAY_KEYS, host_overlay_evidence=key in HOST_OVERLAY_KEYS,
        overlay_statistic=HOST_OVERLAY_STATISTICS.get(key, "mean"),
    )


def _tested(case: Case, spec: CaseSpec, heatmaps: np.ndarray, concepts: dict, ratio: float, keys: tuple[str, ...]) -> dict[str, list]:
    """The case's analyses at ``ratio``, causally tested once per evidence setting of ``keys``
    (raw numbers per cluster: the rule settles them itself, ``settled``)."""
    spaces = (HEATMAP_SPACE, *(concept_space(layer) for layer in case.concept_layers))
    config = SprayConfig(
        embedding="spectral", threshold=SCORE_FLOOR, min_eigen_ratio=ratio, random_state=spec.seed, spaces=spaces
    )
    analyses = analyze_spaces(heatmaps, case.train_labels, case.class_names, config, concepts=concepts)
    predict = model_predictor(case.model, AttributionSettings(device="cpu"), ConfirmConfig().batch_size)
    settings = {evidence_key(area, mass): (area, mass) for area, mass in EVIDENCE_GRID}
    tested = {}
    for key in keys:
        copies = copy.deepcopy(analyses)
        if key in OVERLAY_KEYS:
            confirm = overlay_config(key, spec.seed)
        else:
            area, mass = settings[key]
            confirm = ConfirmConfig(
                max_candidates=10**6, random_state=spec.seed, evidence_area=area, evidence_mass=mass,
                wide_evidence=False, overlay_evidence=False, host_overlay_evidence=False,
            )
        confirm_analyses(
            copies, heatmaps, case.train_labels, lambda rows: case.train_images[rows], predict, confirm,
            settle_candidates=False,
        )
        tested[key] = copies
    return tested


def _write_record(path: Path, record: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def _with_settings(spec: CaseSpec, record: dict, path: Path, keys: tuple[str, ...]) -> dict:
    """A record made before the evidence settings ``keys`` existed, with them added: the
    case's analyses are rebuilt (seeded, so the same clusters) and only ``keys`` are tested."""
    case = build_case(spec)
    heatmaps, concepts = explain(case)
    for ratio in sorted({c["ratio"] for c in record["clusters"]}):
        added, _ = cluster_records(case, _tested(case, spec, heatmaps, concepts, ratio, keys), ratio)
        by_members = {(c["class"], c["space"], tuple(c["members"])): c for c in added}
        for cluster in record["clusters"]:
            if cluster["ratio"] != ratio:
                continue
            match = by_members.get((cluster["class"], cluster["space"], tuple(cluster["members"])))
            if match is None:
                raise RuntimeError(f"{spec.key()}: the rebuilt analyses differ from the record's; delete {path} to rebuild it")
            cluster["tests"].update({key: match["tests"][key] for key in keys})
    _write_record(path, record)
    return record


def _with_overlays(spec: CaseSpec, record: dict, path: Path, keys: tuple[str, ...]) -> dict:
    """A record made before the overlay settings ``keys`` existed, with them added from its own
    clusters: an overlay needs the members' images, not their relevance, so nothing is
    explained or clustered again. Each candidate is tested as :func:`_tested` does (an
    audit's ``confirm_analyses`` with every cluster a candidate): in the order of
    ``spray.confirm.run._by_score`` (score, class, space, cluster), its rank the seed of its
    draws; clusters that were not candidates (a whole class, or under the size floor, which
    no rule reads) keep no test."""
    case = build_case(spec)
    predict = model_predictor(case.model, AttributionSettings(device="cpu"), ConfirmConfig().batch_size)
    # the overlay settings read no relevance: a stand-in of the right length for the tester
    no_relevance = np.zeros((len(case.train_labels), 1, 1), dtype=np.float32)
    min_size = SprayConfig().min_cluster_size
    for ratio in sorted({c["ratio"] for c in record["clusters"]}):
        clusters = [c for c in record["clusters"] if c["ratio"] == ratio]
        per_analysis = defaultdict(int)
        for c in clusters:
            per_analysis[(c["class"], c["space"])] += 1
        position = {id(c): i for i, c in enumerate(clusters)}  # an analysis's order: score, then cluster id
        candidates = sorted(
            (c for c in clusters if per_analysis[(c["class"], c["space"])] > 1 and c["size"] >= min_size),
            key=lambda c: (-c["score"], c["class"], c["space"], position[id(c)]),
        )
        for key in keys:
            tester = CandidateTester(no_relevance, case.train_labels, lambda rows: case.train_images[rows], predict,
                                     overlay_config(key, spec.seed))
            for c in clusters:
                c["tests"][key] = {part: None for part in ("paste", "control", "removal", "status")}
            for rank, c in enumerate(candidates):
                members = SimpleNamespace(member_rows=np.asarray(c["members"], dtype=np.int64))
                conf, _ = tester.test(members, c["class"], rank)
                c["tests"][key] = {part: conf.get(part) for part in ("paste", "control", "removal", "status")}
    _write_record(path, record)
    return record


def run_case(spec: CaseSpec, ratios: tuple[float, ...] = EIGEN_RATIOS) -> dict:
    """The stored record of one case for ``ratios`` (computed once, then read from the cache;
    a record made before an evidence setting of ``RECORD_KEYS`` existed gets it added)."""
    # the case's digest names its data and model, so a changed generator never serves an old record
    path = CACHE / f"{spec.key()}-{spec.digest()}-{RECORD_VERSION}.json"
    if path.exists():
        record = json.loads(path.read_text())
        missing = tuple(key for key in RECORD_KEYS if any(key not in c["tests"] for c in record["clusters"]))
        if missing and set(missing) <= set(OVERLAY_KEYS):
            return _with_overlays(spec, record, path, missing)
        return _with_settings(spec, record, path, missing) if missing else record
    started = time.perf_counter()
    case = build_case(spec)
    heatmaps, concepts = explain(case)
    keys = RECORD_KEYS
    records, aris = [], {}
    for ratio in ratios:
        found, ari = cluster_records(case, _tested(case, spec, heatmaps, concepts, ratio, keys), ratio)
        records += found
        aris[str(ratio)] = ari
    record = {
        "spec": dataclasses.asdict(spec), "key": spec.key(), "accuracy": case.accuracy, "moved": case.moved,
        "gain": case.gain, "relied": bool(case.relied), "target": int(case.target_label),
        "n_stamped": int(case.stamped.sum()), "n_target": int((case.train_labels == case.target_label).sum()),
        "clusters": records, "ari": aris, "seconds": time.perf_counter() - started, "packages": package_versions(),
    }
    _write_record(path, record)
    return record


@dataclasses.dataclass(frozen=True)
class Rule:
    ratio: float
    threshold: float
    min_paste_rate: float
    min_lift: float
    dominance: float | None  # None: no settling (the detector before spray.confirm.resolve)
    evidence: str
    #: the lift the settings after the first (the wide ones) must reach; None: ``min_lift``
    wide_min_lift: float | None = None
    #: the share of the anchor's lift a contender must keep at the wide settings (None: ``dominance``)
    wide_dominance: float | None = None
    #: clusters scoring under ``threshold`` are flagged too when they confirm with at least
    #: this lift at each setting (None: never; they are not candidates)
    low_score_lift: float | None = None
    #: the lift that confirms with the members' mean overlay (evidence key ``OVERLAY``)
    overlay_min_lift: float | None = None
    #: settle comparing with an anchor only at the settings where it confirms
    #: (``spray.confirm.resolve.YARDSTICK_WHERE_CONFIRMED``); False: at every setting
    yardstick_confirmed: bool = False
    #: the lift that confirms with the members' overlay against the hosts (``HOST_OVERLAY_KEYS``)
    host_overlay_min_lift: float | None = None
    #: the least lift at every setting for a cluster holding more than half its class (None: no extra bar)
    majority_min_lift: float | None = None
    #: the fewest samples the rest of a cluster's analysis must hold for the cluster to be
    #: judged (spray's gate: ``min_cluster_size``; a smaller rest is outliers); None: any rest
    min_rest: int | None = None
    #: settle comparing a contender with the anchor at the overlay settings too; False: at the
    #: region settings, and at the overlays only where the anchor confirms at no region
    #: setting (``spray.confirm.resolve.YARDSTICK_OVERLAYS``, :meth:`Contender.yardstick`)
    overlay_yardstick: bool = True
    #: the lift that flags a *concept-space* cluster scoring under the threshold (None: the
    #: same as ``low_score_lift``; spray has one bar for every space)
    concept_low_score_lift: float | None = None

    def lift_needed(self, key: str, position: int, low_score: bool = False, majority: bool = False,
                    concept: bool = False) -> float:
        """The lift that confirms at the ``position``-th evidence setting of the rule (record
        key ``key``), for a candidate or for a cluster scoring under the threshold (``low_score``),
        holding more than half of its class or not (``majority``), in a concept space or not
        (``concept``)."""
        if key in HOST_OVERLAY_KEYS and self.host_overlay_min_lift is not None:
            needed = self.host_overlay_min_lift
        elif key in (OVERLAY, OVERLAY_INK) and self.overlay_min_lift is not None:
            needed = self.overlay_min_lift
        else:
            needed = self.min_lift if position == 0 or self.wide_min_lift is None else self.wide_min_lift
        low_bar = self.concept_low_score_lift if concept and self.concept_low_score_lift is not None else self.low_score_lift
        if low_score and low_bar is not None:
            needed = max(needed, low_bar)
        return max(needed, self.majority_min_lift) if majority and self.majority_min_lift is not None else needed

    def flags(self, record: dict, space: str | None = None) -> list[dict]:
        """The clusters this rule flags. Every cluster is tested here (no candidate cap), so a
        cluster without a test is one that is its whole class: never a candidate. With several
        evidence settings, a cluster is judged at the one where it lifts most among those where
        it confirms (as :class:`spray.confirm.run.CandidateTester` does). The confirmed ones are
        settled by spray's own :func:`spray.confirm.resolve.resolve`, with their lifts at every
        setting: outranked ones are dropped, joined ones merged into their head. A cluster
        holding more than half of its analysis's rows needs ``majority_min_lift`` as well; one
        whose rest holds fewer than ``min_rest`` rows is not judged (spray scores it 0 and
        never tests it: its rest is outliers)."""
        sizes = defaultdict(int)  # an analysis's clusters cover its rows
        for c in record["clusters"]:
            if c["ratio"] == self.ratio:
                sizes[(c["class"], c["space"])] += c["size"]
        chosen = []
        for c in record["clusters"]:
            low_score = c["score"] < self.threshold
            if c["ratio"] != self.ratio or (low_score and self.low_score_lift is None) or (space and c["space"] != space):
                continue
            if c["size"] < SprayConfig().min_cluster_size:
                continue
            if self.min_rest is not None and sizes[(c["class"], c["space"])] - c["size"] < self.min_rest:
                continue
            keys = self.evidence.split("+")
            tests = [c["tests"][key] for key in keys]
            lifts = tuple(test["paste"]["rate"] - test["control"]["rate"] for test in tests if test["paste"] is not None)
            confirms = tuple(
                test["paste"] is not None
                and test["paste"]["low"] >= self.min_paste_rate
                and test["paste"]["rate"] - test["control"]["rate"]
                >= self.lift_needed(key, position, low_score, 2 * c["size"] > sizes[(c["class"], c["space"])],
                                    c["space"].startswith(CONCEPT_PREFIX))
                for position, (key, test) in enumerate(zip(keys, tests))
            )
            passing = [
                (test["paste"]["rate"] - test["control"]["rate"], test["paste"], test["control"])
                for test, confirmed in zip(tests, confirms)
                if confirmed
            ]
            if passing:
                _, paste, control = max(passing, key=lambda entry: entry[0])
                complete = len(lifts) == len(tests)
                yardstick = confirms if self.yardstick_confirmed else (True,) * len(confirms)
                overlays = () if self.overlay_yardstick else tuple(key in OVERLAY_KEYS for key in keys)
                chosen.append({
                    **c, "paste": paste, "control": control, "lifts": lifts if complete else (),
                    "confirmation": confirmation_record(keys, confirms),
                    "confirms": yardstick if complete and (self.yardstick_confirmed or not self.overlay_yardstick) else (),
                    "overlays": overlays if complete else (),
                })
        chosen = [{**c, "analysis_size": sizes[(c["class"], c["space"])]} for c in chosen]
        kept = chosen if self.dominance is None else settled(chosen, self.dominance, self.wide_dominance)
        return sorted(kept, key=lambda c: -c["score"])


def confirmation_record(keys: list[str], confirms: tuple[bool, ...]) -> dict:
    """What a flag's ``confirmation`` in ``summary.json`` says of its settings, as far as the
    record knows: each setting's status under the rule, and whether it is an overlay."""
    return {"settings": [
        {"status": "confirmed" if confirmed else "rejected", "evidence": {"overlay": key in OVERLAY_KEYS}}
        for key, confirmed in zip(keys, confirms)
    ]}


def settled(confirmed: list[dict], dominance: float, wide_dominance: float | None = None) -> list[dict]:
    """``confirmed`` cluster records after spray's resolution: the outranked left out, each
    joined one merged into its head (members, hits and the higher score)."""
    contenders = [
        Contender(i, c["class"], (c["class"], c["space"]), np.asarray(c["members"]),
                  c["paste"]["rate"] - c["control"]["rate"], c["score"], tuple(c.get("lifts", ())), c.get("analysis_size"),
                  tuple(c.get("confirms", ())), tuple(c.get("overlays", ())))
        for i, c in enumerate(confirmed)
    ]
    resolution = resolve(contenders, dominance, wide_dominance)
    heads = {i: dict(c) for i, c in enumerate(confirmed) if i not in resolution.outranked and i not in resolution.joined}
    for part, head in sorted(resolution.joined.items()):
        merged, extra = heads[head], confirmed[part]
        merged["members"] = sorted(set(merged["members"]) | set(extra["members"]))
        merged.update(size=len(merged["members"]), hits=merged["hits"] + extra["hits"], score=max(merged["score"], extra["score"]))
    return list(heads.values())


def findings(flags: list[dict]) -> list[dict]:
    return [primary for primary, _ in group_findings(flags, lambda c: c["members"])]


def judge(record: dict, rule: Rule, space: str | None = None) -> dict:
    """What the audit (or one space) says about one case under ``rule``."""
    found = findings(rule.flags(record, space))
    kind = record["spec"]["kind"]
    target, n_stamped = record["target"], record["n_stamped"]
    out = {"findings": len(found), "found": False, "f1": 0.0, "precision": 0.0, "false": 0}
    if kind == "clean":
        out["false"] = len(found)
        return out
    if kind == "multimodal":
        out["false"] = len(found)
        out["in_class"] = sum(f["class"] == target for f in found)
        return out
    for i, f in enumerate(found):
        on_target = f["class"] == target and f["hits"] >= 0.5 * f["size"]
        if i == 0 and f["class"] == target:
            precision = f["hits"] / f["size"]
            recall = f["hits"] / max(n_stamped, 1)
            out.update(found=True, precision=precision, f1=2 * precision * recall / (precision + recall) if f["hits"] else 0.0)
        if not on_target:
            out["false"] += 1
    return out


def upper_bound(failures: int, n: int, level: float = 0.95) -> float:
    """Clopper-Pearson one-sided upper bound of a rate."""
    return 1.0 if failures >= n else float(beta.ppf(level, failures + 1, n - failures))


def summarise(records: list[dict], rule: Rule, space: str | None = None) -> dict:
    planted = [r for r in records if r["spec"]["kind"] not in ("clean", "multimodal")]
    relied = [r for r in planted if r["relied"]]
    judged = {r["key"]: judge(r, rule, space) for r in records}
    clean = [r for r in records if r["spec"]["kind"] == "clean"]
    multi = [r for r in records if r["spec"]["kind"] == "multimodal"]
    models = clean + planted
    false_models = sum(judged[r["key"]]["false"] > 0 for r in models)
    return {
        "relied": len(relied),
        "found": sum(judged[r["key"]]["found"] for r in relied),
        "f1": float(np.mean([judged[r["key"]]["f1"] for r in relied])) if relied else float("nan"),
        "clean": len(clean),
        "clean_false": sum(judged[r["key"]]["false"] for r in clean),
        "planted_false": sum(judged[r["key"]]["false"] for r in planted),
        "models": len(models),
        "false_models": false_models,
        "false_bound": upper_bound(false_models, len(models)) if models else float("nan"),
        "multi": len(multi),
        "multi_flagged": sum(judged[r["key"]]["false"] > 0 for r in multi),
        "judged": judged,
    }


def tune(records: list[dict], ratios: tuple[float, ...], refine_from: Rule | None = None, stage: str = "majority") -> Rule:
    """The dev rule: most relied-on cases found, then fewest false-flag models, then highest
    F1 (first ``RULE_GRID``, then ``REFINE_GRID`` around its best rule, then ``OVERLAY_GRID``,
    ``HOST_OVERLAY_GRID`` and ``MAJORITY_GRID``, each around the one before). Among rules of the first stage that tie, the first in grid order is kept;
    among those of the later ones, the strictest (the highest bars: fewer flags where the dev
    cases cannot tell). ``refine_from``: only one stage (``stage``, a key of
    :data:`REFINE_STAGES`), around this rule (the earlier stages' choices stand when the
    records of their settings did not change)."""
    def strictness(rule: Rule) -> tuple[float, ...]:
        keys = rule.evidence.split("+")
        return (
            rule.dominance if rule.wide_dominance is None else rule.wide_dominance,
            1.0 if rule.low_score_lift is None else rule.low_score_lift,
            1.0 if not {OVERLAY, OVERLAY_INK} & set(keys) or rule.overlay_min_lift is None else rule.overlay_min_lift,
            0.0 if rule.yardstick_confirmed else 1.0,  # the settling of draw 8 when they tie
            1.0 if not set(HOST_OVERLAY_KEYS) & set(keys) or rule.host_overlay_min_lift is None else rule.host_overlay_min_lift,
            0.0 if rule.majority_min_lift is None else rule.majority_min_lift,
            (1.0 if rule.low_score_lift is None else rule.low_score_lift) if rule.concept_low_score_lift is None else rule.concept_low_score_lift,
        )

    def ranked(rules: list[Rule], strict: bool = False) -> Rule:
        best, best_key = None, None
        for rule in rules:
            s = summarise(records, rule)
            key = (s["found"] - 2 * s["false_models"] - 2 * s["multi_flagged"], s["f1"], *(strictness(rule) if strict else ()))
            print(f"  {rule}: found {s['found']}/{s['relied']} F1 {s['f1']:.3f} false-flag models "
                  f"{s['false_models']}/{s['models']} multimodal flagged {s['multi_flagged']}/{s['multi']}")
            if best_key is None or key > best_key:
                best, best_key = rule, key
        return best

    first = [] if refine_from is not None else [
        rule for ratio in ratios for values in itertools.product(*RULE_GRID.values())
        # one setting: the same rule as with wide_min_lift None
        if (rule := Rule(ratio, *values)).wide_min_lift is None or "+" in rule.evidence
    ]
    def around(best: Rule, grid: dict) -> Rule:
        return ranked([dataclasses.replace(best, **dict(zip(grid, v))) for v in itertools.product(*grid.values())], strict=True)

    if refine_from is not None:
        return around(refine_from, REFINE_STAGES[stage])
    return around(around(around(around(ranked(first), REFINE_GRID), OVERLAY_GRID), HOST_OVERLAY_GRID), MAJORITY_GRID)


#: The constants judged on test draws 17 and 18 (the hosts' *median* overlay confirming at
#: 0.5, a cluster under the threshold at 0.5 in every space): printed beside the current rule
#: with ``--previous``, a paired comparison on the same records (nothing is chosen from it).
PREVIOUS_RULE = Rule(
    1.5, 0.6, 0.2, 0.2, 0.85, f"0.3/0.5+0.5/0.9+{OVERLAY_HOSTS_MEDIAN}", 0.6, 0.4, 0.5, None, True, 0.5, 0.5, 3, False
)


def changed_cases(records: list[dict], rule: Rule, previous: Rule) -> list[str]:
    """One line per case that ``rule`` and ``previous`` judge differently (found, F1, false flags)."""
    lines = []
    for record in records:
        now, before = judge(record, rule), judge(record, previous)
        if (now["found"], round(now["f1"], 2), now["false"]) != (before["found"], round(before["f1"], 2), before["false"]):
            lines.append(f"| {record['key']} | {record['relied']} | {before['found']} | {before['f1']:.2f} | {before['false']} | "
                         f"{now['found']} | {now['f1']:.2f} | {now['false']} |")
    return lines


def default_rule() -> Rule:
    analysis, confirm = SprayConfig(), ConfirmConfig()
    return Rule(
        analysis.min_eigen_ratio, analysis.threshold, confirm.min_paste_rate, confirm.min_lift, confirm.dominance,
        "+".join(setting_key(setting, confirm) for setting in confirm.evidence_settings()),
        confirm.wide_min_lift if confirm.wide_evidence else None,
        confirm.wide_dominance if confirm.wide_evidence else None,
        confirm.low_score_min_lift if confirm.max_low_score else None,
        confirm.overlay_min_lift if confirm.overlay_evidence else None,
        YARDSTICK_WHERE_CONFIRMED,
        confirm.host_overlay_min_lift if confirm.host_overlay_evidence else None,
        confirm.majority_min_lift or None,
        analysis.min_cluster_size,
        YARDSTICK_OVERLAYS,
        confirm.concept_low_score_min_lift if confirm.max_low_score else None,
    )


def setting_key(setting: EvidenceSetting, confirm: ConfirmConfig) -> str:
    """The record key of one of spray's evidence settings."""
    if not setting.overlay:
        return evidence_key(setting.area, setting.mass)
    if setting.reference == "hosts":
        return next(key for key, statistic in HOST_OVERLAY_STATISTICS.items() if statistic == setting.statistic)
    return OVERLAY_INK if confirm.overlay_control == "ink" else OVERLAY


def table(records: list[dict], rule: Rule) -> None:
    """The Q3 table: overall, per space, and per kind / fraction / regime / architecture."""
    spaces = sorted({c["space"] for r in records for c in r["clusters"]} | {HEATMAP_SPACE})
    print(f"\nrule: {rule}")
    print("| view | relied cases | found | mean F1 | false flags (clean) | false flags (planted) | models with a false flag | 95% bound | multi-modal flagged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, space in [(AUDIT, None), *[(s, s) for s in spaces]]:
        s = summarise(records, rule, space)
        print(f"| {name} | {s['relied']} | {s['found']} ({s['found'] / max(s['relied'], 1):.0%}) | {s['f1']:.3f} | "
              f"{s['clean_false']} in {s['clean']} | {s['planted_false']} | {s['false_models']}/{s['models']} | "
              f"{s['false_bound']:.3f} | {s['multi_flagged']}/{s['multi']} |")
    overall = summarise(records, rule)["judged"]
    planted = [r for r in records if r["spec"]["kind"] not in ("clean", "multimodal")]
    for field_name in ("kind", "fraction", "regime", "arch", "dataset"):
        print(f"\n| {field_name} | cases | relied | found | mean F1 | side precision (60-90 %) |")
        print("|---|---|---|---|---|---|")
        groups = defaultdict(list)
        for r in planted:
            groups[r["spec"][field_name]].append(r)
        for value, rs in sorted(groups.items()):
            relied = [r for r in rs if r["relied"]]
            found = [overall[r["key"]] for r in relied]
            side = [overall[r["key"]]["precision"] for r in relied if r["spec"]["fraction"] >= 0.6 and overall[r["key"]]["found"]]
            print(f"| {value} | {len(rs)} | {len(relied)} | {sum(f['found'] for f in found)} | "
                  f"{np.mean([f['f1'] for f in found]) if found else float('nan'):.3f} | "
                  f"{np.mean(side) if side else float('nan'):.3f} ({len(side)}) |")
    multi = [r for r in records if r["spec"]["kind"] == "multimodal"]
    if multi:
        print("\n| multi-modal case | findings in the class | ARI (heatmap) | ARI (best space) |")
        print("|---|---|---|---|")
        for r in multi:
            ari = r["ari"].get(str(rule.ratio), {})
            print(f"| {r['key']} | {overall[r['key']]['in_class']} | {ari.get(HEATMAP_SPACE, float('nan')):.2f} | "
                  f"{max(ari.values()) if ari else float('nan'):.2f} |")
    print("\n| case | accuracy | moved | gain | relied | findings | found | F1 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        j = overall[r["key"]]
        print(f"| {r['key']} | {r['accuracy']:.3f} | {r['moved']:.2f} | {r['gain']:.2f} | {r['relied']} | "
              f"{j['findings']} | {j['found']} | {j['f1']:.2f} | {r['seconds']:.0f} |")


def select(specs: list[CaseSpec], planted: int | None, clean: int | None, multimodal: int | None) -> list[CaseSpec]:
    """At most this many of each group, evenly spread over the generator's (balanced) order."""
    def spread(group: list[CaseSpec], count: int | None) -> list[CaseSpec]:
        if count is None or count >= len(group):
            return group
        return [group[i] for i in np.linspace(0, len(group) - 1, count).round().astype(int)]

    return (
        spread([s for s in specs if s.planted], planted)
        + spread([s for s in specs if s.kind == "clean"], clean)
        + spread([s for s in specs if s.kind == "multimodal"], multimodal)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("dev", "test"), required=True)
    parser.add_argument("--size", choices=("quick", "full"), default="full")
    parser.add_argument("--planted", type=int, default=None, help="at most this many planted cases")
    parser.add_argument("--clean", type=int, default=None, help="at most this many clean models")
    parser.add_argument("--multimodal", type=int, default=None, help="at most this many multi-modal cases")
    parser.add_argument(
        "--draw", type=int, default=0,
        help="test only: a fresh draw of the test split (new seeds), for a detector changed since the last draw was run",
    )
    parser.add_argument(
        "--shard", default=None, metavar="I/N",
        help="build only every N-th case from the I-th (0-based): N processes share the cache and the work; "
             "a last run without --shard prints the whole table from the cache",
    )
    parser.add_argument("--previous", action="store_true", help="also print the previous detector's row on the same records")
    parser.add_argument("--tune", action="store_true", help="dev only: score every rule and print the best")
    parser.add_argument("--extra", action="store_true",
                        help="dev only: add the extra watermark cases (bench/cases.py extra_dev_cases)")
    parser.add_argument("--min-fraction", type=float, default=None,
                        help="only the planted cases on at least this share of their class (clean and multi-modal cases stay): "
                             "the cases a bar for clusters holding most of their class can change")
    parser.add_argument("--refine", nargs="?", const="majority", default=None, choices=tuple(REFINE_STAGES),
                        help="with --tune: only one stage (default: majority, MAJORITY_GRID; overlay-statistic: "
                             "OVERLAY_STATISTIC_GRID; concept-low-score: CONCEPT_LOW_SCORE_GRID), around spray's current defaults")
    parser.add_argument("--correction-cases", action="store_true",
                        help="dev only: add the planted cases bench/correction_q3.py --split dev reads (its own spread of the "
                             "split, 20 of them not in --planted 42's)")
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=None,
        help="min_eigen_ratio values to analyse with (default: all of EIGEN_RATIOS with --tune, else spray's default)",
    )
    args = parser.parse_args()
    if args.tune and args.split != "dev":
        parser.error("--tune runs on the dev split only: constants are never set on the test split.")
    torch.set_num_threads(1)
    if args.draw and args.split != "test":
        parser.error("--draw picks a fresh draw of the test split; the dev split has one.")
    if args.extra and args.split != "dev":
        parser.error("--extra adds dev-split cases.")
    specs = select(generate_cases(args.split, args.size, args.draw), args.planted, args.clean, args.multimodal)
    specs += extra_dev_cases() if args.extra else []
    if args.correction_cases:
        if args.split != "dev":
            parser.error("--correction-cases adds dev-split cases.")
        chosen = {spec.key() for spec in specs}
        specs += [spec for spec in select(generate_cases("dev", args.size), CORRECTION_PLANTED, 0, 0) if spec.key() not in chosen]
    if args.min_fraction is not None:
        specs = [spec for spec in specs if not spec.planted or spec.fraction >= args.min_fraction]
    if args.shard:
        try:
            index, count = (int(part) for part in args.shard.split("/"))
        except ValueError:
            parser.error(f"--shard takes I/N (e.g. 0/2); got {args.shard!r}")
        if not 0 <= index < count:
            parser.error(f"--shard I/N needs 0 <= I < N; got {args.shard!r}")
        specs = specs[index::count]
    print(f"{args.split} split{f' (draw {args.draw})' if args.draw else ''}: {len(specs)} cases", flush=True)
    ratios = tuple(args.ratios) if args.ratios else (EIGEN_RATIOS if args.tune else (SprayConfig().min_eigen_ratio,))
    records = []
    for i, spec in enumerate(specs):
        record = run_case(spec, ratios)
        records.append(record)
        print(f"[{i + 1}/{len(specs)}] {record['key']} relied={record['relied']} clusters={len(record['clusters'])} "
              f"{record['seconds']:.0f}s", flush=True)
    rule = tune(records, ratios, default_rule() if args.refine else None, args.refine or "majority") if args.tune else default_rule()
    table(records, rule)
    print("\n" + "\n".join(version_report(records)))
    if args.previous:
        s = summarise(records, PREVIOUS_RULE)
        print(f"\nprevious detector ({PREVIOUS_RULE}): found {s['found']}/{s['relied']}, mean F1 {s['f1']:.3f}, "
              f"models with a false flag {s['false_models']}/{s['models']} (95% bound {s['false_bound']:.3f}), "
              f"multi-modal flagged {s['multi_flagged']}/{s['multi']}")
        print("\n| case judged differently | relied | found before | F1 before | false flags before | found | F1 | false flags |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(changed_cases(records, rule, PREVIOUS_RULE)))


if __name__ == "__main__":
    main()
