"""What an attacker found on main (issue 19), each fixed and tried again here, against the real
server with fake engines on 127.0.0.1:

- the runtime directory and its sockets/ are refused (status 2, before anything in them is
  read or created) when another user owns them or could write them; a record the server did
  not write never gets a process group signalled;
- random multipart forms on the audio routes end in an OpenAI error or a forward, never a 500;
- a path with a trailing slash is an unknown path (404), never a redirect built from Host;
- secrets are masked by value: a configuration error, and an engine that prints its own key;
- two Authorization headers are refused (400) on every route.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from launcher_cli import run_launcher
from serving import fake_lanes_env, free_port, serving

pytestmark = pytest.mark.engine

OTHER_UID = 65534                   # nobody


def serve_refused(tmp_path: Path, fake_python: Path, runtime: Path) -> subprocess.CompletedProcess:
    env = {**fake_lanes_env(fake_python, {"a": {}}), "VLLM_RUNTIME_DIR": str(runtime), "VLLM_HOST": "127.0.0.1",
           "VLLM_PORT": str(free_port()), "TMPDIR": str(tmp_path)}
    return run_launcher(env, "serve", timeout=30)


def own_group_sleeper() -> subprocess.Popen:
    """A process in a group of its own that no launcher started: what a planted record names."""
    return subprocess.Popen(["sleep", "600"], start_new_session=True)


def plant_record(directory: Path, pgid: int, **fields) -> Path:
    """A record as a previous (SIGKILLed) server would leave it, its server long gone."""
    path = directory / f"engine-{pgid}.json"
    path.write_text(json.dumps({"lane": "a", "pgid": pgid, "server_pid": 2 ** 22 + 1, "server_start_time": 1,
                                **fields}))
    return path


def alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


@pytest.mark.parametrize("case", ["world-writable", "group-writable", "other-owner", "sockets-world-writable",
                                  "symlink"])
def test_an_unsafe_runtime_directory_is_refused_before_anything_in_it_is_read(tmp_path, fake_python, case):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    refused = runtime
    if case == "world-writable":
        runtime.chmod(0o1777)
    elif case == "group-writable":
        runtime.chmod(0o770)
    elif case == "other-owner":
        os.chown(runtime, OTHER_UID, OTHER_UID)
    elif case == "sockets-world-writable":
        refused = runtime / "sockets"
        refused.mkdir(mode=0o700)
        refused.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        runtime.rmdir()
        runtime.symlink_to(tmp_path / "elsewhere")
    sleeper = own_group_sleeper()
    try:
        if case != "symlink":
            plant_record(runtime, sleeper.pid)           # what another user could plant there
        result = serve_refused(tmp_path, fake_python, runtime)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{refused} is " in result.stderr and "accepted: a directory owned by this user (uid 0)" in result.stderr
        assert "nothing started" in result.stderr
        assert alive(sleeper), "the planted record's group was signalled"
        assert "reaping" not in result.stdout + result.stderr
        assert not (runtime / "sockets").exists() or case == "sockets-world-writable"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_absent_runtime_directory_is_created_private(tmp_path, fake_python):
    runtime = tmp_path / "deep" / "run"
    with serving(tmp_path, {**fake_lanes_env(fake_python, {"a": {}}), "VLLM_RUNTIME_DIR": str(runtime)}):
        for directory in (runtime, runtime / "sockets"):
            info = directory.stat()
            assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.getuid()), directory


def test_a_record_naming_a_group_it_does_not_describe_is_never_signalled(tmp_path, fake_python):
    """Records in the (private) runtime directory naming a live group that is not the launcher's
    engine: a bare pgid, and one copying everything anyone can read about the group (its start
    time, owner, pgid) but not the engine id in its environment. Neither is signalled."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    bare, forged = own_group_sleeper(), own_group_sleeper()
    try:
        stat = Path(f"/proc/{forged.pid}/stat").read_text().rsplit(")", 1)[1].split()
        plant_record(runtime, bare.pid)
        plant_record(runtime, forged.pid, start_time=int(stat[19]), uid=os.getuid(), engine_id="0" * 32)
        env = {**fake_lanes_env(fake_python, {"a": {}}), "VLLM_RUNTIME_DIR": str(runtime)}
        with serving(tmp_path, env) as served:           # listening: the reaper has run
            log = served.log()
            assert (f"not reaping process group {bare.pid} named by {runtime}/engine-{bare.pid}.json: the record "
                    "lacks the group's start time, owner or engine id") in log, log
            assert f"not reaping process group {forged.pid} named by " in log, log
            assert f"process {forged.pid} does not carry the engine's id" in log, log
            assert "left behind by a previous server" not in log
            assert alive(bare) and alive(forged)
    finally:
        for sleeper in (bare, forged):
            sleeper.send_signal(signal.SIGKILL)
            sleeper.wait()
    assert bare.returncode == forged.returncode == -signal.SIGKILL      # no SIGTERM reached them first
