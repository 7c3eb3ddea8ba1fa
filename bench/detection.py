"""Q1: does spray find artifacts planted in MNIST, and does it stay quiet on clean models?

For each case (artifact kind x target class x seed): stamp the artifact on a fraction ``p``
of the target class's training images (``bench.mnist.make_planted``, 10,000 training
images), train the small CNN (``bench.mnist``; cached in ``.bench-cache/``), and check
that it uses the artifact: stamping the other classes' test images must move their
predictions toward the target. Then explain every training image with LRP
(``epsilon_plus_flat``, the explained logit is the true label's; concept relevances of
``features.conv2`` and ``features.conv3`` from the same pass), run spray's automatic
analysis class by class with the default ``SprayConfig`` (spectral picture only) in the
audit's default spaces (heatmap and every concept layer), and read, for the audit as a
whole (flags of all spaces folded into findings as in ``summary.json``) and per space:

* **found**: the target class holds the highest-scoring finding;
* **precision / recall / F1** of that cluster's members against the stamped images of
  the target class (0 when nothing is flagged);
* **false alarms**: findings on a model trained with ``p = 0``.

Anchor: CoRelAy's default ``SpectralClustering`` pipeline (Euclidean distances, kNN
k=10, symmetric normalised Laplacian, 32 eigenpairs, k-means) on the target class's raw
heatmaps, with the number of clusters from the classic eigengap (largest difference
between consecutive eigenvalues, k in 2..8), and the best of its clusters picked with
hindsight (highest F1 against the stamped images).

Heatmaps are cached per model in ``.bench-cache/detection/``. Goals: found in >= 90 % of
planted cases, mean F1 >= 0.85 and >= the anchor's hindsight F1, at most one false flag in
ten clean runs.

Usage::

    python3 bench/detection.py --quick     # 3 kinds x 1 class x 1 seed, 3 clean models
    python3 bench/detection.py             # 3 kinds x 3 classes x 3 seeds, 10 clean models
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mnist import (  # noqa: E402
    ARTIFACTS,
    MnistTrainConfig,
    load_mnist,
    load_or_train_mnist_model,
    make_planted,
    stamp,
)
from spray.analysis.config import HEATMAP_SPACE, SprayConfig, concept_space  # noqa: E402
from spray.analysis.pipeline import analyze_spaces  # noqa: E402
from spray.attribution.lrp import Explainer, make_composite  # noqa: E402
from spray.report.summary import group_findings  # noqa: E402

CACHE = REPO / ".bench-cache" / "detection"
TARGETS = (0, 4, 7)
SEEDS = (0, 1, 2)
CLEAN_SEEDS = tuple(range(10))
CLASS_NAMES = [str(d) for d in range(10)]
# Concept layers whose per-channel relevances are collected with the heatmaps (the audit's
# "auto" choice for a plain CNN takes the last convolutions).
CONCEPT_LAYERS = ("features.conv2", "features.conv3")
SPACES = (HEATMAP_SPACE, *(concept_space(layer) for layer in CONCEPT_LAYERS))
AUDIT = "audit"  # all spaces together, flags folded into findings as the report does


@dataclass
class SpaceResult:
    """What one analysis space (or the whole audit) says about one case."""

    found: bool = False
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    flags: int = 0
    top: str = ""


@dataclass
class Case:
    kind: str
    target: int
    seed: int
    fraction: float
    accuracy: float = float("nan")
    flip: float = float("nan")
    prob_before: float = float("nan")
    prob_after: float = float("nan")
    results: dict[str, SpaceResult] = field(default_factory=dict)
    anchor_k: int = 0
    anchor_f1: float = float("nan")
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.fraction == 0

    @property
    def audit(self) -> SpaceResult:
        return self.results.get(AUDIT, SpaceResult())


def _f1(members: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    hits = int(np.isin(members, truth).sum())
    precision = hits / len(members) if len(members) else 0.0
    recall = hits / len(truth) if len(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([
            torch.softmax(model(torch.from_numpy(images[i : i + batch])), 1).numpy()
            for i in range(0, len(images), batch)
        ])


def explain(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 250
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """LRP heatmaps (N, 28, 28) of the true-label logit (epsilon-plus-flat) and the
    concept relevances (N, C) at ``CONCEPT_LAYERS`` from the same pass."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    digest.update(repr(CONCEPT_LAYERS).encode())
    path = CACHE / f"attributions_{digest.hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path) as stored:
            return stored["heatmaps"], {layer: stored[layer] for layer in CONCEPT_LAYERS}
    heatmaps = np.empty((len(images), *images.shape[2:]), dtype=np.float32)
    concepts: dict[str, list[np.ndarray]] = {layer: [] for layer in CONCEPT_LAYERS}
    with Explainer(model, make_composite("epsilon_plus_flat"), CONCEPT_LAYERS) as explainer:
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start : start + batch])
            y = torch.from_numpy(labels[start : start + batch])
            explanation = explainer.explain(x, y)
            heatmaps[start : start + batch] = explanation.heatmaps.numpy()
            for layer in CONCEPT_LAYERS:
                concepts[layer].append(explanation.concepts[layer].numpy())
    vectors = {layer: np.concatenate(parts).astype(np.float32) for layer, parts in concepts.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, heatmaps=heatmaps, **vectors)
    partial.replace(path)
    return heatmaps, vectors


def read_space(analyses, truth: np.ndarray, target: int | None) -> SpaceResult:
    """Found / precision / recall / F1 of the top flag among ``analyses``; flags = findings
    (flags grouped as ``summary.json`` groups them)."""
    flagged = sorted(
        ((a, c) for a in analyses for c in a.clusters if c.flagged), key=lambda item: -item[1].artifact_score
    )
    findings = group_findings(flagged, lambda item: item[1].member_rows)
    result = SpaceResult(flags=len(findings))
    if findings:
        where, top = findings[0][0]
        result.top = f"class {where.class_index} {where.space} score {top.artifact_score:.2f} size {top.size}"
        if target is not None and where.class_index == target:
            result.found = True
            result.precision, result.recall, result.f1 = _f1(top.member_rows, truth)
    return result


def classic_eigengap(eigenvalues: np.ndarray, max_clusters: int = 8) -> int:
    """k in 2..max_clusters with the largest lambda_(k+1) - lambda_k (ascending, 1-based)."""
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    gaps = values[2 : max_clusters + 1] - values[1:max_clusters]
    return int(np.argmax(gaps)) + 2


def corelay_hindsight(maps: np.ndarray, truth_mask: np.ndarray) -> tuple[int, float]:
    """(k, best F1 over clusters) of CoRelAy's default pipeline on ``maps``."""
    from corelay.pipeline.spectral import SpectralClustering, SpectralEmbedding
    from corelay.processor.clustering import KMeans

    vectors = maps.reshape(len(maps), -1).astype(np.float64)
    eigenvalues, _ = SpectralEmbedding()(vectors)
    k = classic_eigengap(eigenvalues)
    output = SpectralClustering(clustering=KMeans(n_clusters=k, is_output=True))(vectors)
    labels = np.asarray(output[-1])
    truth = np.flatnonzero(truth_mask)
    best = max(_f1(np.flatnonzero(labels == c), truth)[2] for c in np.unique(labels))
    return k, best


def run_case(data, case: Case, config: SprayConfig, epochs: int, anchor: bool) -> Case:
    started = time.perf_counter()
    # a clean case stamps nothing (fraction 0); the kind only seeds the training subset
    kind = "patch" if case.clean else case.kind
    planted = make_planted(data, kind, case.target, case.fraction, seed=case.seed)
    model, _ = load_or_train_mnist_model(
        planted.train_images, planted.train_labels, MnistTrainConfig(epochs=epochs, seed=case.seed)
    )
    case.seconds["model"] = time.perf_counter() - started
    probs = predict(model, planted.test_images)
    case.accuracy = float((probs.argmax(1) == planted.test_labels).mean())
    if not case.clean:
        others = planted.test_images[planted.test_labels != case.target]
        before = predict(model, others)
        after = predict(model, stamp(others, case.kind))
        case.flip = float((after.argmax(1) == case.target).mean() - (before.argmax(1) == case.target).mean())
        case.prob_before = float(before[:, case.target].mean())
        case.prob_after = float(after[:, case.target].mean())

    started = time.perf_counter()
    heatmaps, concepts = explain(model, planted.train_images, planted.train_labels)
    case.seconds["lrp"] = time.perf_counter() - started
    started = time.perf_counter()
    analyses = analyze_spaces(heatmaps, planted.train_labels, CLASS_NAMES, config, concepts=concepts, spaces=SPACES)
    case.seconds["spray"] = time.perf_counter() - started

    truth = np.flatnonzero(planted.stamped)
    target_class = None if case.clean else case.target
    for space in SPACES:
        case.results[space] = read_space([a for a in analyses if a.space == space], truth, target_class)
    case.results[AUDIT] = read_space(analyses, truth, target_class)
    flagged = [(c, a) for a in analyses for c in a.clusters if c.flagged]
    if not case.clean:
        target = next(a for a in analyses if a.class_index == case.target and a.space == HEATMAP_SPACE)
        best = target.clusters[0] if target.clusters else None
        if not case.audit.found:
            case.notes.append(
                f"target class: {target.n_clusters} cluster(s)"
                + (f", best score {best.artifact_score:.2f} "
                   + " ".join(f"{k[:4]}={v:.2f}" for k, v in best.score_components.items())
                   if best else "")
            )
        if anchor:
            started = time.perf_counter()
            mask = planted.train_labels == case.target
            case.anchor_k, case.anchor_f1 = corelay_hindsight(heatmaps[mask], planted.stamped[mask])
            case.seconds["anchor"] = time.perf_counter() - started
    else:
        for c, a in flagged:
            case.notes.append(
                f"false flag: class {a.class_index} {a.space}, {c.size} samples, score {c.artifact_score:.2f} "
                + " ".join(f"{k[:4]}={v:.2f}" for k, v in c.score_components.items())
            )
    return case


def _short(space: str) -> str:
    return space.replace("concept:features.", "c:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 kinds x 1 class x 1 seed, 3 clean models")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the target class stamped")
    parser.add_argument("--kinds", nargs="+", default=list(ARTIFACTS), choices=ARTIFACTS)
    parser.add_argument("--targets", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--clean", type=int, default=None, help="number of clean models")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=None, help="artifact-score threshold (default: spray's)")
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    targets = args.targets or ((TARGETS[0],) if args.quick else TARGETS)
    seeds = args.seeds or ((SEEDS[0],) if args.quick else SEEDS)
    n_clean = args.clean if args.clean is not None else (3 if args.quick else len(CLEAN_SEEDS))
    config = SprayConfig(embedding="spectral", n_threads=args.threads)
    if args.threshold is not None:
        config = SprayConfig(embedding="spectral", n_threads=args.threads, threshold=args.threshold)
    try:
        import corelay  # noqa: F401
        anchor = not args.no_anchor
    except ImportError:
        anchor = False
        print("corelay is not installed (python3 -m pip install corelay): no anchor.", file=sys.stderr)

    data = load_mnist()
    cases = [Case(kind, target, seed, args.fraction) for seed in seeds for target in targets for kind in args.kinds]
    cases += [Case("none", 0, seed, 0.0) for seed in CLEAN_SEEDS[:n_clean]]
    for case in cases:
        run_case(data, case, config, args.epochs, anchor)
        print(
            f"{case.kind:>6} t={case.target} s={case.seed} p={case.fraction:.2f} acc={case.accuracy:.3f} "
            f"flip={case.flip:+.2f} found={case.audit.found} F1={case.audit.f1:.2f} anchorF1={case.anchor_f1:.2f} "
            f"findings={case.audit.flags} top=[{case.audit.top}] "
            + " ".join(f"{k}={v:.0f}s" for k, v in case.seconds.items()),
            file=sys.stderr, flush=True,
        )

    planted = [c for c in cases if not c.clean]
    clean = [c for c in cases if c.clean]
    print()
    print(f"Q1 - planted artifacts in MNIST (p = {args.fraction}, 10,000 training images, "
          f"MnistNet {args.epochs} epochs, LRP epsilon-plus-flat, threshold {config.threshold}); "
          f"'audit' = all spaces, findings folded as in summary.json")
    header = (f"{'kind':>6} | {'class':>5} | {'seed':>4} | {'test acc':>8} | {'flip':>5} | {'p(t) before->after':>18} | "
              f"{'found':>5} | {'prec':>5} | {'recall':>6} | {'F1':>5} | "
              + " | ".join(f"{_short(s) + ' F1':>11}" for s in SPACES)
              + f" | {'anchor k':>8} | {'anchor F1':>9} | top finding")
    print(header)
    print("-" * len(header))
    for c in planted:
        a = c.audit
        print(f"{c.kind:>6} | {c.target:>5} | {c.seed:>4} | {c.accuracy:>8.3f} | {c.flip:>+5.2f} | "
              f"{c.prob_before:>8.3f} -> {c.prob_after:<6.3f} | {'yes' if a.found else 'NO':>5} | {a.precision:>5.2f} | "
              f"{a.recall:>6.2f} | {a.f1:>5.2f} | "
              + " | ".join(f"{c.results[s].f1:>11.2f}" for s in SPACES)
              + f" | {c.anchor_k:>8} | {c.anchor_f1:>9.2f} | {a.top or 'none'}")
    print()
    print(f"{'clean seed':>10} | {'test acc':>8} | {'findings':>8} | "
          + " | ".join(f"{_short(s) + ' flags':>13}" for s in SPACES) + " | top finding")
    for c in clean:
        print(f"{c.seed:>10} | {c.accuracy:>8.3f} | {c.audit.flags:>8} | "
              + " | ".join(f"{c.results[s].flags:>13}" for s in SPACES) + f" | {c.audit.top or 'none'}")
    print()
    for space in (AUDIT, *SPACES):
        if planted:
            found = sum(c.results[space].found for c in planted)
            mean_f1 = statistics.mean(c.results[space].f1 for c in planted)
            line = f"{space:>24}: found {found}/{len(planted)} ({found / len(planted):.0%}), mean F1 {mean_f1:.3f}"
        else:
            line = f"{space:>24}:"
        if clean:
            line += f"; false alarms {sum(c.results[space].flags for c in clean)} in {len(clean)} clean runs"
        print(line)
    if planted:
        anchor_values = [c.anchor_f1 for c in planted if not np.isnan(c.anchor_f1)]
        mean_anchor = statistics.mean(anchor_values) if anchor_values else float("nan")
        print(f"goals (audit): found >= 90%, mean F1 >= 0.85 and >= CoRelAy hindsight {mean_anchor:.3f}; "
              "at most one false alarm in ten clean runs")
        print(f"model uses the artifact: mean flip toward the target {statistics.mean(c.flip for c in planted):+.3f}")
    failures = [c for c in cases if (not c.clean and (not c.audit.found or c.audit.f1 < 0.85)) or (c.clean and c.audit.flags)]
    if failures:
        print()
        print("what fails and why:")
        for c in failures:
            what = "clean" if c.clean else f"{c.kind} class {c.target}"
            reason = "; ".join(c.notes) or (f"F1 {c.audit.f1:.2f} (precision {c.audit.precision:.2f}, recall {c.audit.recall:.2f})")
            print(f"  {what} seed {c.seed}: {reason}")
    print()
    print("command: python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]))


if __name__ == "__main__":
    main()
