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

import json
import os
import signal
import socket
import subprocess
import sys
import time

# What a follower takes from its own node, never from the leader's machine.
NODE_LOCAL = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH", "VLLM_HOST_IP",
    "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES", "VLLM_API_KEY",       # the leader's key: the followers serve no HTTP
})
STOP_GRACE = 20.0            # seconds a follower gets after SIGTERM before SIGKILL of its group
POLL = 0.5


def say(message: str) -> None:
    print(f"[followers] {message}", file=sys.stderr, flush=True)


def follower_environment(own: dict[str, str], lane: dict[str, str]) -> dict[str, str]:
    """The follower's environment: its node's (the Ray worker's: address, interfaces, token,
    visible GPUs), with the lane's other settings from the leader's environment on top."""
    env = dict(own)
    env.update({name: value for name, value in lane.items()
                if name not in NODE_LOCAL and not name.startswith("RAY_")})
    return env


class FollowerProcess:
    """The body of the Ray actor on a follower's node: one follower process and its group."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def start(self, args: list[str], lane_env: dict[str, str]) -> dict:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)

        def die_with_actor() -> None:                 # PR_SET_PDEATHSIG: SIGTERM when the actor dies
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)

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
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                if sig == signal.SIGTERM:
                    # vLLM's own workers leave with their parent; whatever lingers goes now
                    os.killpg(process.pid, signal.SIGKILL)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return process.poll()


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def pick_nodes(nodes: list[dict], own_address: str, count: int, gpus: float) -> list[dict]:
    """`count` alive nodes other than this one with `gpus` GPUs available, by address."""
    found = [node for node in nodes
             if node.get("Alive") and node.get("NodeManagerAddress") != own_address
             and node.get("Resources", {}).get("GPU", 0) >= gpus]
    return sorted(found, key=lambda node: node["NodeManagerAddress"])[:count]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        say("usage: followers.py SPEC_JSON -- LEADER_ARGV...")
        return 2
    spec, leader_argv = json.loads(argv[0]), argv[2:]
    nodes, gpus = int(spec["nodes"]), spec.get("gpus_per_node", 1)
    master = os.environ.get("VLLM_HOST_IP")
    if not master or not os.environ.get("RAY_ADDRESS"):
        say("VLLM_HOST_IP and RAY_ADDRESS must be set (the launcher sets them from VLLM_CLUSTER_*)")
        return 2

    stop: list[str] = []       # the signal that asks us to stop; a flag: Ray's calls swallow exceptions

    def on_signal(signum, frame):
        stop.append(signal.Signals(signum).name)

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    leader = None
    actors: list[tuple[str, object]] = []
    code = 1
    try:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level="WARNING")
        # after ray.init: its core worker installs a SIGTERM handler that only logs and dies
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        chosen = pick_nodes(ray.nodes(), master, nodes - 1, gpus)
        if len(chosen) < nodes - 1:
            say(f"the cluster has {len(chosen)} other node(s) with {gpus} GPU(s) free; this lane needs {nodes - 1}")
            return 1
        port = free_port(master)
        shared = ["--nnodes", str(nodes), "--master-addr", master, "--master-port", str(port)]
        Follower = ray.remote(FollowerProcess)
        waits = {}
        for rank, node in enumerate(chosen, start=1):
            address = node["NodeManagerAddress"]
            actor = Follower.options(
                num_cpus=0, num_gpus=gpus, max_restarts=0, max_concurrency=4,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            actors.append((address, actor))
            started = ray.get(actor.start.remote([*spec["follower_args"], *shared, "--node-rank", str(rank)],
                                                 dict(os.environ)), timeout=120)
            say(f"follower rank {rank} on {address}: pid {started['pid']}")
            waits[actor.wait.remote()] = address
            if stop:
                break
        if stop:
            say(f"{stop[0]}: stopping the followers")
            return 0
        leader = subprocess.Popen([*leader_argv, *shared, "--node-rank", "0"])
        say(f"leader rank 0 on {master}: pid {leader.pid}, master port {port}")
        while not stop:
            if (status := leader.poll()) is not None:
                say(f"the leader exited with status {status}; stopping the followers")
                return status or 1
            done, _ = ray.wait(list(waits), num_returns=1, timeout=POLL)
            for ref in done:
                address = waits.pop(ref)
                try:
                    status = ray.get(ref)
                    say(f"the follower on {address} exited with status {status}; stopping the leader")
                except RayActorError as error:
                    say(f"the follower on {address} is lost (its node or actor died: "
                        f"{str(error).strip().splitlines()[0][:200]}); stopping the leader")
                return 1
        say(f"{stop[0]}: stopping the leader and the followers")
        code = 0
    except (RayError, GetTimeoutError, OSError, ConnectionError) as error:
        say(f"cannot run the followers: {type(error).__name__}: {str(error).strip()[:500]}")
        code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)      # finish the clean-up
        _stop_all(leader, actors)
    return code


def _stop_all(leader: subprocess.Popen | None, actors: list) -> None:
    import ray
    if leader is not None and leader.poll() is None:
        leader.terminate()
    pending = []
    for address, actor in actors:
        try:
            pending.append((address, actor, actor.stop.remote(STOP_GRACE)))
        except Exception:       # noqa: BLE001 (a lost actor: nothing to stop)
            pass
    for address, actor, ref in pending:
        try:
            ray.get(ref, timeout=STOP_GRACE + 15)
        except Exception as error:  # noqa: BLE001
            say(f"stopping the follower on {address}: {type(error).__name__}")
        ray.kill(actor, no_restart=True)
    if leader is not None:
        try:
            leader.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            leader.kill()
            leader.wait()
    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
