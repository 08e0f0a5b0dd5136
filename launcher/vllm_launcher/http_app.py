"""The ASGI app of the front server: one OpenAI-compatible endpoint for every lane, served by
uvicorn in serve.py: POST /v1/... in plain ASGI (the path every request takes: the body
parsed once by msgspec and forwarded as it came unless a model alias is rewritten), the rest
with FastAPI.

Routes: POST to the OpenAI routes of openai_routes.FORWARDED (routed by the body's `model`; no
other path reaches an engine; /v1/messages and /v1/messages/count_tokens speak Anthropic's
Messages API through anthropic.py), /v1/responses/{id} (answered: not stored), GET /v1/models, /livez, /health, /healthz,
/readyz, /version, /metrics, /lanes and lane control. The router owns the decisions; this
module turns HTTP into router calls and errors into OpenAI-style bodies, and reads state only
through the router's read API (lane_state(s), lane_status, serving_engines, ...).

The handlers are module-level functions of one AppState (the configuration, vLLM's facts, the
router, the metrics and what is derived from them once): the FastAPI routes read it from the
app's `state` (Starlette's application state), the plain-ASGI ones are passed it. Every route
that needs the API key checks it with check_key().
"""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.policy
import email.utils
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any, cast

import aiohttp
import httpx
import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from . import __version__, anthropic
from .config import LauncherConfig, route_table
from .errors import APIError
from .memory_plan import memory_plan
from .metrics import Metrics
from .openai_routes import ANTHROPIC_ROUTES, COUNT_TOKENS, FORWARDED, JSON, MULTIPART, forwarded_route, response_by_id
from .proxy import OPENAI, UPSTREAM_ERRORS, Dialect, Forwarder, send_error
from .router import Router
from .scheduler import LaneState
from .values import parse_bool
from .vllm_info import VllmInfo

log = logging.getLogger("vllm_launcher.http_app")
_decode = msgspec.json.decode
_encode = msgspec.json.encode


def _lane_of(state: AppState, data: dict[str, Any]) -> str:
    """The lane of a request's `model` (the caller checked the body is a JSON object)."""
    if "model" not in data:
        raise APIError(400, "the request body has no 'model'; name one of the models at GET /v1/models",
                       "missing_model", param="model")
    model = data["model"]
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, not {type(model).__name__}", "invalid_model", param="model")
    lane = state.routes.get(model.lower())
    if lane is None:
        available = ", ".join(name for config in state.config.lanes.values() for name in config.names)
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise APIError(404, f"The model '{shown}' does not exist. Available models: {available}",
                       "model_not_found", param="model")
    return lane


def _check_content_type(given: str, route: str) -> None:
    """JSON routes take only JSON (a web page cannot post it cross-site without CORS), audio
    routes only multipart form data."""
    wanted = FORWARDED.get(route, JSON)
    if given.partition(";")[0].strip().lower() != wanted:
        raise APIError(415, f"POST /v1/{route} takes Content-Type: {wanted}, not "
                            f"{given[:100] or 'a body without a content type'}", "unsupported_media_type")


def _json_body(body: bytes) -> tuple[object, bool]:
    """The body parsed once: by msgspec, or by the json module where msgspec refuses what Python's
    json (and so vLLM) accepts (lone surrogates, NaN, huge floats); (data, parsed by json)."""
    try:
        return _decode(body), False
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply", "invalid_json") from None
    except msgspec.DecodeError:
        pass
    try:
        return json.loads(body), True
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply", "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", "invalid_json") from None


def _json_bytes(data: object, by_json: bool) -> bytes:
    """DATA serialised again, by the library that parsed it."""
    try:
        return json.dumps(data).encode() if by_json else _encode(data)
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply", "invalid_json") from None


async def receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The request body from ASGI receive, at most LIMIT bytes."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared.decode()} bytes exceeds VLLM_MAX_BODY_BYTES={limit}",
                       "body_too_large")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False) and message["type"] == "http.request":
        if len(body) > limit:
            raise APIError(413, f"request body exceeds VLLM_MAX_BODY_BYTES={limit} bytes", "body_too_large")
        return body
    chunks, size = [body], len(body)
    while message["type"] == "http.request" and message.get("more_body", False):
        message = await receive()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds VLLM_MAX_BODY_BYTES={limit} bytes", "body_too_large")
        chunks.append(chunk)
    if message["type"] == "http.disconnect":
        raise _ClientGone
    return b"".join(chunks)


class _ClientGone(Exception):
    """The client left before its request body was complete."""


def _wait_parameter(request: Request) -> bool:
    raw = request.query_params.get("wait", "true")
    try:
        return parse_bool(raw)
    except ValueError as error:
        raise APIError(422, f"wait={raw[:50]!r}: {error}", "invalid_parameter", param="wait") from None


FormField = tuple[str, str | None, str, bytes]       # name, filename, content type, value


def _form_fields(body: bytes, content_type: str) -> list[FormField]:
    """A multipart/form-data body as (name, filename, content type, value) per field; 400 for
    anything else (a part without a name, a nested multipart, a header the parser refuses)."""
    if "boundary=" not in content_type:
        raise APIError(400, "multipart/form-data needs a boundary", "invalid_form")
    try:
        message = BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1", errors="replace") + b"\r\n\r\n" + body)
        if not message.is_multipart() or message.defects:
            raise APIError(400, "the request body is not valid multipart/form-data", "invalid_form")
        fields: list[FormField] = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, tuple):                     # RFC 2231: name*=utf-8''...
                name = email.utils.collapse_rfc2231_value(name)
            if part.get_content_disposition() != "form-data" or not isinstance(name, str) or not name \
                    or part.is_multipart():
                raise APIError(400, "every part of a multipart/form-data body must be a form field: "
                                    "Content-Disposition: form-data; name=\"...\"", "invalid_form")
            payload = cast(bytes | None, part.get_payload(decode=True))      # not multipart: its bytes
            fields.append((name, part.get_filename(), part.get_content_type(), payload or b""))
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as error:
        # the stdlib parser's way of refusing some malformed headers (not a server error)
        raise APIError(400, f"the request body is not valid multipart/form-data ({type(error).__name__})",
                       "invalid_form") from None
    return fields


def _form_body(fields: list[FormField], model: str) -> tuple[bytes, str]:
    """The form again, with `model` replaced: its body and content type."""
    data: dict[str, list[str]] = {"model": [model]}
    for name, filename, _, value in fields:
        if filename is None and name != "model":
            data.setdefault(name, []).append(value.decode(errors="replace"))
    files = [(name, (filename, value, kind)) for name, filename, kind, value in fields if filename is not None]
    try:
        rebuilt = httpx.Request("POST", "http://engine", data=data, files=files)
        return rebuilt.read(), rebuilt.headers["content-type"]
    except (ValueError, TypeError) as error:
        raise APIError(400, f"the form cannot be forwarded: {str(error)[:200]}", "invalid_form") from None


def check_key(headers: list[tuple[bytes, bytes]], key: bytes | None) -> None:
    """The one check of the API key, for every route that needs it: exactly one
    `Authorization: Bearer <key>` or `x-api-key: <key>` (Anthropic's clients), compared in
    constant time. Two of either, or both naming different keys, are refused, not read first or
    last: a proxy in front may read the other one."""
    if key is None:
        return
    given, api_keys = [], []                # one pass over the headers: every request takes this path
    for name, value in headers:
        if name == b"authorization":
            given.append(value)
        elif name == b"x-api-key":
            api_keys.append(value)
    for values, header in ((given, "Authorization"), (api_keys, "x-api-key")):
        if len(values) > 1:
            raise APIError(400, f"{len(values)} {header} headers: send exactly one, 'Authorization: Bearer <key>' "
                                "or 'x-api-key: <key>'", "invalid_authorization")
    scheme, _, token = (given[0] if given else b"").partition(b" ")
    token = token.strip()
    if api_keys:
        if given and (scheme.lower() != b"bearer" or not hmac.compare_digest(token, api_keys[0].strip())):
            raise APIError(400, "Authorization and x-api-key name different keys: send the key in one of them",
                           "invalid_authorization")
        scheme, token = b"bearer", api_keys[0].strip()
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token, key):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                       "invalid_api_key")


def _shown_path(raw_path: bytes) -> str:
    return raw_path[:200].decode("ascii", errors="replace")


@dataclass(frozen=True)
class AppState:
    """What every handler reads, built once per app (AppState.of)."""

    config: LauncherConfig
    vllm: VllmInfo
    router: Router
    metrics: Metrics
    forwarder: Forwarder
    routes: dict[str, str]              # a model's name, lower-cased -> its lane (config.route_table)
    served_names: dict[str, str]        # lane -> the name its engine knows
    key: bytes | None                   # VLLM_API_KEY; None: every route open
    started: int                        # when the app was made: the models' `created`
    repair_anthropic: bool              # the engine's Anthropic answers need anthropic.py's repairs
    engine_counts: bool                 # the engine answers count_tokens itself

    @classmethod
    def of(cls, config: LauncherConfig, vllm: VllmInfo, router: Router, metrics: Metrics) -> AppState:
        api_key = config.server.api_key
        return cls(
            config=config, vllm=vllm, router=router, metrics=metrics,
            forwarder=Forwarder(router, config.server.log_requests),
            routes=route_table(config),
            served_names={name: lane.served_model_name for name, lane in config.lanes.items()},
            key=api_key.encode() if api_key else None,
            started=int(time.time()),
            repair_anthropic=anthropic.repairs_needed(vllm.version),
            engine_counts=(vllm.version is not None
                           and anthropic.version_tuple(vllm.version) >= anthropic.COUNT_TOKENS_SINCE),
        )


def create_app(config: LauncherConfig, vllm: VllmInfo, router: Router, metrics: Metrics) -> LauncherApp:
    """The ASGI app: POST /v1/... in plain ASGI (openai_post), everything else FastAPI."""
    return LauncherApp(AppState.of(config, vllm, router, metrics))


class LauncherApp:
    """The ASGI app of one AppState: the /v1/ requests of openai_post, not_stored and
    not_allowed here, the rest to the FastAPI app (which holds the same state)."""

    def __init__(self, state: AppState):
        self.state = state
        self.api = _fastapi_app(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
            if response_by_id(raw_path):
                return await not_stored(self.state, scope, send)
            if scope["method"] == "POST":
                return await openai_post(self.state, scope, receive, send)
            if (route := forwarded_route(raw_path)) is not None:
                return await not_allowed(self.state, scope, send, route)
        await self.api(scope, receive, send)


# ---------------------------------------------------------------- plain ASGI: POST /v1/...

async def openai_post(state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/<route>: checked, parsed once and forwarded, in plain ASGI (no FastAPI
    dependency solving or middlewares on the path every request takes)."""
    content_type = declared = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            declared = value
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    route = forwarded_route(raw_path)
    dialect: Dialect = anthropic_dialect(state, scope["headers"]) if route in ANTHROPIC_ROUTES else OPENAI
    stream: bool | None
    try:
        check_key(scope["headers"], state.key)
        if route is None:
            raise APIError(404, f"POST {_shown_path(raw_path)}: not an OpenAI route this server forwards "
                                f"(it forwards /v1/{', /v1/'.join(FORWARDED)})", "not_found")
        given = content_type.decode("latin-1") if content_type else ""
        _check_content_type(given, route)
        if state.router.shutting_down:
            raise APIError(503, "the server is shutting down", "shutting_down")
        body = await receive_body(receive, declared, state.config.server.max_body_bytes)
        if FORWARDED.get(route) == MULTIPART:
            lane, body, given, stream = form_request(state, body, given)
        else:
            data, by_json = _json_body(body)
            if not isinstance(data, dict):
                raise APIError(400, "the request body must be a JSON object", "invalid_body")
            lane = _lane_of(state, data)
            stream = data.get("stream")
            if stream is not None and not isinstance(stream, bool):
                raise APIError(400, f"'stream' must be true or false, not a {type(stream).__name__}",
                               "invalid_stream", param="stream")
            changed = False
            if route in ANTHROPIC_ROUTES:
                anthropic.check_request(data, count_only=route == COUNT_TOKENS)
                changed = anthropic.translate_request(data, state.vllm.version)
                if route == "messages" and anthropic.streams_whole(data, state.vllm.version):
                    # stream stays true: the client's stream is made here
                    cast(anthropic.AnthropicDialect, dialect).answer_whole()        # an Anthropic route's
                    changed = True
            served = state.served_names[lane]
            if data["model"] != served or changed:
                data["model"] = served          # the engine knows only its served name
                body = _json_bytes(data, by_json)
            if route == COUNT_TOKENS:
                await count_tokens(state, send, lane, data, body, dialect)
                return
    except APIError as error:
        state.metrics.rejected.labels("", error.code).inc()      # refused before any lane was chosen
        await send_error(send, error, dialect)
        return
    except _ClientGone:
        return
    await state.forwarder.serve(receive, send, "/v1/" + route, lane, body, stream is True, given, dialect)


def anthropic_dialect(state: AppState, headers: list[tuple[bytes, bytes]]) -> anthropic.AnthropicDialect:
    passed = {name.decode(): value.decode("latin-1") for name, value in headers if name in anthropic.PASSED_HEADERS}
    return anthropic.AnthropicDialect(state.repair_anthropic, passed)


async def count_tokens(state: AppState, send: Send, lane: str, data: dict[str, Any], body: bytes,
                       dialect: Dialect) -> None:
    """POST /v1/messages/count_tokens: the lane's engine answers when it can and is loaded;
    else the count from the lane's tokenizer and template, read here (no lane is loaded or
    switched for it)."""
    if state.engine_counts:
        for engine, lane_state in state.router.serving_engines():
            if engine.lane == lane and lane_state == LaneState.READY:
                session = cast(aiohttp.ClientSession, engine.session)      # a serving engine has its pool
                with contextlib.suppress(*UPSTREAM_ERRORS):      # gone meanwhile: counted here
                    async with session.post("/v1/" + COUNT_TOKENS, data=body, headers={
                            "Content-Type": JSON, **dialect.upstream_headers}) as answer:
                        content = dialect.body(answer.status, await answer.read())
                        await send({"type": "http.response.start", "status": answer.status,
                                    "headers": [(b"content-type", b"application/json")]})
                        await send({"type": "http.response.body", "body": content})
                        return
    try:
        tokens = await asyncio.to_thread(anthropic.count_tokens, state.config.lane(lane), data, state.config.environ)
    except anthropic.TokenizerUnavailable as error:
        raise APIError(503, f"count_tokens for lane {lane!r}: {error}", "tokenizer_unavailable") from None
    counted = json.dumps({"input_tokens": tokens}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(counted))]})
    await send({"type": "http.response.body", "body": counted})


def form_request(state: AppState, body: bytes, content_type: str) -> tuple[str, bytes, str, bool]:
    """An audio request: multipart form data, its `model` one of the fields; its lane, the
    body and content type to forward, and whether it streams."""
    fields = _form_fields(body, content_type)
    models = [value.decode(errors="replace") for name, filename, _, value in fields
              if name == "model" and filename is None]
    lane = _lane_of(state, {"model": models[0]} if models else {})
    if not any(filename is not None for _, filename, _, _ in fields):
        # the audio routes take a file; and a form without one would be rebuilt url-encoded
        raise APIError(400, "the form has no file: send the audio as a part with a filename",
                       "missing_file", param="file")
    served = state.served_names[lane]
    if models[0] != served:                 # the engine knows only its served name
        body, content_type = _form_body(fields, served)
    stream = any(name == "stream" and value.strip().lower() == b"true" for name, _, _, value in fields)
    return lane, body, content_type, stream


async def not_stored(state: AppState, scope: Scope, send: Send) -> None:
    """/v1/responses/{id}...: OpenAI's stored responses, which this server does not keep."""
    try:
        check_key(scope["headers"], state.key)
        raise APIError(404, "stored responses are not kept by this server: vLLM keeps them only with "
                            "VLLM_ENABLE_RESPONSES_API_STORE=1, in one engine's memory (it warns that this leaks "
                            "memory), and a lane switch or restart would lose them; send `store: false` and keep "
                            "the conversation on the client (pass the earlier output as input)",
                       "response_not_stored")
    except APIError as error:
        state.metrics.rejected.labels("", error.code).inc()
        await send_error(send, error)


async def not_allowed(state: AppState, scope: Scope, send: Send, route: str) -> None:
    error = APIError(405, f"{scope['method']} {scope['path']}: Method Not Allowed", "method_not_allowed")
    state.metrics.rejected.labels("", error.code).inc()
    await send_error(send, error, anthropic_dialect(state, []) if route in ANTHROPIC_ROUTES else OPENAI)


# ---------------------------------------------------------------- FastAPI: the other routes

@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = _state(app)
    await state.router.start(preload=state.config.default_lane)
    yield
    await state.router.close()


def _fastapi_app(state: AppState) -> FastAPI:
    # redirect_slashes off: Starlette's redirect of /lanes/a/ to /lanes/a is built from the client's
    # Host and answered before the key check; a trailing slash is an unknown path (404) instead
    app = FastAPI(title="vllm-launcher", version=__version__, lifespan=_lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, redirect_slashes=False,
                  exception_handlers={APIError: api_error, StarletteHTTPException: http_error})
    app.state.launcher = state
    app.include_router(routes)
    return app


def _state(app: FastAPI) -> AppState:
    state: AppState = app.state.launcher
    return state


def _authorized(request: Request) -> AppState:
    """The app's state, once the request's key is checked."""
    state = _state(request.app)
    check_key(request.scope["headers"], state.key)
    return state


async def api_error(request: Request, error: APIError) -> Response:
    _state(request.app).metrics.rejected.labels("", error.code).inc()      # refused before any lane was chosen
    return error.response()


async def http_error(request: Request, error: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return await api_error(request, APIError(error.status_code, f"{request.method} {request.url.path}: "
                                                                f"{error.detail}", code))


# response_model=None on every route: the answers are dicts or responses, serialised as they are
routes = APIRouter()


@routes.get("/v1/models", response_model=None)
async def list_models(request: Request) -> dict[str, Any]:
    state = _authorized(request)
    states = state.router.lane_states()
    data = []
    for lane in state.config.lanes.values():
        for name in lane.names:
            data.append({"id": name, "object": "model", "created": state.started,
                         "owned_by": "vllm-launcher", "root": lane.model, "lane": lane.name,
                         "state": states[lane.name]})
    return {"object": "list", "data": data}


# ---------------------------------------------------------------- health and info

@routes.get("/livez", response_model=None)
async def livez() -> dict[str, Any]:
    return {"status": "alive"}


def health_body(router: Router) -> tuple[int, dict[str, Any]]:
    states = router.lane_states()
    # requests waiting in the launcher per lane (a lane's backlog beyond its dispatch limit too)
    queued = {lane: depth for lane in states if (depth := router.scheduler.queue_depth(lane))}
    if router.shutting_down:
        status = "shutting_down"
    elif LaneState.READY.value in states.values():
        return 200, {"status": "ok", "lanes": states, **({"queued": queued} if queued else {})}
    elif any(s in (LaneState.STARTING, LaneState.DRAINING, LaneState.STOPPING) for s in states.values()):
        status = "switching" if router.ever_started() else "starting"
    elif LaneState.FAILED.value in states.values():
        status = "failed"
    elif LaneState.SLEEPING.value in states.values():
        status = "sleeping"             # not idle: an engine is kept, asleep, to wake for its lane
    else:
        status = "idle"
    body: dict[str, Any] = {"status": status, "lanes": states, **({"queued": queued} if queued else {})}
    progress = {lane: text for lane in states if (text := router.lane_progress(lane))}
    if progress:
        body["progress"] = progress      # e.g. {"big": "waiting for cluster (1/2 nodes)"}
    return 503, body


@routes.get("/health", response_model=None)
@routes.get("/healthz", response_model=None)
async def health(request: Request) -> Response:
    code, body = health_body(_state(request.app).router)
    return JSONResponse(body, status_code=code)


@routes.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response | dict[str, Any]:
    router = _state(request.app).router
    if router.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return {"status": "accepting", "lanes": router.lane_states()}


@routes.get("/version", response_model=None)
async def version(request: Request) -> dict[str, Any]:
    state = _state(request.app)
    return {"version": __version__, "build_sha": state.config.server.build_sha,
            "build_time": state.config.server.build_time, "vllm_version": await engine_version(state),
            "vllm_distribution": state.vllm.distribution}


async def engine_version(state: AppState) -> str | None:
    for engine, lane_state in state.router.serving_engines():
        if lane_state == LaneState.READY:
            try:
                found: str | None = (await engine.get("/version")).json().get("version")
                return found
            except (httpx.HTTPError, RuntimeError, ValueError, AttributeError):
                pass            # RuntimeError: its pool closed as it exited
    return state.vllm.version


@routes.get("/metrics", response_model=None)
async def metrics_endpoint(request: Request) -> Response:
    state = _state(request.app)
    if state.config.server.metrics_require_key:
        check_key(request.scope["headers"], state.key)
    engine_metrics = {}
    for engine, _ in state.router.serving_engines():
        with contextlib.suppress(httpx.HTTPError, RuntimeError):      # RuntimeError: its pool closed
            response = await engine.get("/metrics")
            if response.status_code == 200:
                engine_metrics[engine.lane] = response.text
    return Response(state.metrics.render(engine_metrics), media_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------- lanes

def lane_view(state: AppState, name: str) -> dict[str, Any]:
    config = state.config
    lane = config.lane(name)
    return {
        **state.router.lane_status(name), "names": list(lane.names), "model": lane.model,
        "served_model_name": lane.served_model_name,
        "gpu_memory_utilization": lane.gpu_memory_utilization, "idle_timeout": lane.idle_timeout,
        "memory_plan": memory_plan(lane, config.server.gpu_memory_gb),
    }


def lane_name(config: LauncherConfig, raw: str) -> str:
    by_lower = {name.lower(): name for name in config.lanes}
    if raw.lower() not in by_lower:
        raise APIError(404, f"no lane {raw[:100]!r}; lanes: {', '.join(config.lanes)}", "lane_not_found")
    return by_lower[raw.lower()]


@routes.get("/lanes", response_model=None)
async def lanes(request: Request) -> dict[str, Any]:
    state = _authorized(request)
    return {"default_lane": state.config.default_lane,
            "lanes": {name: lane_view(state, name) for name in state.config.lanes}}


@routes.get("/lanes/{lane}", response_model=None)
async def one_lane(lane: str, request: Request) -> dict[str, Any]:
    state = _authorized(request)
    return lane_view(state, lane_name(state.config, lane))


def _lane_control(request: Request, lane: str) -> tuple[Router, str, bool]:
    """POST /lanes/{lane}/...: the router, the lane and ?wait=, checked in that order after the key."""
    state = _authorized(request)
    wait = _wait_parameter(request)
    return state.router, lane_name(state.config, lane), wait


def _accepted(router: Router, name: str) -> Response:
    """202: a lane control under way (?wait=false)."""
    return JSONResponse({"lane": name, "state": router.lane_state(name).value}, status_code=202)


@routes.post("/lanes/{lane}/load", response_model=None)
async def load(lane: str, request: Request) -> Response | dict[str, Any]:
    router, name, wait = _lane_control(request, lane)
    if router.shutting_down:
        raise APIError(503, "the server is shutting down", "shutting_down")
    router.load(name)
    if not wait:
        return _accepted(router, name)
    lane_state = await router.wait_lane(name, {LaneState.READY, LaneState.FAILED})
    if lane_state == LaneState.FAILED:
        raise APIError(503, f"lane {name!r} failed to start: {router.last_error(name)}",
                       "lane_failed")
    if lane_state != LaneState.READY:
        raise APIError(503, f"the server is shutting down; lane {name!r} was {lane_state.value}", "shutting_down")
    return {"lane": name, "state": lane_state.value}


@routes.post("/lanes/{lane}/unload", response_model=None)
async def unload(lane: str, request: Request) -> Response | dict[str, Any]:
    router, name, wait = _lane_control(request, lane)
    router.unload(name)
    if not wait:
        return _accepted(router, name)
    lane_state = await router.wait_lane(name, {LaneState.STOPPED, LaneState.FAILED})
    return {"lane": name, "state": lane_state.value}
