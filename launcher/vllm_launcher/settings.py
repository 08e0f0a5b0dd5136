"""The environment contract: every variable the launcher reads, in three tables.

SERVER_SETTINGS are server-wide. ENGINE_SETTINGS configure an engine: the global name is the
default for every lane and `VLLM_LANE_<LANE>_<SETTING>` overrides it for one lane.
CLUSTER_SETTINGS describe this machine's node of a Ray cluster (`vllm-launcher cluster`) and
where the cluster's head is, for lanes that span several machines. Names after
the first are aliases used by the seed deployments; the first one set wins, in table order.
This module is the one place these names and their defaults are written down: the CLI help,
the Nix module and the tests read them from here, docs/settings.md's table is checked against it
(tests/test_settings_doc.py), and the configuration's
dataclasses (config.py) take their field defaults from here (`defaults`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import values

LANE_PREFIX = "VLLM_LANE_"
LANE_ENV_INFIX = "ENV_"

LOG_LEVELS = {name.lower(): name for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}
LOG_LEVELS["warn"] = "WARNING"

# `--dtype` accepts these (vLLM 0.12 and 0.32); bf16/fp16/fp32 are common spellings we normalise.
DTYPES = {
    "auto": "auto", "half": "half", "float16": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "float": "float", "float32": "float32",
    "fp32": "float32",
}
KV_CACHE_DTYPES = {name: name for name in (
    "auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")}
# 0.12 accepts these block sizes; 0.32 accepts them too.
BLOCK_SIZES = {str(size): str(size) for size in (1, 8, 16, 32, 64, 128, 256)}
EXECUTOR_BACKENDS = {"mp": "mp", "ray": "ray"}
SLEEP_LEVELS = {"0": "0", "1": "1", "2": "2"}


def _sleep_level(raw: str) -> int:
    return int(values.choice_parser(SLEEP_LEVELS, "vLLM sleep level, 0 off")(raw))


def _block_size(raw: str) -> int:
    return int(values.choice_parser(BLOCK_SIZES, "KV cache block size in tokens")(raw))


@dataclass(frozen=True)
class Setting:
    key: str                       # the setting's name, e.g. "GPU_MEMORY_UTILIZATION"
    names: tuple[str, ...]         # environment names, first one set wins
    parse: Callable[[str], Any]
    help: str
    default: Any = None

    @property
    def env(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class EngineSetting(Setting):
    flag: str | None = None        # the vLLM flag; None when the launcher consumes the value
    # how a boolean becomes flags: "switch" = flag when true; "toggle" = --x / --no-x
    bool_style: str | None = None
    lane_only: bool = False        # only as VLLM_LANE_<LANE>_<KEY>
    extra: dict = field(default_factory=dict)


def _server(key, names, parse, help, default=None):
    return Setting(key, tuple(names), parse, help, default)


def _engine(key, parse, help, flag=None, names=None, bool_style=None, lane_only=False, default=None):
    return EngineSetting(key, tuple(names or (f"VLLM_{key}",)), parse, help, default,
                         flag=flag, bool_style=bool_style, lane_only=lane_only)


_str = str.strip
_identifier = values.pattern_parser(r"[A-Za-z0-9_.\-]+", "a name of letters, digits, '_', '.' or '-'")

SERVER_SETTINGS: tuple[Setting, ...] = (
    _server("host", ["VLLM_HOST", "HOST"], _str, "address the front server listens on", "0.0.0.0"),
    _server("port", ["VLLM_PORT", "PORT"], lambda raw: _port(raw), "port of the front server", 8000),
    _server("api_key", ["VLLM_API_KEY"], _str, "bearer key clients must send (unset: no auth)"),
    _server("api_key_file", ["VLLM_API_KEY_FILE"], _str, "file holding the bearer key"),
    _server("log_level", ["VLLM_LOG_LEVEL", "VLLM_LOGGING_LEVEL"],
            values.choice_parser(LOG_LEVELS, "log level"),
            "log level of the launcher, passed to engines as VLLM_LOGGING_LEVEL", "INFO"),
    _server("log_requests", ["VLLM_LOG_REQUESTS"], values.parse_bool, "log one line per request", False),
    _server("log_format", ["VLLM_LOG_FORMAT"], values.choice_parser({"text": "text", "json": "json"}, "log format"),
            "log line format: text or json", "text"),
    _server("log_directory", ["LOG_DIRECTORY"], _str, "also write logs to files in this directory (unset: stdout only)"),
    _server("build_sha", ["BUILD_SHA"], _str, "build identifier reported by /version", "dev"),
    _server("build_time", ["BUILD_TIME"], _str, "build time reported by /version", "dev"),
    _server("engine_python", ["VLLM_ENGINE_PYTHON"], _str,
            "Python interpreter that runs the engines (default: the launcher's own)", sys.executable),
    _server("start_timeout", ["VLLM_START_TIMEOUT"], values.parse_positive_float,
            "seconds an engine may take to become ready", 900.0),
    _server("drain_timeout", ["VLLM_DRAIN_TIMEOUT"], values.parse_positive_float,
            "seconds in-flight requests may take to finish before a switch or shutdown", 120.0),
    _server("stop_timeout", ["VLLM_STOP_TIMEOUT"], values.parse_positive_float,
            "seconds between SIGTERM and SIGKILL of an engine's process group", 20.0),
    _server("switch_max_wait", ["VLLM_SWITCH_MAX_WAIT"], values.parse_positive_float,
            "the cap B: once a request for another lane has waited this long, a busy loaded lane is closed "
            "(drained, then put to sleep or stopped) for it (bench/results/switch_max_wait.json chose 120 s)", 120.0),
    _server("queue_max", ["VLLM_QUEUE_MAX"], values.parse_positive_int,
            "requests waiting in the launcher's queues in all (a lane's backlog beyond its dispatch limit "
            "included), beyond: 503 queue_full with a Retry-After from that lane's own costs and service rate",
            4096),
    _server("queue_timeout", ["VLLM_QUEUE_TIMEOUT"], values.parse_positive_float,
            "seconds a loaded lane may take none of its queue (its engine stuck) before that queue gets 503 "
            "queue_timeout; waiting for other lanes' turns never times out (the wait bound covers it)", 600.0),
    _server("max_body_bytes", ["VLLM_MAX_BODY_BYTES"], values.parse_byte_size,
            "largest request body accepted, beyond: 413", 32 * 1024 * 1024),
    _server("max_connections", ["VLLM_MAX_CONNECTIONS"], values.parse_positive_int,
            "open client connections at most (capped by the open-file limit); beyond, the longest-idle "
            "connection is closed, or the new one answered 503 when all are busy", 2048),
    _server("keepalive_timeout", ["VLLM_KEEPALIVE_TIMEOUT"], values.parse_positive_float,
            "seconds a connection may stay idle (no request under way, also before its first) before it is closed",
            15.0),
    _server("header_timeout", ["VLLM_HEADER_TIMEOUT"], values.parse_positive_float,
            "seconds from a request's first byte to the end of its headers, beyond: 408 and close", 15.0),
    _server("body_timeout", ["VLLM_BODY_TIMEOUT"], values.parse_positive_float,
            "seconds from the end of a request's headers to the end of its body, beyond: 408 and close", 60.0),
    _server("engine_max_restarts", ["VLLM_ENGINE_MAX_RESTARTS"], values.parse_positive_int,
            "consecutive crash loops (failed starts; crashes or hangs of engines that had not served: no output "
            "reached a client, fewer than 3 requests finished, ready less than 60 s) before a lane is failed; a "
            "failed lane is tried again after 300 s", 5),
    _server("gpu_memory_budget", ["VLLM_GPU_MEMORY_BUDGET"], values.parse_fraction,
            "share of device memory all loaded lanes may use together (default: the largest lane's share)"),
    _server("gpu_memory_gb", ["VLLM_GPU_MEMORY_GB"], values.parse_positive_float,
            "device memory in GB for the memory plan when it cannot be queried"),
    _server("sleep_overhead_gb", ["VLLM_SLEEP_OVERHEAD_GB"], values.parse_nonnegative_float,
            "device memory in GB a level-2 sleeping engine is counted for (its process overhead) in the "
            "co-residency budget", 1.0),
    _server("metrics_require_key", ["VLLM_METRICS_REQUIRE_KEY"], values.parse_bool,
            "require the API key for /metrics", False),
    _server("runtime_dir", ["VLLM_RUNTIME_DIR"], _str,
            "where engine process groups are recorded and engines' Unix sockets live (sockets/, mode 0700) "
            "(default: $XDG_RUNTIME_DIR/vllm-launcher or ~/.local/state)"),
)


def _port(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("must be a port number from 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


ENGINE_SETTINGS: tuple[EngineSetting, ...] = (
    _engine("MODEL", _str, "HF model id or local directory (a model.safetensors path means its directory)",
            "--model", names=["VLLM_MODEL", "MODEL_PATH", "MODEL_ID"]),
    _engine("SERVED_MODEL_NAME", _identifier, "name clients use (default: last part of a hub id, else the lane name)",
            "--served-model-name"),
    _engine("ALIASES", values.parse_name_list, "comma list of extra names a request's model may use"),
    _engine("GPU_MEMORY_UTILIZATION", values.parse_fraction, "share of device memory for this engine, (0, 1]",
            "--gpu-memory-utilization",
            names=["VLLM_GPU_MEMORY_UTILIZATION", "GPU_MEM_UTIL", "GPU_MEMORY_UTILIZATION"]),
    _engine("MAX_MODEL_LEN", values.parse_positive_int, "context length in tokens", "--max-model-len",
            names=["VLLM_MAX_MODEL_LEN", "MAX_MODEL_LEN"]),
    _engine("TENSOR_PARALLEL_SIZE", values.parse_positive_int, "GPUs per engine (tensor parallel)",
            "--tensor-parallel-size", names=["VLLM_TENSOR_PARALLEL_SIZE", "TENSOR_PARALLEL"]),
    _engine("PIPELINE_PARALLEL_SIZE", values.parse_positive_int, "pipeline stages", "--pipeline-parallel-size"),
    _engine("DTYPE", values.choice_parser(DTYPES, "vLLM spelling"), "weights and activations dtype", "--dtype",
            names=["VLLM_DTYPE", "DTYPE"]),
    _engine("ENFORCE_EAGER", values.parse_bool, "disable graph capture / torch.compile", "--enforce-eager",
            bool_style="switch"),
    _engine("BLOCK_SIZE", _block_size, "KV cache block size in tokens", "--block-size"),
    _engine("SWAP_SPACE", values.parse_nonnegative_float, "CPU swap space in GiB (vLLM < 0.18 only)", "--swap-space"),
    _engine("NUM_GPU_BLOCKS_OVERRIDE", values.parse_positive_int, "fixed number of KV cache blocks",
            "--num-gpu-blocks-override"),
    _engine("KV_CACHE_DTYPE", values.choice_parser(KV_CACHE_DTYPES, "KV cache dtype"), "KV cache dtype",
            "--kv-cache-dtype"),
    _engine("KV_CACHE_MEMORY_BYTES", values.parse_byte_size, "KV cache size in bytes (overrides the utilisation)",
            "--kv-cache-memory-bytes"),
    _engine("MAX_NUM_SEQS", values.parse_positive_int,
            "sequences per batch (--max-num-seqs), and the lane's dispatch limit: at most this many of its requests "
            "are in its engine at once (fewer while the engine's vllm:num_requests_waiting says it queues some), "
            "the rest wait in the launcher's queue, where a switch does not have to drain them",
            "--max-num-seqs", default=16),
    _engine("MAX_NUM_BATCHED_TOKENS", values.parse_positive_int, "tokens per batch", "--max-num-batched-tokens"),
    _engine("ENABLE_PREFIX_CACHING", values.parse_bool, "prefix caching on/off", "--enable-prefix-caching",
            bool_style="toggle"),
    _engine("ENABLE_CHUNKED_PREFILL", values.parse_bool, "chunked prefill on/off", "--enable-chunked-prefill",
            bool_style="toggle"),
    _engine("CPU_OFFLOAD_GB", values.parse_nonnegative_float, "GiB of weights offloaded to CPU memory",
            "--cpu-offload-gb"),
    _engine("QUANTIZATION", _identifier, "quantisation method (awq, gptq, fp8 ...)", "--quantization"),
    _engine("TRUST_REMOTE_CODE", values.parse_bool, "run the model repository's own code", "--trust-remote-code",
            names=["VLLM_TRUST_REMOTE_CODE", "TRANSFORMERS_TRUST_REMOTE_CODE"], bool_style="switch"),
    _engine("TOKENIZER", _str, "tokenizer id or directory (default: the model's)", "--tokenizer"),
    _engine("LOAD_FORMAT", _identifier, "weights format (auto, safetensors, dummy ...)", "--load-format"),
    _engine("ATTENTION_BACKEND", values.pattern_parser(r"[A-Za-z0-9_]+", "a backend name such as TRITON_ATTN"),
            "attention backend (flag on new vLLM, VLLM_ATTENTION_BACKEND on 0.12)", "--attention-backend"),
    _engine("DISTRIBUTED_EXECUTOR_BACKEND", values.choice_parser(EXECUTOR_BACKENDS, "executor"),
            "mp (vLLM's own worker processes; on several machines, vLLM's multi-node followers) or ray "
            "(vLLM's Ray executor); unset: vLLM's choice on one machine, ray for a lane on several",
            "--distributed-executor-backend"),
    _engine("SLEEP_LEVEL", _sleep_level,
            "vLLM sleep mode: 0 off (stop/start); 1 or 2 start the engine with --enable-sleep-mode and "
            "VLLM_SERVER_DEV_MODE=1 and put it to sleep at that level (1: weights kept in host memory, "
            "2: discarded) instead of stopping it; a failed sleep or wake falls back to stop/start"),
    _engine("WARMUP", values.parse_bool,
            "after the engine answers /health and before the lane is ready (and its queue dispatched), send it "
            "a warm-up, so the first user does not pay for kernels compiled on first use: a short chat through "
            "the chat template, plain and streamed; without a template a completion; for a pooling model an "
            "embedding, score, rerank or classify request (the first kind the engine accepts); refused by the "
            "engine: logged, the lane is ready anyway; an engine that dies or does not answer within "
            "VLLM_START_TIMEOUT (spawn to warmed up) failed to start. Off: ready at /health", default=True),
    # agents (docs/agents.md): checked against the installed vLLM's parser registries (config.check_parsers)
    _engine("TOOL_CALL_PARSER", _identifier,
            "vLLM tool-call parser for this model family (hermes, llama3_json, mistral, qwen3_coder ...); turns on "
            "auto tool choice (--enable-auto-tool-choice --tool-call-parser NAME); names added by a "
            "--tool-parser-plugin FILE in EXTRA_ARGS are accepted", "--tool-call-parser"),
    _engine("REASONING_PARSER", _identifier,
            "vLLM reasoning parser for a reasoning model (deepseek_r1, qwen3 ...): its thinking is returned apart "
            "from the answer", "--reasoning-parser"),
    _engine("CHAT_TEMPLATE", lambda raw: _chat_template(raw),
            "chat template for models whose own is missing or lacks tool calls: a Jinja file, or the template "
            "itself", "--chat-template"),
    _engine("ENGINE_STALL_TIMEOUT", values.parse_positive_float,
            "seconds a busy engine (requests in flight) may go without generating a token (vLLM's "
            "vllm:generation_tokens_total on its /metrics) before the watchdog probes it with a one-token "
            "generation on a fresh connection; a probe unanswered within min(60 s, this) declares it hung: "
            "stopped, its unanswered requests back in line, restarted with back-off. Must exceed the longest "
            "prefill expected (no token comes during one): 600 s covers a 131072-token prompt at 220 tokens/s",
            default=600.0),
    _engine("EXTRA_ARGS", values.parse_shell_words, "more vLLM flags, shell-split, appended last",
            names=["VLLM_EXTRA_ARGS", "EXTRA_VLLM_ARGS"]),
    _engine("IDLE_TIMEOUT", values.parse_positive_float, "unload this lane after this many idle seconds",
            lane_only=True),
    _engine("NODES", values.parse_positive_int,
            "machines (Ray cluster nodes) this lane's engine spans; default: as many as its tensor x pipeline "
            "size needs at VLLM_CLUSTER_GPUS per machine (1 when it fits on one); with "
            "DISTRIBUTED_EXECUTOR_BACKEND ray vLLM places its workers, with mp the launcher starts vLLM's "
            "own followers on the other nodes", lane_only=True),
)


def _chat_template(raw: str) -> str:
    """A template file that exists, or the template itself (vLLM takes either)."""
    if "{{" in raw or "{%" in raw:
        return raw
    path = Path(raw.strip()).expanduser()
    if not path.is_file():
        raise ValueError("no such file: give a Jinja chat template file, or the template itself")
    return str(path)


def _nonnegative_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number, 0 or more") from None
    if value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


CLUSTER_ROLES = {"head": "head", "worker": "worker"}
_interface = values.pattern_parser(r"[A-Za-z0-9_.:@\-]{1,15}", "a network interface name such as enp1s0")


def _cluster(key, parse, help, default=None):
    return Setting(key, (f"VLLM_CLUSTER_{key.upper()}",), parse, help, default)


# Ray's ports are fixed so a firewall can open exactly them (CLUSTER_PORT_KEYS, then the worker
# range). Every other Ray listener stays on loopback or is not started (no dashboard, no
# autoscaler monitor); tests/test_cluster.py checks the listening sockets of real nodes.
CLUSTER_SETTINGS: tuple[Setting, ...] = (
    _cluster("role", values.choice_parser(CLUSTER_ROLES, "cluster role"),
             "this machine's part in the cluster: head or worker (unset, and no VLLM_CLUSTER_ADDRESS: no cluster); "
             "`vllm-launcher cluster start` runs it"),
    _cluster("address", _str, "the head's address, host or host:port (default port VLLM_CLUSTER_PORT); "
             "on the head it defaults to its own interface address"),
    _cluster("interface", _interface,
             "network interface of the cluster link: the node's address is its IPv4 address, and NCCL/RCCL "
             "(NCCL_SOCKET_IFNAME) and Gloo (GLOO_SOCKET_IFNAME) traffic uses it"),
    _cluster("token_file", _str, "file holding the cluster's token (Ray token authentication, always on); "
             "the same file content on every machine, never on a command line"),
    _cluster("gpus", _nonnegative_int, "GPUs of this machine that Ray offers to lanes", 1),
    _cluster("cpus", values.parse_positive_int, "CPUs of this machine that Ray offers (default: Ray's, all)"),
    _cluster("object_store_memory", values.parse_byte_size,
             "size of Ray's shared-memory object store on this machine (default: Ray's, 30 % of memory)"),
    _cluster("temp_dir", _str, "Ray's session and log directory on this machine (default: Ray's, /tmp/ray)"),
    _cluster("port", lambda raw: _port(raw), "Ray's GCS port on the head (the address workers join)", 6379),
    _cluster("node_manager_port", lambda raw: _port(raw), "Ray's node manager (raylet) port on every node", 6380),
    _cluster("object_manager_port", lambda raw: _port(raw), "Ray's object manager port on every node", 6381),
    _cluster("agent_grpc_port", lambda raw: _port(raw), "Ray's node agent gRPC (metrics agent) port on every node",
             6382),
    _cluster("agent_http_port", lambda raw: _port(raw), "Ray's node agent HTTP port on every node", 6383),
    _cluster("runtime_env_agent_port", lambda raw: _port(raw), "Ray's runtime environment agent port on every node",
             6384),
    _cluster("metrics_port", lambda raw: _port(raw), "Ray's Prometheus metrics export port on every node", 6385),
    _cluster("min_worker_port", lambda raw: _port(raw), "first port of Ray's worker processes (one port each)",
             10002),
    _cluster("max_worker_port", lambda raw: _port(raw), "last port of Ray's worker processes", 10199),
)
# The fixed ports a firewall between the machines opens, besides min_worker_port..max_worker_port.
CLUSTER_PORT_KEYS = ("port", "node_manager_port", "object_manager_port", "agent_grpc_port", "agent_http_port",
                     "runtime_env_agent_port", "metrics_port")

ENGINE_SETTINGS_BY_KEY = {setting.key: setting for setting in ENGINE_SETTINGS}
SERVER_SETTINGS_BY_KEY = {setting.key: setting for setting in SERVER_SETTINGS}
CLUSTER_SETTINGS_BY_KEY = {setting.key: setting for setting in CLUSTER_SETTINGS}


def defaults(settings: Iterable[Setting]) -> Any:
    """A table's defaults as attributes by key (`defaults(SERVER_SETTINGS).port` is 8000): what the
    configuration's dataclasses take their field defaults from, so each default is written once."""
    return SimpleNamespace(**{setting.key: setting.default for setting in settings})

LANES_VAR = "VLLM_LANES"
DEFAULT_LANE_VAR = "VLLM_DEFAULT_LANE"

# A variable holds a secret when one of these is a whole `_`-separated word of its name
# (VLLM_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY; not TOKENIZER or MAX_NUM_BATCHED_TOKENS),
# unless it ends in _FILE: that names the file holding the secret (VLLM_API_KEY_FILE).
SECRET_WORDS = frozenset({"KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIALS"})
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/?#@\s]+@")
MASK = "***"


def is_secret(name: str) -> bool:
    words = name.upper().split("_")
    return words[-1] != "FILE" and not SECRET_WORDS.isdisjoint(words)


def masked(name: str, value: str) -> str:
    """How a variable's value may be shown anywhere (listings, errors, logs): a secret as ***,
    credentials inside URLs (`http://user:pass@host`) as `http://***@host`."""
    return MASK if is_secret(name) else mask_url_credentials(value)


def mask_url_credentials(text: str) -> str:
    return _URL_CREDENTIALS.sub(MASK + "@", text)


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """Free text (a log line, an engine's output in an error) with the given secret values and
    credentials inside URLs masked."""
    text = mask_url_credentials(text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def lane_var(lane: str, key: str) -> str:
    return f"{LANE_PREFIX}{lane.upper()}_{key}"
