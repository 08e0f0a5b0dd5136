"""Environment -> LauncherConfig, built once and validated as a whole.

`load_config(os.environ)` either returns a complete configuration or raises ConfigError listing
every problem at once, each naming the variable, the value given and what is accepted.
Nothing here starts a process or touches the network.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import values
from .scheduler import SchedulerSettings
from .settings import (
    CLUSTER_PORT_KEYS,
    CLUSTER_SETTINGS,
    DEFAULT_LANE_VAR,
    ENGINE_SETTINGS,
    ENGINE_SETTINGS_BY_KEY,
    LANE_ENV_INFIX,
    LANE_PREFIX,
    LANES_VAR,
    SERVER_SETTINGS,
    SERVER_SETTINGS_BY_KEY,
    Setting,
    defaults,
    is_secret,
    lane_var,
    mask_secrets,
    masked,
)

LANE_NAME = re.compile(r"[A-Za-z0-9_]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_LANE_NAME = "default"
VLLM_DEFAULT_SHARE = 0.9          # vLLM's --gpu-memory-utilization default (0.12)

# Flags the launcher owns: an engine's address and key are chosen per start, its model and
# names come from the lane settings. EXTRA_ARGS may not set them.
OWNED_FLAGS = ("--host", "--port", "--uds", "--api-key", "--model", "--served-model-name")
# Engine environment names a lane's ENV_ may not set, for the same reason.
OWNED_ENGINE_ENV = frozenset({"VLLM_API_KEY", "VLLM_PORT", "VLLM_HOST_IP", "VLLM_LOGGING_LEVEL"})
# The exit status of every command that refuses its configuration (serve too, for a runtime
# directory the operator must fix first).
CONFIG_EXIT = 2


class ConfigError(Exception):
    """Every problem found in the environment, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# The dataclasses' field defaults are the settings table's (settings.py), read by key: a default is
# written there alone (tests/test_settings_defaults.py holds every field to it).
_SERVER = defaults(SERVER_SETTINGS)
_CLUSTER = defaults(CLUSTER_SETTINGS)


@dataclass(frozen=True)
class ServerConfig:
    host: str = _SERVER.host
    port: int = _SERVER.port
    api_key: str | None = field(default=_SERVER.api_key, repr=False)
    api_key_file: str | None = _SERVER.api_key_file
    log_level: str = _SERVER.log_level
    log_requests: bool = _SERVER.log_requests
    log_format: str = _SERVER.log_format
    log_directory: str | None = _SERVER.log_directory
    build_sha: str = _SERVER.build_sha
    build_time: str = _SERVER.build_time
    engine_python: str = _SERVER.engine_python
    start_timeout: float = _SERVER.start_timeout
    drain_timeout: float = _SERVER.drain_timeout
    stop_timeout: float = _SERVER.stop_timeout
    switch_max_wait: float = _SERVER.switch_max_wait
    queue_max: int = _SERVER.queue_max
    queue_timeout: float = _SERVER.queue_timeout
    max_body_bytes: int = _SERVER.max_body_bytes
    max_connections: int = _SERVER.max_connections
    keepalive_timeout: float = _SERVER.keepalive_timeout
    header_timeout: float = _SERVER.header_timeout
    body_timeout: float = _SERVER.body_timeout
    engine_max_restarts: int = _SERVER.engine_max_restarts
    gpu_memory_budget: float | None = _SERVER.gpu_memory_budget
    gpu_memory_gb: float | None = _SERVER.gpu_memory_gb
    sleep_overhead_gb: float = _SERVER.sleep_overhead_gb
    metrics_require_key: bool = _SERVER.metrics_require_key
    runtime_dir: str | None = _SERVER.runtime_dir

    def public(self) -> dict[str, Any]:
        """The settings as JSON-able data, secrets masked."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {name: masked(name, value) if isinstance(value, str) else value for name, value in data.items()}


@dataclass(frozen=True)
class ClusterConfig:
    """This machine's Ray node and the cluster's head (CLUSTER_SETTINGS). Present in a
    LauncherConfig when VLLM_CLUSTER_ROLE or VLLM_CLUSTER_ADDRESS is set."""

    role: str | None = _CLUSTER.role        # head | worker | None (a machine that only uses the cluster)
    address: str | None = _CLUSTER.address  # the head, host:port; None on the head: its own interface address
    interface: str = field(kw_only=True)    # both required (a configuration that fails to load has "")
    token_file: str = field(kw_only=True)
    gpus: int = _CLUSTER.gpus
    cpus: int | None = _CLUSTER.cpus
    object_store_memory: int | None = _CLUSTER.object_store_memory
    temp_dir: str | None = _CLUSTER.temp_dir
    port: int = _CLUSTER.port
    node_manager_port: int = _CLUSTER.node_manager_port
    object_manager_port: int = _CLUSTER.object_manager_port
    agent_grpc_port: int = _CLUSTER.agent_grpc_port
    agent_http_port: int = _CLUSTER.agent_http_port
    runtime_env_agent_port: int = _CLUSTER.runtime_env_agent_port
    metrics_port: int = _CLUSTER.metrics_port
    min_worker_port: int = _CLUSTER.min_worker_port
    max_worker_port: int = _CLUSTER.max_worker_port

    def fixed_ports(self) -> dict[str, int]:
        """Setting key -> port, the ports a firewall opens besides the worker range."""
        return {key: getattr(self, key) for key in CLUSTER_PORT_KEYS}

    def public(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class LaneConfig:
    name: str
    model: str
    model_is_local: bool
    served_model_name: str
    names: tuple[str, ...]                 # every name a request's `model` may use, served name first
    settings: dict[str, Any]               # resolved engine settings by key (MODEL etc. excluded)
    env: dict[str, str]                    # the lane's own engine environment (VLLM_LANE_<LANE>_ENV_*)
    idle_timeout: float | None = None

    @property
    def gpu_memory_utilization(self) -> float | None:
        return self.settings.get("GPU_MEMORY_UTILIZATION")


@dataclass(frozen=True)
class LauncherConfig:
    server: ServerConfig
    lanes: dict[str, LaneConfig]            # in VLLM_LANES order
    default_lane: str
    environ: dict[str, str] = field(repr=False)   # the environment the configuration was read from
    warnings: tuple[str, ...] = ()
    cluster: ClusterConfig | None = None    # VLLM_CLUSTER_*: None when no cluster is configured

    def lane(self, name: str) -> LaneConfig:
        return self.lanes[name]

    def secret_values(self) -> list[str]:
        """Every secret value the configuration holds, longest first, for free text (logs, an
        engine's output in an error) to mask: see secret_values."""
        return secret_values(self.environ, (self.server.api_key,                  # also from VLLM_API_KEY_FILE
                                            _file_secret(self.cluster.token_file if self.cluster else None)))


def scheduler_settings(server: ServerConfig) -> SchedulerSettings:
    """The scheduler's settings that the environment sets; the rest are the scheduler's own. Its
    defaults equal the table's (tests/test_settings_defaults.py), so a bare SchedulerSettings(),
    as the tests and bench/ build it, is the server's at its defaults."""
    return SchedulerSettings(switch_max_wait=server.switch_max_wait, drain_timeout=server.drain_timeout,
                             queue_max=server.queue_max, queue_timeout=server.queue_timeout,
                             memory_budget=server.gpu_memory_budget, max_restarts=server.engine_max_restarts)


def secret_values(environ: Mapping[str, str], known: tuple[str | None, ...] = ()) -> list[str]:
    """The secrets an environment holds, longest first: the values of variables named as secrets,
    the credentials inside *_PROXY URLs, and `known` ones (a key or token read from a file).
    Masked by value wherever text is shown, whatever variable a value turns up in. Values shorter
    than 4 would mask ordinary text."""
    found = {value.strip() for name, value in environ.items() if is_secret(name)}
    for name, value in environ.items():
        if name.upper().endswith("_PROXY") and "@" in value:
            userinfo = value.partition("://")[2].rpartition("@")[0]
            found.update((userinfo, userinfo.partition(":")[2]))
    found.update(value.strip() for value in known if value)
    return sorted((value for value in found if len(value) >= 4), key=len, reverse=True)


def _file_secret(path: str | None) -> str | None:
    """The secret a file holds (the cluster's token), or None when it cannot be read."""
    try:
        return Path(path).read_text().strip() if path else None
    except (OSError, UnicodeDecodeError):
        return None


def shown(name: str, raw: str) -> str:
    """How a variable's value appears in a message: secrets never appear."""
    return f"{name}={masked(name, raw)!r}"


class _Reader:
    """Reads variables from one environment, collecting problems instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.problems: list[str] = []
        self.known_secrets: list[str | None] = []     # read from files (the API key, the cluster token)

    def error(self) -> ConfigError:
        """Every problem, with every secret masked by value: a secret may turn up in any
        variable (an API key pasted into VLLM_GPU_MEMORY_UTILIZATION), not only a secret's."""
        secrets = secret_values(self.environ, tuple(self.known_secrets))
        return ConfigError([mask_secrets(problem, secrets) for problem in self.problems])

    def first_set(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        for name in names:
            raw = self.environ.get(name)
            if raw is not None and not values.is_unset(raw):
                return name, raw
        return None

    def parse(self, name: str, raw: str, setting: Setting) -> Any:
        try:
            return setting.parse(raw)
        except ValueError as error:
            self.problems.append(f"{shown(name, raw)}: {error}")
            return None

    def setting(self, setting: Setting, names: tuple[str, ...] | None = None) -> Any:
        found = self.first_set(names or setting.names)
        if found is None:
            return setting.default
        return self.parse(*found, setting)


def load_config(environ: Mapping[str, str]) -> LauncherConfig:
    reader = _Reader(environ)
    server = _server_config(reader)
    lane_names = _lane_names(reader)
    default_lane = _default_lane(reader, lane_names)
    overrides = _lane_overrides(reader, lane_names)
    globals_ = {s.key: reader.setting(s) for s in ENGINE_SETTINGS if not s.lane_only}
    lanes = {name: _lane_config(reader, name, globals_, overrides.get(name, {})) for name in lane_names}
    _check_unique_names(reader, lanes)
    _check_budget(reader, server, lanes)
    cluster = _cluster_config(reader)
    if reader.problems:
        raise reader.error()
    return LauncherConfig(server=server, lanes=lanes, default_lane=default_lane,
                          environ=dict(environ), warnings=tuple(_warnings(lanes)), cluster=cluster)


def load_cluster_config(environ: Mapping[str, str], role: str | None = None,
                        address: str | None = None) -> tuple[ClusterConfig, str]:
    """The cluster settings alone, for `vllm-launcher cluster` (a worker machine has no lanes):
    (cluster, engine Python). `role` and `address` (the command's) win over the environment.
    Raises ConfigError listing every problem."""
    overrides = {"VLLM_CLUSTER_ROLE": role, "VLLM_CLUSTER_ADDRESS": address}
    reader = _Reader({**environ, **{name: value for name, value in overrides.items() if value is not None}})
    engine_python = reader.setting(SERVER_SETTINGS_BY_KEY["engine_python"])
    cluster = _cluster_config(reader)
    if cluster is not None and cluster.role is None:
        reader.problems.append("VLLM_CLUSTER_ROLE is unset: set it to head or worker "
                               "(or run `vllm-launcher cluster head` / `cluster join ADDRESS`)")
    if cluster is None:
        reader.problems.append("no cluster configured: set VLLM_CLUSTER_ROLE to head or worker "
                               "(or run `vllm-launcher cluster head` / `cluster join ADDRESS`)")
    if cluster is None or reader.problems:        # no cluster is one of the problems
        raise reader.error()
    return cluster, engine_python


def _cluster_config(reader: _Reader) -> ClusterConfig | None:
    found = {s.key: reader.setting(s) for s in CLUSTER_SETTINGS}
    if found["role"] is None and found["address"] is None:
        return None
    # a value that did not parse is a problem already: its default stands in, and "" for the two
    # required ones (the problems below say they are unset)
    found = {"interface": "", "token_file": "", **{key: value for key, value in found.items() if value is not None}}
    if "address" in found:
        found["address"] = _head_address(reader, found["address"], found.get("port", _CLUSTER.port))
    cluster = ClusterConfig(**found)
    if cluster.token_file:
        reader.known_secrets.append(_file_secret(cluster.token_file))
        unsafe = token_file_problem(cluster.token_file)
        if unsafe:
            reader.problems.append(unsafe)
    if cluster.role == "worker" and cluster.address is None:
        reader.problems.append("VLLM_CLUSTER_ROLE='worker': a worker joins a head; set VLLM_CLUSTER_ADDRESS "
                               "to the head's address (host or host:port)")
    for key in ("interface", "token_file"):
        if reader.first_set((f"VLLM_CLUSTER_{key.upper()}",)) is None:
            reader.problems.append(
                f"VLLM_CLUSTER_{key.upper()} is unset: a cluster needs "
                + ("the network interface of the cluster link (its IPv4 address is the node's address)"
                   if key == "interface" else
                   "the file holding the cluster's token (Ray token authentication is always on)"))
    ports = cluster.fixed_ports()
    seen: dict[int, str] = {}
    for key, port in ports.items():
        name = f"VLLM_CLUSTER_{key.upper()}"
        if port in seen:
            reader.problems.append(f"{name}={port}: the same port as {seen[port]}; each Ray port must differ")
        elif cluster.min_worker_port <= port <= cluster.max_worker_port:
            reader.problems.append(
                f"{name}={port}: inside the worker port range VLLM_CLUSTER_MIN_WORKER_PORT.."
                f"VLLM_CLUSTER_MAX_WORKER_PORT ({cluster.min_worker_port}-{cluster.max_worker_port})")
        seen.setdefault(port, name)
    if cluster.min_worker_port > cluster.max_worker_port:
        reader.problems.append(
            f"VLLM_CLUSTER_MIN_WORKER_PORT={cluster.min_worker_port} is above VLLM_CLUSTER_MAX_WORKER_PORT="
            f"{cluster.max_worker_port}: the worker port range is empty")
    return cluster


def token_file_problem(path: str) -> str | None:
    """Why the cluster's token file must not be used, or None. Anyone holding the token runs code
    on every machine of the cluster: the file must be this user's and closed to others (a file
    that cannot be read at all is reported where the token is needed)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    uid = os.getuid()
    accepted = f"accepted: a file owned by this user (uid {uid}) that no other user can read (chmod 600 {path})"
    if info.st_uid != uid:
        return f"VLLM_CLUSTER_TOKEN_FILE={path!r} is owned by uid {info.st_uid}, not this user; {accepted}"
    if info.st_mode & 0o077:
        return (f"VLLM_CLUSTER_TOKEN_FILE={path!r} is open to other users (mode {stat.S_IMODE(info.st_mode):o}): "
                f"anyone holding the token can run code on every machine of the cluster; {accepted}")
    return None


def _head_address(reader: _Reader, raw: str, default_port: int) -> str:
    """host or host:port (IPv6 as [addr]:port) -> host:port."""
    host, port = raw, str(default_port)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\s/]+)(?::(\d+))?", raw.strip())
    if not match:
        reader.problems.append(f"{shown('VLLM_CLUSTER_ADDRESS', raw)}: must be the head's host or host:port, "
                               "e.g. 192.168.100.1 or 192.168.100.1:6379")
        return raw
    host = match.group(1) or match.group(3)
    port = match.group(2) or match.group(4) or port
    if not 1 <= int(port) <= 65535:
        reader.problems.append(f"{shown('VLLM_CLUSTER_ADDRESS', raw)}: port must be from 1 to 65535")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_config(reader: _Reader) -> ServerConfig:
    found = {s.key: reader.setting(s) for s in SERVER_SETTINGS}
    found = {key: value for key, value in found.items() if value is not None}
    if "api_key" not in found and "api_key_file" in found:
        key = _read_key_file(reader, found["api_key_file"])
        if key:
            found["api_key"] = key
    return ServerConfig(**found)


def _read_key_file(reader: _Reader, path: str) -> str | None:
    try:
        key = Path(path).read_text().strip()
    except OSError as error:
        reader.problems.append(
            f"{shown('VLLM_API_KEY_FILE', path)}: cannot read the key file ({error.strerror or error}); "
            "give a readable file holding the key")
        return None
    if not key:
        reader.problems.append(f"{shown('VLLM_API_KEY_FILE', path)}: the file is empty; it must hold the key")
    reader.known_secrets.append(key)
    return key or None


def _lane_names(reader: _Reader) -> list[str]:
    raw = reader.environ.get(LANES_VAR)
    if raw is None or values.is_unset(raw):
        return [DEFAULT_LANE_NAME]
    names = values.parse_name_list(raw)
    if not names:
        reader.problems.append(f"{LANES_VAR}={raw!r}: must name at least one lane, comma-separated")
    elif len(names) != len(raw.split(",")):
        reader.problems.append(f"{LANES_VAR}={raw!r}: an empty lane name between commas; "
                               "write the lane names separated by single commas")
    seen: dict[str, str] = {}
    for name in names:
        if not LANE_NAME.fullmatch(name):
            reader.problems.append(
                f"{LANES_VAR}={raw!r}: lane name {name!r} must use only letters, digits and '_'")
        elif name.lower() in seen:
            reader.problems.append(
                f"{LANES_VAR}={raw!r}: lanes {seen[name.lower()]!r} and {name!r} are the same name "
                "ignoring case; lane names must be unique")
        else:
            seen[name.lower()] = name
    return list(seen.values()) or [DEFAULT_LANE_NAME]


def _default_lane(reader: _Reader, lanes: list[str]) -> str:
    raw = reader.environ.get(DEFAULT_LANE_VAR)
    if raw is None or values.is_unset(raw):
        return lanes[0]
    by_lower = {lane.lower(): lane for lane in lanes}
    if raw.strip().lower() not in by_lower:
        reader.problems.append(
            f"{DEFAULT_LANE_VAR}={raw!r}: not a lane; must be one of: {', '.join(lanes)} (from {LANES_VAR})")
        return lanes[0]
    return by_lower[raw.strip().lower()]


def _lane_overrides(reader: _Reader, lanes: list[str]) -> dict[str, dict[str, tuple[str, str]]]:
    """VLLM_LANE_<LANE>_<SETTING> variables: lane -> key -> (variable, raw value).

    A key is a setting name or ENV_<NAME>. A variable matching no lane is an error (likely a
    typo), and so is one that splits into lane + setting in two ways.
    """
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for variable in sorted(reader.environ):
        if not variable.startswith(LANE_PREFIX):
            continue
        rest = variable[len(LANE_PREFIX):]
        splits = [(lane, rest[len(lane) + 1:]) for lane in lanes
                  if rest.upper().startswith(lane.upper() + "_")]
        valid = [(lane, key) for lane, key in splits if _is_lane_key(key)]
        raw = reader.environ[variable]
        if len(valid) > 1:
            readings = " and ".join(f"lane {lane!r} setting {key}" for lane, key in valid)
            reader.problems.append(f"{shown(variable, raw)}: ambiguous, reads as {readings}; rename a lane")
        elif valid:
            lane, key = valid[0]
            found.setdefault(lane, {})[key] = (variable, raw)
        elif splits:
            lane, key = splits[0]
            reader.problems.append(
                f"{shown(variable, raw)}: unknown setting {key!r} for lane {lane!r}; accepted: "
                f"{', '.join(s.key for s in ENGINE_SETTINGS)} or ENV_<NAME>")
        else:
            reader.problems.append(
                f"{shown(variable, raw)}: no lane matches (lanes: {', '.join(lanes)}; "
                f"set {LANES_VAR} or fix the name)")
    return found


def _is_lane_key(key: str) -> bool:
    if key.startswith(LANE_ENV_INFIX):
        return bool(ENV_NAME.fullmatch(key[len(LANE_ENV_INFIX):]))
    return key in ENGINE_SETTINGS_BY_KEY


def _lane_config(reader: _Reader, lane: str, globals_: dict[str, Any],
                 overrides: dict[str, tuple[str, str]]) -> LaneConfig:
    resolved = dict(globals_)
    env: dict[str, str] = {}
    for key, (variable, raw) in overrides.items():
        if key.startswith(LANE_ENV_INFIX):
            name = key[len(LANE_ENV_INFIX):]
            if name in OWNED_ENGINE_ENV:
                reader.problems.append(
                    f"{shown(variable, raw)}: {name} is set by the launcher for every engine and cannot be overridden")
            else:
                env[name] = raw
        elif not values.is_unset(raw):            # empty / None inherits the global value
            resolved[key] = reader.parse(variable, raw, ENGINE_SETTINGS_BY_KEY[key])

    model = resolved.pop("MODEL")
    if model is None:
        reader.problems.append(
            f"lane {lane!r} has no model: set VLLM_MODEL (or MODEL_PATH / MODEL_ID) or "
            f"VLLM_LANE_{lane.upper()}_MODEL to a hub id or a local directory")
        model = ""
    model, is_local = _normalise_model(model)
    _check_extra_args(reader, lane, overrides, resolved.get("EXTRA_ARGS"))

    served = resolved.pop("SERVED_MODEL_NAME") or (lane if is_local else model.rstrip("/").rsplit("/", 1)[-1])
    aliases = resolved.pop("ALIASES") or []
    names = tuple(dict.fromkeys(name for name in (served, *aliases, model, lane) if name))
    idle_timeout = resolved.pop("IDLE_TIMEOUT", None)
    _check_nodes(reader, lane, resolved)
    settings = {key: value for key, value in resolved.items() if value is not None}
    return LaneConfig(lane, model, is_local, served, names, settings, env, idle_timeout)


def _check_nodes(reader: _Reader, lane: str, resolved: dict[str, Any]) -> None:
    """NODES machines share the lane's tensor x pipeline GPUs evenly, or vLLM cannot place them."""
    nodes = resolved.get("NODES")
    gpus = (resolved.get("TENSOR_PARALLEL_SIZE") or 1) * (resolved.get("PIPELINE_PARALLEL_SIZE") or 1)
    if nodes and gpus % nodes:
        reader.problems.append(
            f"VLLM_LANE_{lane.upper()}_NODES={nodes}: lane {lane!r} has tensor x pipeline = {gpus} GPU(s), "
            f"which {nodes} machines cannot share evenly; set NODES to a divisor of {gpus}, or raise "
            "TENSOR_PARALLEL_SIZE / PIPELINE_PARALLEL_SIZE")


def _normalise_model(model: str) -> tuple[str, bool]:
    """A local directory or a hub id; a path to a .safetensors file means its directory."""
    if not model:
        return model, False
    local = model.startswith(("/", "./", "../", "~")) or os.path.isdir(model)
    if local:
        path = Path(model).expanduser()
        if path.suffix == ".safetensors":
            path = path.parent
        return str(path), True
    return model, False


def _check_extra_args(reader: _Reader, lane: str, overrides, extra: list[str] | None) -> None:
    for word in extra or []:
        flag = word.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            variable = overrides.get("EXTRA_ARGS", ("VLLM_EXTRA_ARGS",))[0]
            reader.problems.append(
                f"{variable} (lane {lane!r}): {flag} is chosen by the launcher; use the lane settings "
                "(VLLM_MODEL, VLLM_SERVED_MODEL_NAME, VLLM_HOST/VLLM_PORT, VLLM_API_KEY) instead")


def _check_unique_names(reader: _Reader, lanes: dict[str, LaneConfig]) -> None:
    """Served names, aliases and lane names route requests: each must belong to one lane.

    A shared MODEL id (two lanes of one model with other settings) is not an error: it routes
    to the first lane in VLLM_LANES order and `check` reports it.
    """
    owner: dict[str, str] = {}
    for lane in lanes.values():
        explicit = [name for name in lane.names if name != lane.model or name in (lane.served_model_name, lane.name)]
        for name in explicit:
            other = owner.get(name.lower())
            if other and other != lane.name:
                reader.problems.append(
                    f"lanes {other!r} and {lane.name!r} both answer to model name {name!r} "
                    f"(served name, alias or lane name); each name must belong to one lane")
            owner.setdefault(name.lower(), lane.name)


def _check_budget(reader: _Reader, server: ServerConfig, lanes: dict[str, LaneConfig]) -> None:
    """Every lane must fit the shared budget on its own, or it could never start."""
    budget = server.gpu_memory_budget
    if budget is None:
        return
    for lane in lanes.values():
        share = lane.gpu_memory_utilization or VLLM_DEFAULT_SHARE
        if share > budget + 1e-9:
            reader.problems.append(
                f"VLLM_GPU_MEMORY_BUDGET={budget:g}: lane {lane.name!r} alone needs {share:g} "
                f"(its GPU_MEMORY_UTILIZATION{'' if lane.gpu_memory_utilization else ', vLLM default'}); "
                "the budget must be at least the largest lane's share")


def _warnings(lanes: dict[str, LaneConfig]) -> list[str]:
    seen: dict[str, str] = {}
    warnings = []
    for lane in lanes.values():
        if lane.model in seen:
            warnings.append(f"lanes {seen[lane.model]!r} and {lane.name!r} serve the same model "
                            f"{lane.model!r}: that id routes to {seen[lane.model]!r}")
        seen.setdefault(lane.model, lane.name)
    return warnings


# (setting, what vLLM calls it, ParserNames field)
PARSER_SETTINGS = (("TOOL_CALL_PARSER", "tool-call parser", "tool"), ("REASONING_PARSER", "reasoning parser", "reasoning"))


def check_parsers(config: LauncherConfig) -> list[str]:
    """TOOL_CALL_PARSER and REASONING_PARSER against the engine Python's vLLM (its registries, with
    the tool parsers of a lane's --tool-parser-plugin FILE): raises ConfigError naming the choices.
    Only when a lane sets one (reading the registries imports vLLM's parsers; the answer is cached).
    Registries that cannot be read (no vLLM there yet) are warnings, returned: nothing to check against."""
    from .vllm_info import parser_names

    problems, warnings = [], []
    for lane in config.lanes.values():
        if not any(lane.settings.get(key) for key, _, _ in PARSER_SETTINGS):
            continue
        extra = lane.settings.get("EXTRA_ARGS") or []
        plugins = tuple(extra[i + 1] if word == "--tool-parser-plugin" else word.partition("=")[2]
                        for i, word in enumerate(extra)
                        if (word == "--tool-parser-plugin" and i + 1 < len(extra))
                        or word.startswith("--tool-parser-plugin="))
        names = parser_names(config.server.engine_python, plugins)
        for key, what, field_name in PARSER_SETTINGS:
            value = lane.settings.get(key)
            if not value:
                continue
            variable = lane_var(lane.name, key) if lane_var(lane.name, key) in config.environ else f"VLLM_{key}"
            if isinstance(names, str):
                warnings.append(f"{variable}={value!r} not checked: cannot read the {what}s of the engines' vLLM "
                                f"({config.server.engine_python}): {names}")
            elif value not in getattr(names, field_name):
                problems.append(f"{variable}={value!r} (lane {lane.name!r}): not a {what} of the engines' vLLM; "
                                f"accepted: {', '.join(getattr(names, field_name))}")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return list(dict.fromkeys(warnings))


def route_table(config: LauncherConfig) -> dict[str, str]:
    """Model name (lower case) -> lane, first lane wins for a shared MODEL id."""
    table: dict[str, str] = {}
    for lane in config.lanes.values():
        for name in lane.names:
            table.setdefault(name.lower(), lane.name)
    return table
