"""Several machines (issue 14, What 1): `vllm-launcher cluster head|join` on real Ray (2.60, the
locked closure's), each node in a network namespace of its own (tests/netns.py: a veth pair,
10.231.0.0/24, no default route), token authentication on.

- a head and a worker join: the cluster shows two nodes with the GPUs each was given (a logical
  resource: no GPU needed), actors run on both, `check` reports the cluster and whether each
  multi-node lane fits, and every TCP listener outside loopback is one of the documented
  firewall ports, on the node's address, or on every address only where Ray allows no other
  (its gRPC servers: GCS, raylet, object manager, workers);
- a token file another user owns or may read is refused (status 2), not warned about;
- a worker with a wrong token is refused at once with a clear error, and the cluster keeps one node;
- SIGTERM to each node's `vllm-launcher` stops it with status 0 and leaves no process in its
  namespace.

Without namespaces (not root, no iproute2) the real-Ray tests skip, except under CI (`CI` set),
where that is a failure. The unit tests at the end need neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from closure_env import CLOSURE_PYTHON, closure_ready
from launcher_cli import config_json, run_launcher
from measurements import record
from netns import machines_or_skip, skip_or_fail
from ray_cluster import Node, cluster_status, launcher_in, new_token, wait_for_nodes
from vllm_launcher.cluster import ClusterError, engine_cluster_environment, interface_ipv4, ray_start_argv
from vllm_launcher.config import ClusterConfig, ConfigError, load_config
from vllm_launcher.engine_command import build_engine_spec
from vllm_launcher.placement import lane_placement
from vllm_launcher.vllm_info import VllmInfo
from waiting import eventually

HEAD_GPUS, WORKER_GPUS = 1, 2
# Ray 2.60's gRPC servers (GCS, raylet, object manager, every worker) listen on all addresses
# whatever --node-ip-address says (only 127.0.0.1 makes them local); its agents take the address.
RAY_ANY_ADDRESS_PORTS = {6379, 6380, 6381} | set(range(10002, 10200))

# As vLLM's Ray executor does: a placement group with a GPU bundle on each node (STRICT_SPREAD),
# an actor in each bundle asked where it runs; the test reads the listening sockets meanwhile.
DRIVER = r"""
import json, sys, ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0, num_gpus=1)
class Where:
    def node(self):
        import os
        names = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "VLLM_HOST_IP", "RAY_USAGE_STATS_ENABLED",
                 "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
        return [ray.util.get_node_ip_address(), {name: os.environ.get(name) for name in names}]

group = placement_group([{"GPU": 1}, {"GPU": 1}], strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=120)
actors = [Where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i))
          .remote() for i in range(2)]
print(json.dumps(sorted(ray.get([actor.node.remote() for actor in actors], timeout=120))), flush=True)
sys.stdin.read()
remove_placement_group(group)
"""


def swept(node: Node) -> str:
    """What the launcher's own sweep after `ray start` had to stop (Ray's stop alone left nothing: none)."""
    lines = [line for line in node.log().splitlines() if "the Ray node left behind" in line]
    return lines[-1].split(": ", 1)[1] if lines else "Ray's own stop left nothing for the launcher's sweep"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two namespaces, a token, and the head running in the first; the worker is the tests'."""
    if not closure_ready():
        skip_or_fail(f"{CLOSURE_PYTHON} (the engines' locked closure, with Ray) is missing: run `make closure`")
    work = tmp_path_factory.mktemp("cluster")
    token = new_token(work / "token")
    assert token.stat().st_mode & 0o777 == 0o600
    with machines_or_skip(2) as (head_machine, worker_machine):
        head = Node(head_machine, work / "head", token, HEAD_GPUS, "head")
        try:
            wait_for_nodes(head, 1)
            record(f"cluster: head node up (status answers, 1 node) in {time.monotonic() - head.started:.1f} s")
            yield {"head": head, "worker_machine": worker_machine, "work": work, "token": token}
        finally:
            head.close()


@pytest.mark.cluster
def test_a_wrong_token_is_refused(cluster):
    head, worker_machine, work = cluster["head"], cluster["worker_machine"], cluster["work"]
    wrong = work / "wrong-token"
    wrong.write_text("0" * 64 + "\n")
    wrong.chmod(0o600)
    worker = Node(worker_machine, work / "wrong", wrong, WORKER_GPUS, "join", head.machine.address)
    try:
        code = worker.process.wait(timeout=90)
        seconds = time.monotonic() - worker.started
    finally:
        worker.close()
    log = worker.log()
    assert code == 1, log
    assert f"the cluster at {head.machine.address}:6379 refused this machine's token" in log, log
    assert f"VLLM_CLUSTER_TOKEN_FILE='{wrong}'" in log and "0" * 64 not in log
    assert "ray.scripts.scripts start" not in log          # refused before any Ray process started
    assert worker_machine.pids() == []
    status = cluster_status(head)
    assert status["nodes_alive"] == 1 and [node["address"] for node in status["nodes"]] == [head.machine.address]
    record(f"cluster: a join with a wrong token refused in {seconds:.1f} s")


@pytest.mark.cluster
def test_head_and_worker_join_with_the_token(cluster):
    head, worker_machine, work = cluster["head"], cluster["worker_machine"], cluster["work"]
    worker = Node(worker_machine, work / "worker", cluster["token"], WORKER_GPUS, "join", head.machine.address)
    try:
        status = wait_for_nodes(head, 2)
        record(f"cluster: worker joined (2 nodes) in {time.monotonic() - worker.started:.1f} s")
        nodes = {node["address"]: node for node in status["nodes"] if node["alive"]}
        assert nodes[head.machine.address]["head"] and nodes[head.machine.address]["gpus"] == HEAD_GPUS
        assert not nodes[worker_machine.address]["head"] and nodes[worker_machine.address]["gpus"] == WORKER_GPUS
        assert status["gpus"] == HEAD_GPUS + WORKER_GPUS and status["ray"] == "2.60.0"
        assert "the head at 10.231.0.1:6379 accepted this machine's token" in worker.log()

        # work runs on both machines, through the token-protected cluster
        env = head.driver_env()
        started = time.monotonic()
        driver = subprocess.Popen(head.machine.argv(str(CLOSURE_PYTHON), "-P", "-c", DRIVER,
                                                    f"{head.machine.address}:6379"),
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = driver.stdout.readline()
            # each node's workers (vLLM's, on a real cluster) inherit that node's interface and address
            assert json.loads(line) == [
                [machine.address, {"NCCL_SOCKET_IFNAME": machine.interface, "GLOO_SOCKET_IFNAME": machine.interface,
                                   "VLLM_HOST_IP": machine.address, "RAY_USAGE_STATS_ENABLED": "0",
                                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": None}]
                for machine in (head.machine, worker_machine)], line
            record(f"cluster: a placement group over both nodes, an actor in each bundle, answered in "
                   f"{time.monotonic() - started:.1f} s")
            allowed = set(range(10002, 10200)) | set(range(6379, 6386))
            for machine in (head.machine, worker_machine):
                listeners = machine.listeners()
                record(f"cluster: {machine.netns} listeners: " + "; ".join(
                    f"{address}:{port} {process.split(',')[0]}" for address, port, process in sorted(listeners)))
                outside = [(address, port, process) for address, port, process in listeners
                           if not address.startswith("127.") and port not in allowed]
                assert outside == [], f"{machine.netns}: listeners outside the documented ports: {outside}"
                # addresses, not only ports: the node's address (--node-ip-address), or every address
                # only on the ports Ray's gRPC servers bind so whatever it is given (README, Ports)
                misplaced = [(address, port, process) for address, port, process in listeners
                             if not address.startswith("127.") and address != machine.address
                             and not (address in ("*", "0.0.0.0", "::") and port in RAY_ANY_ADDRESS_PORTS)]
                assert misplaced == [], f"{machine.netns}: listeners on addresses other than {machine.address}: " \
                                        f"{misplaced}"
                assert (machine.address, 6384) in {(address, port) for address, port, _ in listeners}
        finally:
            driver.stdin.close()
            driver.wait(timeout=60)

        # `check` on the head: the cluster, and which multi-node lanes fit
        env = {**head.env, "VLLM_CLUSTER_ROLE": "head", "VLLM_LANES": "pair,trio,solo", "VLLM_CLUSTER_GPUS": "1",
               "VLLM_LANE_PAIR_TENSOR_PARALLEL_SIZE": "2",
               "VLLM_LANE_TRIO_TENSOR_PARALLEL_SIZE": "3", "VLLM_LANE_TRIO_NODES": "3"}
        for lane in ("pair", "trio", "solo"):
            model = work / "models" / lane
            model.mkdir(parents=True, exist_ok=True)
            (model / "config.json").write_text("{}")
            env[f"VLLM_LANE_{lane.upper()}_MODEL"] = str(model)
        result = launcher_in(head.machine, env, "check", timeout=300)
        lines = result.stdout.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("OK   cluster ")), None)
        assert first is not None, result.stdout + result.stderr
        cluster_lines = lines[first:-1]
        record("cluster: `vllm-launcher check` printed: " + " | ".join(cluster_lines))
        assert (f"OK   cluster {head.machine.address}:6379: 2 nodes alive, 3 GPUs (Ray 2.60.0, token auth): "
                f"{head.machine.address} (head): 1 GPU, 1 CPU; {worker_machine.address}: 2 GPUs, 1 CPU") in lines, \
            result.stdout
        assert "OK   lane pair: 2 GPUs on 2 nodes (1 each): fits the cluster" in lines
        assert ("WARN lane trio: 3 GPUs on 3 nodes (1 each): does not fit the cluster now (2 nodes alive, 3 GPUs); "
                "it waits for more nodes") in lines
        assert not any("lane solo" in line for line in cluster_lines)

        code, seconds = worker.stop()
        assert code == 0, worker.log()
        assert worker_machine.pids() == [], "processes left in the worker's namespace"
        record(f"cluster: SIGTERM stopped the worker (nothing left in its namespace) in {seconds:.1f} s; "
               f"{swept(worker)}")
        eventually(lambda: (cluster_status(head) or {}).get("nodes_alive") == 1,
                   lambda: f"the head sees the worker gone: {cluster_status(head)}", 60, 1)
    finally:
        worker.close()


@pytest.mark.cluster
def test_a_killed_launcher_takes_its_node_with_it(cluster):
    """SIGKILL leaves the launcher no time: the node's `ray start` gets SIGTERM from the kernel
    (parent-death signal) and stops its processes; the head sees the node leave."""
    head, worker_machine = cluster["head"], cluster["worker_machine"]
    worker = Node(worker_machine, cluster["work"] / "killed", cluster["token"], WORKER_GPUS,
                  "join", head.machine.address)
    try:
        wait_for_nodes(head, 2)
        worker.process.kill()
        worker.process.wait()
        started = time.monotonic()
        eventually(lambda: worker_machine.pids() == [],
                   lambda: f"nothing left in the worker's namespace: {worker_machine.pids()}", 60, 0.2)
        record(f"cluster: after SIGKILL of the worker's launcher its node was gone in "
               f"{time.monotonic() - started:.1f} s")
        wait_for_nodes(head, 1, timeout=60)
    finally:
        worker.close()


@pytest.mark.cluster
def test_sigterm_stops_the_head_and_leaves_nothing(cluster):
    head = cluster["head"]
    assert head.process.poll() is None
    code, seconds = head.stop()
    assert code == 0, head.log()
    assert "Ray node stopped" in head.log()
    assert head.machine.pids() == [], "processes left in the head's namespace"
    assert cluster["worker_machine"].pids() == []
    record(f"cluster: SIGTERM stopped the head (nothing left in its namespace) in {seconds:.1f} s; {swept(head)}")
    # the head gone: status and check say so plainly
    result = launcher_in(head.machine, head.env, "cluster", "status")
    assert result.returncode == 1, result.stdout
    assert f"cannot reach the cluster's head at {head.machine.address}:6379: Connection refused" in result.stderr
    assert head.machine.pids() == []


# ---------------------------------------------------------------------------------------------
# without namespaces


def test_engines_get_the_cluster_variables_and_never_the_token():
    environ = {"VLLM_MODEL": "org/m", "RAY_ADDRESS": "10.0.0.1:6379", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": "/run/secrets/ray", "RAY_AUTH_TOKEN": "s3cr3t-token",
               "VLLM_HOST_IP": "10.0.0.2", "NCCL_SOCKET_IFNAME": "enp1s0", "NCCL_IB_DISABLE": "1",
               "GLOO_SOCKET_IFNAME": "enp1s0", "RCCL_MSCCL_ENABLE": "0", "VLLM_CLUSTER_ROLE": "head",
               "VLLM_CLUSTER_INTERFACE": "enp1s0", "VLLM_CLUSTER_TOKEN_FILE": "/run/secrets/ray"}
    env = build_engine_spec(load_config(environ), "default", VllmInfo("vllm", "0.12.0")).env
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "VLLM_HOST_IP", "NCCL_SOCKET_IFNAME",
                 "NCCL_IB_DISABLE", "GLOO_SOCKET_IFNAME", "RCCL_MSCCL_ENABLE"):
        assert env[name] == environ[name], name
    assert "RAY_AUTH_TOKEN" not in env and "s3cr3t-token" not in env.values()
    assert not [name for name in env if name.startswith("VLLM_CLUSTER_")]
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_engine_cluster_environment_from_the_interface(tmp_path):
    cluster = ClusterConfig(role="head", interface="lo", token_file=str(tmp_path / "token"))
    env = engine_cluster_environment(cluster, {"GLOO_SOCKET_IFNAME": "eth9"})
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "eth9"   # the user's wins
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")
    with pytest.raises(ClusterError, match="no such network interface"):
        interface_ipv4("nosuch0")


def test_ray_start_command_line():
    cluster = ClusterConfig(role="worker", address="10.0.0.1:6379", interface="enp1s0", token_file="/t", gpus=2)
    argv = ray_start_argv(cluster, "/py", "10.0.0.2", head=False)
    assert argv[:6] == ["/py", "-P", "-m", "ray.scripts.scripts", "start", "--block"]
    pairs = dict(zip(argv[6::2], argv[7::2], strict=False))
    assert pairs["--node-ip-address"] == "10.0.0.2" and pairs["--num-gpus"] == "2"
    assert pairs["--address"] == "10.0.0.1:6379" and "--head" not in argv
    assert [pairs[flag] for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
                                     "--dashboard-agent-listen-port", "--runtime-env-agent-port",
                                     "--metrics-export-port", "--min-worker-port", "--max-worker-port")] \
        == ["6380", "6381", "6382", "6383", "6384", "6385", "10002", "10199"]
    head = ray_start_argv(ClusterConfig(role="head", interface="enp1s0", token_file="/t"), "/py", "10.0.0.1", True)
    assert head[head.index("--port") + 1] == "6379" and "--no-monitor" in head and "--disable-usage-stats" in head
    assert head[head.index("--include-dashboard") + 1] == "false"
    assert not any("token" in word.lower() for word in argv + head)   # the token is never on a command line


def test_lane_placement():
    def lane(**settings):
        environ = {"VLLM_MODEL": "org/m", **{f"VLLM_LANE_DEFAULT_{k}": str(v) for k, v in settings.items()}}
        return load_config(environ).lanes["default"]

    assert lane_placement(lane(), 1).nodes == 1
    assert (lane_placement(lane(TENSOR_PARALLEL_SIZE=2), 1).nodes, lane_placement(lane(TENSOR_PARALLEL_SIZE=2), 2).nodes) \
        == (2, 1)
    placement = lane_placement(lane(TENSOR_PARALLEL_SIZE=4, PIPELINE_PARALLEL_SIZE=2, NODES=2), 1)
    assert (placement.gpus, placement.nodes, placement.per_node) == (8, 2, 4)


@pytest.mark.parametrize("env,message", [
    ({"VLLM_CLUSTER_ROLE": "worker"}, "a worker joins a head; set VLLM_CLUSTER_ADDRESS"),
    ({"VLLM_CLUSTER_ROLE": "boss"}, "VLLM_CLUSTER_ROLE='boss': must be one of: head worker"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_INTERFACE": ""}, "VLLM_CLUSTER_INTERFACE is unset"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_TOKEN_FILE": ""}, "VLLM_CLUSTER_TOKEN_FILE is unset"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_METRICS_PORT": "6380"},
     "VLLM_CLUSTER_METRICS_PORT=6380: the same port as VLLM_CLUSTER_NODE_MANAGER_PORT"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_PORT": "10100"},
     "VLLM_CLUSTER_PORT=10100: inside the worker port range"),
    ({"VLLM_CLUSTER_ADDRESS": "http://x/"}, "VLLM_CLUSTER_ADDRESS='http://x/': must be the head's host or host:port"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_GPUS": "-1"}, "VLLM_CLUSTER_GPUS='-1': must be a whole number"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_LANE_DEFAULT_NODES": "2"},
     "VLLM_LANE_DEFAULT_NODES=2: lane 'default' has tensor x pipeline = 1 GPU(s)"),
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_TOKEN_FILE": "/etc/passwd"},
     "VLLM_CLUSTER_TOKEN_FILE='/etc/passwd' is "),
], ids=lambda value: next(iter(value)) if isinstance(value, dict) else None)
def test_bad_cluster_settings_are_configuration_errors_naming_the_variable(env, message):
    """What the commands print before exiting 2 (shown through the CLI below, and in test_config.py)."""
    base = {"VLLM_MODEL": "org/m", "VLLM_CLUSTER_INTERFACE": "lo", "VLLM_CLUSTER_TOKEN_FILE": "/nonexistent"}
    with pytest.raises(ConfigError) as caught:
        load_config({**base, **env})
    assert message in "\n".join(caught.value.problems), caught.value.problems


def test_config_shows_the_cluster_and_cluster_commands_check_first(tmp_path):
    env = {"VLLM_MODEL": "org/m", "VLLM_CLUSTER_ROLE": "worker", "VLLM_CLUSTER_ADDRESS": "192.168.100.1",
           "VLLM_CLUSTER_INTERFACE": "lo", "VLLM_CLUSTER_TOKEN_FILE": str(tmp_path / "missing")}
    cluster = config_json(env)["cluster"]
    assert cluster["address"] == "192.168.100.1:6379" and cluster["role"] == "worker" and cluster["gpus"] == 1
    assert config_json({"VLLM_MODEL": "org/m"})["cluster"] is None
    result = run_launcher(env, "cluster", "start")        # no readable token: nothing started
    assert result.returncode == 1 and "cannot read the token file" in result.stderr, result.stderr
    result = run_launcher({}, "cluster", "head")
    assert result.returncode == 2 and "VLLM_CLUSTER_INTERFACE is unset" in result.stderr
    token = tmp_path / "token"
    assert run_launcher({}, "cluster", "new-token", str(token)).returncode == 0
    before = token.read_text()
    result = run_launcher({}, "cluster", "new-token", str(token))
    assert result.returncode == 1 and token.read_text() == before      # never overwritten
    assert len(before.strip()) == 64


@pytest.mark.parametrize("mode,owner", [(0o644, None), (0o640, None), (0o660, None), (0o600, 65534)],
                         ids=["world-readable", "group-readable", "group-writable", "other-owner"])
def test_a_token_file_others_can_read_or_own_is_refused(tmp_path, mode, owner):
    """Anyone holding the token runs code on every machine: refused with status 2 by every
    command that reads the cluster settings, before anything starts (not a warning)."""
    token = tmp_path / "token"
    assert run_launcher({}, "cluster", "new-token", str(token)).returncode == 0
    token.chmod(mode)
    if owner is not None:
        os.chown(token, owner, owner)
    env = {"VLLM_MODEL": "org/m", "VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_INTERFACE": "lo",
           "VLLM_CLUSTER_TOKEN_FILE": str(token), "VLLM_CLUSTER_PORT": "1"}
    for command in (["config"], ["cluster", "status"], ["cluster", "start"]):
        result = run_launcher(env, *command, timeout=60)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        expected = (f"VLLM_CLUSTER_TOKEN_FILE='{token}' is owned by uid {owner}, not this user" if owner else
                    f"VLLM_CLUSTER_TOKEN_FILE='{token}' is open to other users (mode {mode:o})")
        assert expected in result.stderr and "accepted: a file owned by this user" in result.stderr, result.stderr
        assert token.read_text().strip() not in result.stdout + result.stderr
    token.chmod(0o600)
    if owner is None:
        assert run_launcher(env, "config").returncode == 0


def test_without_namespaces_skip_but_fail_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="network namespaces cannot be made here: not root"):
        skip_or_fail("not root")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="network namespaces are needed under CI: not root"):
        skip_or_fail("not root")
