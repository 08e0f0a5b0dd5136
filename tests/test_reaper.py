"""The reaper recognises a real vLLM engine group whose keeper and leader are gone: vLLM names
its EngineCore and workers with setproctitle, which writes the title over the environment, so
their /proc/PID/environ reads empty and cannot show the engine id (found with real vLLM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from vllm_launcher.engines.keeper import group_members
from vllm_launcher.engines.process import process_start_time
from vllm_launcher.engines.reaper import ENGINE_ID_VARIABLE, EngineRecords
from waiting import eventually

# The group's leader starts a child that renames itself as vLLM's EngineCore does, then exits:
# what is left of the group is that child, leaderless, as after SIGKILL of server and keeper.
ENGINE = textwrap.dedent("""
    import os, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c",
        "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); "
        "print('titled', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), child.pid, flush=True)
""")


def start_group(env: dict[str, str]) -> tuple[int, int, int]:
    leader = subprocess.Popen([sys.executable, "-c", ENGINE], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **env}, start_new_session=True)
    started = process_start_time(leader.pid)
    word, child = leader.stdout.readline().split()
    assert word == "titled"
    leader.wait(timeout=30)
    return leader.pid, started, int(child)


def plant_record(records: EngineRecords, pgid: int, started: int, engine_id: str) -> None:
    data = {"lane": "alpha", "pgid": pgid, "start_time": started, "uid": os.getuid(), "engine_id": engine_id,
            "server_pid": 1, "server_start_time": -1}          # a server that is gone
    (records.directory / f"engine-{pgid}.json").write_text(json.dumps(data))


def test_a_leaderless_vllm_like_group_is_reaped(tmp_path):
    pgid, started, child = start_group({ENGINE_ID_VARIABLE: "e" * 32})
    try:
        with open(f"/proc/{child}/environ", "rb") as environ:
            assert not environ.read().strip(b"\0"), "setproctitle no longer blanks the environment"
        records = EngineRecords(tmp_path / "run")
        plant_record(records, pgid, started, "e" * 32)
        assert records.reap_orphans(grace=5) == [pgid]
        eventually(lambda: not group_members(pgid), timeout=10, what="the reaped group to be gone")
    finally:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_group_of_another_engine_id_is_left_alone(tmp_path):
    # the leader's environment (and so a child's before setproctitle) names another engine;
    # a plain process of that group (the leader's environment) shows it
    env = {ENGINE_ID_VARIABLE: "f" * 32}
    pgid = subprocess.Popen(["sleep", "600"], env={**os.environ, **env}, start_new_session=True).pid
    try:
        records = EngineRecords(tmp_path / "run")
        plant_record(records, pgid, process_start_time(pgid), "e" * 32)
        assert records.reap_orphans(grace=5) == []
        assert group_members(pgid) == [pgid]
    finally:
        os.killpg(pgid, signal.SIGKILL)
