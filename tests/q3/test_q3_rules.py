"""Bench Q3's own rules: a fresh draw of the test split never reuses a judged case, and the
rule settles confirmed clusters the way an audit does."""

from __future__ import annotations

import dataclasses

import pytest

from bench.cases import TEST_SEED_BASE, generate_cases
from spray.confirm.resolve import confirmed_as_overlay
from bench.detection import Rule, default_rule, overlay_config, setting_key, settled
from spray.confirm.config import ConfirmConfig


def test_a_fresh_draw_of_the_test_split_shares_no_case_with_the_first():
    first, fresh = generate_cases("test", "full"), generate_cases("test", "full", draw=1)
    assert len(fresh) == len(first)
    assert {spec.key() for spec in first}.isdisjoint(spec.key() for spec in fresh)
    assert all(spec.split == "test" and spec.seed >= TEST_SEED_BASE + 100 for spec in fresh)
    # the same grid: kinds, fractions, regimes and architectures in the same numbers
    cells = lambda specs: sorted((s.kind, s.fraction, s.regime, s.arch) for s in specs)  # noqa: E731
    assert cells(first) == cells(fresh)
    with pytest.raises(ValueError, match="draw"):
        generate_cases("dev", "full", draw=1)


def _cluster(members: range, score: float, paste: float, control: float, space: str = "heatmap", hits: int = 0) -> dict:
    entry = {"rate": paste, "low": paste - 0.05}
    return {
        "ratio": 1.5, "class": 3, "space": space, "members": list(members), "size": len(members), "score": score,
        "hits": hits, "tests": {"0.12/0.5": {"paste": entry, "control": {"rate": control}}},
    }


def test_the_rule_outranks_the_object_side_and_joins_fragments_of_the_shortcut():
    record = {"clusters": [
        _cluster(range(0, 600), 0.95, 0.35, 0.1),            # the class's own digits: lift 0.25
        _cluster(range(600, 650), 0.9, 0.97, 0.01, hits=50),  # the sticker on sevens: lift 0.96
        _cluster(range(650, 700), 0.8, 0.93, 0.0, hits=48),   # the sticker on ones: lift 0.93
    ]}
    rule = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.12/0.5")
    flags = rule.flags(record)
    assert len(flags) == 1
    (flag,) = flags
    assert flag["size"] == 100 and flag["hits"] == 98 and flag["score"] == 0.9
    # the same clusters in a concept space and a heatmap space: no join across analyses
    apart = settled([{**record["clusters"][1], "paste": {"rate": 0.97}, "control": {"rate": 0.01}},
                     {**record["clusters"][2], "space": "concept:layer", "paste": {"rate": 0.93}, "control": {"rate": 0.0}}], 0.85)
    assert sorted(c["size"] for c in apart) == [50, 50]


def _tested(members: range, score: float, tests: dict[str, tuple[float, float]], hits: int = 0) -> dict:
    """A cluster record with (paste rate, control rate) per evidence setting."""
    return {
        "ratio": 1.5, "class": 3, "space": "heatmap", "members": list(members), "size": len(members), "score": score,
        "hits": hits, "tests": {key: {"paste": {"rate": paste, "low": paste - 0.05}, "control": {"rate": control}}
                                for key, (paste, control) in tests.items()},
    }


def test_a_rule_of_two_evidence_settings_judges_each_cluster_at_its_strongest():
    """A texture on 60 % of a class pastes only as a wide region: at the narrow setting
    alone the unstamped side wins the class; judged at their strongest settings, the
    stamped side does (the dev texture case of docs/analysis.md, in numbers)."""
    record = {"clusters": [
        _tested(range(0, 480), 0.88, {"0.3/0.5": (0.26, 0.0), "0.5/0.9": (0.98, 0.04)}, hits=480),
        _tested(range(480, 800), 0.75, {"0.3/0.5": (0.50, 0.05), "0.5/0.9": (0.51, 0.14)}),
    ]}
    narrow = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.3/0.5")
    both = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.3/0.5+0.5/0.9")
    assert [c["hits"] for c in narrow.flags(record)] == [0]
    (flag,) = both.flags(record)
    assert flag["hits"] == 480 and flag["paste"]["rate"] == 0.98
    # a setting where the cluster does not confirm is never the one it is judged at
    weak = {"clusters": [_tested(range(0, 50), 0.9, {"0.3/0.5": (0.6, 0.1), "0.5/0.9": (0.15, -0.9)})]}
    (kept,) = both.flags(weak)
    assert kept["paste"]["rate"] == 0.6


def test_low_scoring_parts_of_a_shortcut_join_when_they_lift_enough():
    """A mark at random places on 60 % of a class (dev, in numbers): the clustering splits the
    stamped images by position into parts scoring under the threshold, each pasting as
    strongly as a tag; judged with ``low_score_lift`` they are flagged as one finding."""
    record = {"clusters": [
        _tested(range(0, 143), 0.52, {"0.3/0.5": (0.94, 0.20), "0.5/0.9": (0.99, 0.55)}, hits=142),
        _tested(range(143, 273), 0.0, {"0.3/0.5": (0.96, 0.32), "0.5/0.9": (0.99, 0.70)}, hits=123),
        # the object side: its pasted strokes move a few hosts, under the low-score bar
        _tested(range(273, 700), 0.61, {"0.3/0.5": (0.98, 0.88), "0.5/0.9": (1.0, 0.99)}, hits=19),
    ]}
    by_score = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.3/0.5+0.5/0.9", 0.6, 0.4)
    assert by_score.flags(record) == []
    (flag,) = dataclasses.replace(by_score, low_score_lift=0.5).flags(record)
    assert flag["size"] == 273 and flag["hits"] == 265
    # a bar above the parts' lifts flags none of them
    assert dataclasses.replace(by_score, low_score_lift=0.8).flags(record) == []


def test_the_overlay_setting_has_its_own_bar_and_an_anchor_is_a_yardstick_only_where_it_confirms():
    """A watermark over the object: pasted regions lift little, the members' mean overlay
    +0.4. The overlay's bar decides; and the parts of a sticker, whose anchor does not
    confirm with the overlay, are not outranked by the overlay's noise."""
    watermark = {"clusters": [
        _tested(range(0, 240), 0.9, {"0.3/0.5": (0.15, 0.1), "0.5/0.9": (0.5, 0.2), "overlay": (0.45, 0.05)}, hits=240),
        _tested(range(240, 800), 0.7, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.3, 0.3), "overlay": (0.05, 0.6)}),
    ]}
    rule = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.3/0.5+0.5/0.9+overlay", 0.6, 0.4, None, overlay_min_lift=0.3)
    (flag,) = rule.flags(watermark)
    assert flag["hits"] == 240 and flag["paste"]["rate"] == 0.45
    assert rule.lift_needed("overlay", 2) == 0.3 and rule.lift_needed("0.5/0.9", 1) == 0.6
    assert dataclasses.replace(rule, overlay_min_lift=0.5).flags(watermark) == []
    sticker = {"clusters": [
        _tested(range(0, 114), 0.9, {"0.3/0.5": (0.96, 0.01), "0.5/0.9": (0.97, 0.01), "overlay": (0.2, 0.05)}, hits=114),
        _tested(range(114, 249), 0.8, {"0.3/0.5": (0.87, 0.01), "0.5/0.9": (0.54, 0.01), "overlay": (0.05, 0.1)}, hits=135),
        _tested(range(249, 800), 0.7, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.2, 0.2), "overlay": (0.0, 0.3)}),
    ]}
    (joined,) = dataclasses.replace(rule, yardstick_confirmed=True).flags(sticker)
    assert joined["size"] == 249 and joined["hits"] == 249
    # compared at every setting, the overlay's +0.15 outranks the part's -0.05
    (alone,) = rule.flags(sticker)
    assert alone["size"] == 114


def test_parts_of_a_sticker_outranked_only_at_the_hosts_overlay_join_without_the_overlays_in_the_yardstick():
    """The dev digits VGG sticker backdoor on 90 %, in numbers: the anchor (one corner) lifts
    +0.94 / +0.92 / +0.81 at the narrow, wide and hosts' overlay settings; another corner's
    part keeps up at the region settings (+0.85, +0.79) but its overlay lifts +0.27, under
    0.4 x 0.81. With the overlays in the settling's yardstick (draw 14's rule) it is
    outranked; spray's default leaves them out, and the two corners are one finding."""
    sticker = {"clusters": [
        _tested(range(0, 38), 0.89, {"0.3/0.5": (0.96, 0.02), "0.5/0.9": (0.99, 0.07), "overlay-hosts": (0.98, 0.17)}, hits=37),
        _tested(range(38, 64), 0.85, {"0.3/0.5": (0.86, 0.01), "0.5/0.9": (0.90, 0.11), "overlay-hosts": (0.87, 0.60)}, hits=25),
        _tested(range(64, 116), 0.3, {"0.3/0.5": (0.2, 0.2), "0.5/0.9": (0.3, 0.3), "overlay-hosts": (0.1, 0.3)}),
    ]}
    rule = dataclasses.replace(default_rule(), evidence="0.3/0.5+0.5/0.9+overlay-hosts")
    assert not rule.overlay_yardstick
    (joined,) = rule.flags(sticker)
    assert joined["size"] == 64 and joined["hits"] == 62
    (alone,) = dataclasses.replace(rule, overlay_yardstick=True).flags(sticker)
    assert alone["size"] == 38


def test_an_anchor_seen_only_as_an_overlay_measures_the_others_at_its_overlay():
    """A faint watermark backdoor confirms with the hosts' overlay only (+0.6); the object
    side confirms at the narrow region (+0.25, where the anchor does not confirm) and lifts
    +0.05 with its overlay. Left with no region setting to compare at, the anchor's overlay is the
    yardstick, and the object side is outranked instead of flagged as a second shortcut."""
    record = {"clusters": [
        _tested(range(0, 60), 0.9, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.3, 0.3), "overlay-hosts": (0.8, 0.2)}, hits=60),
        _tested(range(60, 300), 0.8, {"0.3/0.5": (0.3, 0.05), "0.5/0.9": (0.75, 0.2), "overlay-hosts": (0.3, 0.25)}),
        _tested(range(300, 800), 0.3, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.2, 0.2), "overlay-hosts": (0.1, 0.3)}),
    ]}
    rule = dataclasses.replace(default_rule(), evidence="0.3/0.5+0.5/0.9+overlay-hosts", min_rest=None)
    (flag,) = rule.flags(record)
    assert flag["size"] == 60 and flag["hits"] == 60
    # the flag says, as summary.json does, that the causal test confirmed it as an overlay: the correction bench's
    # --attack-overlay adds the donors' mean overlay for it; the region-confirmed object side would not have it
    assert confirmed_as_overlay(flag["confirmation"])
    assert [entry["status"] for entry in flag["confirmation"]["settings"]] == ["rejected", "rejected", "confirmed"]
    object_side = dataclasses.replace(rule, evidence="0.3/0.5+0.5/0.9").flags(record)
    assert [f["size"] for f in object_side] == [240] and not confirmed_as_overlay(object_side[0]["confirmation"])
    assert not confirmed_as_overlay(None) and not confirmed_as_overlay({})


def test_the_overlay_against_the_hosts_has_its_own_bar_and_spray_s_defaults_name_it():
    """A watermark backdoor: its overlay against the rest of the class loses the mark, against
    the hosts it lifts +0.6. The hosts' bar decides, the rule without that setting finds
    nothing, and the bench's default rule tests spray's own settings in spray's order."""
    backdoor = {"clusters": [
        _tested(range(0, 240), 0.9, {"0.3/0.5": (0.2, 0.1), "0.5/0.9": (0.4, 0.3), "overlay": (0.1, 0.05),
                                     "overlay-hosts": (0.8, 0.2)}, hits=240),
        _tested(range(240, 800), 0.7, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.3, 0.3), "overlay": (0.0, 0.6),
                                       "overlay-hosts": (0.3, 0.6)}),
    ]}
    rule = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.3/0.5+0.5/0.9+overlay+overlay-hosts", 0.6, 0.4, None,
                overlay_min_lift=0.3, yardstick_confirmed=True, host_overlay_min_lift=0.5)
    (flag,) = rule.flags(backdoor)
    assert flag["hits"] == 240 and flag["paste"]["rate"] == 0.8
    assert rule.lift_needed("overlay-hosts", 3) == 0.5 and rule.lift_needed("overlay", 2) == 0.3
    assert dataclasses.replace(rule, host_overlay_min_lift=0.7).flags(backdoor) == []
    assert dataclasses.replace(rule, evidence="0.3/0.5+0.5/0.9+overlay").flags(backdoor) == []
    confirm, default = ConfirmConfig(), default_rule()
    assert default.evidence.split("+") == [setting_key(s, confirm) for s in confirm.evidence_settings()]
    assert default.evidence.endswith("+overlay-hosts-median") and default.host_overlay_min_lift == confirm.host_overlay_min_lift


def test_the_median_overlay_against_the_hosts_is_a_record_key_of_its_own_with_the_hosts_bar():
    """The overlay of per-pixel medians is recorded beside the mean one (``overlay-hosts-median``),
    measured by the bench with spray's own setting, and judged with the hosts' bar: a
    watermark backdoor whose mean overlay lifts +0.2 and whose median overlay lifts +0.7 is
    found by the rule that reads the median, not by the one that reads the mean."""
    median = ConfirmConfig(overlay_statistic="median")
    assert setting_key(median.evidence_settings()[-1], median) == "overlay-hosts-median"
    assert setting_key(ConfirmConfig(overlay_statistic="mean").evidence_settings()[-1], median) == "overlay-hosts"
    measured = overlay_config("overlay-hosts-median", seed=3)
    (setting,) = measured.evidence_settings()
    assert setting.reference == "hosts" and setting.statistic == "median" and measured.random_state == 3
    assert overlay_config("overlay-hosts", seed=3).evidence_settings()[0].statistic == "mean"
    backdoor = {"clusters": [
        _tested(range(0, 120), 0.3, {"0.3/0.5": (0.2, 0.1), "0.5/0.9": (0.3, 0.3), "overlay-hosts": (0.3, 0.1),
                                     "overlay-hosts-median": (0.8, 0.1)}, hits=118),
        _tested(range(120, 800), 0.0, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.3, 0.3), "overlay-hosts": (0.1, 0.3),
                                       "overlay-hosts-median": (0.1, 0.3)}),
    ]}
    mean_rule = dataclasses.replace(default_rule(), evidence="0.3/0.5+0.5/0.9+overlay-hosts")
    median_rule = dataclasses.replace(mean_rule, evidence="0.3/0.5+0.5/0.9+overlay-hosts-median")
    assert median_rule.lift_needed("overlay-hosts-median", 2) == mean_rule.lift_needed("overlay-hosts", 2)
    assert mean_rule.flags(backdoor) == []
    (flag,) = median_rule.flags(backdoor)
    assert flag["hits"] == 118 and flag["paste"]["rate"] == 0.8


def test_a_majority_side_needs_the_majority_lift_at_every_setting_and_spray_s_defaults_name_it():
    """A clean class split 700/100: the typical side lifts +0.27 over the atypical rest and is
    flagged without the majority bar, not with it; a stamp on 700 of 800 lifts +0.9 and stays
    flagged; a 100-sample minority is held only to the plain bar."""
    clean = {"clusters": [
        _tested(range(0, 700), 0.8, {"0.3/0.5": (0.37, 0.1), "0.5/0.9": (0.5, 0.3)}),
        _tested(range(700, 800), 0.7, {"0.3/0.5": (0.1, 0.2), "0.5/0.9": (0.2, 0.4)}),
    ]}
    stamped = {"clusters": [
        _tested(range(0, 700), 0.8, {"0.3/0.5": (0.95, 0.05), "0.5/0.9": (0.97, 0.1)}, hits=700),
        _tested(range(700, 800), 0.7, {"0.3/0.5": (0.05, 0.6), "0.5/0.9": (0.1, 0.7)}),
    ]}
    minority = {"clusters": [
        _tested(range(0, 700), 0.7, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.2, 0.2)}),
        _tested(range(700, 800), 0.8, {"0.3/0.5": (0.4, 0.1), "0.5/0.9": (0.5, 0.3)}, hits=100),
    ]}
    plain = Rule(1.5, 0.6, 0.2, 0.2, 0.85, "0.3/0.5+0.5/0.9", 0.6, 0.4, None)
    barred = dataclasses.replace(plain, majority_min_lift=0.5)
    assert [f["size"] for f in plain.flags(clean)] == [700] and barred.flags(clean) == []
    assert [f["hits"] for f in barred.flags(stamped)] == [700]
    assert [f["hits"] for f in barred.flags(minority)] == [100]
    assert barred.lift_needed("0.3/0.5", 0, majority=True) == 0.5 and barred.lift_needed("0.5/0.9", 1, majority=True) == 0.6
    confirm = ConfirmConfig()
    assert default_rule().majority_min_lift == (confirm.majority_min_lift or None)


def test_a_concept_space_cluster_under_the_threshold_can_have_a_bar_of_its_own():
    """Two clusters scoring 0 that lift +0.6 only with the median overlay, one in the heatmap
    space, one in a concept space: at spray's bars (0.4, and 0.5 in a concept space) both are flagged; with
    ``concept_low_score_lift`` 0.8 only the heatmap one is."""
    def cluster(space: str, members: range) -> dict:
        entry = _tested(members, 0.0, {"0.3/0.5": (0.2, 0.1), "0.5/0.9": (0.3, 0.3), "overlay-hosts": (0.2, 0.1),
                                       "overlay-hosts-median": (0.7, 0.1)}, hits=len(members))
        return {**entry, "space": space, "class": 3 if space == "heatmap" else 5}

    record = {"clusters": [
        cluster("heatmap", range(0, 100)), _tested(range(100, 800), 0.0, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.1, 0.1),
                                                                          "overlay-hosts": (0.0, 0.1), "overlay-hosts-median": (0.0, 0.1)}),
        cluster("concept:layer3", range(800, 900)),
        {**_tested(range(900, 1600), 0.0, {"0.3/0.5": (0.1, 0.1), "0.5/0.9": (0.1, 0.1), "overlay-hosts": (0.0, 0.1),
                                            "overlay-hosts-median": (0.0, 0.1)}), "space": "concept:layer3", "class": 5},
    ]}
    default = default_rule()
    assert default.concept_low_score_lift == ConfirmConfig().concept_low_score_min_lift == 0.5
    assert sorted(flag["space"] for flag in default.flags(record)) == ["concept:layer3", "heatmap"]
    own_bar = dataclasses.replace(default, concept_low_score_lift=0.8)
    assert [flag["space"] for flag in own_bar.flags(record)] == ["heatmap"]
    assert own_bar.lift_needed("overlay-hosts-median", 2, low_score=True, concept=True) == 0.8
    assert own_bar.lift_needed("overlay-hosts-median", 2, low_score=True) == default.low_score_lift == 0.4
