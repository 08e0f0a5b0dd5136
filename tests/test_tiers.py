"""The tiers (tests/tiers.py): every combination of markers lands in exactly one tier, the markers
are pytest.ini's, a helper's marker check fails an unmarked test, and the runner's summary."""

from __future__ import annotations

import configparser
import itertools
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

import tiers

ROOT = Path(__file__).resolve().parent.parent


def selected(tier: tiers.Tier, carried: set[str]) -> bool:
    return Expression.compile(tiers.expression(tier)).evaluate(lambda name, **_: name in carried)


def test_every_combination_of_markers_lands_in_exactly_one_tier():
    markers = [tier.marker for tier in tiers.TIERS if tier.marker]
    for flags in itertools.product((False, True), repeat=len(markers)):
        carried = {marker for marker, on in zip(markers, flags, strict=True) if on}
        landed = [tier.name for tier in tiers.TIERS if selected(tier, carried)]
        first = next((tier.name for tier in tiers.TIERS if tier.marker in carried), "fast")
        assert landed == [first], (carried, landed)
    assert sorted(tiers.RUN_ORDER) == sorted(tiers.BY_NAME)


def test_the_tiers_markers_are_the_declared_ones():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    declared = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].splitlines() if line.strip()}
    assert {tier.marker for tier in tiers.TIERS if tier.marker} == declared


class Item:
    nodeid = "tests/test_x.py::test_y"

    def __init__(self, *markers: str):
        self.markers = markers

    def get_closest_marker(self, name: str):
        return name if name in self.markers else None


def test_a_helper_fails_a_test_without_the_tiers_marker(monkeypatch):
    monkeypatch.setattr(tiers, "current", Item("nix"))
    tiers.require("nix", doing="runs Nix")                      # marked: nothing
    with pytest.raises(pytest.fail.Exception, match=r"test_y starts an engine.*mark.engine or @pytest.mark.e2e"):
        tiers.require("engine", "e2e", doing="starts an engine")
    monkeypatch.setattr(tiers, "unmarked", [])
    tiers.require("engine", doing="starts an engine process", now=False)     # for the test's teardown
    assert tiers.unmarked == ["tests/test_x.py::test_y starts an engine process, so it belongs in a slower tier: "
                              "mark it @pytest.mark.engine (tests/tiers.py)"]
    monkeypatch.setattr(tiers, "current", None)
    tiers.require("engine", doing="outside pytest")            # bench/ uses some helpers: no check


def test_a_tier_prints_its_time_against_its_budget():
    tier = tiers.Tier("fast", None, 120)
    assert tiers.time_line(tier, 0, 95.2) == "tier fast: 95 s of 120 s budget"
    assert tiers.time_line(tier, 1, 130) == \
        "tier fast: 130 s of 120 s budget, OVER BUDGET by 10 s, FAILED (pytest exit 1)"
    assert tiers.time_line(tier, tiers.NO_TESTS, 3) == "tier fast: 3 s of 120 s budget, no tests selected"
    for line, counts in [("===== 1 failed, 344 passed, 302 deselected in 76.46s (0:01:16) =====",
                          [("1", "failed"), ("344", "passed")]),
                         ("4 passed, 2 skipped, 659 deselected in 40.90s", [("4", "passed"), ("2", "skipped")])]:
        assert tiers.COUNT.findall(tiers.SUMMARY.match(line).group(1)) == counts
    assert not tiers.SUMMARY.match("43.79s call     tests/test_a.py::test_b")
