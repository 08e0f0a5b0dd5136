"""Issue 21 through the real server with fake engines whose batch is their KV cache, not their
max_num_seqs (FAKE_BATCH=4: four generate at once, the rest wait inside the engine, shown by
vllm:num_requests_waiting): a lane's backlog stays in the launcher, closing a lane drains only
what its engine holds, and unanswered work goes back in line instead of failing.

The lane alpha is given MAX_NUM_SEQS 64: a launcher that took its dispatch limit from that alone
would put 64 requests in an engine that generates 4, and show it in /lanes; ours reads the
engine's gauges and keeps the rest in its own queue (dispatch_window <= 8 while alpha's queue
holds the backlog).

Beta's bound (scheduler.py, "The wait bound"): beta's one request waits at most
B + K (D + 2 D + T_down + T_up) with K = 1 (its own lane's start): alpha, loaded with a backlog
here, has a turn of D before B closes it, then drains; here B = 3 s, D = 5 s, T_down and T_up
alpha's stop and beta's start as /lanes measured them.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from measurements import record
from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, sse_events, value

pytestmark = pytest.mark.engine

B, D = 3.0, 5.0
ALPHA = {"ENV_FAKE_BATCH": "4", "ENV_FAKE_TOKEN_DELAY": "0.125", "MAX_NUM_SEQS": "64"}   # 4 tokens: 0.5 s


def backlog_env(fake_python, **server):
    return fake_lanes_env(fake_python, {"alpha": ALPHA, "beta": {"ENV_FAKE_TOKEN_DELAY": "0.125"}},
                          VLLM_SWITCH_MAX_WAIT=str(B), VLLM_DRAIN_TIMEOUT=str(D), **server)


class LaneWatch:
    """/lanes read every 0.1 s from a thread while the scenario runs."""

    def __init__(self, served):
        self.served, self.seen, self.stop = served, [], threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        with self.served.client(timeout=5) as client:
            while not self.stop.is_set():
                try:
                    self.seen.append(client.get("/lanes").json()["lanes"])
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


async def two_hundred_and_one(url: str, stream: bool) -> tuple[list, tuple, float]:
    """200 requests for alpha at once, one for beta a second later: (alpha results, beta result,
    beta's seconds). A result: (status, text)."""
    limits = httpx.Limits(max_connections=300)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def one(lane: str):
            if stream:
                async with http.stream("POST", CHAT, json=chat_body(lane, True)) as response:
                    return response.status_code, (await response.aread()).decode()
            response = await http.post(CHAT, json=chat_body(lane))
            return response.status_code, response.text

        async def beta():
            await asyncio.sleep(1.0)
            began = time.monotonic()
            result = await one("beta")
            return result, time.monotonic() - began

        *alpha, (beta_result, beta_seconds) = await asyncio.gather(*(one("alpha") for _ in range(200)), beta())
        return alpha, beta_result, beta_seconds


def beta_bound(lanes: dict) -> float:
    """B, then alpha's turn (D: it has a backlog here), its drain (at most 2 D), its stop, beta's start."""
    return B + 1 * (D + 2 * D + lanes["alpha"]["last_stop_seconds"] + lanes["beta"]["last_start_seconds"]) + 1.0


def check_backlog_held(watch: LaneWatch) -> None:
    """While alpha was loaded with most of its backlog still in the launcher's queue, its engine
    held at most twice its real batch (the gauges), not the 64 of its max_num_seqs (the first
    64 sent before the gauges said so drain away; the window stays down)."""
    loaded = [seen["alpha"] for seen in watch.seen if seen["alpha"]["state"] == "ready"]
    backlog = [lane for lane in loaded if lane["queue_depth"] >= 100]
    assert backlog, f"alpha's backlog never seen in the launcher's queue: {loaded[:5]}"
    assert all(lane["inflight"] <= 64 and lane["max_inflight"] == 64 for lane in loaded)
    assert any(lane["dispatch_window"] <= 8 for lane in backlog), f"the window never came down: {backlog[:5]}"
    held = [lane for lane in backlog if lane["inflight"] <= 8]
    assert held, f"the engine never held only its batch while the backlog waited here: {backlog[:5]}"


def test_200_plus_1_all_answered_beta_within_its_bound(tmp_path, fake_python):
    with serving(tmp_path, backlog_env(fake_python), wait_ready_lane="alpha") as served:
        with LaneWatch(served) as watch:
            alpha, (beta_status, beta_text), beta_seconds = asyncio.run(two_hundred_and_one(served.url, False))
        assert [status for status, _ in alpha] == [200] * 200, [r for r in alpha if r[0] != 200][:3]
        assert all('"model":"alpha"' in text.replace(" ", "") for _, text in alpha)
        assert beta_status == 200 and '"model":"beta"' in beta_text.replace(" ", "")
        lanes = served.lanes()
        assert beta_seconds <= beta_bound(lanes), (beta_seconds, lanes)
        check_backlog_held(watch)
        record(f"200 + 1 (B 3 s, D 5 s, batch 4 of 0.5 s): 200/200 alpha answered, beta in {beta_seconds:.1f} s "
               f"(bound {beta_bound(lanes):.1f} s), {lanes['alpha']['preempted']} back in line, alpha's queue in "
               f"the launcher up to {max(s['alpha']['queue_depth'] for s in watch.seen)}, in its engine up to "
               f"{max(s['alpha']['inflight'] for s in watch.seen)}")
        with served.client() as client:
            samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_requests_total", lane="alpha", status="200") == 200
        assert not any(name == "vllm_launcher_requests_rejected_total" and v for (name, _), v in samples.items())


def test_200_plus_1_streaming(tmp_path, fake_python):
    """Streams: each finishes, or (output already relayed) ends with an SSE error event; none
    fails otherwise."""
    with serving(tmp_path, backlog_env(fake_python), wait_ready_lane="alpha") as served:
        with LaneWatch(served) as watch:
            alpha, (beta_status, beta_text), beta_seconds = asyncio.run(two_hundred_and_one(served.url, True))
        for status, text in alpha:
            assert status == 200, text[:300]
            events = sse_events(text)
            content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
            if text.rstrip().endswith("data: [DONE]"):
                assert content == "alpha t0 t1 t2", text[:500]
            else:   # cut: only after engine output reached the client, and said so
                assert content and any("error" in e for e in events), text[:500]
        assert sum(text.rstrip().endswith("data: [DONE]") for _, text in alpha) == 200  # none needed cutting here
        assert beta_status == 200 and "beta" in beta_text
        lanes = served.lanes()
        assert beta_seconds <= beta_bound(lanes)
        check_backlog_held(watch)
        record(f"200 + 1 streaming: 200/200 streams ended in [DONE], beta in {beta_seconds:.1f} s "
               f"(bound {beta_bound(lanes):.1f} s), {lanes['alpha']['preempted']} back in line")


def test_a_request_longer_than_the_drain_bound_is_served_after_one_preemption(tmp_path, fake_python):
    """D = 2 s, B = 1 s, a 4 s alpha request: beta's request closes alpha, at D the request (no
    output sent: non-streaming) goes back in line, beta is served, alpha comes back for it; in its
    second turn another beta request closes alpha again, and the request, back in line once,
    may finish (it has until 2 D)."""
    env = fake_lanes_env(fake_python, {"alpha": {"ENV_FAKE_TOKEN_DELAY": "0.5"},
                                       "beta": {"ENV_FAKE_TOKEN_DELAY": "0.05"}},
                         VLLM_SWITCH_MAX_WAIT="1", VLLM_DRAIN_TIMEOUT="2")
    with serving(tmp_path, env, wait_ready_lane="alpha") as served:
        result: dict = {}

        def long_request():
            with served.client(timeout=120) as client:
                result["response"] = client.post(CHAT, json=chat_body("alpha", max_tokens=8))

        thread = threading.Thread(target=long_request)
        thread.start()
        served.wait_inflight("alpha", 1)
        with served.client(timeout=120) as client:
            assert client.post(CHAT, json=chat_body("beta")).status_code == 200
            served.wait_state("alpha", "ready")     # back for the request that went back in line
            served.wait_inflight("alpha", 1)
            assert client.post(CHAT, json=chat_body("beta")).status_code == 200
        thread.join(120)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "alpha" + "".join(f" t{i}" for i in range(7))
        assert served.lanes()["alpha"]["preempted"] == 1
        with served.client() as client:
            samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_requests_preempted_total", lane="alpha", reason="drain_timeout") == 1
        assert value(samples, "vllm_launcher_requests_total", lane="alpha", status="200") == 1


def test_a_request_on_a_kept_alive_connection_at_shutdown_is_answered_503(tmp_path, fake_python):
    """SIGTERM while a client holds an idle kept-alive connection: the request it sends next is
    answered 503 shutting_down with the OpenAI error body, not dropped by a close."""
    import json
    import signal
    import socket

    def request(sock: socket.socket, path: str, body: bytes = b"") -> tuple[int, bytes]:
        method = "POST" if body else "GET"
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer after {data!r}"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
        return int(head.split()[1]), rest

    env = fake_lanes_env(fake_python, {"alpha": {}})
    with serving(tmp_path, env, wait_ready_lane="alpha") as served:
        port = int(served.url.rsplit(":", 1)[1])
        held, probe = (socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2))
        with held, probe:
            body = json.dumps(chat_body("alpha")).encode()
            assert request(held, CHAT, body)[0] == 200      # the connection is kept alive, idle now
            assert request(probe, "/readyz")[0] == 200
            served.process.send_signal(signal.SIGTERM)
            while (status := request(probe, "/readyz")[0]) == 200:   # until the server says it is closing
                time.sleep(0.02)
            assert status == 503
            status, answer = request(held, CHAT, body)
            assert status == 503, answer
            assert json.loads(answer)["error"]["code"] == "shutting_down"
        assert served.process.wait(60) == 0
