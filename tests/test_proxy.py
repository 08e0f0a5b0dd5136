"""The forwarder in-process, against a router stand-in: the crash window where a dispatched
request holds the Engine it was dispatched to, whose pool closed as the engine exited."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import httpx
import pytest

from vllm_launcher.engines import Engine
from vllm_launcher.errors import APIError
from vllm_launcher.proxy import Forwarder
from vllm_launcher.router import Ticket


class CrashedLaneRouter:
    """One lane whose engine exited after dispatching the request: its pool is closed and
    the request's ticket carries the crash, as the router leaves them."""

    def __init__(self, client: httpx.AsyncClient, session: aiohttp.ClientSession, abort_later: bool = False):
        self.client = client
        self.session = session
        self.abort_later = abort_later       # the crash reaches the ticket after the request met the closed pool
        self.finished: list[int] = []

    def engine(self, lane: str) -> Engine:
        return Engine(lane, None, self.client, self.session)

    def admit(self, lane: str) -> Ticket:
        engine = self.engine(lane)
        ticket = Ticket(1, lane, 0.0, dispatched_at=0.0, engine=engine)
        ticket.decided.set_result(engine)
        crash = APIError(502, "engine for lane 'a' exited with status 9", "engine_crashed")
        if self.abort_later:
            asyncio.get_running_loop().call_later(0.1, ticket.aborted.set_result, crash)
        else:
            ticket.aborted.set_result(crash)
        return ticket

    def finish(self, ticket: Ticket, status: int) -> None:
        ticket.finished = True
        self.finished.append(status)

    def cancel(self, ticket: Ticket) -> None:
        pass


async def forward(router, stream: bool) -> tuple[int, bytes]:
    """The forwarder's ASGI answer (status, body) to a client that stays connected."""
    sent = []

    async def receive():
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    await Forwarder(router, log_requests=False).serve(receive, send, "/v1/chat/completions", "a",
                                                      b'{"model": "a"}', stream)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("abort_later", [False, True], ids=["aborted", "abort-after-send"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_request_that_picks_up_a_closed_client_ends_in_the_crash_error(stream, abort_later):
    async def run():
        client = httpx.AsyncClient(base_url="http://127.0.0.1:9")
        session = aiohttp.ClientSession("http://127.0.0.1:9")
        await client.aclose()                          # closed as its engine exited
        await session.close()
        router = CrashedLaneRouter(client, session, abort_later)
        return await forward(router, stream), router.finished

    (status, body), finished = asyncio.run(run())
    assert status == 502
    assert json.loads(body)["error"]["code"] == "engine_crashed"
    assert finished == [502]                           # the ticket is closed: inflight goes back down


class BrokenEngine(Engine):
    @property
    def session(self):
        raise RuntimeError("a bug")

    @session.setter
    def session(self, value):
        pass


class BrokenRouter(CrashedLaneRouter):
    def engine(self, lane: str) -> Engine:
        return BrokenEngine(lane, None, self.client)

    def admit(self, lane: str) -> Ticket:          # dispatched, not aborted: the bug is met on the way up
        engine = self.engine(lane)
        ticket = Ticket(1, lane, 0.0, dispatched_at=0.0, engine=engine)
        ticket.decided.set_result(engine)
        return ticket


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_bug_while_forwarding_is_an_openai_500_and_closes_the_ticket(stream):
    async def run():
        router = BrokenRouter(httpx.AsyncClient(), None)
        answer = await forward(router, stream)
        await router.client.aclose()
        return answer, router.finished

    (status, body), finished = asyncio.run(run())
    assert status == 500
    assert json.loads(body)["error"]["code"] == "internal_error"
    assert finished == [500]
