"""`vllm-launcher serve`: logging, the orphan reaper, the router and uvicorn, wired together."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from .config import LauncherConfig
from .logs import setup_logging
from .metrics import Metrics
from .notify import sd_notify
from .reaper import EngineRecords, default_runtime_dir
from .router import Router
from .server import create_app
from .vllm_info import detect

log = logging.getLogger("vllm_launcher.serve")


class _Server(uvicorn.Server):
    """uvicorn, with our shutdown begun at the signal (queued requests answered, lanes drained)
    and a clean exit 0 afterwards instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, router: Router, loop: asyncio.AbstractEventLoop):
        super().__init__(config)
        self.router = router
        self.loop = loop

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        sd_notify("STOPPING=1")
        self.loop.call_soon_threadsafe(self.router.begin_shutdown)


async def _serve(config: LauncherConfig) -> int:
    server_cfg = config.server
    records = EngineRecords(default_runtime_dir(server_cfg.runtime_dir))
    reaped = records.reap_orphans()
    if reaped:
        log.warning("stopped %d engine group(s) left behind by a previous server: %s", len(reaped), reaped)
    vllm = detect(server_cfg.engine_python)
    log.info("vllm-launcher serving lanes %s (default %s) with %s on %s:%d", ", ".join(config.lanes),
             config.default_lane, vllm.describe(), server_cfg.host, server_cfg.port)
    router = Router(config, vllm, Metrics(), records)
    router.state_listeners.append(lambda lane, state, reason: sd_notify(f"STATUS=lane {lane}: {state} ({reason})"))
    app = create_app(config, vllm, router)
    uv_config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_config=None,
                               access_log=False, timeout_graceful_shutdown=server_cfg.drain_timeout + 15,
                               lifespan="on")
    server = _Server(uv_config, router, asyncio.get_running_loop())

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


def run_server(config: LauncherConfig) -> int:
    setup_logging(config.server.log_level, config.server.log_format, config.server.log_directory,
                  config.secret_values())
    return asyncio.run(_serve(config))
