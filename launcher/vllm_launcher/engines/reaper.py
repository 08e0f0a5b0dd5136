"""Engines never outlive their server.

Each running engine's process group is recorded in the runtime directory with the recording
server's pid and start time. A server that was SIGKILLed cannot stop its engines (the
parent-death signal covers the API server process, not its EngineCore children), so at
start-up a new server kills the groups whose recording server is gone. Matching is by group
id and start time, never by process name; groups of a live server are never touched, so two
servers may share a runtime directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from .process import KILL_CONFIRM_SECONDS, group_members, kill_group, process_start_time

log = logging.getLogger("vllm_launcher.reaper")


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


class EngineRecords:
    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.server_pid = os.getpid()
        self.server_start = process_start_time(self.server_pid)

    def _path(self, pgid: int) -> Path:
        return self.directory / f"engine-{pgid}.json"

    def record(self, lane: str, pgid: int) -> None:
        data = {"lane": lane, "pgid": pgid, "start_time": process_start_time(pgid),
                "server_pid": self.server_pid, "server_start_time": self.server_start}
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
                pgid, started = int(data["pgid"]), data.get("start_time")
                server = (int(data["server_pid"]), data.get("server_start_time"))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if _alive(*server):
                continue                      # another live server's engine
            members = [pid for pid in group_members(pgid)
                       if started is None or (process_start_time(pid) or 0) >= started]
            if members:
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
