"""Shared fixtures. The session ends with a check that no engine process (fake or real vLLM)
started by this test run is left alive: the suite fails if one is."""

from __future__ import annotations

import os

import pytest

from serving import TESTS, processes_with, write_fake_python


@pytest.fixture(scope="session")
def fake_python(tmp_path_factory):
    return write_fake_python(tmp_path_factory.mktemp("fake-engine"))


def _leftover_engines() -> list[tuple[int, str]]:
    fake = processes_with(str(TESTS / "fake_engine.py"))
    real = [(pid, cmd) for pid, cmd in processes_with("vllm.entrypoints.openai.api_server")
            if "pytest" not in cmd]
    return fake + real


@pytest.fixture(scope="session", autouse=True)
def no_engine_left_behind():
    before = {pid for pid, _ in _leftover_engines()}
    yield
    left = [(pid, cmd) for pid, cmd in _leftover_engines() if pid not in before]
    if left:
        for pid, _ in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"engine processes left behind by the test run: {left}", pytrace=False)
