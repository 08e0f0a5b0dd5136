"""`vllm-launcher artifacts lock / verify / add` with small generated wheels (issue 6 point 2).

`add` really runs Debian's `nix-store --add-fixed sha256` (CI installs nix-bin): a missing
nix-store fails these tests rather than skipping them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from elf_wheels import build_library, gcc
from elf_wheels import rocm_wheels as rocm_wheel_pair
from vllm_launcher.artifacts import (
    DEFAULT_LOCK,
    artifacts,
    fixed_output_store_path,
    validate_lock,
)
from vllm_launcher.wheel_libraries import read_elf_dynamic

ROOT = Path(__file__).resolve().parent.parent

TORCH = "torch-2.9.1-cp311-cp311-linux_x86_64.whl"
VLLM = "vllm-0.12.0+rocm711-cp311-cp311-linux_x86_64.whl"


def make_wheel(path: Path, payload: str) -> Path:
    """A valid zip with the dist-info files a wheel carries; `payload` makes its hash unique."""
    name, version = path.name.split("-")[:2]
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", f"# {payload}\n")
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


@pytest.fixture()
def wheels(tmp_path: Path, request) -> Path:
    directory = tmp_path / "wheels"
    directory.mkdir()
    # Unique content per test: `nix-store --add-fixed` of one content gives one store path.
    make_wheel(directory / TORCH, f"torch {request.node.nodeid} {tmp_path}")
    make_wheel(directory / VLLM, f"vllm {request.node.nodeid} {tmp_path}")
    return directory


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(artifacts, list(args), env=env, catch_exceptions=False)


def lock(wheels: Path, lock_file: Path):
    result = run("lock", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 0, result.output
    return json.loads(lock_file.read_text())


def test_committed_lock_is_valid_and_unhashed():
    data = json.loads((ROOT / "artifacts.lock.json").read_text())
    assert validate_lock(data, "artifacts.lock.json") == []
    assert [e["filename"] for e in data["artifacts"]] == [TORCH, VLLM]
    # The repository cannot know the hashes of private wheels: never a made-up one.
    assert all(e["sha256"] == "" and e["size"] is None for e in data["artifacts"])
    assert data == DEFAULT_LOCK


def test_lock_hashes_and_sizes(wheels: Path, tmp_path: Path):
    import hashlib

    data = lock(wheels, tmp_path / "artifacts.lock.json")
    for entry in data["artifacts"]:
        content = (wheels / entry["filename"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["size"] == len(content)
    assert validate_lock(data, "lock") == []


def test_lock_without_python_env_skips_the_relock_with_a_warning(wheels: Path, tmp_path: Path):
    # These fake wheels carry no Requires-Dist: the closure re-lock is tests/test_closure_lock.py.
    result = run("lock", str(wheels), "--lock-file", str(tmp_path / "l.json"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'python-env' / 'pyproject.toml'} not found" in result.output
    assert "not re-locked" in result.output and (tmp_path / "l.json").exists()


def test_lock_finds_a_wheel_by_project_name(wheels: Path, tmp_path: Path):
    (wheels / TORCH).rename(wheels / "torch-2.9.2-cp311-cp311-linux_x86_64.whl")
    data = lock(wheels, tmp_path / "l.json")
    torch = data["artifacts"][0]
    assert (torch["filename"], torch["version"]) == ("torch-2.9.2-cp311-cp311-linux_x86_64.whl", "2.9.2")


def test_lock_keeps_extra_entries_and_urls(wheels: Path, tmp_path: Path):
    triton = "pytorch_triton_rocm-3.5.1-cp311-cp311-linux_x86_64.whl"
    make_wheel(wheels / triton, "triton")
    lock_file = tmp_path / "l.json"
    template = json.loads(json.dumps(DEFAULT_LOCK))
    template["artifacts"].append(
        {"name": "pytorch-triton-rocm", "version": "3.5.1", "filename": triton, "sha256": "", "size": None,
         "url": "https://example.invalid/" + triton}
    )
    lock_file.write_text(json.dumps(template))
    data = lock(wheels, lock_file)
    assert data["artifacts"][2]["url"].endswith(triton) and len(data["artifacts"][2]["sha256"]) == 64


def test_lock_missing_wheel_names_file_and_leaves_lock(tmp_path: Path, wheels: Path):
    (wheels / VLLM).unlink()
    lock_file = tmp_path / "l.json"
    result = run("lock", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 1
    assert VLLM in result.output and "not found" in result.output
    assert not lock_file.exists()


def test_verify_good(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    lock(wheels, lock_file)
    result = run("verify", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"ok {TORCH}" in result.output and f"ok {VLLM}" in result.output


def test_verify_wrong_hash(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    data = lock(wheels, lock_file)
    expected = data["artifacts"][1]["sha256"]
    make_wheel(wheels / VLLM, "another build, same size class")
    # Same size as locked, so the sha256 comparison is what catches it.
    data["artifacts"][1]["size"] = (wheels / VLLM).stat().st_size
    lock_file.write_text(json.dumps(data))
    result = run("verify", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 1
    assert str(wheels / VLLM) in result.output
    assert f"expected {expected}" in result.output


def test_verify_wrong_size(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    lock(wheels, lock_file)
    with (wheels / TORCH).open("ab") as handle:
        handle.write(b"x")
    result = run("verify", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 1 and TORCH in result.output and "expected" in result.output


def test_verify_missing_file(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    lock(wheels, lock_file)
    (wheels / TORCH).unlink()
    result = run("verify", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 1
    assert f"{wheels / TORCH}: missing" in result.output and "sha256" in result.output


def test_verify_unlocked_lock_says_what_to_run(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    lock_file.write_text(json.dumps(DEFAULT_LOCK))
    result = run("verify", str(wheels), "--lock-file", str(lock_file))
    assert result.exit_code == 1 and "vllm-launcher artifacts lock" in result.output


def test_invalid_lock_is_reported_with_status_2(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    bad = json.loads(json.dumps(DEFAULT_LOCK))
    bad["artifacts"][0]["sha256"] = "ABC"
    bad["artifacts"][1]["filename"] = "vllm.whl"
    lock_file.write_text(json.dumps(bad))
    result = run("verify", str(wheels), "--lock-file", str(lock_file))
    assert result.exit_code == 2
    assert "sha256='ABC'" in result.output and "PEP 427" in result.output


def test_add_without_nix_prints_commands(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    data = lock(wheels, lock_file)
    result = run("add", str(wheels), "--lock-file", str(lock_file), "--no-progress",
                 env={"PATH": str(tmp_path / "no-bin")})
    assert result.exit_code == 0, result.output
    for entry in data["artifacts"]:
        assert f"nix-store --add-fixed sha256 {wheels / entry['filename']}" in result.output
        assert fixed_output_store_path(entry["sha256"], entry["filename"]) in result.output


def test_add_refuses_a_wrong_file(wheels: Path, tmp_path: Path):
    lock_file = tmp_path / "l.json"
    lock(wheels, lock_file)
    make_wheel(wheels / TORCH, "tampered")
    result = run("add", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 1 and "nothing added" in result.output


@pytest.mark.nix
def test_add_with_real_nix_store(wheels: Path, tmp_path: Path):
    nix_store = shutil.which("nix-store")
    assert nix_store, "nix-store not found: install Debian's nix-bin (.ci/run does)"
    lock_file = tmp_path / "l.json"
    data = lock(wheels, lock_file)
    result = run("add", str(wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 0, result.output
    paths = result.output.split()
    assert len(paths) == 2
    for entry, store_path in zip(data["artifacts"], paths, strict=False):
        # The path nixpkgs' requireFile { name; sha256; } computes for this entry.
        printed = subprocess.run(
            [nix_store, "--print-fixed-path", "sha256", entry["sha256"], entry["filename"]],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        assert store_path == printed == fixed_output_store_path(entry["sha256"], entry["filename"])
        subprocess.run([nix_store, "--check-validity", store_path], check=True)
        size = subprocess.run([nix_store, "--query", "--size", store_path], check=True,
                              capture_output=True, text=True).stdout.strip()
        assert int(size) > entry["size"]  # NAR size: the file plus NAR framing
        assert Path(store_path).read_bytes() == (wheels / entry["filename"]).read_bytes()


# --- the wheels' native libraries (issue 18, What 3) ------------------------------------------


@pytest.fixture()
def rocm_wheels(tmp_path: Path) -> Path:
    directory = tmp_path / "rocm-wheels"
    directory.mkdir()
    rocm_wheel_pair(directory, tmp_path / "elf", TORCH, VLLM)
    return directory


def test_lock_records_the_sonames_each_wheel_needs_from_outside(rocm_wheels: Path, tmp_path: Path):
    result = run("lock", str(rocm_wheels), "--lock-file", str(tmp_path / "l.json"), "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "l.json").read_text())
    torch, vllm = data["artifacts"]
    # Not libc10.so / libtorch.so (its own DT_SONAMEs), not the GPU code object's entry.
    assert torch["needs"] == {
        "libMIOpen.so.1": "torch/lib/libtorch.so",
        "libamdhip64.so.7": "torch/lib/libc10.so",
        "libc.so.6": "torch/_C.cpython-311-x86_64-linux-gnu.so",
        "libhipblas.so.3": "torch/lib/libtorch.so",
        "libstdc++.so.6": "torch/lib/libtorch.so",
    }
    assert torch["provides"] == {"libc10.so": "torch/lib", "libtorch.so": "torch/lib"}
    # vLLM bundles none of torch's libraries: it needs them (Nix finds them in torch's entry).
    assert vllm["needs"] == {name: "vllm/_C.abi3.so" for name in
                             ("libamdhip64.so.7", "libc.so.6", "libc10.so", "libtorch.so")}
    assert vllm["provides"] == {}
    assert "torch: 4 ELF files" not in result.output  # the GPU code object is no host library
    assert "torch: 3 ELF files, 2 libraries of its own; needs from outside: libMIOpen.so.1" in result.output
    assert validate_lock(data, "lock") == []
    jsonschema.validate(data, json.loads((ROOT / "nix/artifacts.schema.json").read_text()))


def test_reader_agrees_with_readelf(tmp_path: Path):
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils, beside gcc) not found"
    libraries = [
        build_library(tmp_path, "libx.so.2", ["libamdhip64.so.7", "libz.so.1"], "libx.so.2"),
        build_library(tmp_path, None, [], "plain.so"),
        Path(subprocess.run([gcc(), "-print-file-name=libgcc_s.so.1"], capture_output=True, text=True,
                            check=True).stdout.strip()),
    ]
    for library in libraries:
        shown = subprocess.run([readelf, "-dW", str(library)], capture_output=True, text=True, check=True).stdout
        with library.open("rb") as handle:
            elf = read_elf_dynamic(handle)
        assert elf.needed == re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", shown), library
        assert [elf.soname] if elf.soname else [] == re.findall(r"\(SONAME\)\s+Library soname: \[(.*?)\]", shown)
    with (tmp_path / "empty.c").open("rb") as handle:
        assert read_elf_dynamic(handle) is None  # not an ELF file


def test_lock_names_a_broken_elf_file_and_leaves_the_lock(rocm_wheels: Path, tmp_path: Path):
    torch = rocm_wheels / TORCH
    library = (tmp_path / "elf" / "built" / "libtorch.so").read_bytes()
    with zipfile.ZipFile(torch, "a") as wheel:  # cut inside the dynamic section
        wheel.writestr("torch/lib/libbroken.so", library[: len(library) // 2])
    lock_file = tmp_path / "l.json"
    result = run("lock", str(rocm_wheels), "--lock-file", str(lock_file), "--no-progress")
    assert result.exit_code == 1
    assert "torch/lib/libbroken.so" in result.output and "truncated" in result.output
    assert not lock_file.exists()


def test_validate_lock_rejects_malformed_library_maps():
    data = json.loads(json.dumps(DEFAULT_LOCK))
    data["artifacts"][0]["needs"] = ["libamdhip64.so.7"]
    assert any("needs must map library names" in p for p in validate_lock(data, "lock"))
