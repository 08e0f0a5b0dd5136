"""A multi-node lane with vLLM's own executor (mp), without Ray or namespaces: the followers'
environment (their node's own address, interfaces, paths and devices; the lane's settings from
the leader; never the leader's key), which Ray nodes get followers, FollowerProcess run here
(its own process group, a stop that ends the whole group, SIGKILL after the grace, the
parent-death signal), the argv a cluster lane gets (followers.py around the plain leader argv;
the followers' `vllm serve --headless` accepted by vLLM's own `vllm serve` parser) and the
supervisor's report of an engine that exits 75 (the cluster could not place the followers) while
starting: 503 cluster_unavailable and no crash loop, unlike an exit with status 1.
tests/test_cluster_vllm.py runs all of it with real Ray and vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_cluster import FakeCluster, cluster_env, run_app
from real_engine import requires_vllm
from serving import chat_body, group_alive, wait_gone
from vllm_launcher.config import load_config
from vllm_launcher.engine_command import ENGINE_MODULE, FOLLOWER_MODULE, build_engine_spec
from vllm_launcher.engines import followers
from vllm_launcher.engines.followers import FollowerProcess, follower_environment, lane_settings, pick_nodes
from vllm_launcher.vllm_info import VllmInfo
from waiting import eventually, eventually_async

VLLM = VllmInfo("vllm", "0.32.0")
FOLLOWERS_PY = Path(followers.__file__).resolve()

# --- follower_environment -------------------------------------------------------------------

# What a follower's node has of its own, and the same names as the leader's machine has them.
NODE_OWN = {
    "VLLM_HOST_IP": "10.0.0.2", "NCCL_SOCKET_IFNAME": "eth-node", "GLOO_SOCKET_IFNAME": "eth-node",
    "RAY_ADDRESS": "10.0.0.1:6379", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/node/token",
    "RAY_NODE_ID": "node-2", "VLLM_API_KEY": "node-key", "PATH": "/node/bin", "HOME": "/home/node",
    "TMPDIR": "/node/tmp", "PYTHONPATH": "/node/python", "CUDA_VISIBLE_DEVICES": "3",
    "HIP_VISIBLE_DEVICES": "3", "ROCR_VISIBLE_DEVICES": "3",
}
LEADER_OWN = {
    "VLLM_HOST_IP": "10.0.0.1", "NCCL_SOCKET_IFNAME": "eth-leader", "GLOO_SOCKET_IFNAME": "eth-leader",
    "RAY_ADDRESS": "127.0.0.1:6379", "RAY_AUTH_MODE": "leader-mode", "RAY_AUTH_TOKEN_PATH": "/leader/token",
    "RAY_NODE_ID": "node-1", "RAY_USAGE_STATS_ENABLED": "0", "VLLM_API_KEY": "leader-secret",
    "PATH": "/leader/bin", "HOME": "/home/leader", "TMPDIR": "/leader/tmp", "PYTHONPATH": "/leader/python",
    "CUDA_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "0,1", "ROCR_VISIBLE_DEVICES": "0,1",
}
LANE_SETTINGS = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "DEBUG",
                 "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1"}


def test_a_follower_keeps_its_nodes_own_names_and_takes_the_lanes_settings_from_the_leader():
    node = {**NODE_OWN, "HF_HUB_OFFLINE": "0", "NODE_ONLY": "kept"}
    env = follower_environment(node, {**LEADER_OWN, **LANE_SETTINGS})
    assert {name: env[name] for name in NODE_OWN} == NODE_OWN
    assert {name: env[name] for name in LANE_SETTINGS} == LANE_SETTINGS     # HF_HUB_OFFLINE: the lane's
    assert env["NODE_ONLY"] == "kept"
    assert "RAY_USAGE_STATS_ENABLED" not in env                   # a RAY_* name only the leader has
    assert not set(env.values()) & {"leader-secret", "eth-leader", "/leader/bin", "/leader/token", "0,1"}


def test_a_node_without_its_own_names_gets_none_of_the_leaders():
    env = follower_environment({"PATH": "/node/bin"}, {**LEADER_OWN, **LANE_SETTINGS})
    assert env == {"PATH": "/node/bin", **LANE_SETTINGS}, env
    assert "VLLM_API_KEY" not in env                              # the leader's key stays with the leader


def test_the_leaders_key_and_node_names_are_not_even_sent_to_the_other_nodes():
    sent = lane_settings({**LEADER_OWN, **LANE_SETTINGS})
    assert sent == LANE_SETTINGS, sent


def test_a_follower_threads_as_the_leader_does_not_as_rays_zero_cpu_actor():
    # Ray 2.60 sets OMP_NUM_THREADS=1 in an actor with num_cpus=0 (ours); the follower must not inherit it
    actor_env = {"PATH": "/node/bin", "OMP_NUM_THREADS": "1"}
    assert "OMP_NUM_THREADS" not in follower_environment(actor_env, LANE_SETTINGS)
    assert follower_environment(actor_env, {**LANE_SETTINGS, "OMP_NUM_THREADS": "16"})["OMP_NUM_THREADS"] == "16"


# --- pick_nodes -----------------------------------------------------------------------------

def ray_node(address: str, alive: bool = True, gpus: float | None = 1.0) -> dict:
    """An entry as ray.nodes() gives it (GPU absent from Resources on a node without GPUs)."""
    resources = {"CPU": 2.0, "memory": 1e9, f"node:{address}": 1.0}
    if gpus is not None:
        resources["GPU"] = gpus
    return {"NodeID": f"id-{address}", "Alive": alive, "NodeManagerAddress": address, "Resources": resources}


RAY_NODES = [
    ray_node("10.0.0.7"), ray_node("10.0.0.1", gpus=2.0),        # 10.0.0.1: this node
    ray_node("10.0.0.3", alive=False, gpus=2.0), ray_node("10.0.0.6", gpus=None),
    ray_node("10.0.0.5", gpus=2.0), ray_node("10.0.0.4", gpus=0.5), ray_node("10.0.0.2"),
]


def addresses(nodes: list[dict]) -> list[str]:
    return [node["NodeManagerAddress"] for node in nodes]


@pytest.mark.parametrize(("count", "gpus", "expected"), [
    (9, 1, ["10.0.0.2", "10.0.0.5", "10.0.0.7"]),      # not this node, the dead one, nor those short of a GPU
    (2, 1, ["10.0.0.2", "10.0.0.5"]),                  # at most `count`, the first by address
    (9, 2, ["10.0.0.5"]),                              # two GPUs: only 10.0.0.5 (10.0.0.3 is dead)
    (9, 0.5, ["10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.7"]),
    (0, 1, []),
])
def test_pick_nodes(count, gpus, expected):
    chosen = pick_nodes(RAY_NODES, "10.0.0.1", count, gpus)
    assert addresses(chosen) == expected
    assert all(node["NodeID"] == f"id-{node['NodeManagerAddress']}" for node in chosen)   # whole entries


def test_pick_nodes_finds_none_when_only_this_node_is_alive():
    assert pick_nodes([ray_node("10.0.0.1"), ray_node("10.0.0.2", alive=False)], "10.0.0.1", 1, 1) == []


# --- FollowerProcess, here without Ray ------------------------------------------------------

SLEEPER = "import time; time.sleep(60)"
# A child that writes argv[1] once it ignores SIGTERM, then sleeps.
STUBBORN = ("import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\nos.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
            "time.sleep(60)\n")
# A child that starts a grandchild that ignores SIGTERM (as a lingering worker), then sleeps.
WITH_GRANDCHILD = ("import subprocess, sys, time\n"
                   f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}, sys.argv[1]])\ntime.sleep(60)\n")


def wait_for_file(path: Path, timeout: float = 60.0) -> str:
    eventually(path.exists, f"{path} written", timeout, 0.02)
    return path.read_text()


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def follower():
    process = FollowerProcess()
    yield process
    if process.process is not None:
        kill_group(process.process.pid)
        process.process.kill()
        process.process.wait()


def test_the_follower_runs_this_python_in_a_group_of_its_own_with_its_nodes_environment(follower, monkeypatch):
    monkeypatch.setenv("VLLM_HOST_IP", "10.9.9.9")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    started = follower.start(["-c", SLEEPER], {"VLLM_HOST_IP": "10.0.0.1", "VLLM_API_KEY": "leader-secret",
                                               "VLLM_LOGGING_LEVEL": "DEBUG"})
    pid = started["pid"]
    assert started == {"pid": follower.process.pid, "address": "10.9.9.9"}
    assert os.getpgid(pid) == pid != os.getpgid(0)
    assert os.getsid(pid) == pid                                   # a session of its own too
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:3] == [sys.executable.encode(), b"-c", SLEEPER.encode()]
    environ = proc_environ(pid)
    assert environ["VLLM_HOST_IP"] == "10.9.9.9" and environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert "VLLM_API_KEY" not in environ


def test_stop_ends_the_followers_whole_group_children_included(follower, tmp_path):
    grandchild_file = tmp_path / "grandchild.pid"
    pid = follower.start(["-c", WITH_GRANDCHILD, str(grandchild_file)], {})["pid"]
    grandchild = int(wait_for_file(grandchild_file))
    assert os.getpgid(grandchild) == pid                           # the follower's group
    began = time.monotonic()
    status = follower.stop(10.0)
    took = time.monotonic() - began
    assert status == -signal.SIGTERM, status                       # the follower itself left on SIGTERM
    assert took < 5, took                                          # without waiting for the grace
    wait_gone(grandchild, timeout=10)                              # the one ignoring SIGTERM: SIGKILLed
    assert group_alive(pid) == []


def test_a_follower_that_ignores_sigterm_is_killed_after_the_grace(follower, tmp_path):
    ready = tmp_path / "ready"
    follower.start(["-c", STUBBORN, str(ready)], {})
    wait_for_file(ready)
    began = time.monotonic()
    status = follower.stop(1.0)
    took = time.monotonic() - began
    assert status == -signal.SIGKILL, status
    assert 0.9 <= took < 6, took


def test_wait_returns_the_followers_exit_status(follower):
    assert FollowerProcess().wait() == 0 and FollowerProcess().stop(1.0) is None      # nothing started
    follower.start(["-c", "import sys; sys.exit(7)"], {})
    assert follower.wait() == 7


def test_wait_in_one_thread_and_stop_in_another_both_see_the_end(follower):
    """The actor serves wait() and stop() at once (max_concurrency): a blocked wait() ends too."""
    follower.start(["-c", SLEEPER], {})
    waited: list[int] = []
    waiter = threading.Thread(target=lambda: waited.append(follower.wait()), daemon=True)
    waiter.start()
    assert follower.stop(5.0) == -signal.SIGTERM
    waiter.join(timeout=10)
    assert waited == [-signal.SIGTERM]


# The actor's stand-in: imports followers.py by path, starts a follower, writes its pid, blocks.
ACTOR = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("followers_by_path", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pid = module.FollowerProcess().start(["-c", sys.argv[2], sys.argv[3]], {})["pid"]
open(sys.argv[4] + ".tmp", "w").write(str(pid))
import os; os.rename(sys.argv[4] + ".tmp", sys.argv[4])
time.sleep(120)
"""
# The follower: notes the SIGTERM it gets in argv[1] and exits; says it is ready in argv[1].ready.
NOTES_SIGTERM = """
import os, signal, sys, time
def on_term(signum, frame):
    with open(sys.argv[1] + ".tmp", "w") as note:       # renamed when written: never read half-made
        note.write(signal.Signals(signum).name)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1] + ".ready", "w").write("ready")
time.sleep(60)
"""


def test_the_follower_gets_sigterm_when_its_actor_dies(tmp_path):
    got, pid_file = tmp_path / "signal", tmp_path / "follower.pid"
    actor = subprocess.Popen([sys.executable, "-c", ACTOR, str(FOLLOWERS_PY), NOTES_SIGTERM, str(got), str(pid_file)],
                             stdout=subprocess.DEVNULL, start_new_session=True)
    pid = None
    try:
        pid = int(wait_for_file(pid_file))
        wait_for_file(Path(f"{got}.ready"))
        actor.kill()                                       # SIGKILL: no clean-up of its own
        actor.wait(timeout=10)
        assert wait_for_file(got, timeout=30) == "SIGTERM"
        wait_gone(pid, timeout=30)
    finally:
        actor.kill()
        actor.wait(timeout=10)
        if pid is not None:
            kill_group(pid)


# --- build_engine_spec ----------------------------------------------------------------------

LANE = {"VLLM_LANE_BIG_DISTRIBUTED_EXECUTOR_BACKEND": "mp", "VLLM_LANE_BIG_MAX_MODEL_LEN": "512",
        "VLLM_LANE_BIG_EXTRA_ARGS": "--seed 7 --max-num-seqs 4"}


def lane_environ(tmp_path: Path, fake_python: Path, cluster: bool = True, **lane: str) -> dict[str, str]:
    """The lanes of test_cluster_lanes (small, and big with TENSOR_PARALLEL_SIZE=2), big with the mp
    executor; with or without the cluster (a head with VLLM_CLUSTER_GPUS=1, a 0600 token file)."""
    environ = {**cluster_env(tmp_path, fake_python), **LANE}
    environ.update({f"VLLM_LANE_BIG_{key}": value for key, value in lane.items()})
    if not cluster:
        environ = {name: value for name, value in environ.items() if not name.startswith("VLLM_CLUSTER_")}
    return environ


def big_spec(environ: dict[str, str], **kwargs):
    return build_engine_spec(load_config(environ), "big", VLLM, **kwargs)


@pytest.mark.parametrize("where", [{"uds": "/run/big.sock", "api_key": "engine-key"}, {}], ids=["uds", "tcp"])
@pytest.mark.parametrize("sleep_mode", [False, True])
def test_a_cluster_lane_with_mp_runs_followers_py_around_the_plain_leader_argv(tmp_path, fake_python, where,
                                                                             sleep_mode):
    spec = big_spec(lane_environ(tmp_path, fake_python), sleep_mode=sleep_mode, **where)
    plain = big_spec(lane_environ(tmp_path, fake_python, cluster=False), sleep_mode=sleep_mode, **where)
    python = str(fake_python)
    assert spec.argv[:2] == [python, "-P"] and spec.argv[4] == "--", spec.argv
    assert Path(spec.argv[2]) == FOLLOWERS_PY and spec.argv[2].endswith("engines/followers.py")
    leader = spec.argv[5:]
    assert leader == plain.argv, (leader, plain.argv)
    assert leader[:3] == [python, "-m", ENGINE_MODULE]
    assert ("--uds" in leader) == bool(where)

    follower_spec = json.loads(spec.argv[3])
    assert (follower_spec["nodes"], follower_spec["gpus_per_node"]) == (2, 1), follower_spec
    args = follower_spec["follower_args"]
    assert args[:5] == ["-m", FOLLOWER_MODULE, "serve", "fake-org/big-model", "--headless"], args
    # the leader's engine flags and EXTRA_ARGS, in the same order, without its address or names
    address_end = leader.index("--uds" if where else "--port") + 2
    engine_flags = leader[address_end:]
    assert args[5:] == (["--enable-sleep-mode"] if sleep_mode else []) + engine_flags, args
    assert engine_flags[-4:] == ["--seed", "7", "--max-num-seqs", "4"]
    for flag, value in (("--tensor-parallel-size", "2"), ("--distributed-executor-backend", "mp"),
                        ("--max-model-len", "512")):
        assert args[args.index(flag) + 1] == value, (flag, args)
    assert not {"--uds", "--host", "--port", "--model", "--served-model-name", "--api-key"} & set(args), args
    assert spec.env == plain.env


def test_a_cluster_lanes_engine_environment_gives_a_follower_the_lanes_settings_but_not_the_key(
        tmp_path, fake_python):
    spec = big_spec(lane_environ(tmp_path, fake_python, SLEEP_LEVEL="1"), uds="/run/big.sock", api_key="engine-key")
    assert spec.env["VLLM_API_KEY"] == "engine-key"
    env = follower_environment({"PATH": "/node/bin", "VLLM_HOST_IP": "10.0.0.2"}, spec.env)
    assert "VLLM_API_KEY" not in env and "engine-key" not in env.values()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_LOGGING_LEVEL"] == spec.env["VLLM_LOGGING_LEVEL"]
    assert (env["PATH"], env["VLLM_HOST_IP"]) == ("/node/bin", "10.0.0.2")


@pytest.mark.parametrize(("cluster", "lane"), [
    (True, {"DISTRIBUTED_EXECUTOR_BACKEND": "ray"}),     # vLLM's Ray executor places its own workers
    (False, {}),                                         # mp, no cluster
    (True, {"TENSOR_PARALLEL_SIZE": "1"}),               # mp, on one node of the cluster
], ids=["ray-executor", "no-cluster", "one-node"])
def test_other_lanes_keep_the_plain_argv(tmp_path, fake_python, cluster, lane):
    spec = big_spec(lane_environ(tmp_path, fake_python, cluster, **lane), uds="/run/big.sock")
    alone = big_spec(lane_environ(tmp_path, fake_python, False, **lane), uds="/run/big.sock")
    assert spec.argv == alone.argv
    assert spec.argv[:3] == [str(fake_python), "-m", ENGINE_MODULE], spec.argv
    assert str(FOLLOWERS_PY) not in spec.argv and "--headless" not in spec.argv


def vllm_serve_parser():
    """The parser `python -m vllm.entrypoints.cli.main serve ...` uses (vllm/entrypoints/cli/main.py
    and serve.py, 0.32: the `serve` subcommand of a FlexibleArgumentParser, built by make_arg_parser),
    without importing the CLI's other subcommands."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    make_arg_parser(parser.add_subparsers(required=False, dest="subparser").add_parser("serve"))
    return parser, validate_parsed_serve_args


@pytest.mark.e2e
@requires_vllm
def test_the_follower_args_parse_with_vllms_own_serve_parser(tmp_path, fake_python):
    try:
        parser, validate = vllm_serve_parser()
    except ImportError as error:
        pytest.skip(f"the installed vLLM has no vllm serve parser at the 0.32 places: {error}")
    spec = big_spec(lane_environ(tmp_path, fake_python), uds="/run/big.sock", sleep_mode=True)
    args = json.loads(spec.argv[3])["follower_args"]
    # what followers.py adds for rank 1 of 2
    cli = [*args[2:], "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "29500", "--node-rank", "1"]
    parsed = parser.parse_args(cli)
    validate(parsed)
    assert (parsed.subparser, parsed.model_tag, parsed.headless) == ("serve", "fake-org/big-model", True)
    assert (parsed.tensor_parallel_size, parsed.distributed_executor_backend) == (2, "mp")
    assert (parsed.nnodes, parsed.node_rank, parsed.master_addr, parsed.master_port) == (2, 1, "127.0.0.1", 29500)
    assert (parsed.max_model_len, parsed.seed, parsed.max_num_seqs, parsed.enable_sleep_mode) == (512, 7, 4, True)
    with pytest.raises(SystemExit):               # the parser does refuse what it does not know
        parser.parse_args([*cli, "--no-such-flag"])


# --- the supervisor: exit 75 while starting --------------------------------------------------

NOT_PLACED = "[followers] the cluster has 0 other alive node(s) with 1 GPU(s); this lane needs 1"


def write_followers_python(directory: Path, fake_python: Path, status: int) -> Path:
    """The engines' Python: followers.py's command line prints followers.py's last line and exits
    with `status`; anything else runs the fake engine (the lane small)."""
    path = directory / f"followers-python-{status}"
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-P" ] && [ "$2" = "{FOLLOWERS_PY}" ]; then\n'
                    f'  echo "{NOT_PLACED}" >&2\n  exit {status}\nfi\nexec {fake_python} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.engine
@pytest.mark.parametrize(("status", "code", "state", "failures"), [
    (75, "cluster_unavailable", "stopped", 0),       # CLUSTER_NOT_READY: the cluster's state
    (1, "lane_failed", "failed", 1),                 # an ordinary start failure (VLLM_ENGINE_MAX_RESTARTS=1)
], ids=["exit-75", "exit-1"])
def test_an_engine_exiting_75_while_starting_is_the_cluster_unavailable_not_a_crash(
        tmp_path, fake_python, status, code, state, failures):
    assert followers.CLUSTER_NOT_READY == 75
    python = write_followers_python(tmp_path, fake_python, status)
    environ = {**lane_environ(tmp_path, python), "VLLM_ENGINE_MAX_RESTARTS": "1"}

    async def body(client, router):
        await eventually_async(lambda: _lane_state(client, "small", "ready"), "lane small ready")
        answers = [await client.post("/v1/chat/completions", json=chat_body("big", max_tokens=2)) for _ in range(2)]
        return answers, (await client.get("/lanes")).json()["lanes"]["big"]

    answers, lane = run_app(tmp_path, environ, FakeCluster(workers=1), body)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == code, error
        assert f"exited with status {status} while starting" in error["message"], error
        assert NOT_PLACED in error["message"], error          # followers.py's last line: why
    assert (lane["state"], lane["failures"]) == (state, failures), lane
    assert NOT_PLACED in lane["last_error"]


async def _lane_state(client, lane: str, state: str) -> bool:
    return (await client.get("/lanes")).json()["lanes"][lane]["state"] == state
