"""The flake's Python package set evaluated with Nix 2.8 (issue 11, What item 4).

nix/tests/python-set.nix evaluates nix/packages.nix -- uv2nix's package set from
python-env/uv.lock, nix/python-overlay.nix, vllm-server and the image's layers -- with the real
uv2nix, pyproject.nix and nixpkgs.lib and a stubbed `pkgs` (no nixpkgs needed). Checked here:
torch and vLLM come from requireFile with the artifacts lock's hashes, for both uv.lock shapes
(PyPI placeholders; path sources `wheels/<filename>` as `vllm-launcher artifacts lock` writes
them); every requirement of the vLLM wheel (its ROCm Requires-Dist) resolves to a package of the
set; no CUDA-only package is left; the image's big layer holds no launcher.

The sources are not vendored and CI cannot fetch them: point NIXPKGS_LIB at a
nix-community/nixpkgs.lib checkout, UV2NIX_SRC at pyproject-nix/uv2nix and PYPROJECT_NIX_SRC at
pyproject-nix/pyproject.nix (each the repository's root). Without them these tests skip,
saying which is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from measurements import record
from nix_evaluator import ROOT, nix_instantiate, nixpkgs_lib

pytestmark = pytest.mark.nix

TORCH_FILE = "torch-2.9.1-cp311-cp311-linux_x86_64.whl"
VLLM_FILE = "vllm-0.12.0+rocm711-cp311-cp311-linux_x86_64.whl"
TRITON_FILE = "pytorch_triton_rocm-3.5.1-cp311-cp311-linux_x86_64.whl"
HASHES = {"torch": "a" * 64, "vllm": "b" * 64, "pytorch-triton-rocm": "c" * 64}

# What `vllm-launcher artifacts lock` records for ROCm 7.1 builds (the shape of its `needs` and
# `provides`; tests/test_artifacts.py checks the recording itself on real ELF files).
TORCH_NEEDS = {
    "libamdhip64.so.7": "torch/lib/libc10_hip.so", "libhipblas.so.3": "torch/lib/libtorch_hip.so",
    "libhipblaslt.so.1": "torch/lib/libtorch_hip.so", "libMIOpen.so.1": "torch/lib/libtorch_hip.so",
    "librocblas.so.5": "torch/lib/libtorch_hip.so", "libhsa-runtime64.so.1": "torch/lib/libtorch_hip.so",
    "libroctx64.so.4": "torch/lib/libtorch_hip.so", "libc.so.6": "torch/lib/libc10.so",
    "libstdc++.so.6": "torch/lib/libc10.so", "libgcc_s.so.1": "torch/lib/libc10.so",
    "libnuma.so.1": "torch/lib/libtorch_hip.so",
}
TORCH_PROVIDES = {"libc10.so": "torch/lib", "libc10_hip.so": "torch/lib", "libtorch.so": "torch/lib",
                  "libtorch_cpu.so": "torch/lib", "libtorch_hip.so": "torch/lib"}
VLLM_NEEDS = {"libamdhip64.so.7": "vllm/_C.abi3.so", "libc10.so": "vllm/_C.abi3.so",
              "libc10_hip.so": "vllm/_C.abi3.so", "libtorch.so": "vllm/_C.abi3.so",
              "libc.so.6": "vllm/_C.abi3.so", "libstdc++.so.6": "vllm/_C.abi3.so"}
# nix/native-libraries.nix's table, as the stub packages are named.
TORCH_PACKAGES = {"clr-7.1.1", "hipblas-7.1.1", "hipblaslt-7.1.1", "miopen-7.1.1", "rocblas-7.1.1",
                  "rocm-runtime-7.1.1", "roctracer-7.1.1", "glibc", "gcc-14-lib", "numactl"}

# Packages that exist only for NVIDIA GPUs: none may be left in a ROCm set.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cupy-cuda.*|.*-cu1[0-9]+|.*[-_]cuda[0-9]*x?|pynvml|nvidia-ml-py|"
                       r"flashinfer-python|xformers|cuda-python|cuda-bindings)$")

# The environment the wheels are for (markers of Requires-Dist).
ENVIRONMENT = {
    "python_version": "3.11", "python_full_version": "3.11.14", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": "",
}


def source(var: str, marker: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is unset: set it to a checkout of the repository holding {marker} "
                    "(CI cannot fetch it) to evaluate the package set")
    path = Path(value)
    if not (path / marker).exists():
        pytest.fail(f"{var}={value}: no {marker} there")
    return path


@pytest.fixture(scope="module")
def sources() -> dict[str, Path]:
    return {
        "lib": nixpkgs_lib(),
        "uv2nix": source("UV2NIX_SRC", "lib/workspace.nix"),
        "pyproject": source("PYPROJECT_NIX_SRC", "build/packages.nix"),
    }


def artifacts_lock(triton: bool = False, torch_needs: dict | None = None) -> dict:
    entries = [
        {"name": "torch", "version": "2.9.1", "filename": TORCH_FILE, "sha256": HASHES["torch"], "size": 1,
         "needs": TORCH_NEEDS if torch_needs is None else torch_needs, "provides": TORCH_PROVIDES},
        {"name": "vllm", "version": "0.12.0+rocm711", "filename": VLLM_FILE, "sha256": HASHES["vllm"], "size": 2,
         "needs": VLLM_NEEDS, "provides": {}},
    ]
    if triton:
        entries.append({"name": "pytorch-triton-rocm", "version": "3.5.1", "filename": TRITON_FILE,
                        "sha256": HASHES["pytorch-triton-rocm"], "size": 3,
                        "needs": {"libc.so.6": "triton/_C/libtriton.so"}, "provides": {}})
    return {"version": 1, "artifacts": entries}


def uv_lock() -> dict:
    return tomllib.loads((ROOT / "python-env/uv.lock").read_text())


def path_shaped(lock: dict, hashes: dict[str, str] | None = None, triton: bool = False) -> dict:
    """uv.lock as `artifacts lock DIR` re-locks it: torch and vllm as path sources; with
    `triton`, pytorch-triton-rocm's wheel in place of PyPI's triton."""
    hashes = hashes or HASHES
    files = {"torch": TORCH_FILE, "vllm": VLLM_FILE}
    lock = json.loads(json.dumps(lock))
    if triton:
        files["pytorch-triton-rocm"] = TRITON_FILE
        for package in lock["package"]:
            if package["name"] == "triton":
                package["name"] = "pytorch-triton-rocm"
            for dep in package.get("dependencies", []):
                if dep["name"] == "triton":
                    dep["name"] = "pytorch-triton-rocm"
    for package in lock["package"]:
        if package["name"] in files:
            filename = files[package["name"]]
            package["source"] = {"path": f"wheels/{filename}"}
            package["version"] = filename.split("-")[1]
            package.pop("sdist", None)
            package["wheels"] = [{"filename": filename, "hash": f"sha256:{hashes[package['name']]}"}]
    return lock


def evaluate(sources: dict[str, Path], tmp_path: Path, lock: dict, uvlock: dict | None = None,
             ok: bool = True, extra_pkgs: str | None = None):
    lock_file = tmp_path / "artifacts.lock.json"
    lock_file.write_text(json.dumps(lock))
    args = ["--arg", "lib", f"import {sources['lib']}",
            "--arg", "pyproject-nix-src", str(sources["pyproject"]),
            "--arg", "uv2nix-src", str(sources["uv2nix"]),
            "--arg", "lockFile", str(lock_file),
            "--arg", "pythonEnvDir", str(ROOT / "python-env")]
    if uvlock is not None:
        uv_file = tmp_path / "uv.lock.json"
        uv_file.write_text(json.dumps(uvlock))
        args += ["--arg", "uvLock", f"builtins.fromJSON (builtins.readFile {uv_file})"]
    if extra_pkgs is not None:
        args += ["--arg", "extraPkgs", extra_pkgs]
    started = time.monotonic()
    result = subprocess.run(
        [nix_instantiate(), "--eval", "--strict", "--json", "nix/tests/python-set.nix", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - started
    if not ok:
        assert result.returncode != 0, "evaluation should have failed"
        return result.stderr
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout), elapsed


def vllm_requires_dist() -> list[Requirement]:
    """The vLLM wheel's ROCm Requires-Dist as python-env/pyproject.toml states it."""
    pyproject = tomllib.loads((ROOT / "python-env/pyproject.toml").read_text())
    (meta,) = [m for m in pyproject["tool"]["uv"]["dependency-metadata"] if m["name"] == "vllm"]
    return [Requirement(line) for line in meta["requires-dist"]]


def check_set(out: dict) -> dict:
    packages = set(out["packages"])
    described = out["described"]
    # torch and vLLM: the private wheels, by requireFile with the artifacts lock's hashes, relinked
    # against exactly the packages their recorded sonames map to; vLLM searches torch/lib for
    # torch's libraries; nothing is ignored.
    for name, filename in (("torch", TORCH_FILE), ("vllm", VLLM_FILE)):
        src = described[name]["src"]
        assert src == {"name": filename, "fetcher": "requireFile", "sha256": HASHES[name]}, (name, src)
        assert "auto-patchelf-hook" in described[name]["nativeBuildInputs"]
        assert described[name]["ignoreMissing"] == []
    assert set(described["torch"]["buildInputs"]) == TORCH_PACKAGES
    assert set(described["vllm"]["buildInputs"]) == {"clr-7.1.1", "glibc", "gcc-14-lib"}
    assert described["vllm"]["sonames"]["libtorch.so"] == "artifact torch (torch/lib)"
    assert described["vllm"]["version"] == "0.12.0+rocm711"
    assert re.search(r'addAutoPatchelfSearchPath "/nix/store/\w+-torch-2\.9\.1/lib/python3\.11/site-packages/torch/lib"',
                     described["vllm"]["preFixup"]), described["vllm"]["preFixup"]
    # Every other package is a PyPI file of the lock (or the launcher's own directory).
    others = {n: d["src"] for n, d in described.items() if n not in ("torch", "vllm")}
    assert all(s is None or s["fetcher"] in ("fetchurl", "path") for s in others.values()), others
    # The wheels that need more than manylinux.
    assert {"onetbb-2022.3.0", "gcc-14-lib"} <= set(described["numba"]["buildInputs"])
    assert "libamd_smi.so" in described["amdsmi"]["postInstall"]
    assert "torchvision" not in packages  # PyPI's is a CUDA build; only a ROCm artifact may add it
    # Every requirement of the vLLM wheel that holds on linux x86_64 / CPython 3.11 resolves,
    # but those python-env's override-dependencies keep out (`; sys_platform == 'never'`).
    overrides = tomllib.loads((ROOT / "python-env/pyproject.toml").read_text())["tool"]["uv"]
    never = {canonicalize_name(Requirement(o).name) for o in overrides.get("override-dependencies", [])
             if "sys_platform == 'never'" in o}
    wanted = {canonicalize_name(r.name) for r in vllm_requires_dist()
              if r.marker is None or r.marker.evaluate(ENVIRONMENT)} - never
    assert wanted - packages == set()
    assert wanted <= set(described["vllm"]["dependencies"])
    cuda = sorted(p for p in packages if CUDA_ONLY.match(p))
    assert cuda == []
    # The venvs: the launcher in vllm-env only, never in the engines' layer.
    env = {re.sub(r"^[0-9a-f]{32}-", "", p) for p in out["env"]}
    engine = {re.sub(r"^[0-9a-f]{32}-", "", p) for p in out["engineEnv"]}
    assert env - engine == {"vllm-launcher-0.1.0", "vllm-strix-env-0.1.0"}
    assert not any(p.startswith("vllm-launcher") for p in engine)
    assert any(p.startswith("torch-") for p in engine) and any(p.startswith("vllm-0.12.0") for p in engine)
    return {"packages": len(packages), "cuda": cuda, "requirements": len(wanted)}


def test_package_set_registry_shaped_lock(sources, tmp_path):
    out, elapsed = evaluate(sources, tmp_path, artifacts_lock())
    figures = check_set(out)
    lock_names = {p["name"] for p in uv_lock()["package"]}
    # The set is the lock: nothing added, and only what no marker selects left out.
    assert set(out["packages"]) <= lock_names
    record(f"nix package set (uv2nix, Nix 2.8, stubbed pkgs): {figures['packages']} packages of "
           f"{len(lock_names)} locked, torch+vllm from requireFile, {figures['requirements']} vLLM "
           f"requirements resolved, CUDA-only left: {len(figures['cuda'])}, eval {elapsed:.2f} s")


def test_package_set_path_shaped_lock(sources, tmp_path):
    out, _ = evaluate(sources, tmp_path, artifacts_lock(), uvlock=path_shaped(uv_lock()))
    check_set(out)


def test_locks_that_disagree_stop_evaluation(sources, tmp_path):
    other = dict(HASHES, vllm="d" * 64)
    err = evaluate(sources, tmp_path, artifacts_lock(), uvlock=path_shaped(uv_lock(), other), ok=False)
    assert "uv.lock and artifacts.lock.json disagree about vllm" in err
    assert "vllm-launcher artifacts lock DIR" in err


def test_unlocked_artifacts_say_what_to_run(sources, tmp_path):
    lock = json.loads((ROOT / "artifacts.lock.json").read_text())
    err = evaluate(sources, tmp_path, lock, ok=False)
    assert "not locked yet" in err and "vllm-launcher artifacts lock DIR" in err


def test_triton_artifact_replaces_the_placeholder(sources, tmp_path):
    out, _ = evaluate(sources, tmp_path, artifacts_lock(triton=True))
    triton = out["described"]["triton"]
    assert triton["src"] == {"name": TRITON_FILE, "fetcher": "requireFile", "sha256": HASHES["pytorch-triton-rocm"]}
    assert "pytorch-triton-rocm" not in out["packages"]


def test_triton_artifact_in_a_path_shaped_lock(sources, tmp_path):
    out, _ = evaluate(sources, tmp_path, artifacts_lock(triton=True), uvlock=path_shaped(uv_lock(), triton=True))
    triton = out["described"]["pytorch-triton-rocm"]
    assert triton["src"] == {"name": TRITON_FILE, "fetcher": "requireFile", "sha256": HASHES["pytorch-triton-rocm"]}
    assert "triton" not in out["packages"]
    assert "pytorch-triton-rocm" in out["described"]["torch"]["dependencies"]


def test_image_layers_and_tag(sources, tmp_path):
    out, _ = evaluate(sources, tmp_path, artifacts_lock())
    container = out["container"]
    assert container["tag"] == "0.12.0_rocm711-0.1.0"
    assert container["layerCount"] == 4
    assert container["layers"]["engine"] == ["vllm-engine-env"]
    assert container["layers"]["torch"] == ["torch"]
    assert container["layers"]["launcher"][0].startswith("vllm-server-")
    # The engines' environment (the big layer) has no launcher; the wrapper runs vllm-env.
    assert "vllm-env/bin/vllm-launcher" in out["server"]["script"]
    assert "VLLM_ENGINE_PYTHON /nix/store/" in out["server"]["script"]


def test_rocm_packages_come_from_the_recorded_sonames(sources, tmp_path):
    """torch's libraries and the image's native layer follow the sonames the lock records: one
    soname more (librccl.so.1) adds rccl, and nothing the wheels do not name (rocm-smi,
    hipsparse, rocfft, ...) is linked or shipped."""
    out, _ = evaluate(sources, tmp_path, artifacts_lock())
    layer = set(out["container"]["layers"]["rocm"])
    # The artifacts' packages, and amdsmi for the libamd_smi.so PyPI's amdsmi loads at run time.
    assert layer == TORCH_PACKAGES | {"amdsmi-7.1.1"}, layer
    assert out["described"]["torch"]["sonames"]["libMIOpen.so.1"] == "rocmPackages.miopen"
    more = dict(TORCH_NEEDS, **{"librccl.so.1": "torch/lib/libtorch_hip.so"})
    out2, _ = evaluate(sources, tmp_path, artifacts_lock(torch_needs=more))
    assert set(out2["described"]["torch"]["buildInputs"]) == TORCH_PACKAGES | {"rccl-7.1.1"}
    assert set(out2["container"]["layers"]["rocm"]) == layer | {"rccl-7.1.1"}
    record(f"nix package set: torch's libraries from its {len(TORCH_NEEDS)} recorded sonames -> "
           f"{len(TORCH_PACKAGES)} packages; image layer {sorted(layer)}")


def test_a_library_nixpkgs_lacks_stops_evaluation_until_the_user_supplies_it(sources, tmp_path):
    needs = dict(TORCH_NEEDS, **{"libhipsparselt.so.0": "torch/lib/libtorch_hip.so"})
    err = evaluate(sources, tmp_path, artifacts_lock(torch_needs=needs), ok=False)
    assert "libhipsparselt.so.0" in err and TORCH_FILE in err and "torch/lib/libtorch_hip.so" in err
    assert "rocmPackages.hipsparselt" in err and "vllmStrixLibraries" in err
    # The user's overlay adds it: linked, and shipped in the image.
    mine = ('{ vllmStrixLibraries."libhipsparselt.so" = { type = "derivation"; name = "hipsparselt-mine"; '
            'outPath = "/nix/store/00000000000000000000000000000000-hipsparselt-mine"; }; }')
    out, _ = evaluate(sources, tmp_path, artifacts_lock(torch_needs=needs), extra_pkgs=mine)
    assert "hipsparselt-mine" in out["described"]["torch"]["buildInputs"]
    assert "hipsparselt-mine" in out["container"]["layers"]["rocm"]


def test_an_unknown_soname_stops_evaluation(sources, tmp_path):
    needs = dict(TORCH_NEEDS, **{"libfrobnicate.so.3": "torch/lib/libtorch_hip.so"})
    err = evaluate(sources, tmp_path, artifacts_lock(torch_needs=needs), ok=False)
    assert "libfrobnicate.so.3" in err and TORCH_FILE in err and "maps it to no package" in err


def test_a_lock_without_needs_asks_for_a_new_lock(sources, tmp_path):
    lock = artifacts_lock()
    del lock["artifacts"][0]["needs"]
    err = evaluate(sources, tmp_path, lock, ok=False)
    assert "has no `needs`" in err and "vllm-launcher artifacts lock DIR" in err


def test_flake_outputs_keep_their_names(sources, tmp_path):
    """flake.nix's outputs called with these inputs (nixpkgs = the stub)."""
    out, _ = evaluate(sources, tmp_path, artifacts_lock())
    flake = out["flake"]
    assert {"default", "torch-rocm", "vllm", "vllm-env", "vllm-engine-env", "vllm-launcher", "vllm-server",
            "vllm-container"} <= set(flake["packages"])
    assert flake["apps"] == ["artifacts", "vllm-server"]
    assert flake["devShells"] == ["default", "vllm"] and flake["nixosModules"] == ["default", "vllm"]
    assert {"packagesFor", "overlayWithLock", "laneEnv", "runtimeEnv", "lock"} <= set(flake["lib"])
    assert {"torch-import", "vllm-import", "launcher-cli", "module-vm", "nix-eval"} <= set(flake["checks"])
    # A user's own locks through lib.packagesFor / overlayWithLock.
    assert flake["userVllmSrc"] == VLLM_FILE
    assert flake["overlayVllmServer"].startswith("vllm-server-")
    assert "torch 2.9.1, vLLM 0.12.0+rocm711" in flake["userDevShellHook"]
