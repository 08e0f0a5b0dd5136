"""Lane switching under load with fake engines: nothing lost, nothing misrouted, no
starvation, clean shutdown, and no engine process left behind (checked by process group)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import openai
import pytest

from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, sse_events, value, wait_metric
from waiting import eventually

pytestmark = pytest.mark.engine


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """POST a streaming request from a thread; outcome["status"], outcome["text"] when it ends."""
    outcome: dict = {}

    def run():
        with httpx.stream("POST", url + CHAT, json=body, timeout=120) as response:
            outcome["status"], outcome["text"] = response.status_code, response.read().decode()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


async def mixed_traffic(url: str, lanes: list[str], total: int, clients: int, seed: int) -> list[tuple]:
    """`clients` concurrent clients send `total` requests in all, each to a random lane, a
    third of them streaming. Returns (lane, status, model seen, text) per request."""
    rng = random.Random(seed)
    plan = [(rng.choice(lanes), rng.random() < 0.33, rng.randint(1, 6)) for _ in range(total)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results = []

    async def client_loop(http: httpx.AsyncClient):
        while not queue.empty():
            lane, stream, tokens = queue.get_nowait()
            await asyncio.sleep(rng.random() * 0.05)
            if stream:
                async with http.stream("POST", CHAT, json=chat_body(lane, True, tokens)) as response:
                    text = (await response.aread()).decode()
                events = sse_events(text)
                content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
                models = {e.get("model") for e in events if "choices" in e}
                results.append((lane, response.status_code, models.pop() if len(models) == 1 else models, content))
            else:
                response = await http.post(CHAT, json=chat_body(lane, False, tokens))
                body = response.json()
                content = body["choices"][0]["message"]["content"] if response.status_code == 200 else body
                results.append((lane, response.status_code, body.get("model"), content))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return results


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_concurrent_mixed_traffic_three_lanes(tmp_path, fake_python, seed):
    lanes = ["orchestrator", "coder", "fast_rag"]
    env = fake_lanes_env(fake_python, {lane: {"ENV_FAKE_TOKEN_DELAY": "0.01"} for lane in lanes},
                         VLLM_SWITCH_MAX_WAIT="1.5")
    with serving(tmp_path, env, wait_ready_lane="orchestrator") as served:
        results = asyncio.run(mixed_traffic(served.url, lanes, total=200, clients=32, seed=seed))
        assert len(results) == 200
        for lane, status, model, content in results:
            assert status == 200, (lane, status, content)
            assert model == lane and content.startswith(lane), (lane, model, content)
        lanes_view = served.lanes()
        with served.client() as client:
            samples = metric_samples(client.get("/metrics").text)
        starts = {lane: value(samples, "vllm_launcher_engine_starts_total", lane=lane) for lane in lanes}
        switches = sum(v for (name, _), v in samples.items() if name == "vllm_launcher_switches_total")
        print(f"seed {seed}: engine starts {starts}, switches {switches:.0f}; last start seconds "
              f"{ {name: view['last_start_seconds'] for name, view in lanes_view.items()} }")
        assert all(count >= 1 for count in starts.values()), starts       # every lane was loaded
        assert sum(starts.values()) == switches, (starts, switches)       # each start a planned switch: no restart
        for lane in lanes:
            assert value(samples, "vllm_launcher_engine_start_failures_total", lane=lane) == 0
            assert value(samples, "vllm_launcher_inflight_requests", lane=lane) == 0
        assert sum(value(samples, "vllm_launcher_requests_total", lane=lane, status="200") for lane in lanes) == 200


def test_streaming_through_a_switch_and_queued_served_after(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.05"}, "b": {}},
                         VLLM_SWITCH_MAX_WAIT="0.5")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        thread, outcome = stream_in_background(served.url, chat_body("a", True, 60))
        served.wait_inflight("a", 1)
        with served.client() as client:
            b_answers = [client.post(CHAT, json=chat_body("b")) for _ in range(1)]
        thread.join(60)
        status, text = outcome["status"], outcome["text"]
        events = sse_events(text)
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events).count(" t") == 59
        assert all(r.status_code == 200 and r.json()["model"] == "b" for r in b_answers)
        assert served.lanes()["b"]["state"] == "ready" and served.lanes()["a"]["state"] == "stopped"


def test_starvation_bound_under_back_to_back_traffic(tmp_path, fake_python):
    """llama-swap's open starvation case: a client hammering lane A must not keep lane B waiting
    beyond VLLM_SWITCH_MAX_WAIT + drain + stop + start."""
    max_wait = 2.0
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.02"}, "b": {}},
                         VLLM_SWITCH_MAX_WAIT=str(max_wait))
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        stop = threading.Event()
        a_done = []

        def hammer():
            with served.client() as client:
                while not stop.is_set():
                    a_done.append(client.post(CHAT, json=chat_body("a", max_tokens=5)).status_code)

        hammers = [threading.Thread(target=hammer) for _ in range(2)]
        for thread in hammers:
            thread.start()
        eventually(lambda: len(a_done) >= 10, "lane a's hammering gets going", 60, 0.02)
        began = time.monotonic()
        with served.client() as client:
            b = client.post(CHAT, json=chat_body("b"))
        waited = time.monotonic() - began
        served_before_b = len(a_done)
        eventually(lambda: len(a_done) >= served_before_b + 2, "lane a served again after b", 60, 0.02)
        stop.set()
        for thread in hammers:
            thread.join(60)
        assert b.status_code == 200 and b.json()["model"] == "b"
        view = served.lanes()
        bound = max_wait + 0.1 * 5 + 5.0 + view["b"]["last_start_seconds"]   # drain of 5-token requests, stop grace
        print(f"lane b waited {waited:.2f} s under back-to-back lane a traffic (bound {bound:.2f} s)")
        assert waited <= bound + 2.0, (waited, bound)      # slack for a loaded 2-core machine
        assert set(a_done) == {200} and len(a_done) > 10


def test_shutdown_with_requests_in_flight_and_queued(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.05", "ENV_FAKE_CHILD": "1"}, "b": {}},
                         VLLM_SWITCH_MAX_WAIT="60", VLLM_DRAIN_TIMEOUT="30")
    served_ctx = serving(tmp_path, env, wait_ready_lane="a")
    served = served_ctx.__enter__()
    results = {}

    def stream_a():
        with httpx.stream("POST", served.url + CHAT, json=chat_body("a", True, 40), timeout=60) as response:
            results["a"] = (response.status_code, response.read().decode())

    def queued_b():
        response = httpx.post(served.url + CHAT, json=chat_body("b"), timeout=60)
        results["b"] = (response.status_code, response.json())

    threads = [threading.Thread(target=stream_a), threading.Thread(target=queued_b)]
    threads[0].start()
    served.wait_inflight("a", 1)
    threads[1].start()
    groups = served.record_engine_groups()
    served.wait_queue("b", 1)
    code = served.terminate()
    for thread in threads:
        thread.join(30)
    assert code == 0, served.log()[-2000:]
    status, text = results["a"]
    assert status == 200 and text.rstrip().endswith("data: [DONE]")   # the stream finished during the drain
    status, body = results["b"]
    assert status == 503 and body["error"]["code"] == "shutting_down" and body["error"]["type"] == "server_error"
    served_ctx.__exit__(None, None, None)
    assert groups and not served.leftovers()       # the engine and its forked child are gone


def test_unknown_model_404_lists_names(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ALIASES": "alpha"}, "b": {}})
    with serving(tmp_path, env) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        error = caught.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model"
        for name in ("a", "alpha", "fake-org/a-model", "b"):
            assert name in error["message"]
        starts = sum(1 for line in served.log().splitlines() if "starting engine" in line)
        assert starts == 1                  # only the default lane; the unknown model started nothing


def test_engine_that_fails_to_start_answers_503_with_its_log(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "broken": {"ENV_FAKE_EXIT_ON_START": "3"}},
                         VLLM_SWITCH_MAX_WAIT="0.5", VLLM_ENGINE_MAX_RESTARTS="1")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        with served.client() as client:
            began = time.monotonic()
            response = client.post(CHAT, json=chat_body("broken"))
            took = time.monotonic() - began
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "lane_failed"
            assert "exited with status 3" in error["message"] and "FAKE_EXIT_ON_START" in error["message"]
            assert took < 30       # failed at once, not after VLLM_START_TIMEOUT (900 s)
            assert client.post(CHAT, json=chat_body("a")).status_code == 200   # the other lane still serves


def test_drain_timeout_ends_a_long_stream_with_an_error_event(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.2"}, "b": {}},
                         VLLM_SWITCH_MAX_WAIT="0.5", VLLM_DRAIN_TIMEOUT="1")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        thread, outcome = stream_in_background(served.url, chat_body("a", True, 200))
        served.wait_inflight("a", 1)
        b = httpx.post(served.url + CHAT, json=chat_body("b"), timeout=60)
        thread.join(60)
        assert b.status_code == 200
        status, text = outcome["status"], outcome["text"]
        events = sse_events(text)
        assert status == 200 and "error" in events[-1], text[-500:]
        assert events[-1]["error"]["code"] == "drain_timeout"


def test_health_readyz_livez_version(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_START_DELAY": "5"}, "b": {}},
                         BUILD_SHA="abc123", BUILD_TIME="2026-11-22")
    with serving(tmp_path, env) as served:
        with served.client() as client:
            assert client.get("/livez").status_code == 200
            assert client.get("/readyz").status_code == 200
            starting = client.get("/health")
            assert starting.status_code == 503 and starting.json()["status"] == "starting"
            assert starting.json()["lanes"] == {"a": "starting", "b": "stopped"}
            served.wait_state("a", "ready")
            for path in ("/health", "/healthz"):
                ok = client.get(path)
                assert ok.status_code == 200 and ok.json() == {"status": "ok", "lanes": {"a": "ready", "b": "stopped"}}
            version = client.get("/version").json()
            assert version["build_sha"] == "abc123" and version["build_time"] == "2026-11-22"
            assert version["vllm_version"] == "0.0.0-fake" and version["version"]


def test_client_disconnect_mid_stream_closes_the_upstream_request(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.1"}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        with client.stream("POST", CHAT, json=chat_body("a", True, 300)) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            next(chunks)                                      # the stream runs; then the client leaves
            running = value(metric_samples(client.get("/metrics").text), "vllm:num_requests_running",
                            lane="a", model_name="a")
            assert running == 1
        wait_metric(served, "vllm:num_requests_running", 0, timeout=10, lane="a", model_name="a")
        wait_metric(served, "vllm_launcher_inflight_requests", 0, timeout=10, lane="a")
        assert client.post(CHAT, json=chat_body("a")).status_code == 200
