"""`vllm-launcher serve`: logging, the orphan reaper, the router and uvicorn, wired together."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import uvicorn

from .config import CONFIG_EXIT, LauncherConfig, ServerConfig
from .engines import EngineRecords, default_runtime_dir, sockets_dir
from .engines.process import UnsafeDirectory
from .host_checks import log_host_findings
from .http_app import create_app
from .limits import BodyTimeout, Connections, Limits, connection_cap, protocol_class, raise_open_file_limit
from .logs import setup_logging
from .metrics import Metrics
from .notify import sd_notify
from .router import Router
from .vllm_info import detect

log = logging.getLogger("vllm_launcher.serve")

# uvicorn cancels what is still running this long after the drain bound (a client that does
# not read its stream's end): shutdown ends within VLLM_DRAIN_TIMEOUT + this + the engines' stop.
SHUTDOWN_GRACE = 5.0
# Beyond that: connections closed, each engine's keeper ending what is left of its group (10 s).
SHUTDOWN_MARGIN = 15.0


def shutdown_bound(server: ServerConfig) -> float:
    """The longest a shutdown may take: the drain (VLLM_DRAIN_TIMEOUT), uvicorn's grace, the
    engines' stop (VLLM_STOP_TIMEOUT) and the margin. Told to systemd at the signal
    (EXTEND_TIMEOUT_USEC), so a unit's TimeoutStopSec shorter than this does not SIGKILL the
    server in the middle of a drain the operator configured."""
    return server.drain_timeout + SHUTDOWN_GRACE + server.stop_timeout + SHUTDOWN_MARGIN


class _Server(uvicorn.Server):
    """uvicorn, with our shutdown begun at the signal (queued requests answered, lanes drained)
    and a clean exit 0 afterwards instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, router: Router, connections: Connections,
                 loop: asyncio.AbstractEventLoop):
        super().__init__(config)
        self.router = router
        self.connections = connections
        self.loop = loop

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
        else:
            bound = shutdown_bound(self.router.config.server)
            sd_notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={round(bound * 1e6)}\n"
                      f"STATUS=shutting down: draining for up to {bound:.0f} s")
        self.should_exit = True
        self.loop.call_soon_threadsafe(self.router.begin_shutdown)
        self.loop.call_soon_threadsafe(self.connections.begin_shutdown)


StateListener = Callable[[str, str, str], None]      # (lane, new state, reason), as Router.state_listeners


async def _serve(config: LauncherConfig, state_listeners: Iterable[StateListener] = ()) -> int:
    server_cfg = config.server
    runtime_dir = default_runtime_dir(server_cfg.runtime_dir)
    sockets = sockets_dir(runtime_dir)         # both directories checked before anything is read from them
    records = EngineRecords(runtime_dir)
    reaped = records.reap_orphans()
    if reaped:
        log.warning("stopped %d engine group(s) left behind by a previous server: %s", len(reaped), reaped)
    vllm = detect(server_cfg.engine_python)
    log_host_findings(config, vllm.is_cpu_build)    # `check`'s host checks, as the service user (issue 23)
    log.info("vllm-launcher serving lanes %s (default %s) with %s on %s:%d", ", ".join(config.lanes),
             config.default_lane, vllm.describe(), server_cfg.host, server_cfg.port)
    metrics = Metrics()
    router = Router(config, vllm, metrics, records, sockets=sockets)
    router.state_listeners.append(lambda lane, state, reason: sd_notify(f"STATUS=lane {lane}: {state} ({reason})"))
    router.state_listeners.extend(state_listeners)
    connections = Connections(_limits(config), metrics.registry)
    app = BodyTimeout(create_app(config, vllm, router, metrics), connections)
    # proxy_headers off: nothing here uses the client's address (no access log), and uvicorn's
    # X-Forwarded-For middleware would run on every request
    uv_config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_config=None,
                               access_log=False, lifespan="on", proxy_headers=False, http=protocol_class(connections),
                               # uvicorn annotates these two as int; its timers take the float
                               timeout_keep_alive=connections.limits.keepalive_timeout,  # type: ignore[arg-type]
                               h11_max_incomplete_event_size=connections.limits.max_header_bytes,
                               timeout_graceful_shutdown=server_cfg.drain_timeout + SHUTDOWN_GRACE)  # type: ignore[arg-type]
    server = _Server(uv_config, router, connections, asyncio.get_running_loop())

    async def notify_when_listening() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started:
            sd_notify("READY=1")
            log.info("listening on http://%s:%d", server_cfg.host, server_cfg.port)

    notifier = asyncio.create_task(notify_when_listening())
    await server.serve()
    notifier.cancel()
    return 0 if server.started else 1


def _limits(config: LauncherConfig) -> Limits:
    server_cfg = config.server
    open_files = raise_open_file_limit()
    cap = connection_cap(server_cfg.max_connections, open_files)
    if cap < server_cfg.max_connections:
        log.warning("VLLM_MAX_CONNECTIONS=%d lowered to %d: the open-file limit is %d (raise LimitNOFILE / ulimit -n)",
                    server_cfg.max_connections, cap, open_files)
    return Limits(max_connections=cap, keepalive_timeout=server_cfg.keepalive_timeout,
                  header_timeout=server_cfg.header_timeout, body_timeout=server_cfg.body_timeout)


def _loop_factory():
    """uvloop's event loop (libuv: less CPU per request than asyncio's), when installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_server(config: LauncherConfig, *, quiet_to: Path | None = None,
               state_listeners: Iterable[StateListener] = ()) -> int:
    """Serve until SIGTERM/SIGINT. The demo passes QUIET_TO (engines' output quietly on the
    terminal, whole in that file) and a listener of lane states."""
    setup_logging(config.server.log_level, config.server.log_format, config.server.log_directory,
                  config.secret_values(), quiet_to=quiet_to)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            return runner.run(_serve(config, state_listeners))
        except UnsafeDirectory as error:
            print(f"vllm-launcher: the runtime directory (VLLM_RUNTIME_DIR) is refused: {error}; nothing started",
                  file=sys.stderr, flush=True)
            return CONFIG_EXIT          # as for a configuration error: the operator fixes it first
