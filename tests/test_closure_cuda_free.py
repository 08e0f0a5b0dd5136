"""Nothing built against CUDA in the locked closure: what would die beside the user's ROCm torch.

.venv-closure's torch is PyPI's CUDA build (the CPU twin of the user's ROCm wheel), beside which
every CUDA-linked extension loads: importing the closure here proves nothing about the target.
So these tests read the ELF DT_NEEDED of every native library of the locked packages (`uv export`
of python-env/uv.lock, as installed in .venv-closure; the artifacts of artifacts.lock.json, which
the user's wheels replace, aside) and
- fail on a link to a CUDA library or to torch's own libraries or HIP's (the lists `artifacts lock`
  refuses a torchvision wheel by) unless the package is on closure_env.ALLOWED with its reason;
- import the API server as on the target: every library but torch's own that needs a CUDA
  library fails to load (closure_env.TARGET_LOADER), as the dynamic loader fails there.
The negative tests take the lock before issue 18 (PyPI's torchvision 0.24.1, a CUDA build, pinned
by hash below; uv's cache keeps the 8 MB wheel, so it is downloaded once) installed into a
temporary --target directory: the scan names its _C.so, the import fails as it did on the target.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from closure_env import (
    ALLOWED,
    API_SERVER,
    CLOSURE_DIR,
    CLOSURE_PYTHON,
    LOCK,
    ROOT,
    TARGET_LOADER,
    UV,
    VLLM_VERSION,
    closure_ready,
    native_libraries,
    normalise,
    run_closure,
    scan,
    site_packages,
    unloadable_on_target,
)

pytestmark = [pytest.mark.closure,
              pytest.mark.skipif(not closure_ready(), reason=f"{CLOSURE_DIR} is missing: run `make closure`")]

# python-env/uv.lock before issue 18 (timm -> torchvision): PyPI's file, a CUDA 12.8 build.
CUDA_TORCHVISION = ("torchvision==0.24.1 "
                    "--hash=sha256:a0f106663e60332aa4fcb1ca2159ef8c3f2ed266b0e6df88de261048a840e0df")
NMS_ERROR = "RuntimeError: operator torchvision::nms does not exist"


@pytest.fixture(scope="module")
def locked_packages() -> set[str]:
    """The packages `uv export` gives for the lock (what Nix builds and the closure installs)."""
    export = subprocess.run([UV, "export", "--frozen", "--project", str(LOCK.parent), "--no-header", "--no-hashes",
                             "--no-annotate"], capture_output=True, text=True, timeout=60)
    assert export.returncode == 0, export.stderr
    names = {normalise(line.split("==")[0].split(";")[0].strip()) for line in export.stdout.splitlines()
             if line[:1].isalnum()}
    assert len(names) >= 150, sorted(names)
    return names


@pytest.fixture(scope="module")
def closure_site():
    return site_packages()


@pytest.fixture(scope="module")
def cuda_torchvision(tmp_path_factory):
    """PyPI's torchvision 0.24.1 (hash-pinned) in a --target directory of its own."""
    target = tmp_path_factory.mktemp("cuda-torchvision")
    requirements = target.parent / "torchvision-requirements.txt"
    requirements.write_text(CUDA_TORCHVISION + "\n")
    installed = subprocess.run([UV, "pip", "install", "-q", "--python", str(CLOSURE_PYTHON), "--target", str(target),
                                "--no-deps", "--require-hashes", "-r", str(requirements)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    return target


def target_like_import(tmp_path, libraries, *, pythonpath=None) -> subprocess.CompletedProcess:
    missing = unloadable_on_target(libraries)
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    code = TARGET_LOADER + f"import {API_SERVER}, vllm; print(vllm.__version__, vllm.__file__)"
    return run_closure(tmp_path, "-c", code, str(tmp_path / "missing.json"),
                       env={"PYTHONPATH": str(pythonpath)} if pythonpath else None)


def test_no_locked_package_links_cuda_or_torch(locked_packages, closure_site):
    libraries = native_libraries([closure_site])
    scanned = {name: files for name, files in libraries.items() if name in locked_packages}
    # the scan sees the closure's extensions (numpy, ray, cv2, ...), not an empty directory
    assert sum(map(len, scanned.values())) >= 150, {name: len(files) for name, files in scanned.items()}
    assert {"numpy", "ray", "opencv-python-headless", "xgrammar"} <= {n for n, f in scanned.items() if f}
    assert not {"torchvision", "timm"} & locked_packages, "python-env/pyproject.toml overrides them out"
    assert scan(libraries, locked_packages, [closure_site]) == []


def test_the_api_server_imports_as_on_the_target(tmp_path, closure_site):
    """The module every engine runs, with what the target cannot load made unloadable."""
    libraries = native_libraries([closure_site])
    result = target_like_import(tmp_path, libraries)
    assert result.returncode == 0, result.stderr[-4000:]
    version, path = result.stdout.split()[-2:]
    assert version == VLLM_VERSION and path.startswith(str(CLOSURE_DIR)), result.stdout


def test_the_scan_names_the_cuda_torchvision(locked_packages, closure_site, cuda_torchvision, monkeypatch):
    """The lock before issue 18 (torchvision 0.24.1 from PyPI) fails the scan, for its _C.so."""
    sites = [closure_site, cuda_torchvision]
    libraries = native_libraries(sites)
    problems = scan(libraries, locked_packages | {"torchvision"}, sites)
    assert problems, "the scan passed PyPI's CUDA torchvision"
    assert all(line.startswith("torchvision: ") for line in problems), problems
    c_so = next(line for line in problems if line.startswith("torchvision: torchvision/_C.so needs "))
    assert "CUDA libcudart.so.12, libc10_cuda.so, libtorch_cuda.so" in c_so, c_so
    assert "torch/HIP libc10.so, libtorch.so, libtorch_cpu.so, libtorch_python.so" in c_so, c_so
    # on the allow-list (with a reason) it passes: the list is what exempts a package
    monkeypatch.setitem(ALLOWED, "torchvision", "test")
    assert scan(libraries, locked_packages | {"torchvision"}, sites) == []


def test_the_import_fails_with_the_cuda_torchvision_as_on_the_target(tmp_path, closure_site, cuda_torchvision):
    """What every engine did on the target: torchvision's _C.so does not load, its
    _meta_registrations then registers a fake kernel for an operator that does not exist, and
    transformers imports torchvision on the API server's import chain."""
    libraries = native_libraries([closure_site, cuda_torchvision])
    assert {os.path.relpath(path, cuda_torchvision) for path in unloadable_on_target(libraries)} == {
        "torchvision/_C.so", "torchvision/image.so"}
    # what CI saw before: beside the CPU twin (a CUDA build) the same import passes
    plain = run_closure(tmp_path, "-c", f"import {API_SERVER}", env={"PYTHONPATH": str(cuda_torchvision)})
    assert plain.returncode == 0, plain.stderr[-4000:]
    result = target_like_import(tmp_path, libraries, pythonpath=cuda_torchvision)
    assert result.returncode != 0, "the API server imported with torchvision's _C.so unloadable"
    assert result.stderr.strip().splitlines()[-1] == NMS_ERROR, result.stderr[-4000:]
    frames = result.stderr.split("Traceback (most recent call last):")[-1]
    assert "transformers/image_utils.py" in frames and "torchvision/_meta_registrations.py" in frames, frames[-4000:]


def test_the_flake_import_check_accepts_what_the_closure_leaves_out(closure_site):
    """nix/check-imports.py (flake check vllm-import) compares the vLLM wheel's Requires-Dist
    with the built closure: rocm.txt's timm (the stand-in METADATA, as the real wheel's) is
    left out on purpose by the pyproject's overrides, not a failure; anything else missing is."""
    import importlib.metadata
    import importlib.util
    import tomllib

    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "nix" / "check-imports.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    pyproject = LOCK.parent / "pyproject.toml"
    stand_ins = tomllib.loads(pyproject.read_text())["tool"]["uv"]["dependency-metadata"]
    requires = next(m["requires-dist"] for m in stand_ins if m["name"] == "vllm")
    installed = {normalise(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions(path=[str(closure_site)])}

    def version_of(name: str) -> str | None:
        return installed.get(normalise(name))

    assert check.left_out(str(pyproject)) == {"torchvision", "timm", "cupy-cuda12x"}
    problems, skipped = check.unmet(requires, version_of, check.left_out(str(pyproject)))
    assert (problems, skipped) == ([], ["timm>=1.0.17"])
    problems, skipped = check.unmet(requires, version_of, set())       # without the pyproject: the old failure
    assert problems == ["timm>=1.0.17 : not installed"] and skipped == []
