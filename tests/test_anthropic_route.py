"""The Anthropic Messages API on the front server (issue 22), with fake engines that answer
/v1/messages the way vLLM 0.12 does (tests/fake_engine.py): the real `anthropic` client's
create and stream() through the repairs, Anthropic-shaped errors, the key as x-api-key, pings
while a stream waits for its lane, the request translations reaching the engine, count_tokens
without loading a lane, stored responses refused. The same against real vLLM 0.12:
tests/test_e2e_vllm012.py. The stream repair itself, chunk boundaries anywhere: at the end."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from real_engine import shared_demo_models
from serving import CHAT, chat_body, fake_lanes_env, serving
from vllm_launcher.anthropic import PING, StreamRepair, count_tokens, translate_request
from vllm_launcher.config import load_config
from vllm_launcher.errors import APIError

KEY = "k-anthropic"
MESSAGES = "/v1/messages"


def client(served, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=KEY, max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return shared_demo_models(tmp_path_factory)["alpha"]


def anthropic_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    return body["error"]


@pytest.mark.engine
def test_anthropic_client_through_the_repairs_and_errors(tmp_path, fake_python, tokenizer_model):
    log = tmp_path / "messages.jsonl"
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_MESSAGES_LOG": str(log), "ENV_FAKE_TOKEN_DELAY": "0.01"},
                                       "b": {"TOKENIZER": str(tokenizer_model), "ENV_FAKE_START_DELAY": "4"}},
                         VLLM_API_KEY=KEY, VLLM_QUEUE_MAX="1")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as http:
        claude = client(served)
        message = claude.messages.create(model="a", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text == "a t0 t1" and message.usage.output_tokens == 3
        # the engine's stream as 0.12 sends it fails this client (no usage in message_start, [DONE]); repaired:
        with claude.messages.stream(model="a", max_tokens=4, messages=[{"role": "user", "content": "hi"}]) as stream:
            texts = list(stream.text_stream)
            final = stream.get_final_message()
        assert "".join(texts) == "a t0 t1 t2" and final.usage.output_tokens == 4 and final.usage.input_tokens == 3
        assert final.stop_reason == "max_tokens" and final.role == "assistant"

        # the key as x-api-key (the client's way), as Bearer (ANTHROPIC_AUTH_TOKEN's way), and wrong
        bearer = anthropic.Anthropic(base_url=served.url, auth_token=KEY, max_retries=0)
        assert bearer.messages.create(model="a", max_tokens=1, messages=[{"role": "user", "content": "x"}]).id
        with pytest.raises(anthropic.AuthenticationError) as wrong:
            anthropic.Anthropic(base_url=served.url, api_key="nope", max_retries=0).messages.create(
                model="a", max_tokens=1, messages=[{"role": "user", "content": "x"}])
        assert wrong.value.body["type"] == "error" and wrong.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.NotFoundError) as unknown:          # the front server's 404
            claude.messages.create(model="claude-none", max_tokens=1, messages=[{"role": "user", "content": "x"}])
        assert unknown.value.body["error"]["type"] == "not_found_error"
        assert "claude-none" in unknown.value.body["error"]["message"]
        # the engine's own refusal ("Bad Request", OpenAI-shaped) in Anthropic's shape
        refused = http.post(MESSAGES, headers={"x-api-key": KEY}, json={
            "model": "a", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]})
        assert refused.status_code == 400
        assert anthropic_error(refused)["type"] == "invalid_request_error"
        assert "document" in anthropic_error(refused)["message"]

        # a request shaped like Claude Code's: translated where 0.12 refuses or misreads it
        claude_code_request = {
            "model": "a", "max_tokens": 2, "thinking": {"type": "enabled", "budget_tokens": 1024},
            "system": [{"type": "text", "text": "You are a coder.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "read", "description": "read a file",
                       "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}},
                      {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
            "messages": [
                {"role": "user", "content": "read a.txt"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "I should read", "signature": "s"},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "read",
                                                   "input": {"path": "a.txt"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [{"type": "text", "text": "hello"}]}]}]}
        answer = http.post(MESSAGES + "?beta=true", json=claude_code_request,
                           headers={"x-api-key": KEY, "anthropic-version": "2023-06-01",
                                    "anthropic-beta": "interleaved-thinking-2025-05-14"})
        assert answer.status_code == 200, answer.text
        seen = json.loads(log.read_text().splitlines()[-1])
        assert seen["headers"] == {"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"}
        assistant, result = seen["body"]["messages"][1:]
        assert [block["type"] for block in assistant["content"]] == ["tool_use"]         # thinking dropped
        assert result["content"][0]["id"] == "toolu_1" and result["content"][0]["content"] == "hello"
        assert [tool["name"] for tool in seen["body"]["tools"]] == ["read"]             # the server tool dropped
        assert seen["body"]["system"] == claude_code_request["system"]                  # accepted as it is

        # a named tool in a stream: 0.12 would drop the first piece of its input; asked whole, streamed from here
        weather = {"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
        named = {"model": "a", "max_tokens": 16, "tools": [weather], "tool_choice": {"type": "tool", "name": "weather"},
                 "messages": [{"role": "user", "content": "Weather in Rome?"}]}
        with claude.messages.stream(**named) as stream:
            final = stream.get_final_message()
        assert json.loads(log.read_text().splitlines()[-1])["body"]["stream"] is False
        assert [(block.type, block.input) for block in final.content if block.type == "tool_use"] == \
            [("tool_use", {"city": "Rome"})]
        assert final.stop_reason == "tool_use" and final.usage.output_tokens > 0      # 0.12 says end_turn
        assert claude.messages.create(**named).stop_reason == "tool_use"

        # count_tokens: from lane b's tokenizer, b is not loaded for it (its engine takes 4 s to start)
        count = claude.messages.count_tokens(model="b", messages=[{"role": "user", "content": "Hello"}],
                                             system="Be brief.")
        expected = count_tokens(load_config(env).lane("b"), {"system": "Be brief.",
                                                              "messages": [{"role": "user", "content": "Hello"}]})
        assert count.input_tokens == expected > 3
        assert served.lanes()["b"]["state"] == "stopped"
        missing = http.post(MESSAGES + "/count_tokens", headers={"x-api-key": KEY},
                            json={"model": "a", "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 503 and anthropic_error(missing)["type"] == "overloaded_error"
        assert "fake-org/a-model" in anthropic_error(missing)["message"]     # a hub id not on this machine

        # a stream that waits for its lane: pings (Python clients hide them: raw SSE), then the answer
        with httpx.stream("POST", served.url + MESSAGES, headers={"x-api-key": KEY}, timeout=60,
                          json={"model": "b", "max_tokens": 2, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as response:
            # the queue's one place is the waiting stream's: the next request is refused, in Anthropic's shape
            with pytest.raises(anthropic.APIStatusError) as full:
                claude.messages.create(model="b", max_tokens=1, messages=[{"role": "user", "content": "x"}])
            raw = response.read()
        assert response.status_code == 200
        first_event = raw.index(b"event: message_start")
        assert raw.startswith(b": waiting for lane b (starting") and PING in raw[:first_event]
        assert b"[DONE]" not in raw and raw.endswith(b'"message_stop"}\n\n')
        assert full.value.status_code == 503 and full.value.body["error"]["type"] == "overloaded_error", full.value.body
        assert "too many requests waiting" in full.value.body["error"]["message"]
        start = json.loads(raw[first_event:].split(b"\n\n")[0].split(b"data: ")[1])
        assert start["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
        assert start["message"]["role"] == "assistant" and start["message"]["type"] == "message"


@pytest.mark.engine
def test_key_headers_and_stored_responses(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_API_KEY=KEY)
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as http:
        body = chat_body("a")
        assert http.post(CHAT, json=body, headers={"x-api-key": KEY}).status_code == 200     # every route
        assert http.get("/lanes", headers={"x-api-key": KEY}).status_code == 200
        same = {"x-api-key": KEY, "Authorization": f"Bearer {KEY}"}
        assert http.post(CHAT, json=body, headers=same).status_code == 200
        ambiguous = [
            [("x-api-key", KEY), ("x-api-key", "other")],
            [("x-api-key", KEY), ("x-api-key", KEY)],
            [("x-api-key", KEY), ("Authorization", "Bearer other")],
            [("x-api-key", "other"), ("Authorization", f"Bearer {KEY}")],
            [("x-api-key", KEY), ("Authorization", f"Basic {KEY}")],
        ]
        for headers in ambiguous:
            answer = http.post(CHAT, json=body, headers=headers)
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_authorization", headers
            answer = http.post(MESSAGES, json={"model": "a", "max_tokens": 1, "messages": []}, headers=headers)
            assert answer.status_code == 400 and anthropic_error(answer)["type"] == "invalid_request_error"
        for method, path in (("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel"),
                             ("DELETE", "/v1/responses/resp_1"), ("GET", "/v1/responses/resp_1/input_items")):
            answer = http.request(method, path, headers={"x-api-key": KEY})
            assert answer.status_code == 404, (method, path)
            error = answer.json()["error"]
            assert error["code"] == "response_not_stored" and "switch" in error["message"]
            assert http.request(method, path).status_code == 401


def test_stream_repair_at_any_chunk_boundary():
    """0.12's stream, cut anywhere, comes out as the same events with message_start completed and
    without [DONE]; a stream that needs nothing (0.32's) passes byte for byte."""
    start = b'event: message_start\ndata: {"type": "message_start", "message": {"id": "m", "content": [], "model": "a"}}\n\n'
    rest = (b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": '
            b'"text_delta", "text": "hi"}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
    broken = start + rest + b"data: [DONE]\n\n"
    for cut in range(1, len(broken)):
        repair = StreamRepair(repair=True)
        out = repair.feed(broken[:cut]) + repair.feed(broken[cut:]) + repair.close()
        assert out.endswith(rest) and b"[DONE]" not in out, cut
        message = json.loads(out.split(b"\n\n")[0].split(b"data: ")[1])["message"]
        assert message["usage"] == {"input_tokens": 0, "output_tokens": 0} and message["stop_reason"] is None
    right = start.replace(b'"content": []', b'"type": "message", "role": "assistant", "content": [], '
                                              b'"stop_reason": null, "usage": {"input_tokens": 3, "output_tokens": 0}')
    repair = StreamRepair(repair=False)
    assert repair.feed(right + rest[:7]) + repair.feed(rest[7:]) + repair.close() == right + rest
    # an error event with vLLM's type gets Anthropic's
    repair = StreamRepair(repair=False)
    out = repair.feed(b'event: error\ndata: {"type": "error", "error": {"type": "internal_error", "message": "x"}}\n\n')
    assert json.loads(out.split(b"data: ")[1]) == {"type": "error", "error": {"type": "api_error", "message": "x"}}


def test_a_tool_use_stream_stops_for_the_tool():
    events = (b'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, "content_block": '
              b'{"type": "tool_use", "id": "t", "name": "w", "input": {}}}\n\nevent: message_delta\ndata: '
              b'{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}\n\n')
    out = StreamRepair(repair=True).feed(events)
    assert json.loads(out.split(b"data: ")[-1])["delta"]["stop_reason"] == "tool_use"
    assert StreamRepair(repair=False).feed(events) == events


def test_translations_only_for_engines_that_need_them():
    request = {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]}],
               "tool_choice": {"type": "none"}, "tools": [{"name": "t", "input_schema": {}}]}
    untouched = json.loads(json.dumps(request))
    assert translate_request(untouched, "0.32.0") is False and untouched == request
    assert translate_request(request, "0.12.0") is True
    assert request == {"messages": [{"role": "assistant", "content": []}]}


# A tool-calling template in the style of Qwen's (tools as JSON, tool calls, tool results),
# with transformers' extras: raise_exception and a {% generation %} block.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>{% endif %}"
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_count_tokens_renders_as_transformers_does(tokenizer_model, tmp_path):
    """The count here reads tokenizer.json with `tokenizers` and renders with jinja2 (transformers
    imports torch: seconds and hundreds of MiB in the front server); against transformers'
    own apply_chat_template on the same conversation, with tools, tool calls and results."""
    from transformers import AutoTokenizer

    from vllm_launcher.anthropic import _conversation, chat_request

    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    env = {"VLLM_MODEL": str(tokenizer_model), "VLLM_CHAT_TEMPLATE": str(template)}
    request = {"system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
               "tools": [{"name": "read", "description": "read a file", "input_schema": {
                   "type": "object", "properties": {"path": {"type": "string"}}}}],
               "messages": [{"role": "user", "content": "read a.txt"},
                            {"role": "assistant", "content": [{"type": "text", "text": "Reading."},
                                                              {"type": "tool_use", "id": "t1", "name": "read",
                                                               "input": {"path": "a.txt"}}]},
                            {"role": "user", "content": [{"type": "tool_result", "id": "t1", "content": "héllo"}]}]}
    ours = count_tokens(load_config(env).lane("default"), request)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_model))
    messages, tools = chat_request(request)
    prompt = tokenizer.apply_chat_template(_conversation(messages, TOOL_TEMPLATE), tools=tools,
                                           chat_template=TOOL_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert "<tool_call>" in prompt and '"read"' in prompt and "héllo" in prompt
    assert ours == len(tokenizer.encode(prompt, add_special_tokens=False))
    # the template's raise_exception is the engine's 400, its message the client's
    refusing = {"VLLM_MODEL": str(tokenizer_model),
                "VLLM_CHAT_TEMPLATE": "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"}
    with pytest.raises(APIError, match="no system") as refused:
        count_tokens(load_config(refusing).lane("default"), request)
    assert refused.value.status == 400
