"""Network namespaces as machines: two (or more) namespaces joined by veth pairs with addresses
in a private /24 the test owns, loopback up, no default route (nothing can leave them), removed
after use with every process inside killed.

Where namespaces cannot be made (not root, no `ip`, a sandbox), `machines()` raises
NamespacesUnavailable; `skip_or_fail` turns that into a skip, except under CI (`CI` set), where
it is a failure: CI runs as root and must run these tests.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

import tiers

SUBNET = "10.231.0"              # 10.231.0.0/24, only ever inside namespaces made here
_counter = itertools.count()


class NamespacesUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Machine:
    netns: str
    interface: str
    address: str

    def argv(self, *command: str) -> list[str]:
        """A command run inside this machine's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *command]

    def pids(self) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def command_lines(self, containing: str = "") -> list[str]:
        """Command lines (arguments joined by spaces) of the processes inside the namespace that
        contain `containing`."""
        found = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    line = file.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue                    # gone meanwhile
            if containing in line:
                found.append(line)
        return found

    def listeners(self) -> list[tuple[str, int, str]]:
        """(address, port, process) of every listening TCP socket inside the namespace."""
        result = subprocess.run(self.argv("ss", "-Htlnp"), capture_output=True, text=True, check=True)
        found = []
        for line in result.stdout.splitlines():
            fields = line.split()
            local = fields[3]
            address, _, port = local.rpartition(":")
            found.append((address.strip("[]"), int(port), " ".join(fields[5:])))
        return found


def skip_or_fail(reason: str):
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"network namespaces are needed under CI: {reason}", pytrace=False)
    pytest.skip(f"network namespaces cannot be made here: {reason}")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def kill_all(machine: Machine, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process inside the namespace and wait until none is left; the pids found."""
    found = machine.pids()
    deadline = time.monotonic() + timeout
    while (left := machine.pids()) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return found


@contextlib.contextmanager
def machines_or_skip(count: int = 2):
    """machines(), the test skipped where namespaces cannot be made (failed under CI)."""
    try:
        with machines(count) as made:
            yield made
    except NamespacesUnavailable as error:
        skip_or_fail(str(error))


@contextlib.contextmanager
def machines(count: int = 2):
    """`count` namespaces on one link (a veth pair for two; a bridge namespace beyond), addresses
    SUBNET.1, .2 ...; every process inside is killed and the namespaces deleted on exit."""
    tiers.require("cluster", doing="makes network namespaces")
    if os.geteuid() != 0:
        raise NamespacesUnavailable("not root")
    if not shutil.which("ip") or not shutil.which("ss"):
        raise NamespacesUnavailable("`ip` or `ss` (iproute2) is not installed")
    if count != 2:
        raise NotImplementedError("two machines (one veth pair) for now")
    tag = f"{os.getpid() % 100000}x{next(_counter)}"
    made: list[Machine] = []
    try:
        names = [f"vl{tag}{role}" for role in "hw"]
        for name in names:
            _ip("netns", "add", name)
            made.append(Machine(name, f"ve{tag}{name[-1]}", f"{SUBNET}.{len(made) + 1}"))
        _ip("link", "add", made[0].interface, "type", "veth", "peer", "name", made[1].interface)
        for machine in made:
            _ip("link", "set", machine.interface, "netns", machine.netns)
            _ip("-n", machine.netns, "link", "set", "lo", "up")
            _ip("-n", machine.netns, "addr", "add", f"{machine.address}/24", "dev", machine.interface)
            _ip("-n", machine.netns, "link", "set", machine.interface, "up")
        yield made
    finally:
        for machine in made:
            kill_all(machine)
            subprocess.run(["ip", "netns", "del", machine.netns], capture_output=True)
