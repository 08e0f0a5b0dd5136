"""Engines die with the server (engines/keeper.py): the keeper alone, and the real
`vllm-launcher serve` SIGKILLed with fake engines (the real vLLM case is
tests/test_e2e_real_vllm.py's SIGKILL test)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest

from serving import fake_lanes_env, group_alive, keepers_of, processes_with_tmpdir, serving, start_server
from vllm_launcher.engines.process import KEEPER_SCRIPT
from waiting import eventually

# An "engine" that forks a child in its group (as vLLM's API server forks VLLM::EngineCore),
# prints the child's pid, then sleeps, or exits with the status in argv[1] when given one.
ENGINE = ("import os, sys, time\n"
          "pid = os.fork()\n"
          "if pid == 0:\n    time.sleep(600); sys.exit(0)\n"
          "print(pid, flush=True)\n"
          "if len(sys.argv) > 1:\n    sys.exit(int(sys.argv[1]))\n"
          "time.sleep(600)\n")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def kept(*engine_args: str):
    """The keeper running ENGINE as the launcher starts it: (keeper, the pipe's write end, the
    engine's child's pid); whatever is left is killed afterwards."""
    read_end, write_end = os.pipe()
    keeper = subprocess.Popen([sys.executable, "-I", "-S", str(KEEPER_SCRIPT), str(read_end), "--",
                               sys.executable, "-c", ENGINE, *engine_args],
                              stdout=subprocess.PIPE, text=True, pass_fds=(read_end,), start_new_session=True)
    os.close(read_end)
    pipe = [write_end]
    try:
        yield keeper, pipe, int(keeper.stdout.readline())
    finally:
        for fd in pipe:
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(keeper.pid, signal.SIGKILL)
        keeper.wait()


def test_a_stop_ends_the_engine_and_the_keeper_leaves_with_its_status_and_nothing_behind():
    with kept() as (keeper, _, grandchild):
        assert eventually(lambda: len(group_alive(keeper.pid)) == 3, "keeper, engine and child in the group", 10)
        assert os.getpgid(grandchild) == keeper.pid
        os.killpg(keeper.pid, signal.SIGTERM)              # a stop's SIGTERM: the engine dies of it
        assert keeper.wait(timeout=10) == -signal.SIGTERM  # the keeper ignores it, and leaves as the engine did
        eventually(lambda: not group_alive(keeper.pid), "the group gone", 10)   # the child too (it ignored nothing:
        # the keeper SIGKILLs what is left once the engine is gone)


def test_the_engines_exit_status_is_the_keepers():
    with kept("3") as (keeper, _, grandchild):
        assert keeper.wait(timeout=10) == 3
        eventually(lambda: not alive(grandchild), "the engine's child gone", 10)


def test_the_pipe_closed_is_the_launchers_death_and_the_whole_group_dies():
    with kept() as (keeper, pipe, grandchild):
        eventually(lambda: len(group_alive(keeper.pid)) == 3, "keeper, engine and child in the group", 10)
        os.close(pipe.pop())                               # what the kernel does when the launcher dies
        assert keeper.wait(timeout=10) == -signal.SIGKILL
        eventually(lambda: not group_alive(keeper.pid), "the group gone", 10)
        assert not alive(grandchild)


@pytest.mark.engine
def test_a_sigkilled_server_leaves_no_engine_process(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_CHILD": "1"}})
    served = start_server(tmp_path, env, wait_ready_lane="a")
    (pgid,) = served.record_engine_groups()
    assert len(group_alive(pgid)) == 3                     # keeper, engine and its forked "EngineCore"
    assert [keeper.pid for keeper in keepers_of(served.process.pid)] == [pgid]
    served.process.send_signal(signal.SIGKILL)
    served.process.wait()
    eventually(lambda: not group_alive(pgid), "the engine group gone", 30)
    assert processes_with_tmpdir(str(tmp_path)) == []      # nothing of the engine, whatever its group


@pytest.mark.engine
def test_keepers_leave_with_their_engines(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "b": {}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        (first,) = keepers_of(served.process.pid)
        assert client.post("/lanes/a/unload").json()["state"] == "stopped"
        assert not alive(first.pid)                        # gone when the launcher says stopped
        assert client.post("/lanes/b/load").status_code == 200
        served.wait_state("b", "ready")
        (second,) = keepers_of(served.process.pid)
        assert second.pid != first.pid
    assert not alive(second.pid)
