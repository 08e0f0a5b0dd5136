"""The forwarder in-process, against a router stand-in: the crash window where a dispatched
request holds the Engine it was dispatched to, whose pool closed as the engine exited."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.requests import Request

from vllm_launcher.engines import Engine
from vllm_launcher.errors import APIError
from vllm_launcher.proxy import Forwarder
from vllm_launcher.router import Ticket


class CrashedLaneRouter:
    """One lane whose engine exited after dispatching the request: its pool is closed and
    the request's ticket carries the crash, as the router leaves them."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.finished: list[int] = []

    def engine(self, lane: str) -> Engine:
        return Engine(lane, None, self.client)

    def admit(self, lane: str) -> Ticket:
        engine = self.engine(lane)
        ticket = Ticket(1, lane, 0.0, dispatched_at=0.0, engine=engine)
        ticket.decided.set_result(engine)
        ticket.aborted.set_result(APIError(502, "engine for lane 'a' exited with status 9", "engine_crashed"))
        return ticket

    def finish(self, ticket: Ticket, status: int) -> None:
        ticket.finished = True
        self.finished.append(status)

    def cancel(self, ticket: Ticket) -> None:
        pass


def client_request() -> Request:
    async def receive():            # the client stays connected
        await asyncio.Event().wait()
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_request_that_picks_up_a_closed_client_ends_in_the_crash_error(stream):
    async def run():
        client = httpx.AsyncClient(base_url="http://127.0.0.1:9")
        await client.aclose()                          # closed as its engine exited
        router = CrashedLaneRouter(client)
        response = await Forwarder(router, log_requests=False).handle(
            client_request(), "/v1/chat/completions", "a", b'{"model": "a"}', stream)
        return response, router.finished

    response, finished = asyncio.run(run())
    assert response.status_code == 502
    assert json.loads(response.body)["error"]["code"] == "engine_crashed"
    assert finished == [502]                           # the ticket is closed: inflight goes back down


class BrokenEngine(Engine):
    @property
    def client(self):
        raise RuntimeError("a bug")

    @client.setter
    def client(self, value):
        pass


class BrokenRouter(CrashedLaneRouter):
    def engine(self, lane: str) -> Engine:
        return BrokenEngine(lane, None, self.client)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_bug_while_forwarding_is_an_openai_500_and_closes_the_ticket(stream):
    async def run():
        router = BrokenRouter(httpx.AsyncClient())
        response = await Forwarder(router, log_requests=False).handle(
            client_request(), "/v1/chat/completions", "a", b'{"model": "a"}', stream)
        await router.client.aclose()
        return response, router.finished

    response, finished = asyncio.run(run())
    assert response.status_code == 500
    assert json.loads(response.body)["error"]["code"] == "internal_error"
    assert finished == [500]
