"""A small stand-in for a vLLM OpenAI server, for fast deterministic tests of the front server.

Started exactly like vLLM (`<python> -m vllm.entrypoints.openai.api_server --model M
--served-model-name N --uds PATH ...`, or `--host H --port P`, through tests/fake_python), it
listens on the Unix socket (uvicorn's `uds`, like vLLM's `--uds`) or TCP, and speaks /health,
/v1/models, /v1/chat/completions, /v1/completions (streaming too), /v1/embeddings, /version
and /metrics, honours VLLM_API_KEY, and misbehaves on request through its environment
(set per lane with VLLM_LANE_<LANE>_ENV_FAKE_*):

FAKE_START_DELAY=s      sleep before listening            FAKE_EXIT_ON_START=code  exit at once
FAKE_FAIL_STARTS=n:file fail the first n starts (counted in file)
FAKE_FAIL_STARTS_AFTER=n:file  succeed n starts, fail every later one
FAKE_HANG_ON_TERM=1     ignore SIGTERM                    FAKE_CHILD=1  fork a child like EngineCore
FAKE_TOKEN_DELAY=s      delay per generated token         FAKE_DIE_AFTER_TOKENS=n  exit mid-stream
FAKE_CRASH_AFTER=s      exit this long after becoming ready
FAKE_CRASH_EVERY=lo-hi  exit (status 9) when the Nth generation request arrives, N drawn from lo..hi
                        at each start (every request in flight dies with it)
FAKE_STALL_AFTER=n      a hung engine: from the nth generation request on, no token comes for any
                        request (new ones too), while /health and /metrics keep answering
FAKE_BATCH=n            a finite batch like vLLM's scheduler (its KV cache, whatever --max-num-seqs says):
                        n requests generate at once, the rest wait in the engine; /metrics shows
                        vllm:num_requests_running and vllm:num_requests_waiting as vLLM does
FAKE_PATH_LOG=file      append every request's method and raw path (as received, ?query too) to file
FAKE_PRINT=text         print this line at start (before any FAKE_*START* failure)

Sleep mode, as vLLM 0.12 serves it (tests/test_sleep_mode.py compares the routes with vLLM's
own router): with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1, POST /sleep?level=N (default
1; 200, empty body), POST /wake_up[?tags=..] (200, empty body), GET /is_sleeping
({"is_sleeping": bool}); without both, those paths are 404.
FAKE_SLEEP_FAIL=1       /sleep answers 500 like an engine that raised (and stays awake)
FAKE_WAKE_FAIL=1        /wake_up answers 500 (and the engine stays asleep)
FAKE_REFUSE_SLEEP_MODE=1  exit 1 at start with vLLM's error when --enable-sleep-mode is given
FAKE_WAKE_DELAY=s       /wake_up takes this long

/v1/responses, /v1/rerank and /v1/score answer with a small JSON echo; /v1/audio/transcriptions
and /v1/audio/translations take multipart form data and answer with the form's model.

The launcher's warm-ups (X-Request-Id launcher-warmup-...) are answered like any request of
their route, but without FAKE_TOKEN_DELAY, FAKE_DIE_AFTER_TOKENS or a count in /metrics, and
go to FAKE_WARMUP_LOG instead of FAKE_PATH_LOG:
FAKE_WARMUP_LOG=file    append "warmup POST <path>[ stream]" per warm-up (may be FAKE_PATH_LOG's file)
FAKE_WARMUP=refuse|hang|die  answer warm-ups 400 / never / by exiting (status 9)
FAKE_WARMUP_DELAY=s     each warm-up takes this long
FAKE_TASK=base|pooling|pooling-0.12  a model without a chat template (chat: vLLM's 400) or a pooling
                        model (generation refused 400; pooling-0.12: 200 with the error body, as vLLM 0.12
                        does); unset: a chat model
FAKE_FIRST_DELAY=s      the first generation the engine serves (warm-up or not) takes this much
                        longer, as kernels compiled on first use make it on a real engine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

VERSION = "0.0.0-fake"


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", dest="module")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--uds")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    return args


def env_float(name: str, default: float = 0.0) -> float:
    return float(os.environ.get(name) or default)


def maybe_fail_start() -> None:
    code = os.environ.get("FAKE_EXIT_ON_START")
    if code:
        print(f"fake engine: failing on start with status {code} (FAKE_EXIT_ON_START)", flush=True)
        sys.exit(int(code))
    for variable, fails in (("FAKE_FAIL_STARTS", lambda done, n: done < n),
                            ("FAKE_FAIL_STARTS_AFTER", lambda done, n: done >= n)):
        spec = os.environ.get(variable)
        if not spec:
            continue
        count, path = spec.split(":", 1)
        done = int(open(path).read() or 0) if os.path.exists(path) else 0
        with open(path, "w") as counter:
            counter.write(str(done + 1))
        if fails(done, int(count)):
            print(f"fake engine: start {done + 1} fails ({variable}={count})", flush=True)
            sys.exit(3)


def sleep_routes(state: dict) -> list[Route]:
    """vLLM 0.12's dev-mode sleep endpoints (vllm/entrypoints/openai/api_server.py): /sleep reads
    `level` from the query (default "1") and answers 200 with no body; /wake_up takes optional
    repeated `tags` (none: every tag) and answers 200 with no body; /is_sleeping answers JSON. An
    exception in the engine is FastAPI's plain 500 "Internal Server Error"."""
    def internal_error():
        return PlainTextResponse("Internal Server Error", status_code=500)

    async def sleep(request: Request):
        level = request.query_params.get("level", "1")
        try:
            level = int(level)
        except ValueError:
            return internal_error()
        if os.environ.get("FAKE_SLEEP_FAIL"):
            print("fake engine: sleep fails (FAKE_SLEEP_FAIL)", flush=True)
            return internal_error()
        state["sleeping"] = level
        print(f"fake engine: asleep at level {level}", flush=True)
        return Response(status_code=200)

    async def wake_up(request: Request):
        tags = request.query_params.getlist("tags") or None
        await asyncio.sleep(env_float("FAKE_WAKE_DELAY"))
        if os.environ.get("FAKE_WAKE_FAIL"):
            print("fake engine: wake fails (FAKE_WAKE_FAIL)", flush=True)
            return internal_error()
        state["sleeping"] = 0
        print(f"fake engine: awake (tags {tags})", flush=True)
        return Response(status_code=200)

    async def is_sleeping(request: Request):
        return JSONResponse({"is_sleeping": bool(state["sleeping"])})

    routes = [Route("/sleep", sleep, methods=["POST"]), Route("/wake_up", wake_up, methods=["POST"]),
              Route("/is_sleeping", is_sleeping, methods=["GET"])]
    for route in routes:
        route.methods.discard("HEAD")          # Starlette adds HEAD to GET; FastAPI's routes have no HEAD: 405
    return routes


WARMUP_ID = b"launcher-warmup-"
NO_CHAT_TEMPLATE = ("Cannot use chat template functions because tokenizer.chat_template is not set and no "
                    "template argument was passed! For information about writing templates and setting the "
                    "tokenizer.chat_template attribute, please see the documentation at "
                    "https://huggingface.co/docs/transformers/main/en/chat_templating")


def is_warmup(scope) -> bool:
    return any(name == b"x-request-id" and value.startswith(WARMUP_ID) for name, value in scope.get("headers", ()))


def bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}},
                        status_code=400)


def chaos(state: dict) -> None:
    """FAKE_CRASH_EVERY and FAKE_STALL_AFTER, at the arrival of a generation request."""
    if state["crash_at"] and state["requests"] >= state["crash_at"]:
        print(f"fake engine: crashing at request {state['requests']} (FAKE_CRASH_EVERY)", flush=True)
        os._exit(9)
    stall_after = int(os.environ.get("FAKE_STALL_AFTER") or 0)
    if stall_after and state["requests"] >= stall_after and not state["stalled"].is_set():
        print(f"fake engine: stalled at request {state['requests']} (FAKE_STALL_AFTER)", flush=True)
        state["stalled"].set()


async def token(state: dict, delay: float) -> None:
    """One generated token: its delay, then counted in vllm:generation_tokens_total; never, once stalled."""
    await asyncio.sleep(delay)
    if state["stalled"].is_set():
        await asyncio.Event().wait()
    state["tokens"] += 1


def crash_at() -> int:
    spec = os.environ.get("FAKE_CRASH_EVERY")
    if not spec:
        return 0
    low, _, high = spec.partition("-")
    return random.randint(int(low), int(high or low))


async def warmup_faults(request: Request, body: dict):
    """A warm-up: logged, delayed, and failed as FAKE_WARMUP says (a response), else None."""
    if path := os.environ.get("FAKE_WARMUP_LOG"):
        with open(path, "a") as log:
            log.write(f"warmup POST {request.url.path}{' stream' if body.get('stream') else ''}\n")
    await asyncio.sleep(env_float("FAKE_WARMUP_DELAY"))
    fault = os.environ.get("FAKE_WARMUP")
    if fault == "refuse":
        return bad_request("fake engine: warm-ups refused (FAKE_WARMUP=refuse)")
    if fault == "hang":
        print("fake engine: hanging in the warm-up (FAKE_WARMUP=hang)", flush=True)
        await asyncio.sleep(3600)
    if fault == "die":
        print("fake engine: dying in the warm-up (FAKE_WARMUP=die)", flush=True)
        os._exit(9)
    return None


@contextlib.asynccontextmanager
async def in_batch(state: dict, slots: asyncio.Semaphore | None):
    """A place in the engine's batch (FAKE_BATCH: waiting in the engine until one frees), counted
    in vLLM's gauges: waiting until it has one, then running."""
    state["waiting"] += 1
    try:
        if slots is not None:
            await slots.acquire()
    finally:
        state["waiting"] -= 1
    state["running"] += 1
    try:
        yield
    finally:
        state["running"] -= 1
        if slots is not None:
            slots.release()


def build_app(served: str, model: str, sleep_mode: bool = False) -> Starlette:
    key = os.environ.get("VLLM_API_KEY")
    token_delay = env_float("FAKE_TOKEN_DELAY")
    die_after = int(os.environ.get("FAKE_DIE_AFTER_TOKENS") or 0)
    task = os.environ.get("FAKE_TASK")
    state = {"requests": 0, "running": 0, "sleeping": 0, "generated": 0, "tokens": 0, "crash_at": crash_at(),
             "stalled": asyncio.Event(), "waiting": 0}
    batch = int(os.environ.get("FAKE_BATCH") or 0)
    slots = asyncio.Semaphore(batch) if batch else None

    def unauthorized(request: Request):
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "Unauthorized", "type": "authentication_error",
                                           "param": None, "code": 401}}, status_code=401)
        return None

    async def health(request):
        return PlainTextResponse("")

    async def version(request):
        return JSONResponse({"version": VERSION})

    async def metrics(request):
        return PlainTextResponse(
            "# HELP vllm:num_requests_running Number of requests running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{served}"}} {state["running"]}\n'
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{served}"}} {state["waiting"]}\n'
            "# HELP vllm:prompt_tokens_total Prompt tokens.\n"
            "# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{model_name="{served}"}} {state["requests"] * 3}\n'
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="{served}"}} {state["tokens"]}\n'
            "# HELP python_gc_objects_collected_total not ours\n"
            "# TYPE python_gc_objects_collected_total counter\n"
            'python_gc_objects_collected_total{generation="0"} 1.0\n')

    async def models(request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": served, "object": "model", "created": 0, "owned_by": "fake", "root": model}]})

    async def generate(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        if body.get("model") != served:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}},
                                status_code=404)
        chat = request.url.path.endswith("chat/completions")
        warmup = is_warmup(request.scope)
        if warmup and (refused := await warmup_faults(request, body)) is not None:
            return refused
        if task in ("pooling", "pooling-0.12"):
            refused = bad_request(f"The model does not support {'Chat Completions' if chat else 'Completions'} API")
            if task == "pooling-0.12":
                refused.status_code = 200         # vLLM 0.12 answers this refusal 200, the error in the body
            return refused
        if task == "base" and chat:
            return bad_request(NO_CHAT_TEMPLATE)
        state["generated"] += 1
        if state["generated"] == 1:
            await asyncio.sleep(env_float("FAKE_FIRST_DELAY"))
        delay, dies_after = (0.0, 0) if warmup else (token_delay, die_after)
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        else:
            prompt = str(body.get("prompt", ""))
        tokens = [f"{served}"] + [f" t{i}" for i in range(max(0, int(body.get("max_tokens") or 4) - 1))]
        created = int(time.time())
        state["requests"] += 0 if warmup else 1
        if not warmup:
            chaos(state)
        ident = f"fake-{state['requests']}"
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens),
                 "total_tokens": len(prompt.split()) + len(tokens)}

        def choice(text, finish):
            if chat:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def delta(text, finish):
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            async def generate_all():
                async with in_batch(state, slots):
                    for count, _ in enumerate(tokens, 1):
                        await token(state, delay)
                        if dies_after and count >= dies_after:
                            os._exit(9)

            # like vLLM, a client that leaves aborts its generation
            if not await until_disconnect(request, generate_all()):
                return PlainTextResponse("", status_code=499)
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": served,
                                 "choices": [choice("".join(tokens), "length")], "usage": usage})

        async def events():
            async with in_batch(state, slots):
                for count, word in enumerate(tokens, 1):
                    await token(state, delay)
                    if dies_after and count >= dies_after:
                        os._exit(9)
                    chunk = {"id": ident, "object": kind + ".chunk", "created": created, "model": served,
                             "choices": [delta(word, None)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                final = {"id": ident, "object": kind + ".chunk", "created": created, "model": served,
                         "choices": [delta("", "length")]}
                yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"
                # vLLM ends the response a moment after its last event; a client may leave first
                await asyncio.sleep(float(os.environ.get("FAKE_LINGER_AFTER_DONE") or 0))

        return StreamingResponse(events(), media_type="text/event-stream")

    async def messages(request: Request):
        """POST /v1/messages as vLLM 0.12 answers it (anthropic.py repairs it): a message_start
        without type, role, usage and stop_reason, `data: [DONE]` last, vLLM's error shapes.
        FAKE_MESSAGES_LOG: a JSON line per request, its body and anthropic-* headers."""
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        if path := os.environ.get("FAKE_MESSAGES_LOG"):
            with open(path, "a") as log:
                log.write(json.dumps({"body": body, "headers": {name: value for name, value in request.headers.items()
                                                                if name.startswith("anthropic-")}}) + "\n")
        for message in body.get("messages", []):
            for block in message["content"] if isinstance(message.get("content"), list) else []:
                if block.get("type") not in ("text", "image", "tool_use", "tool_result"):
                    return JSONResponse({"error": {"message": f"Input tag '{block.get('type')}' found using 'type' "
                                                              "does not match any of the expected tags",
                                                   "type": "Bad Request", "code": 400}}, status_code=400)
        if body.get("model") != served:
            return JSONResponse({"type": "error", "error": {"type": "NotFoundError", "message":
                                                            f"The model `{body.get('model')}` does not exist."}},
                                status_code=404)
        words = [served] + [f" t{i}" for i in range(max(0, int(body.get("max_tokens") or 4) - 1))]
        usage = {"input_tokens": 3, "output_tokens": len(words)}
        tool = (body.get("tool_choice") or {}).get("name")
        if tool and not body.get("stream"):       # a named tool, as 0.12 answers it: stop_reason end_turn
            return JSONResponse({"id": "msg-fake", "type": "message", "role": "assistant", "model": served,
                                 "content": [{"type": "text", "text": ""}, {"type": "tool_use", "id": "toolu_fake",
                                                                            "name": tool, "input": {"city": "Rome"}}],
                                 "stop_reason": "end_turn", "usage": usage})
        if not body.get("stream"):
            return JSONResponse({"id": "msg-fake", "type": "message", "role": "assistant", "model": served,
                                 "content": [{"type": "text", "text": "".join(words)}], "stop_reason": "max_tokens",
                                 "usage": usage})

        def event(name, data):
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        async def events():
            yield event("message_start", {"type": "message_start",
                                          "message": {"id": "msg-fake", "content": [], "model": served}})
            if tool:                      # 0.12 drops the first piece of a named tool's input
                yield event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": "toolu_fake", "name": tool, "input": {}}})
                yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": 'city": "Rome"}'}})
                yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                              "usage": usage})
                yield event("message_stop", {"type": "message_stop"})
                yield "data: [DONE]\n\n"
                return
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
            for word in words:
                await asyncio.sleep(token_delay)
                yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": word}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                          "usage": usage})
            yield event("message_stop", {"type": "message_stop"})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def echo(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        if is_warmup(request.scope) and (refused := await warmup_faults(request, body)) is not None:
            return refused
        return JSONResponse({"object": request.url.path.rsplit("/", 1)[-1], "model": body.get("model")})

    async def audio(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return JSONResponse({"error": {"message": "expected multipart/form-data", "type": "BadRequestError",
                                           "param": None, "code": 400}}, status_code=400)
        if f'name="model"\r\n\r\n{served}\r\n'.encode() not in body:
            return JSONResponse({"error": {"message": f"no model field {served!r}", "type": "NotFoundError",
                                           "param": "model", "code": 404}}, status_code=404)
        return JSONResponse({"text": f"{served} heard {len(body)} bytes"})

    async def embeddings(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        if is_warmup(request.scope) and (refused := await warmup_faults(request, body)) is not None:
            return refused
        return JSONResponse({"object": "list", "model": served, "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    app = Starlette(routes=[
        Route("/health", health), Route("/version", version), Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        *[Route(f"/v1/{path}", echo, methods=["POST"]) for path in ("responses", "rerank", "score")],
        *[Route(f"/v1/audio/{path}", audio, methods=["POST"]) for path in ("transcriptions", "translations")],
        *(sleep_routes(state) if sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1" else []),
    ])
    path_log = os.environ.get("FAKE_PATH_LOG")
    return record_paths(app, path_log) if path_log else app


async def until_disconnect(request: Request, work) -> bool:
    """Runs `work`; False (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.done() and not task.cancelled()


def record_paths(app, path_log: str):
    """Every request's method and raw path, one line each, before the app sees it."""
    async def recorded(scope, receive, send):
        if scope["type"] == "http" and not is_warmup(scope):
            raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            query = scope.get("query_string", b"").decode("latin-1")
            with open(path_log, "a") as log:
                log.write(f"{scope['method']} {raw}{'?' + query if query else ''}\n")
        await app(scope, receive, send)
    return recorded


def main(argv) -> None:
    args = parse_args(argv)
    where = f"socket {args.uds}" if args.uds else f"port {args.port}"
    print(f"fake engine pid {os.getpid()} pgid {os.getpgid(0)} for {args.served_model_name} on {where}", flush=True)
    if os.environ.get("FAKE_PRINT"):
        print(os.environ["FAKE_PRINT"], flush=True)
    time.sleep(env_float("FAKE_START_DELAY"))
    maybe_fail_start()
    if args.enable_sleep_mode and os.environ.get("FAKE_REFUSE_SLEEP_MODE"):
        # vLLM 0.32's words on the CPU (a pydantic ValidationError of its ModelConfig)
        print("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
              "  Value error, Sleep mode is not supported on current platform. [type=value_error, "
              "input_value=ArgsKwargs((), {'model': '...'}), input_type=ArgsKwargs]", flush=True)
        sys.exit(1)
    if os.environ.get("FAKE_CHILD"):
        if os.fork() == 0:                    # like VLLM::EngineCore: same group, outlives a SIGKILLed parent
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(1)
    if os.environ.get("FAKE_HANG_ON_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    crash_after = env_float("FAKE_CRASH_AFTER")
    if crash_after:
        def crash():
            print("fake engine: crashing (FAKE_CRASH_AFTER)", flush=True)
            os._exit(7)
        import threading

        threading.Timer(crash_after, crash).start()
    address = {"uds": args.uds} if args.uds else {"host": args.host, "port": args.port}
    config = uvicorn.Config(build_app(args.served_model_name, args.model, args.enable_sleep_mode), **address,
                            log_level="warning", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    if os.environ.get("FAKE_HANG_ON_TERM"):
        server.handle_exit = lambda sig, frame: None
    server.run()


if __name__ == "__main__":
    main(sys.argv[1:])
