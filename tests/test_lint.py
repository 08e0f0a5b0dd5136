"""No module reads another's private members: ruff's SLF001 over the launcher, the benchmarks
and the tests, with the configuration in launcher/pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--config", str(ROOT / "launcher" / "pyproject.toml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_no_private_member_access():
    done = ruff("launcher", "bench", "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_catches_a_private_access(tmp_path):
    """The rule is on: a file reading another object's `_field` fails it."""
    sample = tmp_path / "sample.py"
    sample.write_text("def peek(router):\n    return router._tickets\n")
    done = ruff(str(sample))
    assert done.returncode == 1 and "SLF001" in done.stdout, done.stdout + done.stderr
