"""Connection limits and timeouts of the front server, over raw sockets and HTTP: idle, slow
and unfinished clients are cut by the timeouts with an OpenAI-style 408 (or 431, or a plain
close when nothing was asked); beyond VLLM_MAX_CONNECTIONS the longest-idle connection makes
room, or the newcomer gets 503 at once when every connection is busy; a thousand idle
connections do not keep a lane from starting; slow bodies do not hold up shutdown."""

from __future__ import annotations

import json
import resource
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from measurements import record
from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, start_server, value
from vllm_launcher.limits import connection_cap
from waiting import eventually

pytestmark = pytest.mark.engine

BODY = json.dumps(chat_body("a")).encode()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_until_eof(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    began = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - began


def answer(data: bytes) -> tuple[int, dict | None, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), (json.loads(body)["error"] if body else None), headers


def head(length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {CHAT} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def closed_by(served, reason: str) -> float:
    with served.client() as client:
        return value(metric_samples(client.get("/metrics").text), "vllm_launcher_connections_closed_total",
                     reason=reason)


def open_connections(served) -> float:
    with served.client() as client:
        return value(metric_samples(client.get("/metrics").text), "vllm_launcher_connections")


TIMEOUT = 1.0          # each of the three timeouts in the test below
LATE = 6.0             # a close later than this is a missing timeout, not a slow machine


def test_idle_slow_and_unfinished_clients_are_cut_by_the_timeouts(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_KEEPALIVE_TIMEOUT=str(TIMEOUT),
                         VLLM_HEADER_TIMEOUT=str(TIMEOUT), VLLM_BODY_TIMEOUT=str(TIMEOUT))
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        silent = connect(served.url)                                  # never sends anything
        partial_head = connect(served.url)
        partial_head.sendall(head(len(BODY))[:30])
        slow_body = connect(served.url)
        slow_body.sendall(head(len(BODY)) + BODY[:10])
        chunked = connect(served.url)                                 # a chunk, then never the last one
        chunked.sendall(head(chunked=True) + b"5\r\n" + BODY[:5] + b"\r\n")
        after_answer = connect(served.url)                            # one request, then idle
        after_answer.sendall(head(len(BODY)) + BODY)

        data, took = read_until_eof(silent, LATE)
        assert data == b"" and took < LATE                            # closed without a word
        for sock in (partial_head, slow_body, chunked):
            data, took = read_until_eof(sock, LATE)
            status, error, headers = answer(data)
            assert status == 408 and error["code"] == "request_timeout" and headers["connection"] == "close", data
            assert set(error) == {"message", "type", "param", "code"}
        data, took = read_until_eof(after_answer, LATE)
        assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1 and took < LATE

        slowloris = connect(served.url)                   # a byte at a time: bytes do not extend the bound
        began = time.monotonic()
        slowloris.settimeout(0.2)
        request, received = head(len(BODY)) * 100, b""
        for byte in request:
            try:
                slowloris.sendall(bytes([byte]))
                received = slowloris.recv(65536)
                break
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            assert time.monotonic() - began < LATE, "the head's bound did not end a slow head"
        received += read_until_eof(slowloris, LATE)[0]
        assert answer(received)[0] == 408

        huge = connect(served.url)                                    # a head not ended within 64 KiB
        huge.sendall(head(len(BODY))[:-2] + b"X-Filler: " + b"x" * 100_000)
        status, error, _ = answer(read_until_eof(huge, LATE)[0])
        assert status == 431 and error["code"] == "headers_too_large"

        for garbage in (b"GARBAGE\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: nine\r\n\r\n"):               # not HTTP; a bad header value
            malformed = connect(served.url)
            malformed.sendall(garbage)
            status, error, headers = answer(read_until_eof(malformed, LATE)[0])
            assert status == 400 and error["code"] == "invalid_request" and headers["connection"] == "close"
            assert set(error) == {"message", "type", "param", "code"}

        for reason, at_least in (("idle", 2), ("header_timeout", 2), ("body_timeout", 2), ("header_too_large", 1)):
            assert closed_by(served, reason) >= at_least, reason
        with served.client() as client:                               # and it still serves
            assert client.post(CHAT, json=chat_body("a")).status_code == 200


class StreamHeld:
    """A streaming request read from a thread; `started` is set at its first bytes."""

    def __init__(self, url: str):
        self.started = threading.Event()
        self.text = ""
        self.thread = threading.Thread(target=self._run, args=(url,))
        self.thread.start()

    def _run(self, url: str) -> None:
        with httpx.stream("POST", url + CHAT, json=chat_body("a", True, 60), timeout=60) as response:
            for chunk in response.iter_text():
                self.text += chunk
                self.started.set()


def sized_head(size: int) -> bytes:
    """A complete request head (for BODY, then close) of exactly `size` bytes, padded by a filler header."""
    plain = head(len(BODY))[:-2] + b"Connection: close\r\n\r\n"
    filler = b"X-Filler: "
    padding = size - len(plain) - len(filler) - 2
    return plain[:-2] + filler + b"x" * padding + b"\r\n\r\n"


def test_a_head_over_64_kib_gets_431_however_it_arrives(tmp_path, fake_python):
    """In one read (one send: parsed and dispatched at once), in many small reads, or pipelined
    behind a request in the same read; a head just under the limit is served."""
    with serving(tmp_path, fake_lanes_env(fake_python, {"a": {}}), wait_ready_lane="a") as served:
        def send(pieces: list[bytes]) -> list[int]:
            sock = connect(served.url)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for piece in pieces:
                    sock.sendall(piece)
                    # pieces 10 ms apart arrive in reads of their own; once the server answers,
                    # nothing more is sent (data after its close would reset the connection)
                    if len(pieces) > 1 and select.select([sock], [], [], 0.01)[0]:
                        break
                data = read_until_eof(sock, LATE)[0]
            finally:
                sock.close()
            return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]

        limit = 64 * 1024
        for size in (limit + 1, 70_000, 100_000):
            request = sized_head(size) + BODY
            assert len(sized_head(size)) == size
            assert send([request]) == [431], size                                         # one read
            assert send([request[i:i + 4096] for i in range(0, len(request), 4096)]) == [431], size   # many
            small = head(len(BODY))[:-2] + b"Connection: keep-alive\r\n\r\n" + BODY
            answers = send([small + request])                                             # pipelined
            assert answers in ([200, 431], [431]), (size, answers)    # the first one's answer may be cut short
        assert send([sized_head(limit) + BODY]) == [200]                                 # within the limit
        assert closed_by(served, "header_too_large") == 9


def test_beyond_the_connection_limit_the_idle_make_room_and_the_busy_get_503(tmp_path, fake_python):
    limit = 4
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.05"}}, VLLM_MAX_CONNECTIONS=str(limit))
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        idle = [connect(served.url) for _ in range(limit)]
        with served.client() as client:                   # evicts the oldest idle connection
            assert client.post(CHAT, json=chat_body("a")).status_code == 200
        assert read_until_eof(idle[0], 10)[0] == b""
        for sock in idle:
            sock.close()

        streams = [StreamHeld(served.url) for _ in range(limit)]     # every connection busy
        for stream in streams:
            assert stream.started.wait(30), "the stream did not start"
        began = time.monotonic()
        refused = httpx.post(served.url + CHAT, json=chat_body("a"), timeout=30)
        took = time.monotonic() - began
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
        assert refused.headers["retry-after"] == "1" and took < 2.0, took
        for stream in streams:
            stream.thread.join(60)
            assert stream.text.rstrip().endswith("[DONE]")
        assert closed_by(served, "over_limit") >= 1 and closed_by(served, "evicted") >= 1


HOLDER = textwrap.dedent("""
    import selectors, socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks = [socket.create_connection((host, port), timeout=30) for _ in range(count)]
    print("connected", len(socks), flush=True)
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    began, open_ = time.monotonic(), len(socks)
    sys.stdin.readline()                      # the test says when the lane has served
    print("waiting", open_, flush=True)
    while open_ and time.monotonic() - began < 120:
        for key, _ in selector.select(1):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                open_ -= 1
    print("closed", count - open_, "open", open_, "after", round(time.monotonic() - began, 1), flush=True)
""")


def raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the open-file hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.parametrize("server_open_files", [None, 1024], ids=["raised", "systemd_default"])
def test_a_thousand_idle_connections_while_a_lane_starts(tmp_path, fake_python, server_open_files):
    """The client holding the connections (and, "raised", the server) inherit a raised open-file
    limit; the connections are held while lane b's engine starts; b serves; the idle timeout
    closes them. "systemd_default": the server runs under 1024 open files (soft and hard, as
    systemd's default), so it holds what its cap allows and closes the longest idle for newcomers."""
    count, keepalive = 1000, 12.0
    raise_open_file_limit(4096)
    env = fake_lanes_env(fake_python, {"a": {}, "b": {"ENV_FAKE_START_DELAY": "1"}},
                         VLLM_KEEPALIVE_TIMEOUT=str(keepalive))
    python = sys.executable
    if server_open_files:
        python = tmp_path / "python-limited"
        python.write_text(f"#!/bin/sh\nulimit -n {server_open_files}\nexec {sys.executable} \"$@\"\n")
        python.chmod(0o755)
    open_files = server_open_files or resource.getrlimit(resource.RLIMIT_NOFILE)[1]   # the server raises to hard
    held = min(count, connection_cap(2048, open_files))
    with serving(tmp_path, env, wait_ready_lane="a", python=str(python)) as served:
        host, port = served.url.removeprefix("http://").split(":")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, host, port, str(count)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().split() == ["connected", str(count)]
            began = time.monotonic()
            with served.client() as client:
                response = client.post(CHAT, json=chat_body("b"))        # starts lane b's engine
                assert response.status_code == 200 and response.json()["model"] == "b"
                samples = metric_samples(client.get("/metrics").text)
            switched = time.monotonic() - began
            assert value(samples, "vllm_launcher_connections") >= min(count + 1, held), "held through the start"
            assert value(samples, "vllm_launcher_connections_limit") == connection_cap(2048, open_files)
            assert switched < keepalive, f"lane b took {switched:.1f} s: the test's window is too short"
            assert served.lanes()["b"]["state"] == "ready"
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline().split()[0] == "waiting"
            report = holder.stdout.readline().split()
            assert report[:4] == ["closed", str(count), "open", "0"], report
            eventually(lambda: closed_by(served, "idle") + closed_by(served, "evicted") >= count,
                       lambda: f"the server closed {count} idle connections (closed "
                               f"{closed_by(served, 'idle') + closed_by(served, 'evicted')})", 10, 0.1)
            line = (f"{count} idle connections, server open-file limit {open_files} (cap {connection_cap(2048, open_files)}), while lane b "
                    f"started and served ({switched:.1f} s); all closed {report[-1]} s later: "
                    f"{closed_by(served, 'evicted'):.0f} to make room, {closed_by(served, 'idle'):.0f} idle")
            print(line)
            record(line)
        finally:
            holder.kill()
            holder.wait()


def test_slow_bodies_do_not_hold_up_shutdown(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_BODY_TIMEOUT="300", VLLM_DRAIN_TIMEOUT="30")
    served = start_server(tmp_path, env, wait_ready_lane="a")
    slow = []
    for _ in range(20):
        sock = connect(served.url)
        sock.sendall(head(len(BODY)) + BODY[:10])
        slow.append(sock)
    eventually(lambda: open_connections(served) >= 21, lambda: f"21 open connections ({open_connections(served)})", 10)
    began = time.monotonic()
    code = served.terminate(timeout=60)
    took = time.monotonic() - began
    assert code == 0 and took < 10, (code, took)
    for sock in slow:
        data, _ = read_until_eof(sock, 5)
        status, error, _ = answer(data)
        assert status == 503 and error["code"] == "shutting_down", data
    assert not served.leftovers()
