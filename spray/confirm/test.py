"""The causal test of one candidate: paste its evidence elsewhere, remove it from the members.

A shortcut is evidence that moves a prediction by itself, whatever the object: pasted into
an image of another class, a watermark or a tag turns it into the flagged class; a
legitimate sub-strategy's evidence (a part of the object, drawn another way) does not,
because without the rest of the object it means little. Three measurements:

* **paste**: each sampled member's evidence (:mod:`spray.confirm.evidence`) is pasted
  into ``hosts`` images of other classes (``host * (1 - mask) + member * mask``). Among
  hosts not already predicted as the flagged class, ``moved`` count those that are
  afterwards; ``gain`` is the mean rise of the flagged class's probability.
* **control**: the very same pairs of masks and hosts, but the pasted pixels come from
  samples of the *rest* of the class instead of the members. Pasting a region of a class's
  images can move hosts for a legitimate reason (it carries part of the object, or it
  covers the host's own object); the swapped donor keeps the region and the object class
  and changes only what is specific to the cluster. A tag in a corner moves hosts when
  copied from a tagged member and not when copied from a clean one (there it is
  background); a part of the object moves hosts about as much from either donor. For a
  split of a class into two sides, this tells which side carries the shortcut whatever
  their sizes.
* **removal**: the evidence of members predicted as the class is filled with the rest of
  the class's typical pixels (their per-pixel median); ``lost`` counts members whose
  prediction changes, ``drop`` is the mean fall of the class's probability. Reported for
  the reader, not a term of the decision: removing part of an object also costs
  predictions.

A candidate is **confirmed** when the 95 % Wilson lower bound of the paste rate is at least
``min_paste_rate`` and the paste rate exceeds the control's (same masks, same hosts) by at
least ``min_lift``.

An overlay written over the object (a watermark, a texture) is held whole by no region, so
it is also tested as an overlay (:func:`overlay_test`, set up by ``spray.confirm.run``): the
members' mean image minus the rest of the class's, where brighter, is added to the hosts;
the control adds the rest's mean minus the hosts' (the class's object, on average), scaled
to the same brightest pixel; the removal subtracts the overlay from the members. By default
the overlay is taken against the hosts' mean image instead of the rest of the class's (a
backdoor's members are other classes' objects, which cancel against the hosts), with the
control at the same total ink (``[confirm] host_overlay_evidence``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from spray.confirm.config import OVERLAY_STATISTICS

#: Probabilities (n, classes) for display images (n, C, H, W) in [0, 1].
Predict = Callable[[np.ndarray], np.ndarray]
def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate ``hits / n`` (scipy's; (0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    interval = binomtest(int(hits), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def difference_interval(first: dict, second: dict) -> tuple[float, float]:
    """95 % interval of ``first["rate"] - second["rate"]`` from the two rates' Wilson intervals
    (``low``, ``high``): Newcombe's hybrid score interval (1998, method 10). It treats the two
    counts as independent; for a paste and its control, measured on the same hosts and so
    positively correlated, that makes it wider than it need be (a cautious "no difference")."""
    p1, p2 = float(first["rate"]), float(second["rate"])
    l1, u1, l2, u2 = (float(first["low"]), float(first["high"]), float(second["low"]), float(second["high"]))
    return (p1 - p2) - float(np.hypot(p1 - l1, u2 - p2)), (p1 - p2) + float(np.hypot(u1 - p1, p2 - l2))


def rate_entry(hits: int, n: int, shift: float, hit_key: str, shift_key: str) -> dict[str, float | int]:
    """``{"n", hit_key, "rate", "low", "high", shift_key}``: a counted rate with its interval."""
    low, high = wilson_interval(hits, n)
    return {"n": int(n), hit_key: int(hits), "rate": hits / n if n else 0.0, "low": low, "high": high, shift_key: float(shift)}


def pasted(hosts: np.ndarray, donors: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``host * (1 - mask) + donor * mask`` per pair; masks (n, H, W) apply to every channel."""
    keep = masks[:, None, :, :].astype(hosts.dtype)
    return hosts * (1 - keep) + donors * keep


@dataclass
class PasteOutcome:
    """One paste measurement and the images it made (for the report's examples)."""

    entry: dict[str, float | int]
    pairs: np.ndarray  # (n_pairs, 2): donor index, host index
    images: np.ndarray  # the pasted images, aligned with pairs


def paste_pairs(masks: np.ndarray, n_hosts: int, hosts_per_donor: int, rng: np.random.Generator) -> np.ndarray:
    """(n_pairs, 2) donor and host indices: each donor with a non-empty mask meets
    ``hosts_per_donor`` distinct random hosts."""
    usable = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    per = min(hosts_per_donor, n_hosts)
    return np.array(
        [(d, h) for d in usable for h in rng.choice(n_hosts, size=per, replace=False)], dtype=np.int64
    ).reshape(-1, 2)


def paste_test(
    predict: Predict,
    donors: np.ndarray,
    masks: np.ndarray,
    hosts: np.ndarray,
    target: int,
    pairs: np.ndarray,
    host_probs: np.ndarray | None = None,
) -> PasteOutcome:
    """Paste donor ``d``'s pixels under mask ``d`` into host ``h`` for every pair ``(d, h)``.

    ``host_probs``: the hosts' predicted probabilities when already known.
    """
    host_probs = predict(hosts) if host_probs is None else host_probs
    if len(pairs) == 0:
        return PasteOutcome(rate_entry(0, 0, 0.0, "moved", "gain"), pairs, hosts[:0])
    images = pasted(hosts[pairs[:, 1]], donors[pairs[:, 0]], masks[pairs[:, 0]])
    return _moved(predict, images, host_probs[pairs[:, 1]], target, pairs)


def _moved(predict: Predict, images: np.ndarray, before: np.ndarray, target: int, pairs: np.ndarray) -> PasteOutcome:
    """How many of the changed ``images`` (hosts with evidence put in) that were not predicted
    as ``target`` before (``before``: their probabilities then) are now, and the mean gain."""
    after = predict(images)
    eligible = before.argmax(axis=1) != target
    moved = int((after.argmax(axis=1)[eligible] == target).sum())
    gain = float((after[:, target] - before[:, target]).mean())
    return PasteOutcome(rate_entry(moved, int(eligible.sum()), gain, "moved", "gain"), pairs, images)


def member_overlay(member_images: np.ndarray, rest_images: np.ndarray, statistic: str = "mean") -> np.ndarray:
    """(C, H, W) what members add to the images of ``rest_images`` (the rest of their class, or
    other classes' images): the members' image minus the rest's, where it is brighter, each
    group summed up pixel by pixel by ``statistic``. With ``"mean"``, objects that differ from
    image to image average out; what every member carries over its object (a watermark, a
    texture) stays.

    ``statistic`` ``"median"`` takes the per-pixel medians instead: what the *typical* member
    adds. An additive mark clipped where the object is bright survives in a mean only as the
    share of members whose pixel is background there, so the mean overlay is a fainter mark
    than the one the members carry; in the median it keeps its full strength wherever most
    members are background, and objects that differ from image to image drop out entirely
    (the median of a pixel that few objects cover is background)."""
    if statistic not in OVERLAY_STATISTICS:
        raise ValueError(f"overlay statistic must be one of {OVERLAY_STATISTICS}, got {statistic!r}")
    summary = np.median if statistic == "median" else np.mean
    return np.clip(summary(member_images, axis=0) - summary(rest_images, axis=0), 0.0, None)


def overlay_test(
    predict: Predict, overlay: np.ndarray, hosts: np.ndarray, target: int, host_probs: np.ndarray | None = None
) -> PasteOutcome:
    """Add ``overlay`` (C, H, W) to every host (clipped to [0, 1]): how many move to ``target``
    (pairs: donor 0 with each host)."""
    host_probs = predict(hosts) if host_probs is None else host_probs
    images = np.clip(hosts + overlay[None], 0.0, 1.0).astype(hosts.dtype)
    pairs = np.stack([np.zeros(len(hosts), dtype=np.int64), np.arange(len(hosts))], axis=1)
    return _moved(predict, images, host_probs, target, pairs)


def removal_test(
    predict: Predict, members: np.ndarray, masks: np.ndarray, fill: np.ndarray, target: int,
    member_probs: np.ndarray | None = None,
) -> tuple[dict[str, float | int], np.ndarray, np.ndarray]:
    """Fill each member's evidence with ``fill`` (C, H, W); the entry, the filled images and
    their predicted probabilities."""
    keep = masks[:, None, :, :].astype(members.dtype)
    return removal_outcome(predict, members, members * (1 - keep) + fill[None] * keep, target, member_probs)


def removal_outcome(
    predict: Predict, members: np.ndarray, removed: np.ndarray, target: int, member_probs: np.ndarray | None = None
) -> tuple[dict[str, float | int], np.ndarray, np.ndarray]:
    """How many ``members`` predicted as ``target`` are not once their evidence is gone
    (``removed``: the same images without it); the entry, ``removed`` and its probabilities."""
    member_probs = predict(members) if member_probs is None else member_probs
    after = predict(removed)
    eligible = member_probs.argmax(axis=1) == target
    lost = int((after.argmax(axis=1)[eligible] != target).sum())
    drop = float((member_probs[eligible, target] - after[eligible, target]).mean()) if eligible.any() else 0.0
    return rate_entry(lost, int(eligible.sum()), drop, "lost", "drop"), removed, after


#: How :func:`decide` names the evidence and its control: a pasted region (the default) or
#: the members' mean overlay added to the hosts.
REGION_WORDING = ("pasting the evidence", "the same regions copied from the rest of the class")


def overlay_name(reference: str | None, statistic: str | None = "mean") -> str:
    """What an overlay setting adds, in words: the members' mean (or median) overlay, taken
    against the rest of their class or (``reference`` ``"hosts"``) against the other classes'
    images."""
    statistic = statistic or "mean"
    return f"the members' {statistic} overlay" + (f" over other classes' {statistic} image" if reference == "hosts" else "")


def overlay_wording(control: str, reference: str = "rest", statistic: str = "mean") -> tuple[str, str]:
    """:func:`decide`'s words for an overlay setting with its control scaled by ``control``
    (``"peak"`` or ``"ink"``, ``[confirm] overlay_control``), the overlay taken against
    ``reference`` (``"rest"`` of the class or the ``"hosts"``) with ``statistic``."""
    scale = "brightest pixel" if control == "peak" else "total added ink"
    return f"adding {overlay_name(reference, statistic)}", f"the rest of the class's {statistic} overlay at the same {scale}"


def decide(
    paste: dict, control: dict, min_paste_rate: float, min_lift: float, wording: tuple[str, str] = REGION_WORDING
) -> tuple[str, str]:
    """``(status, reason)`` from the paste and control entries (rule: module docstring)."""
    action, control_words = wording
    lift = float(paste["rate"]) - float(control["rate"])
    if paste["n"] == 0:
        return "rejected", "the evidence could not be pasted (no member has relevance beyond its class's)."
    if float(paste["low"]) >= min_paste_rate and lift >= min_lift:
        return "confirmed", (
            f"{action} moves {paste['moved']}/{paste['n']} images of other classes to this class "
            f"({lift:+.0%} over {control_words})."
        )
    return "rejected", (
        f"{action} moves {paste['moved']}/{paste['n']} images of other classes "
        f"({lift:+.0%} over {control_words}): not a shortcut by itself."
    )
