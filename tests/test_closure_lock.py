"""`vllm-launcher artifacts lock DIR` re-locks python-env/uv.lock against the wheels' METADATA.

The path every user with the private wheels takes (issue 11, What 1): stand-in wheels under the
users' file names carry the ROCm Requires-Dist, read from python-env/pyproject.toml's
`[[tool.uv.dependency-metadata]]` (one source of truth), except that torch requires
`pytorch-triton-rocm==3.5.1` like the real ROCm wheel. `artifacts lock` runs on a copy of the
repository's artifacts.lock.json and python-env (the launcher symlinked beside them, as
`../launcher`), with the real `uv lock` against PyPI (its cache makes a run take a second or
two). The repository's own python-env is never written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from vllm_launcher import artifacts as artifacts_module
from vllm_launcher.artifacts import (
    artifacts,
    check_relocked,
    normalize_name,
    rewrite_pyproject,
    uv_command,
)

ROOT = Path(__file__).resolve().parent.parent
PYTHON_ENV = ROOT / "python-env"
TORCH = "torch-2.9.1-cp311-cp311-linux_x86_64.whl"
VLLM = "vllm-0.12.0+rocm711-cp311-cp311-linux_x86_64.whl"
TRITON = "pytorch_triton_rocm-3.5.1-cp311-cp311-linux_x86_64.whl"

pytestmark = [pytest.mark.closure, pytest.mark.timeout(300)]
# uv comes with the launcher's test extra; the Nix build's check phase has neither uv nor PyPI.
needs_uv = pytest.mark.skipif(
    shutil.which("uv") is None and importlib.util.find_spec("uv") is None,
    reason="uv is not installed (pip install './launcher[test]')",
)


def stand_in_metadata() -> dict[str, dict]:
    data = tomllib.loads((PYTHON_ENV / "pyproject.toml").read_text())
    return {m["name"]: m for m in data["tool"]["uv"]["dependency-metadata"]}


def make_wheel(path: Path, requires: list[str], requires_python: str) -> Path:
    name, version = path.name.split("-")[:2]
    dist_info = f"{name}-{version}.dist-info"
    metadata = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        f"Requires-Python: {requires_python}\n"
        + "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    )
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "")
        wheel.writestr(f"{dist_info}/METADATA", metadata)
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                       "Tag: cp311-cp311-linux_x86_64\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def make_rocm_wheels(directory: Path, *, triton: str | None = "rocm") -> Path:
    """torch and vllm stand-ins; torch requires pytorch-triton-rocm (triton="rocm", with its
    wheel), the same but without that wheel (triton="missing"), or PyPI's triton (None)."""
    directory.mkdir()
    meta = stand_in_metadata()
    torch_requires = list(meta["torch"]["requires-dist"])
    if triton is not None:
        torch_requires = [r.replace("triton==", "pytorch-triton-rocm==") for r in torch_requires]
        assert any(r.startswith("pytorch-triton-rocm==3.5.1") for r in torch_requires)
    make_wheel(directory / TORCH, torch_requires, meta["torch"]["requires-python"])
    make_wheel(directory / VLLM, meta["vllm"]["requires-dist"], meta["vllm"]["requires-python"])
    if triton == "rocm":
        make_wheel(directory / TRITON, [], ">=3.10")
    return directory


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A copy of the repository's two locks, with the launcher where `../launcher` points."""
    copy = tmp_path / "repo"
    (copy / "python-env").mkdir(parents=True)
    shutil.copyfile(ROOT / "artifacts.lock.json", copy / "artifacts.lock.json")
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copyfile(PYTHON_ENV / name, copy / "python-env" / name)
    (copy / "launcher").symlink_to(ROOT / "launcher")
    return copy


def run_lock(repo: Path, wheels: Path, *extra: str):
    return CliRunner().invoke(
        artifacts,
        ["lock", str(wheels), "--lock-file", str(repo / "artifacts.lock.json"), "--no-progress", *extra],
        catch_exceptions=False,
    )


def versions(lock_text: str) -> dict[str, str]:
    return {normalize_name(p["name"]): p["version"] for p in tomllib.loads(lock_text)["package"]}


def repository_state() -> dict[str, str]:
    return {name: hashlib.sha256((PYTHON_ENV / name).read_bytes()).hexdigest()
            for name in ("pyproject.toml", "uv.lock")}


def assert_relative_only(text: str, repo: Path, wheels: Path) -> None:
    for absolute in (str(repo), str(wheels), str(ROOT), "/tmp/"):
        assert absolute not in text
    for value in re.findall(r'(?:path|directory|editable) = "([^"]*)"', text):
        assert not value.startswith("/"), value
        assert value == "../launcher" or not value.startswith(".."), value


@needs_uv
def test_lock_relocks_the_closure_with_the_wheels_hashes(repo: Path, tmp_path: Path):
    before_repo = repository_state()
    wheels = make_rocm_wheels(tmp_path / "wheels")
    old_lock = (repo / "python-env" / "uv.lock").read_text()

    result = run_lock(repo, wheels)
    assert result.exit_code == 0, result.output

    lock_text = (repo / "python-env" / "uv.lock").read_text()
    pyproject_text = (repo / "python-env" / "pyproject.toml").read_text()
    artifacts_lock = json.loads((repo / "artifacts.lock.json").read_text())
    by_name = {normalize_name(e["name"]): e for e in artifacts_lock["artifacts"]}
    packages = {normalize_name(p["name"]): p for p in tomllib.loads(lock_text)["package"]}
    assert set(by_name) == {"torch", "vllm", "pytorch-triton-rocm"}
    for name, filename in (("torch", TORCH), ("vllm", VLLM), ("pytorch-triton-rocm", TRITON)):
        sha256 = hashlib.sha256((wheels / filename).read_bytes()).hexdigest()
        # The two locks agree, and both hold the file's own hash.
        assert by_name[name]["sha256"] == sha256 and by_name[name]["filename"] == filename
        assert packages[name]["source"] == {"path": f"wheels/{filename}"}
        assert packages[name]["wheels"] == [{"filename": filename, "hash": f"sha256:{sha256}"}]
    assert packages["vllm"]["version"] == "0.12.0+rocm711"
    assert {d["name"] for d in packages["torch"]["dependencies"]} >= {"pytorch-triton-rocm"}

    assert_relative_only(lock_text, repo, wheels)
    assert_relative_only(pyproject_text, repo, wheels)
    pyproject = tomllib.loads(pyproject_text)
    assert "dependency-metadata" not in pyproject["tool"]["uv"]  # the stand-ins are gone
    assert pyproject["tool"]["uv"]["sources"]["torch"] == {"path": f"wheels/{TORCH}"}

    # The printout names what changed; every other package keeps its version.
    output = result.output
    assert "added   pytorch-triton-rocm 3.5.1" in output
    assert "removed triton 3.5.1" in output
    assert "changed vllm 0.12.0 -> 0.12.0+rocm711" in output
    assert f"changed torch 2.9.1: PyPI -> wheels/{TORCH}" in output
    old, new = versions(old_lock), versions(lock_text)
    # the wheel's METADATA lists timm (rocm.txt) as the real one does; the overrides keep it and
    # PyPI's CUDA torchvision out without a torchvision artifact (tests/test_closure_cuda_free.py)
    assert any(r.startswith("timm") for r in stand_in_metadata()["vllm"]["requires-dist"])
    assert not {"timm", "torchvision"} & set(new)
    for name in ("torch", "vllm", "triton", "pytorch-triton-rocm"):
        old.pop(name, None), new.pop(name, None)
    assert new == old

    # A second run finds nothing to change and writes the same pyproject.
    again = run_lock(repo, wheels)
    assert again.exit_code == 0, again.output
    assert "closure unchanged" in again.output
    assert (repo / "python-env" / "pyproject.toml").read_text() == pyproject_text
    assert repository_state() == before_repo


@needs_uv
def test_two_wheels_when_torch_requires_pypi_triton(repo: Path, tmp_path: Path):
    wheels = make_rocm_wheels(tmp_path / "wheels", triton=None)
    old_lock = (repo / "python-env" / "uv.lock").read_text()
    result = run_lock(repo, wheels)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines() if line.startswith("  ")]
    assert lines == [
        f"changed torch 2.9.1: PyPI -> wheels/{TORCH}",
        f"changed vllm 0.12.0 -> 0.12.0+rocm711 (wheels/{VLLM})",
    ]
    assert len(json.loads((repo / "artifacts.lock.json").read_text())["artifacts"]) == 2
    old, new = versions(old_lock), versions((repo / "python-env" / "uv.lock").read_text())
    assert new == {**old, "vllm": "0.12.0+rocm711"}


def test_missing_triton_wheel_is_named_and_nothing_is_written(repo: Path, tmp_path: Path):
    wheels = make_rocm_wheels(tmp_path / "wheels", triton="missing")
    before = {p: p.read_bytes() for p in (repo / "artifacts.lock.json", repo / "python-env" / "uv.lock",
                                         repo / "python-env" / "pyproject.toml")}
    result = run_lock(repo, wheels)
    assert result.exit_code == 1
    assert f"{wheels / TRITON}: not found" in result.output
    assert f"{TORCH} requires pytorch-triton-rocm" in result.output
    assert {p: p.read_bytes() for p in before} == before


def test_no_relock_leaves_python_env_alone(repo: Path, tmp_path: Path):
    wheels = make_rocm_wheels(tmp_path / "wheels", triton="missing")
    before = {p: p.read_bytes() for p in (repo / "python-env").iterdir()}
    result = run_lock(repo, wheels, "--no-relock")
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in (repo / "python-env").iterdir()} == before
    assert len(json.loads((repo / "artifacts.lock.json").read_text())["artifacts"]) == 2


def test_rewrite_pyproject_is_idempotent_and_keeps_other_entries():
    text = (PYTHON_ENV / "pyproject.toml").read_text()
    wheels = {"torch": TORCH, "vllm": VLLM, "pytorch-triton-rocm": TRITON}
    once = rewrite_pyproject(text, wheels)
    assert rewrite_pyproject(once, wheels) == once
    data, original = tomllib.loads(once), tomllib.loads(text)
    assert data["tool"]["uv"]["sources"]["vllm-launcher"] == {"path": "../launcher"}
    assert data["project"]["dependencies"] == original["project"]["dependencies"] + ["pytorch-triton-rocm"]
    assert data["tool"]["uv"]["override-dependencies"][:-1] == original["tool"]["uv"]["override-dependencies"]
    # Above the sources nothing changes but the two added entries (and their comments).
    head, new_head = (t.split("\n[tool.uv.sources]")[0] for t in (text, once))
    added = [line for line in new_head.splitlines() if line not in head.splitlines()]
    assert [line for line in new_head.splitlines() if line not in added] == head.splitlines()
    assert [line.strip() for line in added if not line.strip().startswith("#")] == [
        '"pytorch-triton-rocm",', "\"triton; sys_platform == 'never'\","]


def test_check_relocked_refuses_absolute_paths_and_disagreeing_hashes():
    lock = f"""
version = 1
[[package]]
name = "torch"
version = "2.9.1"
source = {{ path = "/home/me/wheels/{TORCH}" }}
wheels = [{{ filename = "{TORCH}", hash = "sha256:{'a' * 64}" }}]
[[package]]
name = "elsewhere"
version = "1"
source = {{ directory = "../../outside" }}
"""
    with pytest.raises(Exception) as caught:
        check_relocked(lock, ["../launcher"], [{"name": "torch", "sha256": "b" * 64}])
    message = str(caught.value)
    assert f"/home/me/wheels/{TORCH}" in message and "../../outside" in message
    assert f"artifacts.lock.json sha256:{'b' * 64}" in message


def test_without_uv_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(artifacts_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(artifacts_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Exception, match="uv is needed to re-lock python-env/uv.lock: pip install uv"):
        uv_command()


# --- torchvision as an optional artifact (issue 18, What 1) ----------------------------------

VISION = "torchvision-0.24.1+rocm7.1-cp311-cp311-linux_x86_64.whl"


def test_rewrite_pyproject_with_torchvision_drops_its_overrides():
    text = (PYTHON_ENV / "pyproject.toml").read_text()
    original = tomllib.loads(text)["tool"]["uv"]["override-dependencies"]
    assert {"torchvision; sys_platform == 'never'", "timm; sys_platform == 'never'"} <= set(original)
    once = rewrite_pyproject(text, {"torch": TORCH, "vllm": VLLM, "torchvision": VISION})
    data = tomllib.loads(once)
    assert data["tool"]["uv"]["override-dependencies"] == [
        o for o in original if not o.startswith(("torchvision", "timm"))]
    assert data["tool"]["uv"]["sources"]["torchvision"] == {"path": f"wheels/{VISION}"}
    assert "torchvision" in data["project"]["dependencies"]
    assert "PyPI's torchvision is a CUDA build" not in once        # its comment went with it
    assert rewrite_pyproject(once, {"torch": TORCH, "vllm": VLLM, "torchvision": VISION}) == once


@needs_uv
def test_a_torchvision_wheel_joins_the_lock_and_brings_timm_back(repo: Path, tmp_path: Path):
    wheels = make_rocm_wheels(tmp_path / "wheels", triton=None)
    make_wheel(wheels / VISION, ["numpy", "pillow", "torch==2.9.1"], ">=3.10")
    result = run_lock(repo, wheels)
    assert result.exit_code == 0, result.output
    names = [e["name"] for e in json.loads((repo / "artifacts.lock.json").read_text())["artifacts"]]
    assert names == ["torch", "vllm", "torchvision"]
    lock = tomllib.loads((repo / "python-env" / "uv.lock").read_text())
    packages = {normalize_name(p["name"]): p for p in lock["package"]}
    assert packages["torchvision"]["source"] == {"path": f"wheels/{VISION}"}
    assert "timm" in packages and {"name": "torchvision"} in packages["timm"]["dependencies"]
    assert f"added   torchvision 0.24.1+rocm7.1 (wheels/{VISION})" in result.output
    assert "added   timm " in result.output


def elf_torchvision(directory: Path, work: Path, needed: list[str]) -> Path:
    from elf_wheels import build_library, write_wheel

    extension = build_library(work, None, needed, "_C.so")
    return write_wheel(directory / VISION, {"torchvision/_C.so": extension})


@pytest.mark.parametrize("needed, refused", [
    (["libc10.so", "libtorch.so", "libamdhip64.so.7"], None),
    (["libc10.so", "libtorch.so", "libamdhip64.so.6"], "libamdhip64.so.6 (needed by torchvision/_C.so): not in "),
    (["libc10.so", "libtorch_cuda.so", "libcudart.so.12"], "libcudart.so.12 (needed by torchvision/_C.so): a CUDA"),
], ids=["same-torch", "other-rocm", "cuda"])
def test_a_torchvision_not_built_for_the_users_torch_is_refused(repo: Path, tmp_path: Path, needed, refused):
    """The torch stand-in (tests/elf_wheels.py) bundles libc10.so and libtorch.so and needs
    libamdhip64.so.7: a torchvision must link those, not another ROCm's or CUDA's."""
    from elf_wheels import rocm_wheels

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    rocm_wheels(wheels, tmp_path / "elf", TORCH, VLLM)
    elf_torchvision(wheels, tmp_path / "elf", needed)
    before = (repo / "artifacts.lock.json").read_bytes()
    result = run_lock(repo, wheels, "--no-relock")
    if refused is None:
        assert result.exit_code == 0, result.output
        entry = json.loads((repo / "artifacts.lock.json").read_text())["artifacts"][-1]
        assert entry["name"] == "torchvision" and set(entry["needs"]) >= set(needed)
        return
    assert result.exit_code == 1, result.output
    assert f"{VISION} is not built for your torch wheel, refused:" in result.output
    assert refused in result.output, result.output
    assert (repo / "artifacts.lock.json").read_bytes() == before
