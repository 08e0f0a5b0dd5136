"""The `vllm-launcher` command: every way of running this project ends here."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import click

from . import __version__
from .artifacts import artifacts
from .config import CONFIG_EXIT, ConfigError, LauncherConfig, check_parsers, load_config
from .demo_models import DEFAULT_LANES, demo_models_command, write_demo_models
from .engine_command import build_engine_spec, engine_spec, lane_launch
from .engines import default_runtime_dir
from .memory_plan import memory_plan
from .settings import (
    CLUSTER_SETTINGS,
    DEFAULT_LANE_VAR,
    ENGINE_SETTINGS,
    LANES_VAR,
    SERVER_SETTINGS,
    lane_var,
    mask_secrets,
)
from .vllm_info import detect


def load_or_exit(overrides: Mapping[str, str | None] | None = None) -> LauncherConfig:
    """The configuration from the environment (CLI options win), or every problem and exit 2."""
    environ = dict(os.environ)
    environ.update({name: value for name, value in (overrides or {}).items() if value is not None})
    try:
        config = load_config(environ)
        unchecked = check_parsers(config)       # against the engines' vLLM: only when a lane names a parser
    except ConfigError as error:
        click.echo(f"vllm-launcher: {len(error.problems)} configuration problem(s), nothing started:", err=True)
        for problem in error.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(CONFIG_EXIT)
    for warning in (*config.warnings, *unchecked):
        click.echo(f"vllm-launcher: warning: {warning}", err=True)
    return config


def _pick_lane(config: LauncherConfig, lane: str | None) -> str:
    if lane is None:
        return config.default_lane
    by_lower = {name.lower(): name for name in config.lanes}
    if lane.lower() not in by_lower:
        click.echo(f"vllm-launcher: LANE {lane!r} is not a lane; lanes: {', '.join(config.lanes)} "
                   f"(from {LANES_VAR})", err=True)
        sys.exit(CONFIG_EXIT)
    return by_lower[lane.lower()]


def env_help(key: str) -> str:
    setting = next(s for s in SERVER_SETTINGS if s.key == key)
    default = f"; default {setting.default}" if setting.default is not None else ""
    return f"{setting.help} [env: {', '.join(setting.names)}{default}]"


def _settings_reference() -> str:
    lines = ["Server-wide variables:"]
    for s in SERVER_SETTINGS:
        default = "" if s.default is None else f" [{s.default}]"
        lines.append(f"  {' or '.join(s.names)}{default}: {s.help}")
    lines += ["", f"Lanes: {LANES_VAR} (comma list; unset: one lane 'default'), {DEFAULT_LANE_VAR} [first lane].",
              "Engine settings: the global name is the default for every lane; "
              f"{lane_var('<lane>', '<SETTING>')} overrides it for one lane;",
              f"{lane_var('<lane>', 'ENV_<NAME>')} sets engine environment variable NAME for one lane.", ""]
    for s in ENGINE_SETTINGS:
        names = f"{lane_var('<lane>', s.key)} only" if s.lane_only else " or ".join(s.names)
        flag = f" -> {s.flag}" if s.flag else ""
        lines.append(f"  {s.key}: {names}{flag}: {s.help}")
    lines += ["", "Cluster (several machines, `vllm-launcher cluster`; a cluster is configured when "
              "VLLM_CLUSTER_ROLE or VLLM_CLUSTER_ADDRESS is set):"]
    for s in CLUSTER_SETTINGS:
        default = "" if s.default is None else f" [{s.default}]"
        lines.append(f"  {s.env}{default}: {s.help}")
    lines += ["", "Values None, null and the empty string mean unset. Booleans: 1/0, true/false, yes/no, on/off."]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="vllm-launcher")
def main() -> None:
    """Run vLLM engines from environment variables, and serve several model lanes behind one
    OpenAI-compatible endpoint, loading the right engine on demand.

    Configuration comes from the environment (see `vllm-launcher settings`); bad configuration
    exits with status 2 and lists every problem before anything starts.
    """


@main.command()
def settings() -> None:
    """Print every environment variable the launcher reads, with defaults."""
    click.echo(_settings_reference())


def lane_config_json(config: LauncherConfig, lane_name: str, vllm) -> dict:
    lane = config.lane(lane_name)
    spec = build_engine_spec(config, lane_name, vllm)
    socket = default_runtime_dir(config.server.runtime_dir) / "sockets" / "<start>.sock"
    return {
        "model": lane.model,
        "served_model_name": lane.served_model_name,
        "names": list(lane.names),
        "argv": spec.argv,
        # what `serve` starts: a Unix socket per start (a fresh name each time), never TCP
        "serve_argv": build_engine_spec(config, lane_name, vllm, uds=str(socket)).argv,
        "env": spec.shown_env(),
        "memory_plan": memory_plan(lane, config.server.gpu_memory_gb),
        "idle_timeout": lane.idle_timeout,
        "warnings": list(spec.warnings),
    }


@main.command()
@click.argument("lane", required=False)
@click.option("--format", "fmt", type=click.Choice(["json", "env", "argv"]), default="json", show_default=True,
              help="json: the whole resolved configuration; env: each lane's engine environment as NAME=value "
                   "lines; argv: each lane's engine command line, shell-quoted.")
def config(lane: str | None, fmt: str) -> None:
    """Print the resolved configuration: what each lane's engine would run, with which environment.

    With LANE, that lane only. Secrets show as ***. `argv` and `env` are exactly what
    `vllm-launcher engine LANE` runs (on VLLM_HOST:VLLM_PORT); the json's `serve_argv` is what
    `serve` starts instead: the engine on a Unix socket of the runtime directory (`--uds`).
    """
    cfg = load_or_exit()
    lanes = [_pick_lane(cfg, lane)] if lane else list(cfg.lanes)
    vllm = detect(cfg.server.engine_python)
    # masked by value as well as by name: a secret may sit in any variable (a key pasted into
    # VLLM_LANE_X_SERVED_MODEL_NAME), and the listing is what people paste into bug reports
    secrets = cfg.secret_values()

    def echo(text: str) -> None:
        click.echo(mask_secrets(text, secrets))

    if fmt == "json":
        data = {"server": cfg.server.public(), "default_lane": cfg.default_lane,
                "vllm": {"distribution": vllm.distribution, "version": vllm.version},
                "lanes": {name: lane_config_json(cfg, name, vllm) for name in lanes},
                "cluster": cfg.cluster.public() if cfg.cluster else None}
        echo(json.dumps(data, indent=2))
        return
    for name in lanes:
        spec = build_engine_spec(cfg, name, vllm)
        if len(lanes) > 1:
            echo(f"# lane {name}")
        if fmt == "env":
            for key, value in sorted(spec.shown_env().items()):
                echo(f"{key}={shlex.quote(value)}")
        else:
            echo(shlex.join(spec.argv))


@main.command()
@click.argument("lane", required=False)
def engine(lane: str | None) -> None:
    """Run one lane's engine in the foreground on VLLM_HOST:VLLM_PORT (default lane without LANE).

    The launcher process is replaced by vLLM, so signals reach vLLM directly. The user's API key,
    when set, protects the engine through its environment (never its command line).
    """
    cfg = load_or_exit()
    lane = _pick_lane(cfg, lane)
    launch = lane_launch(cfg, lane)                     # its placement, computed once
    server = cfg.server
    spec = engine_spec(launch, detect(server.engine_python), listen=(server.host, server.port),
                       api_key=server.api_key)
    if launch.cluster is not None:                      # a multi-node lane: the cluster's environment
        from .cluster import engine_cluster_environment
        spec.env.update(engine_cluster_environment(launch.cluster, cfg.environ))
    for warning in spec.warnings:
        click.echo(f"vllm-launcher: warning: {warning}", err=True)
    click.echo(f"vllm-launcher: exec {shlex.join(spec.argv)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(spec.argv[0], spec.argv, spec.env)


@main.command()
def check() -> None:
    """Preflight: vLLM importable, the host (GPU devices, gfx target, GTT limit against the lanes,
    IOMMU, kernel and CWSR, MES firmware), model directories, known-bad ROCm settings, memory plan.

    Prints one line per finding; exits 1 when any finding is a failure.
    """
    from .preflight import run_checks

    cfg = load_or_exit()
    findings = run_checks(cfg)
    for finding in findings:
        click.echo(finding.line())
    failed = sum(f.level == "fail" for f in findings)
    click.echo(f"{failed} failure(s), {sum(f.level == 'warn' for f in findings)} warning(s)")
    sys.exit(1 if failed else 0)


main.add_command(artifacts)
main.add_command(demo_models_command)


def _cluster_or_exit(role: str | None = None, address: str | None = None):
    from .config import load_cluster_config

    try:
        return load_cluster_config(os.environ, role=role, address=address)
    except ConfigError as error:
        click.echo(f"vllm-launcher: {len(error.problems)} configuration problem(s), nothing started:", err=True)
        for problem in error.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(CONFIG_EXIT)


def _run_node(role: str, address: str | None = None) -> None:
    from .cluster import ClusterError, main_say, run_node

    node, python = _cluster_or_exit(role, address)
    try:
        sys.exit(run_node(node, python, os.environ, say=main_say))
    except ClusterError as error:
        main_say(f"error: {error}")
        sys.exit(1)


@main.group()
def cluster() -> None:
    """This machine's node of a Ray cluster, for lanes that span several machines.

    The node runs in the foreground (for systemd and containers) from the engines' Python
    (VLLM_ENGINE_PYTHON), with its address from VLLM_CLUSTER_INTERFACE, Ray's fixed ports
    (VLLM_CLUSTER_*_PORT), VLLM_CLUSTER_GPUS GPUs, usage statistics off and Ray's token
    authentication on (the token from VLLM_CLUSTER_TOKEN_FILE). SIGTERM or SIGINT stop it and
    every process it started. See `vllm-launcher settings` for the VLLM_CLUSTER_* variables.
    """


@cluster.command()
def head() -> None:
    """Start this machine's node as the cluster's head (GCS on VLLM_CLUSTER_PORT)."""
    _run_node("head")


@cluster.command()
@click.argument("address", required=False)
def join(address: str | None) -> None:
    """Join the cluster whose head is at ADDRESS (host or host:port; default VLLM_CLUSTER_ADDRESS).

    The head must accept this machine's token first: a refused token or an unreachable head
    (waited for up to 60 s) ends with status 1 and no Ray process started.
    """
    _run_node("worker", address)


@cluster.command()
def start() -> None:
    """Start this machine's node in the role VLLM_CLUSTER_ROLE says (head, or worker joining
    VLLM_CLUSTER_ADDRESS): what a service unit or a container runs."""
    node, _ = _cluster_or_exit()
    _run_node(node.role, node.address)


@cluster.command()
@click.option("--json", "as_json", is_flag=True, help="print the cluster as JSON")
def status(as_json: bool) -> None:
    """Print the cluster's nodes and their GPUs, as the head knows them (asked with the token).

    Exits 1 when the head cannot be asked (unreachable, token refused)."""
    from .cluster import ClusterError, check_token_file, query_cluster, status_lines
    from .config import load_cluster_config

    environ = dict(os.environ)
    environ.setdefault("VLLM_CLUSTER_ROLE", "worker" if environ.get("VLLM_CLUSTER_ADDRESS") else "head")
    try:
        node, python = load_cluster_config(environ)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(f"vllm-launcher: {problem}", err=True)
        sys.exit(CONFIG_EXIT)
    try:
        check_token_file(node.token_file)
        state = query_cluster(node, python, environ)
    except ClusterError as error:
        click.echo(f"vllm-launcher cluster: error: {error}", err=True)
        sys.exit(1)
    click.echo(json.dumps(state.public(), indent=2) if as_json else "\n".join(status_lines(state)))


@cluster.command("new-token")
@click.argument("file", type=click.Path(dir_okay=False))
def new_token(file: str) -> None:
    """Write a new random cluster token to FILE (mode 0600; an existing file is kept). Copy the
    same file to every machine and point VLLM_CLUSTER_TOKEN_FILE at it."""
    from .cluster import new_token_file

    try:
        new_token_file(file)
    except FileExistsError:
        click.echo(f"vllm-launcher: {file} exists; it is left as it is", err=True)
        sys.exit(1)
    click.echo(f"wrote a new cluster token to {file} (mode 0600)")


@main.command()
@click.option("--host", help=env_help("host"))
@click.option("--port", type=int, help=env_help("port"))
def serve(host: str | None, port: int | None) -> None:
    """Serve every lane behind one OpenAI-compatible endpoint, loading engines on demand.

    The default lane (VLLM_DEFAULT_LANE) is loaded at start-up; a request for another lane
    waits while the server switches (see VLLM_SWITCH_MAX_WAIT). SIGTERM/SIGINT: stop
    accepting, let in-flight requests finish (VLLM_DRAIN_TIMEOUT), answer queued ones 503,
    stop every engine's process group, exit 0.
    """
    from .serve import run_server

    cfg = load_or_exit({"VLLM_HOST": host, "VLLM_PORT": None if port is None else str(port)})
    sys.exit(run_server(cfg))


DEMO_ENV = {
    # tiny CPU lanes: eager mode starts in about half the time; bf16 with eager crashes on AMX CPUs
    "VLLM_ENFORCE_EAGER": "true", "VLLM_DTYPE": "float32", "VLLM_MAX_MODEL_LEN": "512",
    "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_HOST": "127.0.0.1", "VLLM_PORT": "8000",
}


def demo_try_lines(url: str, lane: str, lanes: tuple[str, ...], python: str | None) -> str:
    """What the demo prints once LANE is ready: requests to paste into another terminal."""
    other = next((name for name in lanes if name != lane), lane)
    json_header = "-H 'Content-Type: application/json'"
    lines = [f"Lane {lane} is ready. Try, from another terminal:",
             f"  curl -s {url}/v1/chat/completions {json_header} \\",
             f"    -d '{{\"model\": \"{lane}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
             f"\"max_tokens\": 16}}'",
             f"  curl -sN {url}/v1/completions {json_header} \\",
             f"    -d '{{\"model\": \"{other}\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32, "
             f"\"stream\": true}}'",
             f"  curl -s {url}/lanes"]
    if python:
        lines += [f"  OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY=- {python} -c \\",
                  f"    'import openai; print(openai.OpenAI().completions.create(model=\"{lane}\", prompt=\"Hi\")"
                  ".choices[0].text)'"]
    lines.append(f"A request for {other} switches lanes (its engine starts, 20-60 s). Stop with Ctrl-C.")
    return "\n".join(lines)


def _shown_python() -> str | None:
    """This Python, as a newcomer in the checkout would type it, when it has the openai client."""
    import importlib.util

    if importlib.util.find_spec("openai") is None:
        return None
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable


@main.command()
@click.option("--dir", "directory", default=".demo", show_default=True, type=click.Path(file_okay=False),
              help="where the tiny models, the compile cache and demo.log live (reused by later runs)")
@click.option("--port", type=int, help="port of the front server [default 8000, or VLLM_PORT]")
def demo(directory: str, port: int | None) -> None:
    """Two tiny random-weight model lanes (alpha, beta) served by the installed vLLM.

    Makes the models once (no download), then runs `vllm-launcher serve` on 127.0.0.1:8000 and,
    once the first lane is ready, prints requests to try. The terminal shows the launcher's lines
    and the engines' warnings and errors; DIR/demo.log has everything.
    Variables already set in the environment win over the demo's defaults.
    """
    root = Path(directory).resolve()
    click.echo(f"vllm-launcher demo: tiny models in {root / 'models'} (made once, reused later)")
    models = write_demo_models(root / "models", DEFAULT_LANES)
    env = {**DEMO_ENV, "VLLM_LANES": ",".join(DEFAULT_LANES), "VLLM_CACHE_ROOT": str(root / "cache")}
    env.update({f"VLLM_LANE_{lane.upper()}_MODEL": str(path) for lane, path in models.items()})
    for name, value in env.items():
        os.environ.setdefault(name, value)
    if port is not None:
        os.environ["VLLM_PORT"] = str(port)
    cfg = load_or_exit()
    url = f"http://127.0.0.1:{cfg.server.port}"
    log_file = root / "demo.log"
    shown_log = os.path.relpath(log_file) if not os.path.relpath(log_file).startswith("..") else str(log_file)
    click.echo(f"Lanes {', '.join(cfg.lanes)} on {url}; {cfg.default_lane}'s engine starts now (20-60 s).\n"
               f"Engines' whole output: {shown_log}; here, their warnings and errors only.")
    announced = False

    def announce(lane: str, state: str, reason: str) -> None:
        nonlocal announced
        if announced:
            return
        if state == "ready":
            announced = True
            click.echo(demo_try_lines(url, lane, tuple(cfg.lanes), _shown_python()))
        elif state == "failed":
            announced = True
            click.echo(f"vllm-launcher demo: lane {lane} failed to start ({reason}); the whole engine output is "
                       f"in {shown_log}")
    from .serve import run_server

    sys.exit(run_server(cfg, quiet_to=log_file, state_listeners=[announce]))
