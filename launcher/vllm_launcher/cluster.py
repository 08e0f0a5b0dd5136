"""This machine's node of a Ray cluster: `vllm-launcher cluster head|join|start|status`.

A node is `ray start --block` run from the engines' Python (VLLM_ENGINE_PYTHON: Ray is in the
locked closure), in the foreground for systemd and containers, with:
- the node address from VLLM_CLUSTER_INTERFACE (never Ray's own guess, which routes towards a
  public DNS server and may pick another interface), and NCCL_SOCKET_IFNAME (RCCL reads the
  NCCL_* names), GLOO_SOCKET_IFNAME and VLLM_HOST_IP for the collectives of vLLM's workers;
- Ray's fixed ports from the settings (a firewall opens exactly them), no dashboard, no
  autoscaler monitor, usage statistics off;
- Ray's token authentication on: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (Ray 2.60 reads the
  token from that file); the token is never on a command line nor in an environment.

A worker first asks the head, with its token, who is in the cluster: a refused token or an
unreachable head ends the join at once with a clear error, before any Ray process starts.
SIGTERM, SIGINT or SIGHUP stop the node as `ray stop` would, and then every process the node
left (the launcher is a child subreaper, so nothing escapes it) is terminated: nothing is left.

The queries (`status`, `check`, the worker's first contact) run in the engines' Python too,
as a short script (PROBE) talking to the head's GCS with the token.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from .config import ClusterConfig, LaneConfig, token_file_problem
from .engine_command import TELEMETRY_OFF, passed_environment
from .placement import ClusterState, Node, fits, lane_placement

RAY_AUTH_MODE = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
HEAD_WAIT_SECONDS = 60.0          # how long a joining worker waits for the head to answer
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


class ClusterError(Exception):
    """A cluster problem a user can act on; the message says what and how."""


class HeadUnreachable(ClusterError):
    """The head did not answer (not up yet, a firewall, a wrong address): worth retrying."""


class TokenRefused(ClusterError):
    """The head refused this machine's token: final."""


# ---------------------------------------------------------------------------------------------
# addresses, token, environment, command line


def interface_ipv4(interface: str) -> str:
    """The IPv4 address of a network interface (the first one), read with SIOCGIFADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", interface.encode()[:15]))
        except OSError as error:
            exists = Path("/sys/class/net", interface).exists()
            raise ClusterError(
                f"VLLM_CLUSTER_INTERFACE={interface!r}: "
                + ("the interface has no IPv4 address; give the cluster link an address"
                   if exists else f"no such network interface here ({error.strerror}); "
                   f"interfaces: {', '.join(sorted(os.listdir('/sys/class/net')))}")) from None
    return socket.inet_ntoa(packed[20:24])


def check_token_file(path: str) -> list[str]:
    """Warnings about the token file (none today); ClusterError when it cannot serve as one: it
    cannot be read, is empty, or another user owns it or may read it (token_file_problem; the
    configuration refuses that too, with status 2)."""
    unsafe = token_file_problem(path)
    if unsafe:
        raise ClusterError(unsafe)
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise ClusterError(f"VLLM_CLUSTER_TOKEN_FILE={path!r}: cannot read the token file "
                           f"({error.strerror or error}); give a readable file holding the cluster's token "
                           "(`vllm-launcher cluster new-token FILE` writes one)") from None
    if not token:
        raise ClusterError(f"VLLM_CLUSTER_TOKEN_FILE={path!r}: the file is empty; it must hold the cluster's token")
    return []


def new_token_file(path: str) -> None:
    """A fresh random token in a new file of mode 0600 (an existing file is never overwritten)."""
    import secrets

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")


def head_address(cluster: ClusterConfig, node_ip: str | None = None) -> str:
    """Where the cluster's GCS answers: VLLM_CLUSTER_ADDRESS, or on the head its own address."""
    if cluster.address:
        return cluster.address
    if node_ip is None:
        node_ip = interface_ipv4(cluster.interface)
    return f"{node_ip}:{cluster.port}"


def auth_environment(cluster: ClusterConfig) -> dict[str, str]:
    """What a Ray process needs to talk to the cluster: token mode, the token's file."""
    return {RAY_AUTH_MODE: "token", RAY_AUTH_TOKEN_PATH: os.path.abspath(cluster.token_file)}


def collective_environment(cluster: ClusterConfig, node_ip: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The interface for NCCL/RCCL and Gloo and this node's address for vLLM; a value the user
    set explicitly in the environment wins."""
    wanted = {"NCCL_SOCKET_IFNAME": cluster.interface, "GLOO_SOCKET_IFNAME": cluster.interface,
              "VLLM_HOST_IP": node_ip}
    return {name: environ.get(name) or value for name, value in wanted.items()}


def node_environment(cluster: ClusterConfig, node_ip: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The Ray node's environment (its workers, vLLM's workers among them, inherit it): the
    engines' allow-list, telemetry off, token auth, the collectives' interface."""
    env = passed_environment(environ)
    env.update(TELEMETRY_OFF)            # RAY_USAGE_STATS_ENABLED=0 among them
    env.update(auth_environment(cluster))
    env.update(collective_environment(cluster, node_ip, environ))
    return env


def engine_cluster_environment(cluster: ClusterConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """What an engine on this machine needs to use the cluster (vLLM's Ray executor, or the
    launcher's followers): RAY_ADDRESS, token auth, the collectives' interface."""
    node_ip = interface_ipv4(cluster.interface)
    return {"RAY_ADDRESS": head_address(cluster, node_ip), **TELEMETRY_OFF, **auth_environment(cluster),
            **collective_environment(cluster, node_ip, environ)}


def ray_start_argv(cluster: ClusterConfig, python: str, node_ip: str, head: bool) -> list[str]:
    """`ray start --block` for this node (-P: nothing from the working directory is imported)."""
    argv = [python, "-P", "-m", "ray.scripts.scripts", "start", "--block",
            "--node-ip-address", node_ip, "--num-gpus", str(cluster.gpus),
            "--node-manager-port", str(cluster.node_manager_port),
            "--object-manager-port", str(cluster.object_manager_port),
            "--dashboard-agent-grpc-port", str(cluster.agent_grpc_port),
            "--dashboard-agent-listen-port", str(cluster.agent_http_port),
            "--runtime-env-agent-port", str(cluster.runtime_env_agent_port),
            "--metrics-export-port", str(cluster.metrics_port),
            "--min-worker-port", str(cluster.min_worker_port),
            "--max-worker-port", str(cluster.max_worker_port)]
    if cluster.cpus is not None:
        argv += ["--num-cpus", str(cluster.cpus)]
    if cluster.object_store_memory is not None:
        argv += ["--object-store-memory", str(cluster.object_store_memory)]
    if cluster.temp_dir:
        argv += ["--temp-dir", cluster.temp_dir]
    if head:
        # no dashboard (an HTTP server that runs jobs), no autoscaler monitor (a static cluster;
        # it would listen on 0.0.0.0:44217), no usage statistics
        argv += ["--head", "--port", str(cluster.port), "--include-dashboard", "false", "--no-monitor",
                 "--disable-usage-stats"]
    else:
        argv += ["--address", cast(str, cluster.address)]      # a worker's: loading requires it
    return argv


# ---------------------------------------------------------------------------------------------
# asking the cluster: a short script run by the engines' Python

PROBE = r"""
import json, socket, sys
address, timeout = sys.argv[1], float(sys.argv[2])
def out(**data):
    sys.stdout.write(json.dumps(data))
    sys.exit(0)
host, _, port = address.rpartition(":")
try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 5)).close()
except OSError as error:
    out(error="unreachable", message=f"{address}: {error.strerror or error}")
try:
    import ray
    from ray._raylet import GcsClient
except Exception as error:
    out(error="no_ray", message=f"{type(error).__name__}: {error}")
try:
    infos = GcsClient(address=address).get_all_node_info(timeout=timeout)
except Exception as error:
    kind = "auth" if type(error).__name__ == "AuthenticationError" else "gcs"
    text = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    out(error=kind, message=text.split(". ")[0][:300])
nodes = [{"address": info.node_manager_address, "name": info.node_name, "alive": info.state == 0,
          "head": info.is_head_node, "resources": dict(info.resources_total)} for info in infos.values()]
out(ray=ray.__version__, nodes=sorted(nodes, key=lambda node: (not node["head"], node["address"])))
"""


def query_cluster(cluster: ClusterConfig, python: str, environ: Mapping[str, str], *,
                  address: str | None = None, timeout: float = 10.0) -> ClusterState:
    """The cluster's nodes as the head's GCS knows them, asked with the token.
    ClusterError (refused token, unreachable head, no Ray in the engines' Python) otherwise."""
    address = address or head_address(cluster)
    env = {**passed_environment(environ), **TELEMETRY_OFF, **auth_environment(cluster)}
    try:
        result = subprocess.run([python, "-P", "-c", PROBE, address, str(timeout)], env=env,
                                capture_output=True, text=True, timeout=timeout + 60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ClusterError(f"cannot run the engines' Python {python} to ask the cluster: {error}") from None
    try:
        data = json.loads(result.stdout)
    except ValueError:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ClusterError(f"asking the cluster at {address} failed in {python}: {last}") from None
    failure = data.get("error")
    if failure == "auth":
        raise TokenRefused(
            f"the cluster at {address} refused this machine's token (VLLM_CLUSTER_TOKEN_FILE="
            f"{cluster.token_file!r}): every machine's token file must hold the head's token ({data['message']})")
    if failure == "unreachable":
        raise HeadUnreachable(f"cannot reach the cluster's head at {data['message']} (VLLM_CLUSTER_ADDRESS / "
                           f"VLLM_CLUSTER_PORT; is the head running, is port {address.rpartition(':')[2]} open "
                           "on its firewall?)")
    if failure == "no_ray":
        raise ClusterError(f"Ray is not importable in the engines' Python {python} (VLLM_ENGINE_PYTHON): "
                           f"{data['message']}")
    if failure:
        raise HeadUnreachable(f"the cluster's head at {address} did not answer: {data['message']}")
    nodes = tuple(Node(node["address"], node["head"], node["alive"], node["resources"].get("GPU", 0.0),
                       node["resources"].get("CPU", 0.0)) for node in data["nodes"])
    return ClusterState(address, data["ray"], nodes)


# ---------------------------------------------------------------------------------------------
# lanes on the cluster


def cluster_report(cluster: ClusterConfig, python: str, environ: Mapping[str, str],
                   lanes: Mapping[str, LaneConfig]) -> list[tuple[str, str]]:
    """`check`'s lines about the cluster, as (level, message): ok/info/warn/fail."""
    try:
        lines = [("warn", warning) for warning in check_token_file(cluster.token_file)]
        node_ip = interface_ipv4(cluster.interface)
        state = query_cluster(cluster, python, environ, address=head_address(cluster, node_ip))
    except ClusterError as error:
        return [("fail", f"cluster: {error}")]
    host_ip = environ.get("VLLM_HOST_IP", "").strip()
    if host_ip and host_ip != node_ip:
        lines.append(("warn", f"VLLM_HOST_IP={host_ip!r} is not this machine's cluster address {node_ip} "
                              f"(VLLM_CLUSTER_INTERFACE={cluster.interface!r}): vLLM's rendezvous would hang; unset it"))
    lines.append(("ok", f"cluster {state.address}: {state.describe()}"))
    for lane in lanes.values():
        placement = lane_placement(lane, cluster.gpus)
        if placement.nodes <= 1:
            continue
        if fits(placement, state):
            lines.append(("ok", f"lane {lane.name}: {placement.describe()}: fits the cluster"))
        else:
            lines.append(("warn", f"lane {lane.name}: {placement.describe()}: does not fit the cluster now "
                                  f"({len(state.alive)} nodes alive, {state.gpus:g} GPUs); it waits for more nodes"))
    return lines


# ---------------------------------------------------------------------------------------------
# running this machine's node


def _set_pdeathsig() -> None:
    """In the child: SIGTERM when the launcher dies, so a killed launcher leaves no Ray node."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _become_subreaper() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep(grace: float = 5.0) -> list[int]:
    """Terminate every process left below this one (SIGTERM, then SIGKILL after `grace`)."""
    left = _descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            _reap()
            if not _descendants(os.getpid()):
                return left
            time.sleep(0.1)
        left = _descendants(os.getpid())
    return left


def wait_for_head(cluster: ClusterConfig, python: str, environ: Mapping[str, str],
                  say: Callable[[str], None], wait: float = HEAD_WAIT_SECONDS) -> ClusterState:
    """A joining worker's first contact: the head must answer and accept the token. An
    unreachable head is retried for `wait` seconds (systemd may start the worker first); a
    refused token is final."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            return query_cluster(cluster, python, environ, timeout=10.0)
        except HeadUnreachable as error:
            if time.monotonic() > deadline:
                raise
            if not said:
                say(f"waiting up to {wait:g} s for the head: {error}")
                said = True
            time.sleep(2.0)


def run_node(cluster: ClusterConfig, python: str, environ: Mapping[str, str], *,
             say: Callable[[str], None], stop_timeout: float = 45.0) -> int:
    # stop_timeout: Ray drains a node for up to 30 s on SIGTERM before stopping its processes
    """Run this machine's Ray node in the foreground until a signal or its end; exit status."""
    head = cluster.role == "head"
    for warning in check_token_file(cluster.token_file):
        say(f"warning: {warning}")
    node_ip = interface_ipv4(cluster.interface)
    if not head:
        state = wait_for_head(cluster, python, environ, say)
        say(f"the head at {cluster.address} accepted this machine's token: {state.describe()}")
    argv = ray_start_argv(cluster, python, node_ip, head)
    env = node_environment(cluster, node_ip, environ)
    say(f"{cluster.role} node {node_ip} (interface {cluster.interface}), {cluster.gpus} GPU(s), "
        f"token auth ({cluster.token_file}); {' '.join(argv[3:])}")

    _become_subreaper()
    stopping: list[float] = []          # when the stop began
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        if not stopping:
            stopping.append(time.monotonic())
            say(f"{signal.Signals(signum).name}: stopping the Ray node")
            if child is not None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        child = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_set_pdeathsig)
        if stopping:                    # a signal came before the node existed
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > stop_timeout:
                    say(f"the Ray node did not stop within {stop_timeout:g} s: killing it")
                    child.kill()
    finally:
        left = sweep()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        say(f"stopped {len(left)} process(es) the Ray node left behind")
    if stopping:
        say("Ray node stopped")
        return 0
    say(f"the Ray node exited with status {code} (its log: {cluster.temp_dir or '/tmp/ray'}/session_latest/logs)")
    return code or 1


def status_lines(state: ClusterState) -> list[str]:
    return [f"cluster {state.address}: {len(state.alive)} nodes alive, {state.gpus:g} GPUs (Ray {state.ray_version}, "
            "token auth)"] + [f"  {node.describe()}" for node in state.nodes]


def main_say(message: str) -> None:
    print(f"vllm-launcher cluster: {message}", file=sys.stderr, flush=True)
