"""Logging for the launcher and its engines: text or JSON lines on stdout, and with
LOG_DIRECTORY also rotated files (launcher.log, and engine-<lane>.log per lane). `serve` passes
every engine line on (for the journal); the demo's terminal shows them quietly (QuietTerminal),
the whole output going to a file it names."""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROCESS = re.compile(r"\A\([\w.:-]+ pid=\d+\) ?")          # vLLM's "(APIServer pid=12) " before each line
# vLLM's "WARNING 12-07 22:21:11 [file.py:12] ...", uvicorn's "INFO:     ..."
_LEVEL = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL)(?::| (?:\d\d-\d\d [\d:]{8} )?)")
_VLLM_TIME = re.compile(r"\A(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:]{8} ")
_WARNING_START = re.compile(r"\[\w+\] (WARNING |\[W\d{4} )")      # a compacted engine warning line
_C10_LEVEL = re.compile(r"\[([IWEF])\d{4} [\d:.]+ ")          # torch's C++ "[W1207 22:49:08.64 utils.cpp:68] ..."
_C10_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
# warnings.warn's "file.py:12: FutureWarning: ...": those for programmers (the code calling a
# deprecated API) are not shown
_PYTHON_WARNING = re.compile(r"\S+\.py:\d+: (\w*Warning): ")
_PROGRAMMERS_WARNINGS = frozenset({"DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"})
_SHOWN_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
# What every engine's exit prints: the resource tracker's count of what killed processes held,
# and the leak report of triton's nanobind bindings (xgrammar's on vLLM 0.12): objects still
# alive when the interpreter ends, harmless. A crash is told by the launcher's own line.
_EXIT_NOISE = re.compile(r"resource_tracker: |nanobind: ")
# Set (engines/process.py) while an engine's line is relayed after the launcher began stopping it:
# how vLLM then ends (its "[shutdown]" steps, force-killing its EngineCore at once, the
# EngineDeadError traceback its abort mode may print) is for the log file, not the demo's
# terminal; a stop that fails is the launcher's own error line.
ENGINE_STOPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("engine_stopping", default=False)


def compact_engine_line(line: str) -> str:
    """LINE without colours, vLLM's "(APIServer pid=12) " and its "12-07 22:21:11 " after the level."""
    text = _PROCESS.sub("", _ANSI.sub("", line), count=1)
    return _VLLM_TIME.sub(r"\1 ", text, count=1)


class QuietTerminal(logging.Filter):
    """The demo's terminal: the launcher's lines (without uvicorn's and the host checks' INFO), and
    of the engines' output only what asks for a reader: warnings, errors and tracebacks, each
    with the lines that continue it (a traceback's frames, a multi-line message), a warning
    once however many engines and processes print it. The rest (vLLM's INFO, its ~50 `Route:`
    lines per start, the exit noise above, an engine's end after the launcher stopped it) stays
    in the whole log. A dying engine's last lines
    come in the launcher's own error line (supervisor: "exited ...; last lines")."""

    def __init__(self) -> None:
        super().__init__()
        self._showing: dict[str, bool] = {}       # per engine logger: inside a shown message
        self._warned: set[str] = set()            # warnings shown, by their text without time or pid

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(ENGINE_LOGGER):
            return self.shown(record.name, record.getMessage())
        quiet = record.name.startswith("uvicorn") or record.name == "vllm_launcher.host"
        return not quiet or record.levelno >= logging.WARNING

    def shown(self, source: str, line: str) -> bool:
        text = _PROCESS.sub("", _ANSI.sub("", line), count=1)
        level = _LEVEL.match(text) or _C10_LEVEL.match(text)
        python_warning = _PYTHON_WARNING.search(text)
        if ENGINE_STOPPING.get() or _EXIT_NOISE.search(text):
            show = False
        elif level:
            name = _C10_LEVELS.get(level.group(1), level.group(1))
            show = name in _SHOWN_LEVELS and (name != "WARNING" or self._first(text[level.end():]))
        elif python_warning:
            show = python_warning.group(1) not in _PROGRAMMERS_WARNINGS and self._first(text)
        elif text.startswith("Traceback (most recent call last)"):
            show = True
        else:                                   # no level of its own: continues the message before it
            return self._showing.get(source, False)
        self._showing[source] = show
        return show

    def _first(self, warning: str) -> bool:
        if warning in self._warned:
            return False
        self._warned.add(warning)
        return True


def terminal_width(stream) -> int | None:
    """The columns of the terminal STREAM writes to; None when it is not a terminal (a pipe, a file)."""
    try:
        fd = stream.fileno()
        return os.get_terminal_size(fd).columns if os.isatty(fd) else None
    except (OSError, ValueError, AttributeError):         # io.UnsupportedOperation: a StringIO
        return None


class QuietFormatter(TextFormatter):
    """The demo's terminal: the time and the message; engine lines without colours, vLLM's
    process prefix and its time; an engine's warning cut to the terminal's width (one row each:
    vLLM's run to 250 characters; the log file has them whole). Errors are never cut."""

    def __init__(self, width: Callable[[], int | None] = lambda: None) -> None:
        logging.Formatter.__init__(self, "%(asctime)s %(message)s", "%H:%M:%S")
        self.width = width

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith(ENGINE_LOGGER):
            text = f"[{record.name[len(ENGINE_LOGGER):]}] {compact_engine_line(record.getMessage())}"
            width = self.width()
            warning = _WARNING_START.match(text)
            return text[:width - 1] + "…" if warning and width and len(text) > width else text
        text = super().format(record)
        if record.levelno != logging.INFO:
            text = text.replace(" ", f" {record.levelname} ", 1)
        return text


def setup_logging(level: str, fmt: str, directory: str | None, secrets: Iterable[str] = (),
                  quiet_to: Path | None = None) -> None:
    """Logging for `serve`. With QUIET_TO (the demo): the terminal shows engines' output quietly
    (QuietTerminal, QuietFormatter), and the file QUIET_TO (rewritten) gets every line, in text."""
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    mask = SecretMask(secrets)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    terminal = logging.StreamHandler()
    handlers: list[logging.Handler] = [terminal]
    if quiet_to is not None:
        terminal.addFilter(QuietTerminal())
        quiet_to.parent.mkdir(parents=True, exist_ok=True)
        full = logging.FileHandler(quiet_to, mode="w")
        full.setFormatter(TextFormatter())
        full.addFilter(mask)
        root.addHandler(full)
    if directory:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        handlers += [logging.handlers.RotatingFileHandler(path / "launcher.log", maxBytes=ROTATE_BYTES,
                                                          backupCount=ROTATE_KEEP),
                     _EngineFiles(path, formatter)]
    for handler in handlers:
        quiet = handler is terminal and quiet_to is not None
        handler.setFormatter(QuietFormatter(lambda: terminal_width(terminal.stream)) if quiet else formatter)
        handler.addFilter(mask)
        root.addHandler(handler)
    # engine lines are logged at INFO whatever the launcher's level: they are vLLM's own output
    logging.getLogger("vllm_launcher.engine").setLevel(logging.INFO)
    # httpx logs every upstream request at INFO: noise (and cost) on the hot path; our own
    # request log (VLLM_LOG_REQUESTS) says what an operator needs
    logging.getLogger("httpx").setLevel(logging.WARNING)
