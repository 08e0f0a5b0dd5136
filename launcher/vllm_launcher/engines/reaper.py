"""Engines never outlive their server.

Each running engine's process group is recorded in the runtime directory (private_directory:
this user's, closed to others' writes) with the recording server's pid and start time, and
what identifies the group: its leader's start time, the owner's uid and a random engine id
that every process of the group carries in its environment (ENGINE_ID_VARIABLE). A server that
was SIGKILLed cannot stop its engines (the parent-death signal covers the API server process,
not its EngineCore children); each engine's keeper (keeper.py, its group's leader) kills the
group then. Should the keeper be gone too (killed with the server), at start-up a new server
kills the groups whose recording server is gone, and only when every live process of the group
still matches the record: owned by the recorded uid, started no earlier than the leader, carrying the engine id (readable in
/proc/PID/environ by its owner only, so another user cannot make a process look like an
engine) or showing an empty environment (vLLM's EngineCore and workers: setproctitle writes
their title over it); command lines are not compared: vLLM renames its children
VLLM::EngineCore. A record
that does not match (a reused pid, a record this launcher did not write) is dropped and its
group left alone. Groups of a live server are never touched, so two servers may share a
runtime directory.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from .keeper import group_members
from .process import KILL_CONFIRM_SECONDS, kill_group, private_directory, process_start_time

log = logging.getLogger("vllm_launcher.reaper")

# In every engine's environment (not VLLM_*: vLLM warns about names it does not know).
ENGINE_ID_VARIABLE = "LAUNCHER_ENGINE_ID"


def default_runtime_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "vllm-launcher"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "vllm-launcher"


def _alive(pid: int, start_time: int | None) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


def new_engine_id() -> str:
    return secrets.token_hex(16)


def _carries(pid: int, engine_id: str) -> bool:
    """The process carries the engine's id, or shows no environment at all: setproctitle (vLLM
    names its EngineCore and workers with it) reuses the environment's memory for the title, so
    /proc/PID/environ of such a process reads empty. Ownership and start time, checked by the
    caller, still hold for it."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            environ = file.read()
    except OSError:
        return False
    return not environ.strip(b"\0") or f"{ENGINE_ID_VARIABLE}={engine_id}".encode() in environ.split(b"\0")


def _mismatch(pgid: int, data: dict[str, Any]) -> str | None:
    """Why the live group `pgid` is not the engine the record describes, or None if it is."""
    started, uid, engine_id = data.get("start_time"), data.get("uid"), data.get("engine_id")
    if not (isinstance(started, int) and isinstance(uid, int) and isinstance(engine_id, str) and engine_id):
        return "the record lacks the group's start time, owner or engine id (not written by this launcher)"
    leader_start = process_start_time(pgid)
    if leader_start is not None and leader_start != started:
        return f"its leader started at tick {leader_start}, the record says {started} (a reused pid)"
    for pid in group_members(pgid):
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue                                  # gone meanwhile
        if owner != uid:
            return f"process {pid} belongs to uid {owner}, the record says {uid}"
        if (process_start_time(pid) or 0) < started:
            return f"process {pid} is older than the recorded group"
        if not _carries(pid, engine_id):
            return f"process {pid} does not carry the engine's id"
    return None


class EngineRecords:
    def __init__(self, directory: Path):
        self.directory = private_directory(directory)
        self.server_pid = os.getpid()
        self.server_start = process_start_time(self.server_pid)

    def _path(self, pgid: int) -> Path:
        return self.directory / f"engine-{pgid}.json"

    def record(self, lane: str, pgid: int, engine_id: str) -> None:
        """The group of an engine started with ENGINE_ID_VARIABLE=engine_id in its environment."""
        data = {"lane": lane, "pgid": pgid, "start_time": process_start_time(pgid), "uid": os.getuid(),
                "engine_id": engine_id, "server_pid": self.server_pid, "server_start_time": self.server_start}
        tmp = self._path(pgid).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self._path(pgid))

    def forget(self, pgid: int) -> None:
        self._path(pgid).unlink(missing_ok=True)

    def reap_orphans(self, grace: float = 5.0) -> list[int]:
        """Kill the recorded groups whose server is no longer alive. Returns their group ids."""
        reaped = []
        for path in sorted(self.directory.glob("engine-*.json")):
            try:
                data = json.loads(path.read_text())
                pgid = int(data["pgid"])
                server = (int(data["server_pid"]), data.get("server_start_time"))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if _alive(*server):
                continue                      # another live server's engine
            members = group_members(pgid)
            why = _mismatch(pgid, data) if members else None
            if why:
                log.warning("not reaping process group %d named by %s: %s", pgid, path, why)
            elif members:
                log.warning("reaping engine group %d of lane %s left by server %d (gone): %d process(es)",
                            pgid, data.get("lane"), server[0], len(members))
                kill_group(pgid, signal.SIGTERM)
                deadline = time.monotonic() + grace
                while group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                give_up = time.monotonic() + KILL_CONFIRM_SECONDS
                while group_members(pgid) and time.monotonic() < give_up:
                    kill_group(pgid, signal.SIGKILL)
                    time.sleep(0.1)
                reaped.append(pgid)
            path.unlink(missing_ok=True)
        return reaped
