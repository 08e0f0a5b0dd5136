"""The front server with two fake-engine lanes, through the real `openai` client."""

from __future__ import annotations

import openai
import pytest

from serving import fake_lanes_env, serving

pytestmark = pytest.mark.engine


def test_two_lanes_through_openai_client(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"alpha": {}, "beta": {}}, VLLM_SWITCH_MAX_WAIT="1")
    with serving(tmp_path, env, wait_ready_lane="alpha") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        for lane in ("alpha", "beta", "alpha"):
            chat = client.chat.completions.create(model=lane, messages=[{"role": "user", "content": "hi"}])
            assert chat.model == lane and chat.choices[0].message.content.startswith(lane)
            completion = client.completions.create(model=lane, prompt="hello", max_tokens=3)
            assert completion.model == lane and completion.choices[0].text.startswith(lane)
            chunks = list(client.chat.completions.create(
                model=lane, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=5))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text.startswith(lane) and len(text.split()) == 5
        models = {m.id: m for m in client.models.list().data}
        assert {"alpha", "beta", "fake-org/alpha-model"} <= set(models)
        lanes = served.lanes()
        assert lanes["alpha"]["state"] == "ready" and lanes["beta"]["state"] == "stopped"
