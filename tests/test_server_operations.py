"""What operators rely on, with fake engines: metrics, auth, lane control, limits and
back-pressure, crash recovery, orphan reaping, co-residency, idle unload, logs, sd_notify."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import pytest

from serving import (
    CHAT,
    chat_body,
    engine_socket,
    fake_lanes_env,
    group_alive,
    keepers_of,
    metric_samples,
    serving,
    sse_events,
    start_server,
    value,
    wait_gone,
    wait_metric,
)
from waiting import eventually

pytestmark = pytest.mark.engine


def test_metrics_after_a_scripted_sequence(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "b": {}}, VLLM_SWITCH_MAX_WAIT="0.5")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        for lane in ("a", "a", "b", "b", "b"):
            assert client.post(CHAT, json=chat_body(lane)).status_code == 200
        assert client.post(CHAT, json=chat_body("nope")).status_code == 404
        text = client.get("/metrics").text
        samples = metric_samples(text)
        assert value(samples, "vllm_launcher_requests_total", lane="a", status="200") == 2
        assert value(samples, "vllm_launcher_requests_total", lane="b", status="200") == 3
        assert value(samples, "vllm_launcher_switches_total", from_lane="a", to_lane="b", reason="idle") == 1
        assert value(samples, "vllm_launcher_engine_starts_total", lane="a") == 1
        assert value(samples, "vllm_launcher_engine_starts_total", lane="b") == 1
        assert value(samples, "vllm_launcher_lane_state", lane="b", state="ready") == 1
        assert value(samples, "vllm_launcher_lane_state", lane="a", state="stopped") == 1
        assert value(samples, "vllm_launcher_queue_wait_seconds_count", lane="b") == 3
        assert value(samples, "vllm_launcher_switch_phase_seconds_count", lane="b", phase="start") == 1
        assert value(samples, "vllm_launcher_switch_phase_seconds_count", lane="a", phase="stop") == 1
        assert value(samples, "vllm_launcher_inflight_requests", lane="b") == 0
        assert value(samples, "vllm_launcher_requests_rejected_total", lane="", reason="model_not_found") == 1
        assert value(samples, "vllm_launcher_queue_depth", lane="b") == 0
        # the loaded engine's own metrics, re-exposed with a lane label; nothing else of the engine's
        assert value(samples, "vllm:prompt_tokens_total", lane="b", model_name="b") == 9
        assert "python_gc_objects_collected_total{generation=\"0\"} 1.0" not in text


def test_api_key_on_the_door_and_engines_unreachable_without_the_internal_key(tmp_path, fake_python):
    key_file = tmp_path / "key"
    key_file.write_text("door-key\n")
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_API_KEY_FILE=str(key_file))
    good = {"Authorization": "Bearer door-key"}
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "door-key"},
                        {"Authorization": "Basic door-key"}):
            for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/lanes"), ("POST", "/lanes/a/load")):
                response = client.request(method, path, headers=headers, json=chat_body("a"))
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.post(CHAT, json=chat_body("a"), headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        for path in ("/livez", "/health", "/healthz", "/version", "/metrics", "/readyz"):
            assert client.get(path).status_code == 200, path
        (pgid,) = served.record_engine_groups()
        with httpx.Client(transport=httpx.HTTPTransport(uds=engine_socket(pgid))) as direct:
            for headers in (None, good):
                answer = direct.post(f"http://engine{CHAT}", json=chat_body("a"), headers=headers)
                assert answer.status_code == 401       # neither no key nor the client's key opens the engine
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
        assert b"door-key" not in cmdline and b"--api-key" not in cmdline


def test_metrics_can_require_the_key(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_API_KEY="k", VLLM_METRICS_REQUIRE_KEY="true")
    with serving(tmp_path, env) as served, served.client() as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_load_and_unload_endpoints(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "b": {}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        loaded = client.post("/lanes/B/load")
        assert loaded.status_code == 200 and loaded.json() == {"lane": "b", "state": "ready"}
        lanes = client.get("/lanes").json()["lanes"]
        assert lanes["b"]["state"] == "ready" and lanes["a"]["state"] == "stopped"
        assert lanes["b"]["last_start_seconds"] > 0 and lanes["b"]["memory_plan"]["device_source"]
        unloaded = client.post("/lanes/b/unload")
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "stopped"
        later = client.post("/lanes/a/load?wait=false")
        assert later.status_code == 202 and later.json()["state"] in ("starting", "ready")
        served.wait_state("a", "ready")
        missing = client.post("/lanes/zzz/load")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "lane_not_found"


def retry_after_for_queue_full(tmp_path, fake_python, queue_max: int) -> int:
    # b takes one request at a time (MAX_NUM_SEQS 1), so each queued request adds a whole service
    # time (the 10 s estimate before any finish) to its Retry-After: far more than the start's
    # time left moves between the two runs
    env = fake_lanes_env(fake_python, {"a": {}, "b": {"ENV_FAKE_START_DELAY": "30", "MAX_NUM_SEQS": "1"}},
                         VLLM_QUEUE_MAX=str(queue_max), VLLM_SWITCH_MAX_WAIT="0.2")
    with serving(tmp_path / f"q{queue_max}", env, wait_ready_lane="a") as served:
        def queued():      # waits for the 30 s start; the server's shutdown answers it 503
            httpx.post(served.url + CHAT, json=chat_body("b"), timeout=60)

        threads = [threading.Thread(target=queued) for _ in range(queue_max)]
        for thread in threads:
            thread.start()
        served.wait_queue("b", queue_max)
        rejected = httpx.post(served.url + CHAT, json=chat_body("b"), timeout=10)
        assert rejected.status_code == 503 and rejected.json()["error"]["code"] == "queue_full"
    for thread in threads:
        thread.join()
    return int(rejected.headers["Retry-After"])


def test_queue_full_retry_after_grows_with_the_queue_at_the_lanes_rate(tmp_path, fake_python):
    """Retry-After = the start's time left + the queue ahead at the lane's own rate (issue 21):
    five more queued requests at one at a time and 10 s each add about 50 s."""
    small = retry_after_for_queue_full(tmp_path, fake_python, 1)
    large = retry_after_for_queue_full(tmp_path, fake_python, 6)
    assert 1 <= small < large and 40 <= large - small <= 60, (small, large)


def test_queue_timeout_only_for_a_loaded_lane_that_takes_nothing(tmp_path, fake_python):
    """VLLM_QUEUE_TIMEOUT (issue 21): a request waiting for a lane's start is not timed out (the
    wait bound covers it); one queued behind a loaded lane that takes nothing for that long (its
    one place held by a long generation here, a stuck engine in life) gets 503 queue_timeout."""
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "1", "MAX_NUM_SEQS": "1"},
                                       "b": {"ENV_FAKE_START_DELAY": "4"}},
                         VLLM_QUEUE_TIMEOUT="1", VLLM_SWITCH_MAX_WAIT="0.2")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        started = client.post(CHAT, json=chat_body("b"))
        assert started.status_code == 200, started.text          # waited out b's 4 s start
        held = threading.Thread(target=lambda: client.post(CHAT, json=chat_body("a", max_tokens=6)))
        held.start()                                              # loads a again, then holds its one place
        served.wait_inflight("a", 1)
        response = client.post(CHAT, json=chat_body("a"))
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout", response.text
        assert int(response.headers["Retry-After"]) >= 1
        held.join(timeout=60)


def test_disconnect_while_queued_removes_the_request_and_loads_nothing(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.05"}, "b": {}},
                         VLLM_SWITCH_MAX_WAIT="60")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        busy = threading.Thread(target=lambda: httpx.post(served.url + CHAT, json=chat_body("a", max_tokens=40),
                                                          timeout=30))
        busy.start()                                   # lane a stays busy for 2 s
        served.wait_inflight("a", 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + CHAT, json=chat_body("b"), timeout=0.5)
        wait_metric(served, "vllm_launcher_requests_total", 1, lane="b", status="499")    # seen leaving
        assert served.lanes()["b"]["queue_depth"] == 0
        busy.join()
        # Lane a is idle now: a b still queued would have been switched to at that finish (the
        # scheduler decides on the event, not later); a request answered after it proves none was.
        with served.client() as client:
            assert client.post(CHAT, json=chat_body("a", max_tokens=1)).status_code == 200
        lanes = served.lanes()
        assert lanes["b"]["state"] == "stopped" and lanes["a"]["state"] == "ready"
        assert "lane b: starting engine" not in served.log()


def test_crash_restart_then_failed_while_another_lane_serves(tmp_path, fake_python):
    counter = tmp_path / "starts"
    env = fake_lanes_env(fake_python, {
        "steady": {},
        "flaky": {"ENV_FAKE_CRASH_AFTER": "1.5", "ENV_FAKE_TOKEN_DELAY": "0.1",
                  "ENV_FAKE_FAIL_STARTS_AFTER": f"1:{counter}", "GPU_MEMORY_UTILIZATION": "0.4"}},
        VLLM_ENGINE_MAX_RESTARTS="3", VLLM_GPU_MEMORY_BUDGET="0.9", VLLM_DEFAULT_LANE="flaky")
    env["VLLM_LANE_STEADY_GPU_MEMORY_UTILIZATION"] = "0.4"
    with serving(tmp_path, env, wait_ready_lane="flaky") as served, served.client() as client:
        crashed = client.post(CHAT, json=chat_body("flaky", max_tokens=100))     # in flight at the crash
        assert crashed.status_code == 502 and crashed.json()["error"]["code"] == "engine_crashed"
        queued = client.post(CHAT, json=chat_body("flaky"))        # waits through the restarts, then fails
        assert queued.status_code == 503
        error = queued.json()["error"]
        assert error["code"] == "lane_failed" and "FAKE_FAIL_STARTS_AFTER" in error["message"]
        assert served.lanes()["flaky"]["state"] == "failed"
        assert client.post(CHAT, json=chat_body("flaky")).json()["error"]["code"] == "lane_failed"
        assert client.post(CHAT, json=chat_body("steady")).status_code == 200     # the other lane works
        samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_engine_start_failures_total", lane="flaky") == 2
        assert value(samples, "vllm_launcher_engine_restarts_total", lane="flaky") == 2
        assert int(counter.read_text()) == 3                     # 1 good start, 2 failed restarts
        retry = client.post("/lanes/flaky/load")                 # an operator retries it: 3 more tries
        assert retry.status_code == 503 and retry.json()["error"]["code"] == "lane_failed"
        assert int(counter.read_text()) == 6


def test_sigkilled_server_engines_are_reaped_by_the_next_server(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_CHILD": "1"}})
    first = start_server(tmp_path / "one", env, wait_ready_lane="a")
    env_second = {**env, "VLLM_RUNTIME_DIR": str(first.runtime_dir)}
    (pgid,) = first.record_engine_groups()
    assert len(group_alive(pgid)) == 3                         # keeper, engine and its forked "EngineCore"
    (keeper,) = keepers_of(first.process.pid)                  # killed too (tests/test_engine_keeper.py
    keeper.kill()                                              # shows what it does): the reaper's case
    keeper.wait()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    wait_gone(pgid)                                            # the engine, by its parent-death signal
    survivors = group_alive(pgid)
    assert survivors, "the forked child should outlive a SIGKILLed server and keeper (as VLLM::EngineCore does)"
    with serving(tmp_path / "two", env_second, wait_ready_lane="a") as second:
        assert not group_alive(pgid)                           # reaped at start-up
        assert "left behind by a previous server" in second.log()


def test_two_live_servers_sharing_a_runtime_dir_leave_each_other_alone(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}})
    with serving(tmp_path / "one", env, wait_ready_lane="a") as first:
        (pgid,) = first.record_engine_groups()
        with serving(tmp_path / "two", {**env, "VLLM_RUNTIME_DIR": str(first.runtime_dir)},
                     wait_ready_lane="a") as second:
            assert group_alive(pgid) and "left behind" not in second.log()
            second.engine_groups = second.record_engine_groups() - {pgid}
        assert group_alive(pgid)


@pytest.mark.parametrize("share,a_after", [("0.4", "ready"), ("0.6", "stopped")], ids=["fit", "exclusive"])
def test_co_residency_when_shares_fit_and_exclusive_when_not(tmp_path, fake_python, share, a_after):
    lanes = {"a": {"GPU_MEMORY_UTILIZATION": share}, "b": {"GPU_MEMORY_UTILIZATION": share}}
    with serving(tmp_path, fake_lanes_env(fake_python, lanes, VLLM_GPU_MEMORY_BUDGET="0.9"),
                 wait_ready_lane="a") as served, served.client() as client:
        assert client.post(CHAT, json=chat_body("b")).status_code == 200
        states = {lane: view["state"] for lane, view in served.lanes().items()}
        assert states == {"a": a_after, "b": "ready"}


def test_idle_timeout_unloads_a_lane(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"IDLE_TIMEOUT": "1"}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        assert client.post(CHAT, json=chat_body("a")).status_code == 200
        served.wait_state("a", "stopped", timeout=10)
        assert client.get("/health").json()["status"] == "idle"
        assert client.get("/readyz").status_code == 200
        assert client.post(CHAT, json=chat_body("a")).status_code == 200    # loads again on demand


def test_progress_comments_while_a_stream_waits_then_the_stream(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "slow": {"ENV_FAKE_START_DELAY": "4"}})
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        with httpx.stream("POST", served.url + CHAT, json=chat_body("slow", True, 3), timeout=60) as response:
            text = response.read().decode()
        assert response.status_code == 200
        assert text.startswith(": waiting for lane slow (starting")
        assert [e["model"] for e in sse_events(text)] == ["slow"] * 4 and text.rstrip().endswith("[DONE]")


def test_failure_after_a_waiting_stream_was_answered_is_an_sse_error(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "broken": {"ENV_FAKE_START_DELAY": "3", "ENV_FAKE_EXIT_ON_START": "4"}},
                         VLLM_ENGINE_MAX_RESTARTS="1")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        with httpx.stream("POST", served.url + CHAT, json=chat_body("broken", True), timeout=60) as response:
            text = response.read().decode()
        assert response.status_code == 200 and text.startswith(": waiting for lane broken")
        assert sse_events(text)[-1]["error"]["code"] == "lane_failed"


def test_request_logs_json_and_log_files(tmp_path, fake_python):
    logs = tmp_path / "logs"
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_LOG_REQUESTS="true", VLLM_LOG_FORMAT="json",
                         LOG_DIRECTORY=str(logs))
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        assert client.post(CHAT, json=chat_body("a", max_tokens=3)).status_code == 200
        request = eventually(lambda: [line for line in map(json.loads, (logs / "launcher.log").read_text().splitlines())
                                      if line["logger"] == "vllm_launcher.requests"], "a request line logged", 10)
        assert request[0]["lane"] == "a" and request[0]["status"] == 200
        assert request[0]["usage"]["completion_tokens"] == 3 and "queue_wait" in request[0]
        engine_lines = [json.loads(line) for line in (logs / "engine-a.log").read_text().splitlines()]
        assert any("fake engine pid" in line["message"] for line in engine_lines)
        assert all(line["lane"] == "a" for line in engine_lines)


def test_sd_notify_ready_and_status(tmp_path, fake_python):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    env = fake_lanes_env(fake_python, {"a": {}}, NOTIFY_SOCKET=str(path), VLLM_DRAIN_TIMEOUT="7",
                         VLLM_STOP_TIMEOUT="3")
    try:
        with serving(tmp_path, env, wait_ready_lane="a") as served:
            messages = []
            while not any(m.startswith("STATUS=lane a: ready") for m in messages):
                messages.append(sock.recv(4096).decode())
            assert "READY=1" in messages
            assert served.terminate() == 0
            while not any(m.startswith("STOPPING=1") for m in messages):
                messages.append(sock.recv(4096).decode())
    finally:
        sock.close()
    # the shutdown's bound, told to systemd so a shorter TimeoutStopSec does not cut the drain:
    # drain 7 + uvicorn's grace 5 + engines' stop 3 + margin 15 s
    stopping = next(m for m in messages if m.startswith("STOPPING=1")).split("\n")
    assert "EXTEND_TIMEOUT_USEC=30000000" in stopping, stopping


AUTH = {"Authorization": "Bearer k"}
JSON = {**AUTH, "Content-Type": "application/json"}
DEEP = b"[" * 990 + b"]" * 990
DEEPER = b"[" * 100_000 + b"]" * 100_000
AUDIO = "/v1/audio/transcriptions"
BAD_REQUESTS = [
    ("POST", CHAT, {"content": b"{not json", "headers": JSON}, 400, "invalid_json"),
    ("POST", CHAT, {"content": b"", "headers": JSON}, 400, "invalid_json"),
    ("POST", CHAT, {"content": b"\xff\xfe\x00", "headers": JSON}, 400, "invalid_json"),
    ("POST", CHAT, {"content": DEEP, "headers": JSON}, 400, None),      # too deep, or not an object
    ("POST", CHAT, {"content": b'{"model": "a", "x": ' + DEEPER + b"}", "headers": JSON}, 400, "invalid_json"),
    ("POST", CHAT, {"json": []}, 400, "invalid_body"),
    ("POST", CHAT, {"json": "a string"}, 400, "invalid_body"),
    ("POST", CHAT, {"json": 42}, 400, "invalid_body"),
    ("POST", CHAT, {"json": {"messages": []}}, 400, "missing_model"),
    ("POST", CHAT, {"json": {"model": 7}}, 400, "invalid_model"),
    ("POST", CHAT, {"json": {"model": None}}, 400, "invalid_model"),
    ("POST", CHAT, {"json": {"model": ["a"]}}, 400, "invalid_model"),
    ("POST", CHAT, {"json": {"model": {"name": "a"}}}, 400, "invalid_model"),
    ("POST", CHAT, {"json": {"model": "unknown"}}, 404, "model_not_found"),
    ("POST", CHAT, {"json": {"model": "../../etc/passwd"}}, 404, "model_not_found"),
    ("POST", CHAT, {"json": {"model": "x" * 10000}}, 404, "model_not_found"),
    ("POST", CHAT, {"json": {"model": "--help"}}, 404, "model_not_found"),
    ("POST", CHAT, {"content": b'{"model": "\\ud800"}', "headers": JSON}, 404, "model_not_found"),
    ("POST", CHAT, {"content": b'{"model": "a\\udfff\\ud800b"}', "headers": JSON}, 404, "model_not_found"),
    ("POST", CHAT, {"json": {**chat_body("a", max_tokens=2), "stream": "yes"}}, 400, "invalid_stream"),
    ("POST", CHAT, {"json": {**chat_body("a", max_tokens=2), "stream": 1}}, 400, "invalid_stream"),
    ("POST", CHAT, {"json": {**chat_body("a", max_tokens=2), "stream": None}}, 200, None),
    ("POST", CHAT, {"content": json.dumps(chat_body("a")), "headers": {**AUTH, "Content-Type": "text/plain"}},
     415, "unsupported_media_type"),
    ("POST", CHAT, {"data": {"model": "a"}}, 415, "unsupported_media_type"),
    ("POST", CHAT, {"content": json.dumps(chat_body("a"))}, 415, "unsupported_media_type"),
    ("POST", CHAT, {"data": {"model": "a"}, "files": {"f": ("x", b"x")}}, 415, "unsupported_media_type"),
    ("POST", CHAT, {"json": chat_body("a"), "headers": {**JSON, "Content-Type": "application/json; charset=utf-8"}},
     200, None),
    ("POST", AUDIO, {"json": {"model": "a"}}, 415, "unsupported_media_type"),
    ("POST", AUDIO, {"content": b"x", "headers": {**AUTH, "Content-Type": "multipart/form-data"}}, 400, "invalid_form"),
    ("POST", AUDIO, {"content": b"garbage", "headers": {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}},
     400, "invalid_form"),
    ("POST", "/v1/tokenize", {"json": {"model": "a"}}, 404, "not_found"),
    ("POST", CHAT, {"content": b"{" + b" " * (2 * 1024 * 1024) + b"}", "headers": JSON}, 413, "body_too_large"),
    ("POST", "/v1/completions", {"json": {"model": "a", "prompt": "x" * (3 * 1024 * 1024)}}, 413, "body_too_large"),
    ("POST", CHAT, {"json": {"model": "a"}, "headers": {"Authorization": "Bearer wrong"}}, 401, "invalid_api_key"),
    ("POST", CHAT, {"json": {"model": "a"}, "headers": {"Authorization": ""}}, 401, "invalid_api_key"),
    ("POST", CHAT, {"json": {"model": "a"}, "headers": {}}, 401, "invalid_api_key"),
    ("GET", "/v1/models", {"headers": {"Authorization": "Bearer"}}, 401, "invalid_api_key"),
    ("GET", "/v1/models", {"headers": {"Authorization": "bearer k"}}, 200, None),
    ("GET", "/nope", {}, 404, "not_found"),
    ("GET", "/openapi.json", {}, 404, "not_found"),
    ("GET", "/docs", {}, 404, "not_found"),
    ("GET", "/redoc", {}, 404, "not_found"),
    ("GET", CHAT, {}, 405, "method_not_allowed"),
    ("PUT", CHAT, {}, 405, "method_not_allowed"),
    ("POST", "/lanes/a/load?wait=x", {"headers": {}}, 401, "invalid_api_key"),     # the key before the query
    ("POST", "/lanes/a/load?wait=x", {}, 422, "invalid_parameter"),
    ("POST", "/lanes/a/unload?wait=maybe", {}, 422, "invalid_parameter"),
    ("POST", "/lanes/a/../../load", {}, 404, None),
    ("POST", "/lanes/%00/load", {}, 404, "lane_not_found"),
    # issue 19: no slash redirects, one reading of Authorization, a form part without a name
    ("GET", "/lanes/a/", {"headers": {**AUTH, "Host": "evil.example"}}, 404, "not_found"),
    ("POST", "/lanes/a/load/", {"headers": {"Host": "evil.example"}}, 404, "not_found"),
    ("GET", "/metrics/", {}, 404, "not_found"),
    ("GET", "/lanes", {"headers": [("Authorization", "Bearer k"), ("Authorization", "Bearer x")]}, 400,
     "invalid_authorization"),
    ("POST", CHAT, {"json": chat_body("a"), "headers": [("Authorization", "Bearer x"), ("Authorization", "Bearer k")]},
     400, "invalid_authorization"),
    ("POST", AUDIO, {"content": b'--b\r\nContent-Disposition: form-data; filename="a.wav"\r\n\r\nx\r\n--b--\r\n',
                     "headers": {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}}, 400, "invalid_form"),
]


MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
ONE = [{"role": "user", "content": "hi"}]
KEYED = {"x-api-key": "k", "Content-Type": "application/json"}
# The Anthropic routes (issue 22): Anthropic-shaped errors, {"type": "error", "error": {"type", "message"}};
# (method, path, request, status, Anthropic's error type, a word the message names)
ANTHROPIC_BAD_REQUESTS = [
    ("POST", MESSAGES, {"content": b"{not json", "headers": KEYED}, 400, "invalid_request_error", "JSON"),
    ("POST", MESSAGES, {"json": []}, 400, "invalid_request_error", "object"),
    ("POST", MESSAGES, {"json": {"messages": ONE, "max_tokens": 1}}, 400, "invalid_request_error", "model"),
    ("POST", MESSAGES, {"json": {"model": "claude-x", "messages": ONE, "max_tokens": 1}}, 404, "not_found_error",
     "claude-x"),
    ("POST", MESSAGES, {"json": {"model": "a", "max_tokens": 1}}, 400, "invalid_request_error", "messages"),
    ("POST", MESSAGES, {"json": {"model": "a", "messages": "hi", "max_tokens": 1}}, 400, "invalid_request_error",
     "messages"),
    ("POST", MESSAGES, {"json": {"model": "a", "messages": [{"role": "system", "content": "x"}], "max_tokens": 1}},
     400, "invalid_request_error", "messages.0"),
    ("POST", MESSAGES, {"json": {"model": "a", "messages": [{"role": "user"}], "max_tokens": 1}}, 400,
     "invalid_request_error", "messages.0"),
    ("POST", MESSAGES, {"json": {"model": "a", "messages": ONE}}, 400, "invalid_request_error", "max_tokens"),
    ("POST", MESSAGES, {"json": {"model": "a", "messages": ONE, "max_tokens": "9"}}, 400, "invalid_request_error",
     "max_tokens"),
    ("POST", MESSAGES, {"json": {"model": "a", "messages": ONE, "max_tokens": 1, "stream": "yes"}}, 400,
     "invalid_request_error", "stream"),
    ("POST", MESSAGES, {"content": b"{}", "headers": {"x-api-key": "k", "Content-Type": "text/plain"}}, 415,
     "invalid_request_error", "Content-Type"),
    ("POST", MESSAGES, {"content": b"{" + b" " * (2 * 1024 * 1024) + b"}", "headers": KEYED}, 413,
     "request_too_large", "VLLM_MAX_BODY_BYTES"),
    ("POST", MESSAGES, {"json": {"model": "a"}, "headers": {"x-api-key": "wrong"}}, 401, "authentication_error",
     "x-api-key"),
    ("POST", MESSAGES, {"json": {"model": "a"}, "headers": {}}, 401, "authentication_error", "key"),
    ("POST", MESSAGES, {"json": {"model": "a"}, "headers": [("x-api-key", "k"), ("x-api-key", "k")]}, 400,
     "invalid_request_error", "x-api-key headers"),
    ("POST", MESSAGES, {"json": {"model": "a"}, "headers": {"x-api-key": "k", "Authorization": "Bearer j"}}, 400,
     "invalid_request_error", "different keys"),
    ("GET", MESSAGES, {}, 405, "invalid_request_error", "Method Not Allowed"),
    ("POST", COUNT, {"json": {"model": "a"}}, 400, "invalid_request_error", "messages"),
    ("POST", COUNT, {"json": {"model": "nope", "messages": ONE}}, 404, "not_found_error", "nope"),
    ("POST", COUNT, {"content": b"[", "headers": KEYED}, 400, "invalid_request_error", "JSON"),
    ("POST", COUNT, {"json": {"model": "a", "messages": ONE}, "headers": {"x-api-key": "wrong"}}, 401,
     "authentication_error", "key"),
    ("PUT", COUNT, {}, 405, "invalid_request_error", "Method Not Allowed"),
    # a lane whose hub id is not on this machine: its tokenizer is not either (nothing is downloaded)
    ("POST", COUNT, {"json": {"model": "a", "messages": ONE}}, 503, "overloaded_error", "fake-org/a-model"),
]


def test_bad_input_sweep_gets_4xx_openai_errors_and_the_server_keeps_serving(tmp_path, fake_python):
    paths = tmp_path / "engine-paths"
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_PATH_LOG": str(paths)}}, VLLM_API_KEY="k",
                         VLLM_MAX_BODY_BYTES="1Mi")
    auth = AUTH
    with serving(tmp_path, env, wait_ready_lane="a", ) as served, served.client() as client:
        assert len(BAD_REQUESTS) >= 45
        for method, path, kwargs, status, code in BAD_REQUESTS:
            kwargs = dict(kwargs)
            headers = kwargs.pop("headers", auth)
            response = client.request(method, path, headers=headers, **kwargs)
            assert response.status_code == status, (method, path, status, response.text[:300])
            if status >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, error
                assert code is None or error["code"] == code, (path, error)
        for method, path, kwargs, status, kind, named in ANTHROPIC_BAD_REQUESTS:
            kwargs = dict(kwargs)
            response = client.request(method, path, headers=kwargs.pop("headers", KEYED), **kwargs)
            assert response.status_code == status, (method, path, status, response.text[:300])
            body = response.json()
            assert set(body) == {"type", "error"} and body["type"] == "error", (path, body)
            assert body["error"]["type"] == kind and named in body["error"]["message"], (path, body)
        ok = client.post(CHAT, json=chat_body("a"), headers=auth)
        assert ok.status_code == 200 and ok.json()["model"] == "a"
    # nothing of the Anthropic sweep reached the engine
    assert not [line for line in paths.read_text().splitlines() if line.startswith("POST /v1/messages")]


class ListeningProxy:
    """A "proxy" that takes connections and records them (then hangs up): nothing should come."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                connection, peer = self.sock.accept()
                self.connections.append(peer)
                connection.close()

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("variables", [("HTTP_PROXY", "HTTPS_PROXY", "http_proxy"), ("ALL_PROXY", "all_proxy")],
                         ids=["http", "socks5"])
def test_engine_traffic_ignores_proxy_settings(tmp_path, fake_python, variables):
    proxy = ListeningProxy()
    scheme = "socks5" if "ALL_PROXY" in variables else "http"
    proxies = {name: f"{scheme}://user:pw@127.0.0.1:{proxy.port}" for name in variables}
    try:
        with serving(tmp_path, fake_lanes_env(fake_python, {"a": {}}, **proxies), wait_ready_lane="a",
                     timeout=30) as served, served.client() as client:
            assert client.post(CHAT, json=chat_body("a")).json()["model"] == "a"
            assert client.get("/version").json()["vllm_version"] == "0.0.0-fake"       # asked the engine
            assert 'vllm:num_requests_running{lane="a"' in client.get("/metrics").text    # and its metrics
        assert proxy.connections == []
    finally:
        proxy.close()


def test_engine_output_in_errors_and_logs_has_secrets_masked(tmp_path, fake_python):
    said = "token hf_leaked_token_value via http://proxyuser:proxypass@proxy.example:3128"
    env = fake_lanes_env(fake_python, {"a": {}, "b": {"ENV_HF_TOKEN": "hf_leaked_token_value", "ENV_FAKE_PRINT": said,
                                                   "ENV_FAKE_EXIT_ON_START": "3"}},
                         VLLM_ENGINE_MAX_RESTARTS="1", LOG_DIRECTORY=str(tmp_path / "logs"))
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        failed = client.post(CHAT, json=chat_body("b"))
        message = failed.json()["error"]["message"]
        assert failed.status_code == 503 and "token *** via http://***@proxy.example:3128" in message, message
        shown = client.get("/lanes").text + message + served.log()
    shown += "".join(path.read_text() for path in (tmp_path / "logs").iterdir())
    assert "token *** via http://***@proxy.example:3128" in served.log()
    for secret in ("hf_leaked_token_value", "proxyuser", "proxypass"):
        assert secret not in shown
