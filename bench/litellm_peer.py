"""LiteLLM's proxy as a peer in the overhead benchmark: installed by the benchmark into a
virtual environment of its own (bench/.work/litellm; never a dependency of the project) and
run with one model, `openai/<served name>` at the benchmark's fake engine, no database, no
key, no callbacks, telemetry off and the bundled model-cost map (nothing fetched at start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import WORK, log, taskset_prefix
from .processes import Started, free_port

VENV = WORK / "litellm"
REQUIREMENT = os.environ.get("BENCH_LITELLM", "litellm[proxy]")


def ensure_installed() -> Path:
    """The `litellm` command of bench/.work/litellm, installed on first use (about a minute)."""
    command = VENV / "bin" / "litellm"
    if not command.exists():
        log(f"installing {REQUIREMENT} into {VENV.relative_to(WORK.parent.parent)} (its own venv)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install",
                        REQUIREMENT], check=True)
    return command


def version() -> str | None:
    result = subprocess.run([str(VENV / "bin" / "python"), "-c",
                             "from importlib.metadata import version; print(version('litellm'))"],
                            capture_output=True, text=True)
    return result.stdout.strip() or None


def start(directory: Path, engine_url: str, model: str, cpus: str | None,
          timeout: float = 180.0) -> tuple[Started, str]:
    """LiteLLM's proxy on a free loopback port, serving MODEL from the engine at ENGINE_URL (its
    /v1 base); returns the started process and its base URL once /health/liveliness answers."""
    command = ensure_installed()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "litellm.yaml"            # JSON is YAML
    config.write_text(json.dumps({
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": engine_url, "api_key": "none"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False, "set_verbose": False},
        # no key, as our server runs in the benchmark (recent versions refuse that unless told)
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }, indent=1))
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "TMPDIR": str(directory), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "NO_PROXY": "*", "no_proxy": "*"}
    pin = taskset_prefix(cpus).split()
    started = Started.spawn([*pin, command, "--config", config, "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], env, directory / f"litellm-{port}.log")
    url = f"http://127.0.0.1:{port}"
    started.wait_answer(url + "/health/liveliness", timeout)
    return started, url
