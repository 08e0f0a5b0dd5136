"""limits.py's connection limits subclass uvicorn's HTTP protocols, whose internals uvicorn does
not promise (the list and the reasons: limits._Limited's docstring). These tests fail when one of
those internals changes, before a server test fails in a subtler way: each protocol, uvicorn's
own with a recorder of the calls mixed in as _Limited is, is driven through a request on a
transport in memory, and the names _Limited overrides and reads are checked at the moments it
uses them; and uvicorn must be a version they were read against (limits.UVICORN_CHECKED)."""

from __future__ import annotations

import asyncio
import inspect

import h11
import pytest
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from vllm_launcher import limits

# what _Limited overrides (and calls through super()): each method's parameters after self
OVERRIDDEN = {"connection_made": ["transport"], "connection_lost": ["exc"], "data_received": ["data"],
              "on_response_complete": [], "send_400_response": ["msg"], "timeout_keep_alive_handler": [],
              "shutdown": []}
PROTOCOLS = [pytest.param(HttpToolsProtocol, id="httptools"), pytest.param(H11Protocol, id="h11")]


def test_uvicorn_is_a_version_the_internals_were_read_against():
    assert uvicorn.__version__ in limits.UVICORN_CHECKED, (
        f"uvicorn {uvicorn.__version__}: read the internals limits._Limited relies on (its docstring) in this "
        f"version's protocols/http/ and server.py, then add it to limits.UVICORN_CHECKED {limits.UVICORN_CHECKED}")


def test_auto_picks_httptools_which_the_limits_are_typed_against():
    assert AutoHTTPProtocol is HttpToolsProtocol
    assert limits.protocol_class(_connections()).__bases__[1] is HttpToolsProtocol


@pytest.mark.parametrize("base", PROTOCOLS)
def test_the_overridden_methods_keep_their_signatures(base):
    methods = {**OVERRIDDEN, **({"on_headers_complete": []} if base is HttpToolsProtocol else {})}
    for name, parameters in methods.items():
        method = getattr(base, name, None)
        assert callable(method), f"{base.__name__}.{name} is gone"
        assert list(inspect.signature(method).parameters)[1:] == parameters, \
            f"{base.__name__}.{name}{inspect.signature(method)}: limits._Limited overrides it with {parameters}"


class MemoryTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data):
        self.written += data

    def close(self):
        self.closing = True

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


class Recorder:
    """Mixed in before uvicorn's protocol as _Limited is: uvicorn must call these by name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.idle = asyncio.Event()

    def on_headers_complete(self):
        self.calls.append("on_headers_complete")
        super().on_headers_complete()

    def on_response_complete(self):
        self.calls.append("on_response_complete")
        super().on_response_complete()

    def send_400_response(self, msg):
        self.calls.append("send_400_response")
        super().send_400_response(msg)

    def timeout_keep_alive_handler(self):
        self.calls.append("timeout_keep_alive_handler")
        self.idle.set()
        super().timeout_keep_alive_handler()

    def shutdown(self):
        self.calls.append("shutdown")
        super().shutdown()


async def _echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _connections():
    limits_ = limits.Limits(max_connections=8, keepalive_timeout=1.0, header_timeout=1.0, body_timeout=1.0)
    return limits.Connections(limits_, limits.CollectorRegistry())


def _protocol(base, state):
    config = uvicorn.Config(_echo, lifespan="off", log_config=None, proxy_headers=False, timeout_keep_alive=0.01)
    recorded = type(f"Recorded{base.__name__}", (Recorder, base), {})
    return recorded(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())


@pytest.mark.parametrize("base", PROTOCOLS)
def test_a_request_passes_through_the_internals_the_limits_read(base):
    async def drive():
        state = ServerState()
        protocol = _protocol(base, state)
        transport = MemoryTransport()
        protocol.connection_made(transport)
        assert protocol in state.connections        # what Server.shutdown walks
        assert protocol.transport is transport and protocol.loop is asyncio.get_running_loop()
        assert protocol.cycle is None               # no head yet

        protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
        cycle = protocol.cycle                      # a new cycle: the head is complete
        assert cycle is not None and cycle.more_body is True and cycle.response_complete is False
        if base is HttpToolsProtocol:               # on_headers_complete measures the head with these
            assert protocol.calls == ["on_headers_complete"]
            assert protocol.parser.get_method() == b"POST" and protocol.url == b"/x"
            assert (b"content-length", b"4") in protocol.headers
        else:                                       # _body_pending asks h11
            assert isinstance(protocol.conn, h11.Connection) and protocol.conn.their_state is h11.SEND_BODY

        protocol.data_received(b"cd")
        assert cycle.more_body is False
        if base is H11Protocol:
            assert protocol.conn.their_state is h11.DONE
        await asyncio.wait_for(protocol.idle.wait(), 10)     # the answer, then uvicorn's keep-alive timer
        assert transport.written.startswith(b"HTTP/1.1 200 ") and transport.written.endswith(b"\r\n\r\nabcd")
        assert cycle.response_complete is True
        assert protocol.calls[-2:] == ["on_response_complete", "timeout_keep_alive_handler"]
        assert transport.is_closing()

        protocol.connection_lost(None)
        assert protocol not in state.connections

    asyncio.run(drive())


@pytest.mark.parametrize("base", PROTOCOLS)
def test_a_malformed_request_reaches_send_400_response(base):
    async def drive():
        protocol = _protocol(base, ServerState())
        transport = MemoryTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"NOT HTTP\r\n\r\n")
        assert protocol.calls == ["send_400_response"]
        assert transport.written.startswith(b"HTTP/1.1 400 ") and transport.is_closing()

    asyncio.run(drive())


@pytest.mark.parametrize("base", PROTOCOLS)
def test_server_shutdown_calls_each_connections_shutdown(base):
    async def drive():
        server = uvicorn.Server(uvicorn.Config(_echo, lifespan="off", log_config=None))
        protocol = _protocol(base, server.server_state)
        protocol.connection_made(MemoryTransport())
        server.servers = []                     # never started: nothing listens
        server.force_exit = True                # no waiting for connections, no lifespan
        await server.shutdown()
        assert protocol.calls == ["shutdown"]

    asyncio.run(drive())


def test_the_server_fields_serve_py_sets_at_a_signal_exist():
    """serve._Server overrides uvicorn.Server.handle_exit(sig, frame) to begin our shutdown and
    sets should_exit / force_exit as uvicorn's own handler does; serve.py waits on `started`."""
    assert list(inspect.signature(uvicorn.Server.handle_exit).parameters) == ["self", "sig", "frame"]
    server = uvicorn.Server(uvicorn.Config(app=None))
    assert (server.should_exit, server.force_exit, server.started) == (False, False, False)
    server.handle_exit(2, None)                    # uvicorn's own: the fields serve.py sets
    assert server.should_exit
    server.handle_exit(2, None)
    assert server.force_exit
