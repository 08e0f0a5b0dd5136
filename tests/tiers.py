"""The suite's tiers: each test runs in exactly one, the first below whose marker it carries
(pytest.ini lists the markers); `fast` takes the rest: unit tests and the in-process ASGI tests.

`python tests/tiers.py [TIER ...] [-- PYTEST ARGS]` (make test, make test-fast) runs the tiers one
after another, each one pytest with its marker expression, prints each tier's time against its
budget (a tier that grows shows it) and ends with the tiers' summed pytest summary line.

A helper that starts what a tier is for (an engine, real vLLM, Ray or a network namespace, Nix, the
closure, compose) calls require(): the test calling it must carry that tier's marker, else it fails,
so nothing slow hides in the fast tier."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Tier:
    name: str
    marker: str | None          # None: the tests no other tier takes
    budget: int                 # seconds, on this 2-core machine
    pytest_args: tuple[str, ...] = ()


# Precedence order: a test marked e2e and cluster (real vLLM over Ray) is the cluster tier's.
# Budgets: what each took on this 2-core machine beside other users' load (load average 2-6,
# December 2026), with a margin (docs/tests.md has the numbers). Real vLLM tiers: most of their
# time is engine starts (25-45 s each here), so a test that adds one shows.
TIERS = (
    Tier("cluster", "cluster", 480),        # 331 s, 237 s of it the real vLLM two-node test
    Tier("e2e", "e2e", 600),                # 451-476 s
    Tier("closure", "closure", 240),
    Tier("nix", "nix", 60),
    Tier("compose", "compose", 60),
    # one process: two workers gained nothing here (67 s alone, 71 s on two, beside other load)
    Tier("properties", "properties", 240),
    # fake engines wait more than they compute: two workers, a file each (module fixtures stay
    # whole); 335 s on two workers (356-403 s, CI 363 s, before a 30 s wait left test_server_faults)
    Tier("engine", "engine", 540, ("-n", "2", "--dist", "loadfile")),
    Tier("fast", None, 120),
)
RUN_ORDER = ("fast", "properties", "engine", "nix", "compose", "closure", "e2e", "cluster")
BY_NAME = {tier.name: tier for tier in TIERS}
ROOT = Path(__file__).resolve().parent.parent
NO_TESTS = 5        # pytest's exit status when a tier selects nothing (a -k filter, say): not a failure


def expression(tier: Tier) -> str:
    """The tier's pytest -m expression: its marker and none of the tiers before it."""
    before = [other.marker for other in TIERS[:TIERS.index(tier)] if other.marker]
    if tier.marker is None:
        return " and ".join(f"not {marker}" for marker in before)
    return " and ".join([tier.marker, *(f"not {marker}" for marker in before)])


# --- the guard: set around each test by conftest.py ---------------------------------------------

current: pytest.Item | None = None
unmarked: list[str] = []        # what require(now=False) found, failed at the test's teardown


def require(*markers: str, doing: str, now: bool = True) -> None:
    """Fail the running test unless it carries one of `markers` (outside pytest: nothing); with
    now=False (inside code under test, which may catch the failure) at the test's teardown."""
    item = current
    if item is None or any(item.get_closest_marker(marker) for marker in markers):
        return
    message = (f"{item.nodeid} {doing}, so it belongs in a slower tier: mark it "
               + " or ".join(f"@pytest.mark.{marker}" for marker in markers) + " (tests/tiers.py)")
    if not now:
        unmarked.append(message)
        return
    pytest.fail(message, pytrace=False)


# --- the runner ---------------------------------------------------------------------------------

SUMMARY = re.compile(r"^=* ?(\d+ \w+.*\bin [0-9.]+s\b.*?) ?=*$")      # with or without -q's borders
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|warnings?)\b")


def run_tier(tier: Tier, extra: list[str]) -> tuple[int, float, dict[str, int]]:
    """Run one tier, its output passed through; its exit status, seconds and summary counts."""
    argv = [sys.executable, "-m", "pytest", "-m", expression(tier), *tier.pytest_args, *extra]
    print(f">> tier {tier.name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    tail = b""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT) as process:      # pytest.ini's testpaths
        while chunk := process.stdout.read1(65536):      # as it comes: progress dots end no line
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            tail = (tail + chunk)[-8192:]
    counts: dict[str, int] = {}
    for line in tail.decode(errors="replace").splitlines():
        found = SUMMARY.match(line.strip())     # the last such line is pytest's summary
        if found:
            counts = {}
            for number, kind in COUNT.findall(found.group(1)):
                kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
                counts[kind] = counts.get(kind, 0) + int(number)
    return process.returncode, time.monotonic() - started, counts


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    names = (argv[:argv.index("--")] if "--" in argv else argv) or list(RUN_ORDER)
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        print(f"tiers.py: no tier {', '.join(unknown)}; tiers: {', '.join(RUN_ORDER)}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        status, seconds, counts = run_tier(BY_NAME[name], extra)
        results.append((BY_NAME[name], status, seconds, counts))
        print(f">> {time_line(BY_NAME[name], status, seconds)}", flush=True)
    print()
    for tier, status, seconds, _ in results:
        print(time_line(tier, status, seconds))
    total: dict[str, int] = {}
    for *_, counts in results:
        for kind, number in counts.items():
            total[kind] = total.get(kind, 0) + number
    order = ["failed", "passed", "skipped", "xfailed", "xpassed", "errors", "warnings"]
    shown = ", ".join(f"{total[kind]} {kind}" for kind in order if total.get(kind)) or "no tests ran"
    elapsed = sum(seconds for _, _, seconds, _ in results)
    print(f"{'=' * 20} {shown} in {elapsed:.2f}s ({len(results)} tiers) {'=' * 20}")
    return next((status for _, status, _, _ in results if status not in (0, NO_TESTS)), 0)


def time_line(tier: Tier, status: int, seconds: float) -> str:
    verdict = {0: "", NO_TESTS: ", no tests selected"}.get(status, f", FAILED (pytest exit {status})")
    over = f", OVER BUDGET by {seconds - tier.budget:.0f} s" if seconds > tier.budget else ""
    return f"tier {tier.name}: {seconds:.0f} s of {tier.budget} s budget{over}{verdict}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
