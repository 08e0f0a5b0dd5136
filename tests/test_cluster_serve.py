"""A multi-node lane served by `vllm-launcher serve` on real Ray (issue 14, What 2 and 4): two
network namespaces (tests/netns.py) as two machines, a Ray head and a worker through
`vllm-launcher cluster`, token auth on; the server runs in the head's namespace, and the test's
client too (the namespaces have no route from this one). The lane `big` (tensor parallelism 2,
1 GPU per machine) runs the fake engine behind a fake of vLLM's Ray executor
(tests/fake_ray_engine.py, FAKE_RAY_WORKERS=2: a STRICT_SPREAD placement group, an actor per
node). vLLM's real Ray executor refuses the CPU platform, so this is as far as Ray goes here.

- big answers with its two workers placed one per node; a switch to the one-node lane `small`
  leaves nothing of big on the worker (no actor, no placement group, no worker process), and
  big comes back;
- the worker's machine killed while big serves: the lane's error names the lost node; with a
  worker back, big answers again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from closure_env import CLOSURE_PYTHON, closure_ready
from fake_ray_engine import write_fake_ray_python
from measurements import record
from netns import kill_all, skip_or_fail
from ray_cluster import Node, new_token, stop_server, wait_for_nodes
from serving import fake_lanes_env
from waiting import eventually

pytestmark = pytest.mark.cluster

PORT = 8000

CLIENT = r"""
import json, sys, httpx
method, url, body, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
try:
    response = httpx.request(method, url, json=json.loads(body) if body else None, timeout=timeout)
    print(json.dumps({"status": response.status_code, "body": response.text}))
except httpx.HTTPError as error:
    print(json.dumps({"status": 0, "body": repr(error)}))
"""

# What the cluster holds of big's engine: its live actors and its placement groups not removed.
LEFT = r"""
import json, sys, ray
from ray._private.state import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
actors = [info for info in state.actor_table(None).values()
          if info.get("ActorClassName", "").endswith("FakeRayWorker") and info.get("State") != "DEAD"]
groups = [group for group in ray.util.placement_group_table().values() if group["state"] != "REMOVED"]
print(json.dumps({"actors": [[a.get("Address", {}).get("IPAddress"), a.get("State")] for a in actors],
                  "groups": [[g["strategy"], g["state"]] for g in groups]}))
"""


def in_machine(machine, env, method: str, path: str, body: dict | None = None, timeout: float = 240) -> dict:
    result = subprocess.run(machine.argv(sys.executable, "-c", CLIENT, method, f"http://127.0.0.1:{PORT}{path}",
                                         json.dumps(body) if body else "", str(timeout)),
                            env=env, capture_output=True, text=True, timeout=timeout + 30, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def left_on_cluster(head: Node, env: dict) -> dict:
    result = subprocess.run(head.machine.argv(str(CLOSURE_PYTHON), "-P", "-c", LEFT, f"{head.machine.address}:6379"),
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker_processes(machine) -> list[str]:
    """Command lines in the worker's namespace that belong to big's engine (its actor's process)."""
    return machine.command_lines("FakeRayWorker")


def test_a_two_node_lane_on_ray_switches_cleanly_and_survives_a_lost_worker(tmp_path, two_machines):
    if not closure_ready():
        skip_or_fail(f"{CLOSURE_PYTHON} (the engines' locked closure, with Ray) is missing: run `make closure`")
    token = new_token(tmp_path / "token")
    fake_python = write_fake_ray_python(tmp_path, CLOSURE_PYTHON)
    head_machine, worker_machine = two_machines
    began = time.monotonic()
    head = Node(head_machine, tmp_path / "head", token, 1, "head")
    worker = Node(worker_machine, tmp_path / "worker", token, 1, "join", head_machine.address)
    server = None
    ray_env = head.driver_env()
    try:
        wait_for_nodes(head, 2)
        record(f"cluster serve: head and worker up in {time.monotonic() - began:.1f} s")
        env = {**head.env, **fake_lanes_env(fake_python, {"small": {}, "big": {
                   "TENSOR_PARALLEL_SIZE": "2", "DISTRIBUTED_EXECUTOR_BACKEND": "ray", "ENV_FAKE_RAY_WORKERS": "2"}}),
               "VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_GPUS": "1", "VLLM_HOST": "127.0.0.1",
               "VLLM_PORT": str(PORT), "VLLM_SWITCH_MAX_WAIT": "1", "VLLM_START_TIMEOUT": "180",
               "VLLM_STOP_TIMEOUT": "10", "VLLM_RUNTIME_DIR": str(tmp_path / "run")}
        log_path = tmp_path / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(head_machine.argv(sys.executable, "-m", "vllm_launcher", "serve"),
                                      env=env, stdout=log, stderr=subprocess.STDOUT)

        def lanes() -> dict:
            return json.loads(in_machine(head_machine, env, "GET", "/lanes", timeout=10)["body"])["lanes"]

        def healthy() -> bool:
            assert server.poll() is None, log_path.read_text()[-3000:]
            return in_machine(head_machine, env, "GET", "/health", timeout=5)["status"] == 200

        eventually(healthy, lambda: f"the server healthy: {log_path.read_text()[-3000:]}", 60, 0.5)

        started = time.monotonic()
        answer = in_machine(head_machine, env, "POST", "/v1/chat/completions", chat("big"))
        assert answer["status"] == 200, (answer, log_path.read_text()[-3000:])
        record(f"cluster serve: big (2 nodes, fake Ray executor) answered after a switch in "
               f"{time.monotonic() - started:.1f} s")
        placed = left_on_cluster(head, ray_env)
        assert sorted(address for address, _ in placed["actors"]) == [head_machine.address, worker_machine.address]
        assert placed["groups"] == [["STRICT_SPREAD", "CREATED"]], placed
        assert "2 workers up on" in log_path.read_text()
        assert worker_processes(worker_machine), "no process of big's actor on the worker"

        started = time.monotonic()
        assert in_machine(head_machine, env, "POST", "/v1/chat/completions", chat("small"))["status"] == 200
        assert lanes()["big"]["state"] == "stopped"
        eventually(lambda: left_on_cluster(head, ray_env) == {"actors": [], "groups": []}
                   and not worker_processes(worker_machine),
                   lambda: f"nothing of big left: {left_on_cluster(head, ray_env)}, {worker_processes(worker_machine)}",
                   30, 1)
        record(f"cluster serve: switch to the one-node lane, nothing of big left on the cluster after "
               f"{time.monotonic() - started:.1f} s")
        assert in_machine(head_machine, env, "POST", "/v1/chat/completions", chat("big"))["status"] == 200

        # the worker's machine dies while big serves
        started = time.monotonic()
        worker.process.kill()
        kill_all(worker_machine)
        lost = "lost the worker on node " + worker_machine.address
        eventually(lambda: lost in (lanes()["big"]["last_error"] or ""),
                   lambda: f"big's error names the lost node: {lanes()['big']}\n{log_path.read_text()[-3000:]}",
                   60, 0.5)
        record(f"cluster serve: the worker killed: big's error names the lost node after "
               f"{time.monotonic() - started:.1f} s")
        worker.close()
        # The head notices the dead node by missed heartbeats (tens of seconds); a node joining at
        # the same address before that is refused by Ray, so the new worker waits for it, as an
        # operator restarting a machine does.
        wait_for_nodes(head, 1, timeout=180)
        record(f"cluster serve: the head marked the lost node dead {time.monotonic() - started:.1f} s after the kill")
        worker = Node(worker_machine, tmp_path / "worker2", token, 1, "join", head_machine.address)
        wait_for_nodes(head, 2)
        answer = in_machine(head_machine, env, "POST", "/v1/chat/completions", chat("big"))
        assert answer["status"] == 200, (answer, log_path.read_text()[-3000:])
        record(f"cluster serve: a worker back, big answers again {time.monotonic() - started:.1f} s after the kill")
    finally:
        stop_server(server, timeout=60)
        worker.close()
        head.close()
