"""Fault paths with the fake engine's knobs: engines crashing under concurrent load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import psutil
import pytest

from measurements import record
from serving import (
    CHAT,
    chat_body,
    fake_lanes_env,
    group_alive,
    metric_samples,
    serving,
    sse_events,
    start_server,
    value,
    wait_metric,
)
from vllm_launcher.serve import SHUTDOWN_GRACE
from waiting import eventually

pytestmark = pytest.mark.engine

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
DIE_AFTER_TOKENS = 40


def openai_error(body: bytes) -> dict | None:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) and set(error) == OPENAI_ERROR_KEYS else None


def outcome(status: int, body: bytes, stream: bool) -> tuple[str, str]:
    """("ok" | "error" | "bad", detail) for one finished request."""
    if status != 200:
        error = openai_error(body)
        return ("error", error["code"]) if error else ("bad", f"{status} {body[:200]!r}")
    if not stream:
        return ("ok", "") if "choices" in json.loads(body) else ("bad", body[:200].decode())
    text = body.decode()
    events = sse_events(text)
    if events and "error" in events[-1]:
        return ("error", events[-1]["error"]["code"]) if set(events[-1]["error"]) == OPENAI_ERROR_KEYS \
            else ("bad", text[-300:])
    return ("ok", "") if text.rstrip().endswith("data: [DONE]") else ("bad", f"cut: {text[-300:]}")


async def crash_traffic(url: str, total: int, clients: int, killer_every: int, seed: int) -> list[tuple]:
    """`clients` keep-alive clients send `total` chat requests, a third streaming; every
    `killer_every`-th asks for enough tokens to make the engine exit mid-request."""
    rng = random.Random(seed)
    plan = [(rng.random() < 0.33, DIE_AFTER_TOKENS + 5 if i % killer_every == killer_every - 1 else rng.randint(1, 8))
            for i in range(total)]
    results = []

    async def one(http: httpx.AsyncClient, stream: bool, tokens: int) -> tuple:
        body = chat_body("a", stream, tokens)
        try:
            if stream:
                async with http.stream("POST", CHAT, json=body) as response:
                    return outcome(response.status_code, await response.aread(), True)
            response = await http.post(CHAT, json=body)
            return outcome(response.status_code, response.content, False)
        except httpx.TransportError as error:
            return ("lost", f"{type(error).__name__}: {error}")

    async def client_loop(http: httpx.AsyncClient):
        while plan:
            stream, tokens = plan.pop()
            results.append(await one(http, stream, tokens))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return results


def test_engine_crashes_under_load_end_every_request_in_an_answer_or_an_openai_error(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_DIE_AFTER_TOKENS": str(DIE_AFTER_TOKENS),
                                             "ENV_FAKE_TOKEN_DELAY": "0.005"}},
                         VLLM_ENGINE_MAX_RESTARTS="1000")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        results = asyncio.run(crash_traffic(served.url, total=600, clients=32, killer_every=30, seed=1))
        kinds = {kind: [detail for k, detail in results if k == kind] for kind in ("ok", "error", "bad", "lost")}
        summary = {kind: len(details) for kind, details in kinds.items()}
        assert not kinds["lost"] and not kinds["bad"], (summary, kinds["lost"][:5], kinds["bad"][:5])
        assert "engine_crashed" in kinds["error"], summary         # the fault happened while requests ran
        assert set(kinds["error"]) <= {"engine_crashed", "engine_unavailable"}, summary
        assert len(kinds["ok"]) > len(results) / 4, summary
        wait_metric(served, "vllm_launcher_inflight_requests", 0, lane="a")
        with served.client() as client:
            starts = value(metric_samples(client.get("/metrics").text), "vllm_launcher_engine_starts_total", lane="a")
        print(f"crash traffic: {summary}, engine starts {starts:.0f}, errors {sorted(set(kinds['error']))}")


def close_wait(pid: int) -> int:
    """The process's TCP sockets in CLOSE_WAIT (the peer closed, the process never did)."""
    return len(close_wait_sockets(pid))


def unix_sockets(pid: int) -> int:
    """The process's Unix sockets: engines are reached over them, so one left open after its
    engine is gone is the Unix-socket form of CLOSE_WAIT."""
    return len(psutil.Process(pid).net_connections(kind="unix"))


def close_wait_sockets(pid: int) -> list[str]:
    return [f"{c.laddr.port}->{c.raddr.port}" for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_CLOSE_WAIT]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_crash_mid_request_ends_in_an_openai_error_never_a_silent_cut(tmp_path, fake_python, stream):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_DIE_AFTER_TOKENS": "5", "ENV_FAKE_TOKEN_DELAY": "0.02"}},
                         VLLM_ENGINE_MAX_RESTARTS="100")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        if stream:
            with client.stream("POST", CHAT, json=chat_body("a", True, 20)) as response:
                text = response.read().decode()
            events = sse_events(text)
            assert response.status_code == 200 and [e["model"] for e in events[:-1]] == ["a"] * 4, text
            assert set(events[-1]) == {"error"} and set(events[-1]["error"]) == OPENAI_ERROR_KEYS, text
            assert events[-1]["error"]["code"] == "engine_crashed" and "[DONE]" not in text
        else:
            response = client.post(CHAT, json=chat_body("a", False, 20))
            assert response.status_code == 502 and openai_error(response.content)["code"] == "engine_crashed"
        wait_metric(served, "vllm_launcher_inflight_requests", 0, lane="a")
        served.wait_state("a", "ready", timeout=30)                 # restarted after the back-off
        assert client.post(CHAT, json=chat_body("a", stream, 3)).status_code == 200


# The engine's exit is watched through its status, not `Process.wait()`, which on Python 3.11
# returns only once every pipe is closed: a surviving child (as vLLM's EngineCore) holds stdout.
def test_a_crash_is_noticed_while_the_engines_child_lives_on(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_DIE_AFTER_TOKENS": "5", "ENV_FAKE_CHILD": "1"}},
                         VLLM_ENGINE_MAX_RESTARTS="100")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        response = client.post(CHAT, json=chat_body("a", False, 20))
        assert response.status_code == 502 and openai_error(response.content)["code"] == "engine_crashed"
        wait_metric(served, "vllm_launcher_engine_starts_total", 2, lane="a")      # restarted
        assert client.post(CHAT, json=chat_body("a", False, 3)).status_code == 200


def test_an_engine_that_ignores_sigterm_is_killed_within_the_stop_timeout(tmp_path, fake_python):
    stop_timeout = 2.0
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_HANG_ON_TERM": "1", "ENV_FAKE_CHILD": "1"}},
                         VLLM_STOP_TIMEOUT=str(stop_timeout))
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        (pgid,) = served.record_engine_groups()
        assert len(group_alive(pgid)) == 3                   # keeper, engine and its forked child
        began = time.monotonic()
        unloaded = client.post("/lanes/a/unload")
        took = time.monotonic() - began
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "stopped"
        assert group_alive(pgid) == []                      # the whole group, at the moment it says stopped
        assert stop_timeout <= took < stop_timeout + 3, took      # SIGTERM ignored: SIGKILL after the bound


def test_a_client_leaving_a_non_streaming_request_cancels_it_in_the_engine(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.1"}})       # 100 tokens: 10 s
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        host, port = served.url.removeprefix("http://").split(":")
        body = json.dumps(chat_body("a", False, 100)).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_metric(served, "vllm:num_requests_running", 1, lane="a", model_name="a")
        left = time.monotonic()
        sock.close()                                            # the client leaves
        wait_metric(served, "vllm:num_requests_running", 0, timeout=5, lane="a", model_name="a")
        assert time.monotonic() - left < 5                     # long before the 10 s generation would end
        wait_metric(served, "vllm_launcher_inflight_requests", 0, lane="a")
        wait_metric(served, "vllm_launcher_requests_total", 1, lane="a", status="499")


SLOW_READER = textwrap.dedent("""
    import socket, sys, time
    host, port, body = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # the server feels the slow reading
    sock.connect((host, port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n"
                 b"Content-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    received = b""
    while True:
        chunk = sock.recv(1024)
        if not chunk:
            break
        if not received:
            print("started", file=sys.stderr, flush=True)
        received += chunk
        time.sleep(0.03)
    sys.stdout.buffer.write(received)
""")


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """An HTTP/1.1 chunked body: the payload, and whether its last (empty) chunk arrived."""
    payload = b""
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        if not size_line:
            return payload, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return payload, True
        payload, data = payload + rest[:size], rest[size + 2:]


def test_sigterm_with_a_slow_reader_ends_its_stream_properly_and_exits_within_the_bound(tmp_path, fake_python):
    drain, stop = 2.0, 5.0
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.004"}},
                         VLLM_DRAIN_TIMEOUT=str(drain), VLLM_STOP_TIMEOUT=str(stop))
    served = start_server(tmp_path, env, wait_ready_lane="a")
    host, port = served.url.removeprefix("http://").split(":")
    body = json.dumps(chat_body("a", True, 1000))               # 4 s of tokens, about 10 s of reading
    reader = subprocess.Popen([sys.executable, "-c", SLOW_READER, host, port, body],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert reader.stderr.readline().strip() == b"started"
        began = time.monotonic()
        code = served.terminate(timeout=60)
        took = time.monotonic() - began
        received, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert code == 0, served.log()[-2000:]
    assert took < drain + SHUTDOWN_GRACE + stop + 3, took
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), received[:300]
    payload, finished = dechunk(chunked)
    text = payload.decode()
    events = sse_events(text)
    complete = text.rstrip().endswith("data: [DONE]")
    assert finished and (complete or set(events[-1]) == {"error"}), text[-500:]
    if not complete:
        assert events[-1]["error"]["code"] == "shutting_down" and set(events[-1]["error"]) == OPENAI_ERROR_KEYS
    print(f"slow reader: {'complete' if complete else 'ended by ' + events[-1]['error']['code']}, "
          f"{len(events)} events; server exited {took:.1f} s after SIGTERM")
    assert not served.leftovers()


def test_sigterm_cuts_a_long_stream_at_the_drain_bound_with_an_error_event(tmp_path, fake_python):
    """A stream longer than the shutdown's drain bound (VLLM_DRAIN_TIMEOUT, D) is cut at D with an
    SSE error event and a properly ended body, before uvicorn's own grace (D + SHUTDOWN_GRACE) runs
    out; with D above SHUTDOWN_GRACE a drain of 2 D (a switch's bound) would be cut by uvicorn
    mid-body (curl: exit 18), as it was in CI's e2e tier."""
    drain, stop = SHUTDOWN_GRACE + 1.0, 5.0
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.02"}},
                         VLLM_DRAIN_TIMEOUT=str(drain), VLLM_STOP_TIMEOUT=str(stop))
    served = start_server(tmp_path, env, wait_ready_lane="a")
    result: dict = {}

    def read_stream() -> None:
        try:
            with httpx.stream("POST", served.url + CHAT, json=chat_body("a", True, 5000), timeout=120) as response:
                result["status"] = response.status_code
                result["text"] = "".join(response.iter_text())      # raises on a body cut mid-chunk
        except httpx.HTTPError as error:
            result["error"] = repr(error)

    reader = threading.Thread(target=read_stream)
    reader.start()
    try:
        served.wait_inflight("a", 1)
        began = time.monotonic()
        code = served.terminate(timeout=60)
        took = time.monotonic() - began
    finally:
        reader.join(60)
    assert code == 0, served.log()[-2000:]
    assert "error" not in result, result.get("error")
    events = sse_events(result["text"])
    assert result["status"] == 200 and set(events[-1]) == {"error"}, result["text"][-500:]
    assert events[-1]["error"]["code"] == "shutting_down" and set(events[-1]["error"]) == OPENAI_ERROR_KEYS
    assert took < drain + SHUTDOWN_GRACE + stop + 3, took
    print(f"a {len(events)}-event stream cut at shutdown; the server exited {took:.1f} s after SIGTERM")
    assert not served.leftovers()


CHAOS_LANES = ["orchestrator", "coder", "fast_rag"]


async def chaos_traffic(url: str, total: int, clients: int, killer_every: int, seed: int) -> list[tuple]:
    """`clients` keep-alive clients send `total` chat requests over CHAOS_LANES, a third
    streaming; every `killer_every`-th asks for enough tokens to make its engine exit.
    Returns (kind, detail) per request; an answer from the wrong lane is "bad"."""
    rng = random.Random(seed)
    plan = [(rng.choice(CHAOS_LANES), rng.random() < 0.33,
             DIE_AFTER_TOKENS + 5 if i % killer_every == killer_every - 1 else rng.randint(1, 8))
            for i in range(total)]
    results = []

    async def one(http: httpx.AsyncClient, lane: str, stream: bool, tokens: int) -> tuple:
        body = chat_body(lane, stream, tokens)
        try:
            if stream:
                async with http.stream("POST", CHAT, json=body) as response:
                    content = await response.aread()
            else:
                response = await http.post(CHAT, json=body)
                content = response.content
        except httpx.TransportError as error:
            return ("lost", f"{type(error).__name__}: {error}")
        kind, detail = outcome(response.status_code, content, stream)
        if kind == "ok":
            models = {e.get("model") for e in sse_events(content.decode())} if stream else {json.loads(content)["model"]}
            if models != {lane}:
                return ("bad", f"asked {lane}, answered by {models}")
        return kind, detail

    async def client_loop(http: httpx.AsyncClient):
        while plan:
            results.append(await one(http, *plan.pop()))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return results


def test_chaos_crashes_and_sigkills_over_three_lanes_lose_nothing(tmp_path, fake_python):
    """At least 3,000 requests over three co-resident lanes while engines crash mid-request
    (FAKE_DIE_AFTER_TOKENS) and whole engine groups are SIGKILLed from outside."""
    total, clients, kills = 3000, 48, 6
    lanes = {lane: {"ENV_FAKE_DIE_AFTER_TOKENS": str(DIE_AFTER_TOKENS), "ENV_FAKE_TOKEN_DELAY": "0.002",
                    "GPU_MEMORY_UTILIZATION": "0.3"} for lane in CHAOS_LANES}
    env = fake_lanes_env(fake_python, lanes, VLLM_GPU_MEMORY_BUDGET="0.9", VLLM_ENGINE_MAX_RESTARTS="1000")
    with serving(tmp_path, env, wait_ready_lane="orchestrator") as served, served.client() as client:
        for lane in CHAOS_LANES[1:]:
            assert client.post(f"/lanes/{lane}/load").status_code == 200
        server_pid = served.process.pid
        close_wait_before, unix_before = close_wait(server_pid), unix_sockets(server_pid)
        killed: list[int] = []
        stop = threading.Event()

        def killer():                          # SIGKILL a live engine group now and then
            rng = random.Random(7)
            while len(killed) < kills and not stop.wait(1.5):
                live = [pgid for pgid in served.record_engine_groups() if group_alive(pgid)]
                if live:
                    pgid = rng.choice(live)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                        killed.append(pgid)

        began = time.monotonic()
        thread = threading.Thread(target=killer)
        thread.start()
        try:
            results = asyncio.run(chaos_traffic(served.url, total, clients, killer_every=100, seed=3))
        finally:
            stop.set()
            thread.join()
        took = time.monotonic() - began
        kinds = {kind: [detail for k, detail in results if k == kind] for kind in ("ok", "error", "bad", "lost")}
        summary = {kind: len(details) for kind, details in kinds.items()}
        assert len(results) == total
        assert not kinds["lost"] and not kinds["bad"], (summary, kinds["lost"][:5], kinds["bad"][:5])
        assert set(kinds["error"]) <= {"engine_crashed", "engine_unavailable"}, summary
        assert "engine_crashed" in kinds["error"] and killed, (summary, killed)
        assert len(kinds["ok"]) > total / 2, summary
        for lane in CHAOS_LANES:
            wait_metric(served, "vllm_launcher_inflight_requests", 0, lane=lane)
        # sockets the engines' deaths left are closed, not kept
        eventually(lambda: close_wait(server_pid) <= close_wait_before,
                   lambda: f"CLOSE_WAIT {close_wait_before} -> {close_wait(server_pid)} (server port "
                           f"{served.url.rsplit(':', 1)[1]}): {close_wait_sockets(server_pid)}", 10, 0.2)
        close_wait_after = close_wait(server_pid)
        samples = metric_samples(client.get("/metrics").text)
        starts = sum(value(samples, "vllm_launcher_engine_starts_total", lane=lane) for lane in CHAOS_LANES)
        unix_after_traffic = unix_sockets(server_pid)
        for lane in CHAOS_LANES:                    # with every engine gone, no socket to one is left
            assert client.post(f"/lanes/{lane}/unload").json()["state"] == "stopped"
        unix_after = unix_sockets(server_pid)
        assert unix_after <= unix_before, f"Unix sockets {unix_before} -> {unix_after_traffic} -> {unix_after}"
        line = (f"chaos: {total} requests, {clients} clients, 3 lanes in {took:.1f} s: {summary}, "
                f"{len(killed)} engine groups SIGKILLed, {starts:.0f} engine starts, "
                f"CLOSE_WAIT {close_wait_before} -> {close_wait_after}, Unix sockets {unix_before} -> "
                f"{unix_after_traffic} (engines up) -> {unix_after} (engines unloaded)")
        print(line)
        record(line)


def test_a_client_leaving_after_the_last_event_was_served_in_full(tmp_path, fake_python):
    """A client that closes its connection once it has `data: [DONE]` (before the engine ends the
    response) is a 200 in the metrics, not a 499; one that leaves mid-stream is a 499."""
    # warm-up off: its streamed chat would wait out the 30 s linger before the lane is ready
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_LINGER_AFTER_DONE": "30", "ENV_FAKE_TOKEN_DELAY": "0.05",
                                             "WARMUP": "off"}})
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        for leave_at, status in ((b"data: [DONE]\n\n", "200"), (b"data: {", "499")):
            with httpx.stream("POST", served.url + CHAT, json=chat_body("a", True, 20), timeout=60) as response:
                received = b""
                for chunk in response.iter_raw():
                    received += chunk
                    if leave_at in received:
                        break
            wait_metric(served, "vllm_launcher_requests_total", 1, lane="a", status=status)
        with served.client() as client:
            samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_requests_total", lane="a", status="200") == 1
        assert value(samples, "vllm_launcher_requests_total", lane="a", status="499") == 1
