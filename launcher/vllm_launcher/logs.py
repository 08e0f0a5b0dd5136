"""Logging for the launcher and its engines: text or JSON lines on stdout, and with
LOG_DIRECTORY also rotated files (launcher.log, and engine-<lane>.log per lane)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Iterable

from .settings import mask_secrets

ENGINE_LOGGER = "vllm_launcher.engine."
ROTATE_BYTES = 50 * 1024 * 1024
ROTATE_KEEP = 5
_EXTRA_FIELDS = ("lane", "status", "queue_wait", "total", "usage")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.name.startswith(ENGINE_LOGGER):
            data["lane"] = record.name[len(ENGINE_LOGGER):]
        data.update({key: getattr(record, key) for key in _EXTRA_FIELDS if hasattr(record, key)})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


class TextFormatter(logging.Formatter):
    """Engine lines carry their lane: `[coder] INFO ... vLLM says`."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith(ENGINE_LOGGER):
            return f"[{record.name[len(ENGINE_LOGGER):]}] {record.getMessage()}"
        return super().format(record)


class _EngineFiles(logging.Handler):
    """One rotated file per lane for engine output."""

    def __init__(self, directory: Path, formatter: logging.Formatter):
        super().__init__()
        self.directory = directory
        self.files: dict[str, logging.Handler] = {}
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(ENGINE_LOGGER):
            return
        lane = record.name[len(ENGINE_LOGGER):]
        if lane not in self.files:
            handler = logging.handlers.RotatingFileHandler(self.directory / f"engine-{lane}.log",
                                                           maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP)
            handler.setFormatter(self.formatter)
            self.files[lane] = handler
        self.files[lane].emit(record)


class SecretMask(logging.Filter):
    """Masks the configuration's secret values and credentials inside URLs in every line,
    the engines' own output included."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: str, fmt: str, directory: str | None, secrets: Iterable[str] = ()) -> None:
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    mask = SecretMask(secrets)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if directory:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        handlers += [logging.handlers.RotatingFileHandler(path / "launcher.log", maxBytes=ROTATE_BYTES,
                                                          backupCount=ROTATE_KEEP),
                     _EngineFiles(path, formatter)]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(mask)
        root.addHandler(handler)
    # engine lines are logged at INFO whatever the launcher's level: they are vLLM's own output
    logging.getLogger("vllm_launcher.engine").setLevel(logging.INFO)
    # httpx logs every upstream request at INFO: noise (and cost) on the hot path; our own
    # request log (VLLM_LOG_REQUESTS) says what an operator needs
    logging.getLogger("httpx").setLevel(logging.WARNING)
