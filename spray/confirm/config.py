"""The causal test's settings (``[confirm]``), declared once (:mod:`spray.config`).

The decision constants (``min_paste_rate``, ``min_lift``, ``dominance``) and ``evidence_area``
were set on the dev split of ``bench/detection.py`` (protocol Q3 in ``BENCHMARKS.md``) and
never on its test split; the rest of the test's shape (``evidence_mass``, ``members``,
``hosts``, the control's donor share in ``spray.confirm.evidence``) was set on the demo
before any Q3 run.
``docs/analysis.md`` ("From candidates to flags", "bench Q3") has the runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from spray.config import Choice, Range, setting, validate

DEFAULT_MIN_PASTE_RATE = 0.2
DEFAULT_MIN_LIFT = 0.2
DEFAULT_DOMINANCE = 0.85
#: The bar at the wide evidence setting, where a region carries part of the object, and the
#: lift that flags a cluster scoring under the threshold: on the dev split, among 0.3-0.7
#: and ``dominance``, and among 0.3-0.8: 0.3-0.4 and 0.4-0.6 tie, and the highest bars of
#: the tie were kept (0.3 flagged two-mode classes; docs/analysis.md, "bench Q3").
DEFAULT_WIDE_DOMINANCE = 0.4
#: Lowered from 0.6 with the median overlay (below), among 0.4-0.7 on the whole dev split:
#: 0.5 finds a watermark backdoor on 5 % of a class whose low-scoring cluster lifts +0.55
#: with the median overlay; 0.4 and 0.5 tie at the hosts' bar of 0.5, and 0.4 flags a clean
#: model and a planted one falsely at the hosts' bar of 0.4 (concept-space clusters of
#: zeros lifting +0.43 and +0.47). With the mean overlay 0.5 and 0.6 judge alike.
#: Lowered to 0.4 for the heatmap space with the correction bench's 20 planted dev cases
#: added (128 cases, 58 relied on; ``bench/detection.py ... --correction-cases --refine
#: overlay-statistic``): at the hosts' bar of 0.3-0.4, 49 found (F1 0.793) against 48
#: (0.778) at 0.5, no model flagged falsely that 0.5 does not flag; the concept spaces keep
#: 0.5 (``DEFAULT_CONCEPT_LOW_SCORE_MIN_LIFT``), where 0.4 flags the two models above.
DEFAULT_LOW_SCORE_MIN_LIFT = 0.4
#: The same lift for a *concept-space* cluster scoring under the threshold. A concept space
#: isolates groups of a class drawn one way (the channels of one style light together), and
#: the median image of such a group is a crisp stroke of that style, which moves other
#: classes' images more than the rest's blurrier median at the same ink: the false flags of
#: the low-score path on test draw 17 (+0.52, +0.63) were such clusters. Yet concept spaces
#: also find what the heatmaps miss this way: on the dev split with the correction bench's
#: planted cases (128 cases, 58 relied on; ``--correction-cases --refine concept-low-score``)
#: a random-mark backdoor (F1 0.95) and a watermark backdoor (F1 0.58) are found only by
#: concept-space clusters under the threshold; 0.6-0.7 lose one of them, 0.8 both, and no bar
#: removes a false flag there. With the heatmap space's bar at 0.4, 0.4 in the concept
#: spaces too flags a clean VGG and a plain CNN's co-occurring texture falsely (concept-space
#: clusters scoring 0), and 0.5 finds as many: 0.5.
DEFAULT_CONCEPT_LOW_SCORE_MIN_LIFT = 0.5
#: Clusters under the threshold tested per audit: the dev audits have 39 to 71 (ten classes,
#: three spaces), and the bench tests them all.
DEFAULT_MAX_LOW_SCORE = 96
#: 0.3 on the dev split, among 0.12 (the demo's first setting), 0.3 and 0.5 (with mass 0.9):
#: 16 of 25 relied-on dev cases found, against 14 at 0.12; 0.5 found 18 but let more of the
#: object through and flagged more models falsely (docs/analysis.md, "bench Q3").
DEFAULT_EVIDENCE_AREA = 0.3
#: Set on the demo before any Q3 run.
DEFAULT_EVIDENCE_MASS = 0.5
#: The second, wide setting (the largest of the dev split's grid): a texture or a watermark
#: over the whole image pastes only as a large region (docs/analysis.md, "bench Q3").
DEFAULT_WIDE_EVIDENCE_AREA = 0.5
DEFAULT_WIDE_EVIDENCE_MASS = 0.9
#: A wide region carries more of the object, so its lift must be larger: 0.6 on the dev
#: split, among 0.2 (``min_lift``), 0.3, 0.4, 0.5 and 0.6; under 0.6 a legitimate two-mode
#: class was flagged (docs/analysis.md, "bench Q3").
DEFAULT_WIDE_MIN_LIFT = 0.6
#: The third setting, the members' mean overlay (``spray.confirm.run``), and the lift that
#: confirms there: on the dev split, among 0.2-0.7, 0.2 and 0.3 found one more relied-on
#: case than without the overlay (20 of 25 against 19) and 0.4-0.7 none; every bar flagged
#: the same two-mode class (a ResNet that learned a thick style as the class) and cleared a
#: falsely flagged clean model; 0.3 is the higher bar of the tie (docs/analysis.md, "bench Q3").
DEFAULT_OVERLAY_MIN_LIFT = 0.3
#: How the overlay's control (the rest of the class's own mean overlay) is scaled: to the
#: overlay's brightest pixel, or to its total added ink.
OVERLAY_CONTROLS = ("peak", "ink")
#: How the overlays sum up each group's images, pixel by pixel (``spray.confirm.test.member_overlay``).
#: The median on the whole dev split (108 cases, 46 relied on; ``bench/detection.py --tune
#: --refine overlay-statistic``): 37 found (F1 0.773) against 35 (0.737) with the mean, no
#: model flagged falsely with either, the same one two-mode class flagged. A watermark
#: added to the members and clipped where their objects are bright survives in their mean
#: image only as the share of them that are background there, so the mean overlay is a
#: fainter mark than the one the members carry (docs/analysis.md, "The median overlay").
OVERLAY_STATISTICS = ("mean", "median")
DEFAULT_OVERLAY_STATISTIC = "median"
#: The members' mean overlay against the *hosts'* mean image, and the lift that confirms there
#: (``host_overlay_min_lift``). On the dev split with its extra watermark cases (96 cases, 39
#: relied on), beside the overlay against the class or instead of it, among 0.2-0.7: instead
#: of it at 0.4 and 0.5, 32 of 39 found (F1 0.793) against 29 (0.673) without it, 3 of 84
#: models with a false flag against 4, no two-mode class flagged against 1; beside it, the
#: same cases found with 2 models and 1 two-mode class flagged (the same objective; the
#: tune keeps the higher bars of a tie). Three watermark backdoors more are found and two
#: others move from their clean side to the stamped one (docs/analysis.md, "bench Q3").
#: Lowered to 0.4 on the whole dev split with the twelve low-fraction watermark backdoors
#: (108 cases, 46 relied on): 0.2, 0.3 and 0.4 find 35 against 34 at 0.5, with no false flag or
#: two-mode flag added; no cluster that is not a relied-on artifact lifts more than +0.30
#: there, so 0.4 (the higher bar of the tie) keeps a margin.
#: Raised to 0.5 with the median overlay (``DEFAULT_OVERLAY_STATISTIC``), among 0.3-0.7: 0.3-0.5
#: find the same 37 of 46 with no false flag at ``low_score_min_lift`` 0.5, and the tune keeps
#: the highest bar of a tie; 0.6 finds 36, 0.7 35 (docs/analysis.md, "bench Q3").
#: Lowered to 0.4 with the correction bench's 20 planted dev cases added (128 cases): 0.3 and
#: 0.4 find 49 of 58 with the low-score bar at 0.4, 0.5 finds 48, with the same two models
#: flagged falsely; the tune keeps the highest bar of the tie.
DEFAULT_HOST_OVERLAY_MIN_LIFT = 0.4
#: The lift a candidate holding most of its class must reach at every setting. Its control's
#: donors come from the rest of the class, which for a majority cluster is a small remainder
#: that is unusual by construction (what the class's typical images are not): pasted from it,
#: even the object's own parts move hosts less, so a legitimate majority lifts over it.
#: Set on the dev split (its 32 planted cases on 60-90 % of a class, 24 clean models, 12
#: two-mode classes): 0.3-0.6 tie (one extra flag fewer than no bar, nothing lost), 0.7 loses
#: a relied-on artifact. Confirmed majority clusters there lift at most +0.33 when they are
#: not an artifact the model relies on and at least +0.61 when they are; 0.5 keeps a margin
#: on both sides (the tune's tie rule would take 0.6, none above the smallest artifact).
#: 0 means no extra bar (docs/analysis.md, "bench Q3").
DEFAULT_MAJORITY_MIN_LIFT = 0.5


class EvidenceSetting(NamedTuple):
    """One way of taking a candidate's evidence, and the lift that confirms with it.

    ``overlay`` false: each member's relevance excess, at most ``area`` of the image and
    ``mass`` of the excess (``spray.confirm.evidence.excess_masks``), pasted as a region;
    true: what the members add on average to the images of ``reference`` (``"rest"``: the
    rest of their class; ``"hosts"``: the other classes' images it is added to), added to the
    hosts (``area`` and ``mass`` are 1: the whole image), each group summed up by its
    per-pixel ``statistic`` (``"mean"`` or ``"median"``)."""

    area: float
    mass: float
    min_lift: float
    overlay: bool = False
    reference: str = "rest"
    statistic: str = "mean"

    def entry(self) -> dict[str, float | bool | str]:
        """The record's ``evidence`` (an overlay against the hosts says ``"reference": "hosts"``,
        one of medians ``"statistic": "median"``)."""
        entry: dict[str, float | bool | str] = {"area": float(self.area), "mass": float(self.mass), "min_lift": float(self.min_lift)}
        if not self.overlay:
            return entry
        return {
            **entry, "overlay": True, **({"reference": "hosts"} if self.reference == "hosts" else {}),
            **({"statistic": self.statistic} if self.statistic != "mean" else {}),
        }


@dataclass
class ConfirmConfig:
    """How candidates are tested, and what confirms one.

    Attributes:
        enabled: run the causal test. Off, every candidate is flagged as ``untested``
            (the gate never reads an untested candidate as clean).
        max_candidates: at most this many candidates per audit are tested, highest score
            first; the rest are flagged as ``untested``.
        members: members (and rest-of-class samples, for the control) whose evidence is used.
        hosts: images of other classes each member's evidence is pasted into.
        evidence_area: largest share of the image one member's evidence may cover.
        evidence_mass: the evidence covers this share of the member's excess relevance over
            the rest of its class (capped by ``evidence_area``).
        wide_evidence: also test with a wide evidence setting (``wide_evidence_area``,
            ``wide_evidence_mass``) and keep the setting whose evidence lifts most among
            those that confirm: a tag pastes best as a small region, a global texture only
            as a large one.
        wide_min_lift: the lift that confirms at the wide setting (it pastes more of the
            object, so it must move more).
        overlay_evidence: also test the members' mean overlay: their mean image minus the
            rest of the class's (where brighter) added to other classes' images, against the
            rest's mean minus the hosts' scaled to the same brightest pixel; confirmed with a lift of at least
            ``overlay_min_lift``. A faint overlay written over the object (a watermark, a
            texture) moves predictions this way where no pasted region holds it whole. Off
            by default since the overlay against the hosts replaced it (dev split).
        overlay_statistic: how the overlays sum up each group's images, pixel by pixel:
            ``"mean"`` or ``"median"`` (``spray.confirm.test.member_overlay``). An additive
            mark clipped where the object is bright keeps its full strength only in the
            median, where the mean dims it by the share of members whose object covers it.
        overlay_control: the control's scale, ``"peak"`` (the overlay's brightest pixel) or
            ``"ink"`` (its total added ink).
        host_overlay_evidence: also test the members' mean overlay taken against the
            hosts' mean image instead of the rest of the class's, against the rest's mean
            minus the hosts' scaled to the same total ink; confirmed with a lift of at least
            ``host_overlay_min_lift``. In a backdoor the members are other classes' objects
            carrying a mark: against the rest of their class, the mark is lost wherever the
            class's own object is bright (a watermark over a 0's ring); against the hosts,
            which are other classes' objects too, the objects cancel and the mark stays.
        min_paste_rate: the lower 95 % bound of the share of pasted hosts that move to the
            cluster's class must reach this;
        min_lift: and the share must exceed the control's (the rest of the class's own
            evidence pasted the same way) by at least this much.
        dominance: a confirmed candidate of a class whose lift (paste rate minus control
            rate) is under this share of the class's strongest one is outranked; at or above
            it, it joins the strongest cluster of its own analysis (``spray.confirm.resolve``).
            Compared at the first evidence setting;
        wide_dominance: the same share at the wide setting.
        max_low_score: after the candidates, at most this many clusters scoring under the
            threshold (one of several clusters of their class, highest score first) are
            tested too (0: none): the score proposes, the test decides, and a shortcut split
            by position into small clusters scores low but pastes as strongly as a whole one.
        low_score_min_lift: such a cluster is flagged only when it confirms with at least
            this lift (at each setting: the larger of this and the setting's own).
        concept_low_score_min_lift: the same lift for such a cluster of a concept space,
            where a group of one drawing style separates cleanly and its crisp median image
            can lift over the rest's without being a shortcut (by default the heatmap
            space's: concept spaces also find shortcuts this way that heatmaps miss).
        majority_min_lift: a candidate holding more than half of its class's samples confirms
            only with at least this lift (at each setting: the larger of this and the
            setting's own; 0: no extra bar). Its control is pasted from the small rest of
            the class, which is atypical by construction, so even a legitimate majority's
            object parts lift over it; an artifact on most of a class still lifts far more.
        batch_size: images per forward pass.
        random_state: seeds every draw (the job's seed).
    """

    enabled: bool = setting(True, doc="test every candidate causally")
    max_candidates: int = setting(24, Range(0), doc="candidates tested per audit, highest score first")
    members: int = setting(24, Range(1), doc="members whose evidence is pasted and removed")
    hosts: int = setting(8, Range(1), doc="other-class images each member's evidence is pasted into")
    evidence_area: float = setting(DEFAULT_EVIDENCE_AREA, Range(0.0, 1.0, low_open=True), doc="largest share of the image the evidence covers")
    evidence_mass: float = setting(DEFAULT_EVIDENCE_MASS, Range(0.0, 1.0, low_open=True), doc="share of the excess relevance the evidence covers")
    wide_evidence: bool = setting(True, doc="also test a wide evidence setting; keep the one that lifts most")
    wide_evidence_area: float = setting(DEFAULT_WIDE_EVIDENCE_AREA, Range(0.0, 1.0, low_open=True), doc="largest share of the image the wide evidence covers")
    wide_evidence_mass: float = setting(DEFAULT_WIDE_EVIDENCE_MASS, Range(0.0, 1.0, low_open=True), doc="share of the excess relevance the wide evidence covers")
    wide_min_lift: float = setting(DEFAULT_WIDE_MIN_LIFT, Range(0.0, 1.0), doc="move rate above the control's that confirms at the wide setting")
    overlay_evidence: bool = setting(False, doc="also test the members' mean overlay against the rest of their class, added to other classes' images")
    overlay_statistic: str = setting(DEFAULT_OVERLAY_STATISTIC, Choice(OVERLAY_STATISTICS), doc="the overlays' per-pixel summary of each group's images: mean or median")
    overlay_control: str = setting("peak", Choice(OVERLAY_CONTROLS), doc="the overlay control's scale: the overlay's brightest pixel or its total added ink")
    overlay_min_lift: float = setting(DEFAULT_OVERLAY_MIN_LIFT, Range(0.0, 1.0), doc="move rate above the control's that confirms with the overlay")
    host_overlay_evidence: bool = setting(True, doc="also test the members' mean overlay against the hosts' mean image")
    host_overlay_min_lift: float = setting(DEFAULT_HOST_OVERLAY_MIN_LIFT, Range(0.0, 1.0), doc="move rate above the control's that confirms with the overlay against the hosts")
    min_paste_rate: float = setting(DEFAULT_MIN_PASTE_RATE, Range(0.0, 1.0), doc="lower bound of the pasted hosts' move rate that confirms")
    min_lift: float = setting(DEFAULT_MIN_LIFT, Range(0.0, 1.0), doc="move rate above the control's that confirms")
    dominance: float = setting(DEFAULT_DOMINANCE, Range(0.0, 1.0), doc="share of the class's strongest lift below which a confirmed candidate is outranked")
    wide_dominance: float = setting(DEFAULT_WIDE_DOMINANCE, Range(0.0, 1.0), doc="the same share at the wide evidence setting")
    max_low_score: int = setting(DEFAULT_MAX_LOW_SCORE, Range(0), doc="clusters under the score threshold also tested, highest score first")
    low_score_min_lift: float = setting(DEFAULT_LOW_SCORE_MIN_LIFT, Range(0.0, 1.0), doc="move rate above the control's that flags a cluster under the score threshold")
    concept_low_score_min_lift: float = setting(
        DEFAULT_CONCEPT_LOW_SCORE_MIN_LIFT, Range(0.0, 1.0), doc="the same for a concept-space cluster under the score threshold",
    )
    majority_min_lift: float = setting(DEFAULT_MAJORITY_MIN_LIFT, Range(0.0, 1.0), doc="move rate above the control's that confirms a candidate holding most of its class")
    batch_size: int = setting(128, Range(1), doc="images per forward pass")
    random_state: int = setting(0, Range(0, 2**32 - 1), doc="seed of every draw (the job's seed)", job_key=False)

    def __post_init__(self) -> None:
        validate(self)

    def low_score_lift(self, concept: bool = False) -> float:
        """The lift that flags a cluster scoring under the threshold, of a concept space or not."""
        return self.concept_low_score_min_lift if concept else self.low_score_min_lift

    def evidence_settings(self, low_score: bool = False, majority: bool = False, concept: bool = False) -> tuple[EvidenceSetting, ...]:
        """The settings each candidate is tested with, the default one first, then the wide
        one and the overlays (against the rest of the class, then the hosts); for a cluster
        scoring under the threshold (``low_score``) each lift is at least
        :meth:`low_score_lift` (of a ``concept`` space or not), for one holding most of its
        class (``majority``) at least ``majority_min_lift``."""
        floor = max(self.low_score_lift(concept) if low_score else 0.0, self.majority_min_lift if majority else 0.0)
        narrow = EvidenceSetting(self.evidence_area, self.evidence_mass, max(self.min_lift, floor))
        settings = [narrow]
        if self.wide_evidence and (self.wide_evidence_area, self.wide_evidence_mass) != (self.evidence_area, self.evidence_mass):
            settings.append(EvidenceSetting(self.wide_evidence_area, self.wide_evidence_mass, max(self.wide_min_lift, floor)))
        if self.overlay_evidence:
            settings.append(EvidenceSetting(1.0, 1.0, max(self.overlay_min_lift, floor), overlay=True, statistic=self.overlay_statistic))
        if self.host_overlay_evidence:
            settings.append(EvidenceSetting(
                1.0, 1.0, max(self.host_overlay_min_lift, floor), overlay=True, reference="hosts", statistic=self.overlay_statistic,
            ))
        return tuple(settings)
