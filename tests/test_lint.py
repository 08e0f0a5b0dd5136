"""The gate (issue 20 point 3), in the fast tier: ruff's pyflakes, pycodestyle, bugbear, import
order, pyupgrade and SLF001 (no module reads another's private members) over the launcher, the
benchmarks and the tests; mypy over the package, strictly on the scheduler, the router and
engines/. Both configured in launcher/pyproject.toml, which says which rules are off and why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "launcher" / "pyproject.toml"
MYPY_CACHE = ROOT / ".cache" / "mypy"       # .gitignore'd; warm, the check takes about a second


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--config", str(CONFIG), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def mypy(*paths: Path, cache: Path = MYPY_CACHE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(CONFIG), "--cache-dir", str(cache),
                           "--no-error-summary", *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_passes():
    done = ruff("launcher", "bench", "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_are_on(tmp_path):
    """A private access, an unused import and a zip without strict= each fail the check."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\n\ndef peek(router, a, b):\n    return router._tickets, zip(a, b)\n")
    done = ruff(str(sample))
    assert done.returncode == 1, done.stdout + done.stderr
    assert all(code in done.stdout for code in ("SLF001", "F401", "B905")), done.stdout


def test_mypy_passes():
    done = mypy(ROOT / "launcher" / "vllm_launcher")
    assert done.returncode == 0, done.stdout + done.stderr


def test_engines_are_checked_strictly(tmp_path):
    """An unannotated function fails in engines/ (strict) and passes elsewhere in the package."""
    package = tmp_path / "vllm_launcher"
    (package / "engines").mkdir(parents=True)
    for init in (package / "__init__.py", package / "engines" / "__init__.py"):
        init.write_text("")
    code = "def double(x):\n    return 2 * x\n"
    (package / "engines" / "sample.py").write_text(code)
    (package / "sample.py").write_text(code)
    done = mypy(package / "engines" / "sample.py", package / "sample.py", cache=tmp_path / "cache")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.replace(f"{tmp_path}/", "").splitlines() == [
        "vllm_launcher/engines/sample.py:1: error: Function is missing a type annotation  [no-untyped-def]"], done.stdout
