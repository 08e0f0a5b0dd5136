"""Run the real `vllm-launcher` command in a subprocess with a clean, explicit environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def run_launcher(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_launcher", *args], env={**BASE_ENV, **env},
                          capture_output=True, text=True, timeout=timeout)


def config_json(env: dict[str, str], *args: str) -> dict:
    result = run_launcher(env, "config", "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
