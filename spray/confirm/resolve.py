"""Settle the confirmed candidates of one class against each other.

The causal test (:mod:`spray.confirm.test`) judges each candidate on its own. Two patterns
need the class's candidates side by side:

* **Both sides of a split confirm.** When a class is split into a shortcut side and an
  object side, the object side's evidence (strokes of the real object) can also move other
  classes' images, above a control drawn from the shortcut side, whose pixels there are
  not the object. This is most marked in a backdoor, where the "rest of the class" are
  relabelled images of other classes. Both sides cannot be the class's shortcut: the side
  whose evidence moves predictions most beyond its control (its **lift**, paste rate minus
  control rate) is the class's anchor, and a confirmed candidate that does not name the
  same samples and lifts less than ``dominance`` times the anchor's is **outranked**
  (rejected, with the anchor it yields to). When candidates were tested at several
  evidence settings, the comparison is made at each setting both were tested at, and
  losing at any one outranks: with a wide region, the object side of a backdoor (whose
  control donors are other objects) can lift nearly as much as the shortcut, but at the
  narrow setting it does not come close.
* **One shortcut, several clusters.** In a backdoor the members are images of different
  objects sharing a mark, so spectral clustering can split them by object. Confirmed
  clusters of the same analysis that lift at least ``dominance`` times the anchor are one
  strategy: each **joins** the strongest one of its analysis, and the audit reports one
  cluster with all their members (:func:`merge_into`).

``dominance`` was set on the dev split of ``bench/detection.py`` (``docs/analysis.md``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.findings import SAME_FINDING_JACCARD, jaccard


#: Opens the sentence a joined cluster adds to its head's reason.
JOINED_PREFIX = "Joined by cluster(s)"


@dataclass(frozen=True)
class Contender:
    """A confirmed candidate, as the resolution sees it.

    Attributes:
        key: names the candidate for the caller.
        target: the class it speaks for.
        analysis: names the analysis it came from (clusters of one analysis are disjoint).
        members: its rows.
        lift: paste rate minus control rate of its causal test (at its chosen setting).
        score: its artifact score (breaks ties of ``lift``).
        lifts: its lift at each evidence setting it was tested at, in the audit's order
            (empty: one setting, ``lift``).
    """

    key: Hashable
    target: int
    analysis: Hashable
    members: np.ndarray
    lift: float
    score: float
    lifts: tuple[float, ...] = ()

    def yields_to(self, anchor: Contender, dominance: float) -> bool:
        """Whether ``anchor`` outranks this candidate: it lifts under ``dominance`` times the
        anchor's at some evidence setting both were tested at (at the chosen one, if they
        were not tested at the same settings)."""
        shared = zip(self.lifts, anchor.lifts) if len(self.lifts) == len(anchor.lifts) > 0 else [(self.lift, anchor.lift)]
        return any(own < dominance * theirs for own, theirs in shared)


@dataclass
class Resolution:
    """What the resolution decided: ``outranked[key]`` and ``joined[key]`` name the
    candidate that ``key`` yields to or joins."""

    outranked: dict[Hashable, Hashable] = field(default_factory=dict)
    joined: dict[Hashable, Hashable] = field(default_factory=dict)


def lift_of(confirmation: dict[str, Any]) -> float:
    """Paste rate minus control rate of a confirmation record."""
    return float(confirmation["paste"]["rate"]) - float(confirmation["control"]["rate"])


def setting_lifts(confirmation: dict[str, Any]) -> tuple[float, ...]:
    """The lift at each evidence setting a confirmation record was tested at (empty for one)."""
    return tuple(lift_of(entry) for entry in confirmation.get("settings") or ())


def resolve(contenders: Sequence[Contender], dominance: float) -> Resolution:
    """Outrank and join the confirmed candidates of each class (module docstring).

    Candidates are visited strongest first (lift, then score, then the given order). The
    first of a class is its anchor and the first *head*; each later one
    * that overlaps a head by :data:`SAME_FINDING_JACCARD` stays (the same finding seen
      from another analysis);
    * else, lifting under ``dominance`` times the anchor (at some shared evidence setting:
      :meth:`Contender.yields_to`), is outranked by the anchor;
    * else joins the head of its own analysis, if there is one;
    * else becomes a head: a second shortcut of the class.
    """
    order = sorted(range(len(contenders)), key=lambda i: (-contenders[i].lift, -contenders[i].score, i))
    heads: dict[int, list[tuple[Contender, np.ndarray]]] = {}
    resolution = Resolution()
    for index in order:
        contender = contenders[index]
        class_heads = heads.get(contender.target)
        if class_heads is None:
            heads[contender.target] = [(contender, np.asarray(contender.members))]
            continue
        anchor = class_heads[0][0]
        if any(jaccard(contender.members, members) >= SAME_FINDING_JACCARD for _, members in class_heads):
            continue
        if contender.yields_to(anchor, dominance):
            resolution.outranked[contender.key] = anchor.key
            continue
        for position, (head, members) in enumerate(class_heads):
            if head.analysis == contender.analysis:
                resolution.joined[contender.key] = head.key
                class_heads[position] = (head, np.union1d(members, contender.members))
                break
        else:
            class_heads.append((contender, np.asarray(contender.members)))
    return resolution


def part_entry(cluster: ClusterResult) -> dict[str, Any]:
    """What a joined cluster leaves in the confirmation of the cluster it joins."""
    confirmation = cluster.confirmation or {}
    return {
        "cluster_id": int(cluster.cluster_id),
        "size": cluster.size,
        "artifact_score": float(cluster.artifact_score),
        "paste": confirmation.get("paste"),
        "control": confirmation.get("control"),
    }


def merge_into(analysis: ClassAnalysis, head: ClusterResult, part: ClusterResult) -> None:
    """Make ``part`` one cluster with ``head`` in ``analysis`` (in place).

    ``head`` keeps its id, its causal test and its examples; it takes ``part``'s members
    (and labels), the size-weighted mean of both mean heatmaps, and the higher artifact
    score with its components. ``part`` leaves the analysis; its test's numbers stay in
    ``head.confirmation["joined"]``.
    """
    weights = np.array([head.size, part.size], dtype=np.float64)
    head.mean_heatmap = (weights[0] * np.asarray(head.mean_heatmap) + weights[1] * np.asarray(part.mean_heatmap)) / weights.sum()
    if part.artifact_score > head.artifact_score:
        head.artifact_score, head.score_components = part.artifact_score, dict(part.score_components)
    head.member_rows = np.union1d(head.member_rows, part.member_rows)
    labels = np.asarray(analysis.labels).copy()
    labels[labels == part.cluster_id] = head.cluster_id
    analysis.labels = labels
    analysis.clusters = [cluster for cluster in analysis.clusters if cluster is not part]
    confirmation = dict(head.confirmation or {})
    confirmation["joined"] = [*confirmation.get("joined", []), part_entry(part)]
    ids = ", ".join(str(entry["cluster_id"]) for entry in confirmation["joined"])
    tested = str(confirmation.get("reason", "")).split(JOINED_PREFIX)[0].strip()
    confirmation["reason"] = (
        f"{tested} {JOINED_PREFIX} {ids} of this analysis, whose evidence moves predictions about as strongly: "
        "one shortcut, split by the clustering."
    ).strip()
    head.confirmation = confirmation


def outrank(cluster: ClusterResult, anchor: tuple[ClassAnalysis, ClusterResult]) -> None:
    """Reject a confirmed ``cluster`` that the class's stronger ``anchor`` outranks (in place)."""
    analysis, strongest = anchor
    confirmation = dict(cluster.confirmation or {})
    own, theirs = lift_of(confirmation), lift_of(strongest.confirmation or {})
    confirmation["status"] = "rejected"
    confirmation["outranked_by"] = {
        "class_index": int(analysis.class_index), "space": str(analysis.space),
        "cluster_id": int(strongest.cluster_id), "lift": theirs,
    }
    where = ""
    own_lifts, their_lifts = setting_lifts(confirmation), setting_lifts(strongest.confirmation or {})
    if len(own_lifts) == len(their_lifts) > 0:
        # the setting where it falls furthest behind: the one that decided
        position = int(np.argmin([mine - theirs_at for mine, theirs_at in zip(own_lifts, their_lifts)]))
        area = confirmation["settings"][position].get("evidence", {}).get("area")
        own, theirs = own_lifts[position], their_lifts[position]
        where = f" with evidence of at most {area:.0%} of the image" if isinstance(area, (int, float)) else ""
    confirmation["reason"] = (
        f"its evidence moves predictions ({own:+.0%} over the control{where}), but less than cluster "
        f"{strongest.cluster_id} of the same class in {analysis.space} ({theirs:+.0%}): that is the class's "
        "shortcut, and this is the other side of it (often the object itself)."
    )
    cluster.confirmation = confirmation
    cluster.flagged = False


def settle(tested: Sequence[tuple[ClassAnalysis, ClusterResult, int]], dominance: float) -> dict[str, int]:
    """Apply :func:`resolve` to an audit's tested candidates ``(analysis, cluster, target)``
    (in place). Returns how many were ``outranked`` and ``joined``."""
    confirmed = {
        id(cluster): (analysis, cluster)
        for analysis, cluster, _ in tested
        if cluster.confirmation and cluster.confirmation.get("status") == "confirmed"
    }
    contenders = [
        Contender(
            key=id(cluster), target=target, analysis=id(analysis), members=np.asarray(cluster.member_rows),
            lift=lift_of(cluster.confirmation or {}), score=float(cluster.artifact_score),
            lifts=setting_lifts(cluster.confirmation or {}),
        )
        for analysis, cluster, target in tested
        if id(cluster) in confirmed
    ]
    resolution = resolve(contenders, dominance)
    for key, anchor in resolution.outranked.items():
        outrank(confirmed[key][1], confirmed[anchor])
    for key, head in resolution.joined.items():
        analysis, part = confirmed[key]
        merge_into(analysis, confirmed[head][1], part)
    return {"outranked": len(resolution.outranked), "joined": len(resolution.joined)}
