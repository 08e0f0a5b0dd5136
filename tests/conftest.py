"""Shared fixtures. The session ends with a check that no engine process (fake or real vLLM)
started by this test run is left alive: the suite fails if one is. Engines are recognised by
TMPDIR under this run's base temporary directory (tests give every engine one)."""

from __future__ import annotations

import functools
import os

import pytest

import tiers
from netns import machines_or_skip
from real_engine import (  # noqa: F401 (fixtures, once per run for every module)
    demo_served,
    lanes_env,
    no_leftover_vllm_processes,
    vllm_cache_root,
)
from serving import processes_with_tmpdir, write_fake_python
from vllm_launcher.engines import EngineProcess


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """tiers.require() asks the running test's markers."""
    tiers.current = item
    yield
    tiers.current = None


def _guard_engine_starts() -> None:
    """An engine started in the test's own process (a Router under test) asks the test's marker;
    `vllm-launcher serve` in a subprocess is guarded where tests start it (serving.start_server)."""
    start = EngineProcess.start

    @functools.wraps(start)
    async def guarded(self):
        tiers.require("engine", "e2e", "cluster", doing="starts an engine process", now=False)
        return await start(self)

    EngineProcess.start = guarded


_guard_engine_starts()


@pytest.fixture(autouse=True)
def _marked_for_what_it_started():
    tiers.unmarked.clear()
    yield
    if tiers.unmarked:
        pytest.fail(tiers.unmarked[0], pytrace=False)


@pytest.fixture(scope="session")
def fake_python(tmp_path_factory):
    return write_fake_python(tmp_path_factory.mktemp("fake-engine"))


@pytest.fixture(scope="session", autouse=True)
def no_engine_left_behind(tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp())
    yield
    left = processes_with_tmpdir(base)
    if left:
        for pid, _ in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"engine processes left behind by the test run: {left}", pytrace=False)


def pytest_terminal_summary(terminalreporter):
    from measurements import MEASURED

    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture
def two_machines():
    """Two network namespaces (tests/netns.py) for one test: (head, worker) machines, removed
    with every process inside after it; skipped without root, failed under CI."""
    with machines_or_skip(2) as made:
        yield made
