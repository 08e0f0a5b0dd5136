"""One lane's engine: the exact argv and environment that start it.

`vllm-launcher config` prints these, `vllm-launcher engine` execs them (on VLLM_HOST:VLLM_PORT) and
the server starts them on a Unix socket of their own (`--uds`, never TCP) with an internal key. The environment is built from an
allow-list, never from a copy of os.environ: the launcher's own variables (VLLM_PORT collides
with vLLM's internal port base, VLLM_API_KEY would lock the proxy out ...) never reach vLLM.
The server cuts each lane's slice of the configuration once (LaneLaunch): its supervisor gets that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import ClusterConfig, LaneConfig, LauncherConfig
from .placement import Placement, cluster_placement
from .settings import CLUSTER_SETTINGS, ENGINE_SETTINGS, LANE_PREFIX, SERVER_SETTINGS, masked
from .vllm_info import VllmInfo

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
# A multi-node lane with the mp executor: its followers run `vllm serve --headless` (the CLI's
# serve command; the API server module has no headless mode), started by FOLLOWERS_SCRIPT.
FOLLOWER_MODULE = "vllm.entrypoints.cli.main"
FOLLOWERS_SCRIPT = Path(__file__).resolve().parent / "engines" / "followers.py"
# A lane on several machines without DISTRIBUTED_EXECUTOR_BACKEND: vLLM's Ray executor, the way
# vLLM's own multi-node guide and the public Strix Halo two-node guide run it.
MULTI_NODE_DEFAULT_EXECUTOR = "ray"

PASSED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
    "PYTHONPATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "NIX_SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY",
    "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "XDG_CACHE_HOME", "CC", "CXX", "VLLM_CACHE_ROOT",
    "DO_NOT_TRACK", "CUDA_VISIBLE_DEVICES",
    # several machines: the Ray cluster (its token's file, never the token) and this node's address
    "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "VLLM_HOST_IP",
})
PASSED_PREFIXES = (
    "ROCM_", "ROCR_", "HIP_", "HSA_", "HCC_", "AMD_", "MIOPEN_", "TRITON_", "TORCH_",
    "TORCHINDUCTOR_", "PYTORCH_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "VLLM_ROCM_",
    "VLLM_CPU_", "OMP_", "KMP_", "MKL_", "LC_", "NCCL_", "RCCL_", "GLOO_",
)
# Names the launcher consumes: never passed on even when a prefix above matches them.
LAUNCHER_NAMES = frozenset(
    name for setting in (*SERVER_SETTINGS, *ENGINE_SETTINGS, *CLUSTER_SETTINGS) for name in setting.names
)
TELEMETRY_OFF = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
                 "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class EngineSpec:
    lane: str
    argv: list[str]
    env: dict[str, str]
    warnings: tuple[str, ...] = ()

    def shown_env(self) -> dict[str, str]:
        """The environment with secrets as ***, for printing."""
        return {name: masked(name, value) for name, value in self.env.items()}


def passed_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value for name, value in environ.items()
        if (name in PASSED_NAMES or name.startswith(PASSED_PREFIXES))
        and name not in LAUNCHER_NAMES and not name.startswith(LANE_PREFIX)
    }


def engine_flags(lane: LaneConfig, vllm: VllmInfo) -> tuple[list[str], dict[str, str], list[str]]:
    """The lane's settings as vLLM flags for this vLLM version, plus environment and warnings."""
    flags: list[str] = []
    env: dict[str, str] = {}
    warnings: list[str] = []
    for setting in ENGINE_SETTINGS:
        value = lane.settings.get(setting.key)
        if value is None or setting.flag is None or setting.key in ("MODEL", "SERVED_MODEL_NAME"):
            continue
        if setting.key == "SWAP_SPACE" and not vllm.accepts_swap_space:
            warnings.append(f"lane {lane.name!r}: SWAP_SPACE is ignored, vLLM {vllm.version} has no --swap-space")
            continue
        if setting.key == "ATTENTION_BACKEND" and not vllm.has_attention_backend_flag:
            env["VLLM_ATTENTION_BACKEND"] = value
            continue
        if setting.key == "TOOL_CALL_PARSER":
            flags.append("--enable-auto-tool-choice")        # the parser is used only with it
        if setting.key == "MAX_NUM_SEQS":
            value += 1      # the dispatch limit is MAX_NUM_SEQS: one more for the stall watchdog's probe
        if setting.bool_style == "switch":
            flags += [setting.flag] if value else []
        elif setting.bool_style == "toggle":
            flags.append(setting.flag if value else "--no-" + setting.flag[2:])
        else:
            flags += [setting.flag, _flag_value(value)]
    return flags, env, warnings


def _flag_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class LaneLaunch:
    """One lane's slice of the configuration, cut once (lane_launch): what starting, warming and
    stopping its engine take, and where it runs. The environment only as engines see it (the
    allow-list), never a copy of it all."""
    lane: LaneConfig
    placement: Placement | None          # the lane on the cluster, computed once; None: this machine alone
    cluster: ClusterConfig | None        # VLLM_CLUSTER_*, for a lane with a placement
    engine_python: str
    log_level: str                       # the engines' VLLM_LOGGING_LEVEL
    start_timeout: float
    stop_timeout: float
    environ: Mapping[str, str] = field(repr=False)          # passed_environment of the server's
    secrets: tuple[str, ...] = field(default=(), repr=False)  # masked wherever its engine's output is shown


def lane_launch(config: LauncherConfig, lane_name: str) -> LaneLaunch:
    placement = cluster_placement(config, lane_name)
    server = config.server
    return LaneLaunch(config.lane(lane_name), placement, config.cluster if placement else None,
                      server.engine_python, server.log_level, server.start_timeout, server.stop_timeout,
                      passed_environment(config.environ), tuple(config.secret_values()))


def build_engine_spec(config: LauncherConfig, lane_name: str, vllm: VllmInfo, *,
                      host: str | None = None, port: int | None = None,
                      api_key: str | None = None, uds: str | None = None,
                      sleep_mode: bool | None = None) -> EngineSpec:
    """argv and env for one lane, as the commands show and run it: without uds/host/port/api_key,
    the user's VLLM_HOST, VLLM_PORT and key, as `vllm-launcher engine` runs it."""
    server = config.server
    listen = uds or (server.host if host is None else host, server.port if port is None else port)
    return engine_spec(lane_launch(config, lane_name), vllm, listen=listen,
                       api_key=server.api_key if api_key is None else api_key, sleep_mode=sleep_mode)


def engine_spec(launch: LaneLaunch, vllm: VllmInfo, *, listen: str | tuple[str, int], api_key: str | None,
                sleep_mode: bool | None = None) -> EngineSpec:
    """argv and env for one lane's engine, listening on LISTEN: a Unix socket's path (`--uds`,
    then --port 0), as the server starts it with its internal key, or (host, port).
    `sleep_mode` (default: the lane's SLEEP_LEVEL > 0) adds --enable-sleep-mode and
    VLLM_SERVER_DEV_MODE=1 (vLLM's /sleep, /wake_up, /is_sleeping; also /collective_rpc: the
    engine's private Unix socket keeps other users out)."""
    lane, placement = launch.lane, launch.placement
    flags, flag_env, warnings = engine_flags(lane, vllm)
    executor = lane.settings.get("DISTRIBUTED_EXECUTOR_BACKEND")
    if placement is not None and executor is None:
        # Unset, vLLM would pick its one-machine mp executor and find too few GPUs here.
        flags += ["--distributed-executor-backend", MULTI_NODE_DEFAULT_EXECUTOR]
    argv = [launch.engine_python, "-m", ENGINE_MODULE,
            "--model", lane.model, "--served-model-name", lane.served_model_name,
            # --port 0 with --uds: vLLM listens on the socket only, and at exit names the process using
            # its --port (default 8000, often the front server's) in a warning; no socket has port 0
            *(["--port", "0", "--uds", listen] if isinstance(listen, str)
              else ["--host", listen[0], "--port", str(listen[1])]),
            *flags, *lane.settings.get("EXTRA_ARGS", [])]
    if sleep_mode is None:
        sleep_mode = bool(lane.settings.get("SLEEP_LEVEL"))
    if sleep_mode:
        argv.insert(argv.index("--served-model-name") + 2, "--enable-sleep-mode")

    if placement is not None and executor == "mp":
        argv = multi_node_argv(launch.engine_python, lane, argv, flags, placement, sleep_mode)

    env = dict(launch.environ)
    env.update(TELEMETRY_OFF)
    env["VLLM_LOGGING_LEVEL"] = launch.log_level
    if lane.model_is_local:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(flag_env)
    env.update(lane.env)
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if api_key:
        env["VLLM_API_KEY"] = api_key      # the engine's key: in its environment, never on argv
    return EngineSpec(lane.name, argv, env, tuple(warnings))


def multi_node_argv(python: str, lane: LaneConfig, leader_argv: list[str], flags: list[str],
                    placement: Placement, sleep_mode: bool) -> list[str]:
    """vLLM's own multi-node executor: engines/followers.py runs the leader (this argv, rank 0)
    here and, through Ray, a headless follower on each of the other nodes; it adds --nnodes,
    --node-rank, --master-addr (VLLM_HOST_IP) and a free --master-port when it starts them."""
    follower_args = ["-m", FOLLOWER_MODULE, "serve", lane.model, "--headless",
                     *(["--enable-sleep-mode"] if sleep_mode else []),
                     *flags, *lane.settings.get("EXTRA_ARGS", [])]
    spec = {"nodes": placement.nodes, "gpus_per_node": placement.per_node, "follower_args": follower_args}
    return [python, "-P", str(FOLLOWERS_SCRIPT), json.dumps(spec, separators=(",", ":")), "--", *leader_argv]
