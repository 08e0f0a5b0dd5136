"""Shared fixtures. The session ends with a check that no engine process (fake or real vLLM)
started by this test run is left alive: the suite fails if one is. Engines are recognised by
TMPDIR under this run's base temporary directory (tests give every engine one)."""

from __future__ import annotations

import os

import pytest

from netns import machines_or_skip
from serving import processes_with_tmpdir, write_fake_python


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
