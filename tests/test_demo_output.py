"""`vllm-launcher demo`'s terminal (issue 20, the newcomer's path): the engines' output quietly
(the launcher's lines, the engines' warnings, errors and tracebacks; everything in the log file the
demo names), and the requests to try printed once the first lane is ready, not before. `serve`
passes every engine line on."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
import signal
import sys

import pytest

from serving import processes_with_tmpdir, start_server
from vllm_launcher.demo_models import MARKER_FILE, _marker_content
from vllm_launcher.engine_command import EngineSpec
from vllm_launcher.engines.process import EngineProcess
from vllm_launcher.logs import ENGINE_STOPPING, QuietFormatter, QuietTerminal, compact_engine_line, setup_logging
from waiting import eventually_async

ESC = "\x1b"
PREFIX = f"{ESC}[0;36m(APIServer pid=26890){ESC}[0;0m "     # as vLLM colours it, through a pipe too
CORE = "(EngineCore_DP0 pid=26901) "

# (line, shown on the demo's terminal), in order: lines without a level continue the one before
ENGINE_OUTPUT = [
    (f"{PREFIX}INFO 12-07 22:21:11 [api_server.py:1520] Supported tasks: ['generate']", False),
    (f"{PREFIX}INFO 12-07 22:21:11 [launcher.py:46] Route: /v1/chat/completions, Methods: POST", False),
    (f"{PREFIX}INFO:     Started server process [26890]", False),
    ("fake engine pid 12 pgid 12 for alpha on socket /run/x.sock", False),       # no level, after INFO: hidden
    (f"{PREFIX}WARNING 12-07 22:21:12 [arg_utils.py:1700] The model has a long context length", True),
    (f"{PREFIX}  which this line continues", True),
    (f"{PREFIX}DEBUG 12-07 22:21:12 [x.py:1] detail", False),
    # the same warning from another process of the engine, at another time: shown once
    (f"{CORE}WARNING 12-07 22:21:14 [arg_utils.py:1700] The model has a long context length", False),
    (f"{CORE}  which this line continues", False),
    ("[W1207 22:49:08.642280242 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy", True),   # torch's C++
    ("[I1207 22:49:08.642280242 utils.cpp:70] something routine", False),
    # Python warnings: for programmers (deprecations) hidden, others shown
    ("/venv/lib/python3.11/site-packages/torch/x.py:12: FutureWarning: `foo` is deprecated", False),
    ("  warnings.warn(", False),
    ("/venv/lib/python3.11/site-packages/vllm/y.py:3: UserWarning: the tokenizer has no pad token", True),
    ("  warnings.warn(", True),
    (f"{CORE}ERROR 12-07 22:21:13 [core.py:708] EngineCore failed to start.", True),
    (f"{CORE}Traceback (most recent call last):", True),
    (f'{CORE}  File "/venv/lib/python3.11/site-packages/vllm/v1/engine/core.py", line 699, in run', True),
    (f"{CORE}ValueError: head_size 80 is not supported", True),
    (f"{PREFIX}INFO:     Shutting down", False),
    ("Traceback (most recent call last):", True),                   # a bare one (no logger): shown too
    ('  File "<string>", line 1, in <module>', True),
    ("RuntimeError: boom", True),
    # what every engine's exit prints
    ("nanobind: leaked 87 instances!", False),                     # triton's bindings at exit
    (' - leaked instance 0x7f3c of type "triton._C.libtriton.ir.context"', False),
    ("nanobind: this is likely caused by a reference counting issue in the binding code.", False),
    ("See https://nanobind.readthedocs.io/en/latest/refleaks.html/usr/lib/python3.11/multiprocessing/"
     "resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 1 leaked semaphore objects", False),
    ("  warnings.warn('resource_tracker: There appear to be %d '", False),
    (f"{PREFIX}CRITICAL 12-07 22:21:15 [x.py:1] the end", True),
]


def test_quiet_terminal_shows_warnings_once_errors_and_tracebacks_with_their_continuations():
    quiet = QuietTerminal()
    shown = [quiet.shown("vllm_launcher.engine.alpha", line) for line, _ in ENGINE_OUTPUT]
    wrong = [(line, want) for (line, want), got in zip(ENGINE_OUTPUT, shown, strict=True) if got != want]
    assert not wrong, wrong
    # on the terminal: without colours, process prefix and vLLM's time; a frame keeps its indent
    assert compact_engine_line(ENGINE_OUTPUT[4][0]) == "WARNING [arg_utils.py:1700] The model has a long context length"
    assert compact_engine_line(f'{CORE}  File "core.py", line 699') == '  File "core.py", line 699'


def test_quiet_terminal_follows_each_engine_on_its_own():
    quiet = QuietTerminal()
    assert quiet.shown("vllm_launcher.engine.alpha", f"{CORE}ERROR 12-07 22:21:13 [core.py:708] failed")
    assert not quiet.shown("vllm_launcher.engine.beta", f"{PREFIX}INFO 12-07 22:21:13 [x.py:1] fine")
    # each continuation goes with its own engine's last message
    assert quiet.shown("vllm_launcher.engine.alpha", "  a traceback frame")
    assert not quiet.shown("vllm_launcher.engine.beta", "  a continuation of INFO")


def test_an_engines_end_after_the_launcher_stopped_it_stays_off_the_terminal():
    quiet = QuietTerminal()

    def shown_while_stopping(line: str) -> bool:
        def relay() -> bool:
            ENGINE_STOPPING.set(True)
            return quiet.shown("vllm_launcher.engine.alpha", line)
        return contextvars.copy_context().run(relay)

    shutdown_error = f"{PREFIX}ERROR 12-07 23:13:23 [async_llm.py:906] AsyncLLM output_handler failed."
    assert not shown_while_stopping(shutdown_error)
    assert not shown_while_stopping(f"{PREFIX}WARNING 12-07 23:13:23 [utils.py:648] [shutdown] force killing")
    assert quiet.shown("vllm_launcher.engine.alpha", shutdown_error)        # not stopping: a crash's error


@pytest.mark.engine
def test_engine_process_marks_its_output_after_the_stop_began(tmp_path):
    """A real process group: what it prints before the launcher's SIGTERM is relayed as running,
    what it prints on SIGTERM as its end."""
    script = ("import signal, sys, time\n"
              "def end(*_):\n    print('ERROR 12-07 23:13:23 [x.py:1] dying noisily', flush=True)\n    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, end)\n"
              "print('WARNING 12-07 23:13:20 [x.py:1] running', flush=True)\ntime.sleep(60)\n")
    relayed: list[tuple[str, bool]] = []
    process = EngineProcess(EngineSpec("alpha", [sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"}),
                            "alpha", str(tmp_path / "x.sock"), "engine-key",
                            log_line=lambda lane, line: relayed.append((line, ENGINE_STOPPING.get())))

    async def run() -> None:
        await process.start()
        await eventually_async(lambda: relayed, "the engine's first line", 30)
        await process.stop(grace=10)

    asyncio.run(run())
    assert relayed == [("WARNING 12-07 23:13:20 [x.py:1] running", False),
                       ("ERROR 12-07 23:13:23 [x.py:1] dying noisily", True)], relayed


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved


def _log_everything() -> None:
    logging.getLogger("vllm_launcher.router").info("lane alpha: starting -> ready (engine ready)")
    for line, _ in ENGINE_OUTPUT:
        logging.getLogger("vllm_launcher.engine.alpha").info("%s", line)


def test_quiet_logging_keeps_every_line_in_the_file_and_the_terminal_short(tmp_path, monkeypatch,
                                                                          restored_logging):
    terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    setup_logging("INFO", "text", None, ["topsecret-key"], quiet_to=tmp_path / "demo" / "demo.log")
    _log_everything()
    logging.getLogger("vllm_launcher.engine.alpha").warning("%s", "WARNING key topsecret-key leaked")
    logging.getLogger("uvicorn.error").info("Started server process [1]")
    logging.getLogger("vllm_launcher.host").warning("host check: WARN IOMMU on")
    shown = terminal.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d lane alpha: starting -> ready \(engine ready\)", shown[0]), shown
    assert shown[1:-2] == [f"[alpha] {compact_engine_line(line)}" for line, want in ENGINE_OUTPUT if want], shown
    assert shown[1] == "[alpha] WARNING [arg_utils.py:1700] The model has a long context length", shown
    assert shown[-2] == "[alpha] WARNING key *** leaked"
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING host check: WARN IOMMU on", shown[-1]), shown
    whole = (tmp_path / "demo" / "demo.log").read_text().splitlines()
    assert "lane alpha: starting -> ready" in whole[0]
    assert whole[1:-2] == [f"[alpha] {line}" for line, _ in ENGINE_OUTPUT] + ["[alpha] WARNING key *** leaked"]
    assert "Started server process" in whole[-2] and "IOMMU" in whole[-1]


def test_the_terminal_cuts_engine_warnings_to_its_width_and_never_errors():
    quiet = QuietFormatter(lambda: 50)

    def shown(name: str, line: str, level: int = logging.INFO) -> str:
        return quiet.format(logging.LogRecord(name, level, __file__, 1, line, None, None))

    warning = shown("vllm_launcher.engine.alpha", f"{PREFIX}WARNING 12-07 22:52:23 [system_utils.py:255] Found "
                                                  "ulimit of 20000 and failed to automatically increase it")
    assert warning == "[alpha] WARNING [system_utils.py:255] Found ulimi…" and len(warning) == 50, warning
    assert len(shown("vllm_launcher.engine.alpha", "[W1207 22:49:08.642280242 utils.cpp:68] Warning: " + "x" * 80)) == 50
    error = f"{CORE}ERROR 12-07 22:21:13 [core.py:708] EngineCore failed to start: " + "y" * 80
    assert shown("vllm_launcher.engine.alpha", error) == f"[alpha] {compact_engine_line(error)}"
    assert shown("vllm_launcher.router", "z" * 80, logging.WARNING).endswith(" WARNING " + "z" * 80)
    assert QuietFormatter().format(logging.LogRecord(      # no terminal (a pipe, a file): nothing cut
        "vllm_launcher.engine.alpha", logging.INFO, __file__, 1, "WARNING " + "w" * 80, None, None)).endswith("w" * 80)


def test_serve_passes_every_engine_line_on(monkeypatch, restored_logging):
    terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    setup_logging("INFO", "text", None)
    _log_everything()
    assert terminal.getvalue().splitlines()[1:] == [f"[alpha] {line}" for line, _ in ENGINE_OUTPUT]


@pytest.mark.engine
def test_demo_prints_its_requests_once_the_first_lane_is_ready_and_engine_output_quietly(tmp_path, fake_python):
    demo = tmp_path / "demo"
    for lane in ("alpha", "beta"):        # models already made: the fake engine reads none
        (demo / "models" / lane).mkdir(parents=True)
        (demo / "models" / lane / MARKER_FILE).write_text(json.dumps(_marker_content(0, lane)))
    printed = ("INFO 12-07 22:21:11 [launcher.py:46] Route: /v1/models, Methods: GET\n"
               "WARNING 12-07 22:21:12 [x.py:1] a warning worth reading\n  and its second line\n"
               "INFO 12-07 22:21:12 [x.py:2] back to quiet\nnanobind: leaked 3 instances!")
    env = {"VLLM_ENGINE_PYTHON": str(fake_python), "VLLM_LANE_ALPHA_ENV_FAKE_START_DELAY": "2",
           "VLLM_LANE_ALPHA_ENV_FAKE_PRINT": printed}
    served = start_server(tmp_path, env, wait_ready_lane="alpha", timeout=60,
                          command=("demo", "--dir", str(demo)))
    try:
        terminal = served.log()
        lines = terminal.splitlines()
        ready = next(i for i, line in enumerate(lines) if "lane alpha: starting -> ready" in line)
        try_at = next(i for i, line in enumerate(lines) if line.startswith("Lane alpha is ready. Try"))
        assert try_at > ready, terminal
        assert f"curl -sN {served.url}/v1/completions" in terminal and '"stream": true' in terminal
        assert f"Engines' whole output: {demo / 'demo.log'};" in terminal, terminal
        assert "[alpha] WARNING [x.py:1] a warning worth reading" in lines
        assert "[alpha]   and its second line" in lines
        for hidden in ("Route:", "back to quiet", "nanobind", "fake engine pid"):
            assert hidden not in terminal, hidden
        whole = (demo / "demo.log").read_text()
        for line in printed.splitlines():
            assert f"[alpha] {line}" in whole
        served.process.send_signal(signal.SIGINT)          # Ctrl-C
        assert served.process.wait(60) == 0, served.log()[-2000:]
    finally:
        served.terminate()
    assert not served.leftovers() and not processes_with_tmpdir(str(tmp_path))
