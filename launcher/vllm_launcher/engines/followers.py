"""A multi-node lane with vLLM's own executor (`mp`): the leader here, the followers on the other
nodes through Ray.

Run by the engines' Python as the lane's engine process (a file, not a module: it imports only
the standard library and Ray, so it runs wherever Ray does):

    python -P followers.py SPEC_JSON -- LEADER_ARGV...

SPEC_JSON: {"nodes": N, "gpus_per_node": G, "follower_args": [...]} where follower_args is what
follows the Python on a follower's command line (`-m vllm.entrypoints.cli.main serve MODEL
--headless ...`). This process:

1. connects to the cluster (RAY_ADDRESS, token auth from RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH);
2. picks N-1 alive nodes other than this one (VLLM_HOST_IP) with G GPUs free, and a free master
   port on VLLM_HOST_IP;
3. starts one Ray actor on each of them (node affinity, G GPUs reserved) that runs that node's
   follower, `--node-rank R --nnodes N --master-addr HOST --master-port P`, in a process group
   of its own, with that node's own address and interfaces (its Ray node's environment) and this
   lane's other settings; the follower dies with its actor (parent-death signal);
4. runs the leader (rank 0) as its child, in the launcher's process group for this engine;
5. ends when any of them ends: a follower that exits or whose node is lost stops the leader
   (exit 1, naming the node); the leader's exit stops the followers; SIGTERM stops all.

So Ray is the only thing that knows the cluster's members; stopping the lane (SIGTERM to the
engine's group, SIGKILL after VLLM_STOP_TIMEOUT) leaves no actor (they belong to this driver)
and no follower process on any node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from types import FrameType
from typing import Any

# What a follower takes from its own node, never from the leader's machine.
NODE_LOCAL = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH", "VLLM_HOST_IP",
    "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES", "VLLM_API_KEY",       # the leader's key: the followers serve no HTTP
})
# The exit status that says "the cluster could not place the followers" (too few nodes, or a node
# that died before Ray noticed): the supervisor reports the cluster unavailable, not a crash.
CLUSTER_NOT_READY = 75          # EX_TEMPFAIL
STOP_GRACE = 20.0            # seconds a follower gets after SIGTERM before SIGKILL of its group
START_TIMEOUT = 120.0        # seconds for an actor to be placed and to start its follower
POLL = 0.5


def say(message: str) -> None:
    print(f"[followers] {message}", file=sys.stderr, flush=True)


def lane_settings(leader: dict[str, str]) -> dict[str, str]:
    """What of the leader's environment the followers share: neither its node's names nor its
    key, which are not even sent to the other nodes."""
    return {name: value for name, value in leader.items() if name not in NODE_LOCAL and not name.startswith("RAY_")}


def follower_environment(own: dict[str, str], lane: dict[str, str]) -> dict[str, str]:
    """The follower's environment: its node's (the Ray worker's: address, interfaces, token,
    visible GPUs), with the lane's other settings from the leader's environment on top."""
    env = dict(own)
    if "OMP_NUM_THREADS" not in lane:
        # Ray sets OMP_NUM_THREADS=1 in a zero-CPU actor; the follower threads as the leader does
        env.pop("OMP_NUM_THREADS", None)
    env.update(lane_settings(lane))
    return env


class FollowerProcess:
    """The body of the Ray actor on a follower's node: one follower process and its group."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, args: list[str], lane_env: dict[str, str]) -> dict[str, Any]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)

        actor_pid = os.getpid()

        def die_with_actor() -> None:                 # PR_SET_PDEATHSIG: SIGTERM when the actor dies
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != actor_pid:             # it died before prctl
                os.kill(os.getpid(), signal.SIGTERM)

        env = follower_environment(dict(os.environ), lane_env)
        self.process = subprocess.Popen([sys.executable, *args], env=env, start_new_session=True,
                                        preexec_fn=die_with_actor)
        return {"pid": self.process.pid, "address": env.get("VLLM_HOST_IP") or socket.gethostname()}

    def wait(self) -> int:
        return self.process.wait() if self.process else 0

    def stop(self, grace: float) -> int | None:
        """SIGTERM to the follower's group, SIGKILL after `grace`; its exit status."""
        process = self.process
        if process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        # the follower after the grace, or what it left (vLLM's own workers leave with it)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10.0)
        return process.poll()


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def pick_nodes(nodes: list[dict[str, Any]], own_address: str, count: int, gpus: float) -> list[dict[str, Any]]:
    """`count` alive nodes other than this one with `gpus` GPUs, by address. Their total, not what
    is free now (Ray's per-node availability needs its dashboard, which the nodes run without): a
    node whose GPUs another lane holds makes the actor wait, and the start ends after
    START_TIMEOUT as the cluster's (exit CLUSTER_NOT_READY)."""
    found = [node for node in nodes
             if node.get("Alive") and node.get("NodeManagerAddress") != own_address
             and node.get("Resources", {}).get("GPU", 0) >= gpus]
    return sorted(found, key=lambda node: node["NodeManagerAddress"])[:count]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        say("usage: followers.py SPEC_JSON -- LEADER_ARGV...")
        return 2
    spec, leader_argv = json.loads(argv[0]), argv[2:]
    master = os.environ.get("VLLM_HOST_IP")
    if not master or not os.environ.get("RAY_ADDRESS"):
        say("VLLM_HOST_IP and RAY_ADDRESS must be set (the launcher sets them from VLLM_CLUSTER_*)")
        return 2
    run = MultiNodeRun(spec, leader_argv, master)
    code, reason = run.run()
    say(reason)         # last, after Ray's buffered follower logs: the engine's last line says why
    return code


class MultiNodeRun:
    """The leader and its followers, from start to the stop of all of them."""

    def __init__(self, spec: dict[str, Any], leader_argv: list[str], master: str):
        self.spec = spec
        self.leader_argv = leader_argv
        self.master = master
        self.nodes = int(spec["nodes"])
        self.gpus = spec.get("gpus_per_node", 1)
        self.leader: subprocess.Popen[bytes] | None = None
        # (node address, actor handle); Any: Ray types a handle's methods as the class's, without .remote
        self.actors: list[tuple[str, Any]] = []
        self.stop: list[str] = []     # the signal that asks us to stop: a flag, as Ray's calls swallow exceptions

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop.append(signal.Signals(signum).name)

    def run(self) -> tuple[int, str]:
        """(exit status, why)."""
        import ray
        from ray.exceptions import RayError
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=logging.WARNING)
            # after ray.init: its core worker installs a SIGTERM handler that only logs and dies
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self.on_signal)
            return self._serve()
        except (RayError, OSError, ConnectionError) as error:
            return 1, f"cannot run the followers: {type(error).__name__}: {str(error).strip()[:500]}"
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)      # finish the clean-up first
            self._stop_all()

    def _serve(self) -> tuple[int, str]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError
        chosen = pick_nodes(ray.nodes(), self.master, self.nodes - 1, self.gpus)
        if len(chosen) < self.nodes - 1:
            return CLUSTER_NOT_READY, (f"the cluster has {len(chosen)} other alive node(s) with {self.gpus:g} "
                                       f"GPU(s); this lane needs {self.nodes - 1}")
        port = free_port(self.master)
        shared = ["--nnodes", str(self.nodes), "--master-addr", self.master, "--master-port", str(port)]
        waits: dict[Any, str] = {}       # the followers' wait() (Ray object refs) -> node address
        for rank, node in enumerate(chosen, start=1):
            address = node["NodeManagerAddress"]
            try:
                pid = self._start_follower(node, [*self.spec["follower_args"], *shared, "--node-rank", str(rank)])
            except (RayActorError, GetTimeoutError) as error:
                # a node Ray still lists but that is gone (it notices within seconds): not the engine's fault
                return CLUSTER_NOT_READY, (f"cannot start the follower on {address} "
                                           f"({type(error).__name__}: {_first_line(error)})")
            say(f"follower rank {rank} on {address}: pid {pid}")
            waits[self.actors[-1][1].wait.remote()] = address
            if self.stop:
                return 0, f"{self.stop[0]}: stopping the followers"
        self.leader = subprocess.Popen([*self.leader_argv, *shared, "--node-rank", "0"])
        say(f"leader rank 0 on {self.master}: pid {self.leader.pid}, master port {port}")
        while not self.stop:
            if (status := self.leader.poll()) is not None:
                return status or 1, f"the leader exited with status {status}; followers stopped"
            done, _ = ray.wait(list(waits), num_returns=1, timeout=POLL)
            for ref in done:
                address = waits.pop(ref)
                try:
                    return 1, f"the follower on {address} exited with status {ray.get(ref)}; leader stopped"
                except RayActorError as error:
                    return 1, (f"the follower on {address} is lost (its node or actor died: "
                               f"{_first_line(error)}); leader stopped")
        return 0, f"{self.stop[0]}: leader and followers stopped"

    def _start_follower(self, node: dict[str, Any], args: list[str]) -> int:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        actor: Any = ray.remote(FollowerProcess).options(     # Any: as self.actors
            num_cpus=0, num_gpus=self.gpus, max_restarts=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
        self.actors.append((node["NodeManagerAddress"], actor))
        started: dict[str, Any] = ray.get(actor.start.remote(args, lane_settings(dict(os.environ))), timeout=START_TIMEOUT)
        return int(started["pid"])

    def _stop_all(self) -> None:
        import ray
        leader = self.leader
        if leader is not None and leader.poll() is None:
            leader.terminate()
        pending = []
        for address, actor in self.actors:
            try:
                pending.append((address, actor, actor.stop.remote(STOP_GRACE)))
            except Exception:       # noqa: BLE001 (a lost actor: nothing to stop)
                pass
        for address, actor, ref in pending:
            try:
                ray.get(ref, timeout=STOP_GRACE + 15)
            except Exception as error:  # noqa: BLE001 (lost with its node: nothing left to stop)
                say(f"the follower on {address} could not be asked to stop: {type(error).__name__}")
            ray.kill(actor, no_restart=True)
        if leader is not None:
            try:
                leader.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                leader.kill()
                leader.wait()
        if ray.is_initialized():
            ray.shutdown()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
