"""The keeper of one engine: whatever kills the launcher, even SIGKILL, kills the whole engine.

Run by the launcher's own Python as a file (standard library only), one per engine start, as
the leader of the engine's process group (the launcher starts it in a session of its own):

    python -I -S keeper.py FD -- ENGINE_ARGV...

It runs ENGINE_ARGV as its child, in its group, with its own environment, and exits with the
engine's status when the engine exits (so the launcher sees the engine's exit as before), after
SIGKILLing what is left of the group (vLLM's EngineCore and workers outlive a crashed API
server). FD is the read end of a pipe whose only write end the launcher holds: the launcher
never writes, so end of file comes only when the launcher is gone, however it died; then the
keeper SIGKILLs its whole group, itself included.

Why the parent-death signal is not enough: it reaches only the launcher's direct child (vLLM's
API server), not its children (VLLM::EngineCore, the workers), which live on holding the GPU's
memory. Why the group: every process vLLM starts stays in it, and while the keeper lives its
pid is the group's id, so the id cannot name anything else. The environment cannot identify
them: setproctitle (VLLM::EngineCore) overwrites what /proc/PID/environ shows.

The keeper ignores SIGTERM, SIGINT and SIGHUP (a stop sends SIGTERM to the group: the engine
stops, then the keeper leaves with it); SIGKILL of the group ends it with the rest.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL = 0.1              # seconds between looks at the engine when pidfd_open is not available
KILL_FOR = 10.0         # seconds the keeper tries to end what is left of its group


def spawn(argv: list[str], fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:                                    # the engine: default signals, dies with its keeper
        os.close(fd)
        for sig in IGNORED:
            signal.signal(sig, signal.SIG_DFL)
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.execvp(argv[0], argv)
    except BaseException as error:          # noqa: BLE001 - a child must never return
        os.write(2, f"keeper: cannot run {argv[0]}: {error}\n".encode())
    os._exit(127)


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is pgid (from /proc, so it sees grandchildren too)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state ppid pgrp ...; zombies hold no memory, skip them
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def kill_the_rest() -> None:
    deadline = time.monotonic() + KILL_FOR
    me = os.getpid()
    while (left := [pid for pid in group_members(os.getpgid(0)) if pid != me]) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def leave_as(status: int) -> None:
    """Exit as the engine did: its exit code, or killed by its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))     # the engine's crash, not ours to dump
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> None:
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        print("usage: keeper.py FD -- ENGINE_ARGV...", file=sys.stderr)
        os._exit(2)
    fd = int(argv[0])
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    child = spawn(argv[2:], fd)
    try:
        watched = [fd, os.pidfd_open(child)]
    except (AttributeError, OSError):
        watched = [fd]
    while True:
        ready, _, _ = select.select(watched, [], [], None if len(watched) == 2 else POLL)
        if fd in ready:
            try:
                said = os.read(fd, 64)
            except OSError:
                said = b""
            if not said:                     # the launcher is gone: the whole group goes
                os.killpg(0, signal.SIGKILL)
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            kill_the_rest()
            leave_as(status)


if __name__ == "__main__":
    main(sys.argv[1:])
