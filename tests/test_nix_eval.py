"""Nix checks that need no nixpkgs (issue 6 point 4, issue 7 point 4): every .nix file parses;
no nixpkgs Python package set is used (issue 11);
the pure parts (lock -> sources, runtime environment) evaluate to the expected JSON; the lock
validates against its schema; flake.lock pins what docs/nix.md says.

These call the real `nix-instantiate` (Debian's nix-bin, installed by .ci/run); without it
they fail rather than skip.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest

from nix_evaluator import ROOT, nix_eval, nix_instantiate

pytestmark = pytest.mark.nix

NIX_FILES = sorted([ROOT / "flake.nix", *(ROOT / "nix").rglob("*.nix")])


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses(path: Path):
    result = subprocess.run([nix_instantiate(), "--parse", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_machine_paths_or_repository_wheels():
    for path in NIX_FILES:
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"/home/|/opt/rocm|/root/|/Users/", code), f"{path}: absolute machine path"
        assert not re.search(r"[\w./-]*\.whl\b", code), f"{path}: a wheel referenced by path"


# nixpkgs' Python package set and its builders (issue 11): the environment comes from uv.lock
# through uv2nix/pyproject.nix; nixpkgs gives only the interpreter, stdenv and libraries.
PYTHON_SET = re.compile(r"python3\d*Packages|pythonPackages|python3\d*\.pkgs|\.withPackages|buildPythonPackage|"
                        r"buildPythonApplication|toPythonModule|packageOverrides|pythonRemoveDeps|pythonRelaxDeps")


def test_no_nixpkgs_python_package_set():
    for path in [ROOT / "flake.nix", *sorted((ROOT / "nix").glob("*.nix"))]:
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        found = PYTHON_SET.findall(code)
        assert not found, f"{path.relative_to(ROOT)}: nixpkgs Python package set ({found})"


def test_lock_validates_against_schema():
    schema = json.loads((ROOT / "nix/artifacts.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads((ROOT / "artifacts.lock.json").read_text()), schema)


def test_schema_rejects_a_bad_lock():
    schema = json.loads((ROOT / "nix/artifacts.schema.json").read_text())
    bad = json.loads((ROOT / "artifacts.lock.json").read_text())
    bad["artifacts"][0]["sha256"] = "0" * 63
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


LOCKED = {
    "version": 1,
    "artifacts": [
        {"name": "torch", "version": "2.9.1", "filename": "torch-2.9.1-cp311-cp311-linux_x86_64.whl",
         "sha256": "a" * 64, "size": 10},
        {"name": "vllm", "version": "0.12.0+rocm711",
         "filename": "vllm-0.12.0+rocm711-cp311-cp311-linux_x86_64.whl", "sha256": "b" * 64, "size": 20},
        {"name": "pytorch-triton-rocm", "version": "3.5.1",
         "filename": "pytorch_triton_rocm-3.5.1-cp311-cp311-linux_x86_64.whl", "sha256": "c" * 64,
         "size": 30, "url": "https://example.invalid/pytorch_triton_rocm-3.5.1-cp311-cp311-linux_x86_64.whl"},
    ],
}


def lock_expr(lock: dict, attr: str) -> str:
    return f"(import ./nix/lock.nix {{ lock = builtins.fromJSON {json.dumps(json.dumps(lock))}; }}).{attr}"


def test_lock_to_source_specs():
    specs = nix_eval(lock_expr(LOCKED, "specs"))
    assert set(specs) == {"torch", "vllm", "pytorch-triton-rocm"}
    torch = specs["torch"]
    assert (torch["filename"], torch["sha256"], torch["fetcher"]) == (
        "torch-2.9.1-cp311-cp311-linux_x86_64.whl", "a" * 64, "requireFile")
    assert "nix-store --add-fixed sha256" in torch["message"] and torch["filename"] in torch["message"]
    assert specs["pytorch-triton-rocm"]["fetcher"] == "fetchurl"


def requirefile_prints(message: str) -> str:
    """What nixpkgs' requireFile shows for `message`: its builder is `cat <<_EOF_` (unquoted,
    so bash expands $, backticks and backslashes) around ***, the message and *** (issue 18)."""
    script = f"cat <<_EOF_\n\n***\n{message}\n***\n\n_EOF_\n"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env={})
    return result.stdout


def test_requirefile_message_is_printed_verbatim():
    # the harness is a real shell: a backtick in a message runs a command
    assert requirefile_prints("run `echo ran` now").strip() == "***\nrun ran now\n***"
    for name, spec in nix_eval(lock_expr(LOCKED, "specs")).items():
        message = spec["message"]
        assert not re.search(r"[`$\\]", message), f"{name}: {message}"
        assert requirefile_prints(message) == f"\n***\n{message}\n***\n\n", name
        assert "vllm-launcher artifacts lock DIR" in message and spec["filename"] in message


def test_sources_use_requirefile_and_fetchurl():
    # Stand-ins record the arguments nixpkgs' requireFile / fetchurl would get.
    expr = lock_expr(LOCKED, "sources") + (
        " { requireFile = a: { fn = \"requireFile\"; inherit (a) name sha256; };"
        " fetchurl = a: { fn = \"fetchurl\"; inherit (a) name sha256 url; }; }"
    )
    sources = nix_eval(expr)
    assert sources["vllm"] == {"fn": "requireFile", "name": LOCKED["artifacts"][1]["filename"], "sha256": "b" * 64}
    assert sources["pytorch-triton-rocm"]["fn"] == "fetchurl"
    assert sources["pytorch-triton-rocm"]["name"] == LOCKED["artifacts"][2]["filename"]


def test_committed_lock_fails_with_the_command_to_run():
    err = nix_eval("(import ./nix/lock.nix { lockFile = ./artifacts.lock.json; }).specs.torch", ok=False)
    assert "not locked yet" in err and "vllm-launcher artifacts lock DIR" in err
    # Versions stay readable while unlocked (labels, messages).
    assert nix_eval("(import ./nix/lock.nix { lockFile = ./artifacts.lock.json; }).versions") == {
        "torch": "2.9.1", "vllm": "0.12.0+rocm711"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "XYZ"}, "64 lower-case hex"),
        ({"filename": "torch.whl"}, "PEP 427"),
    ],
)
def test_lock_rejects_bad_entries(change: dict, message: str):
    bad = json.loads(json.dumps(LOCKED))
    bad["artifacts"][0].update(change)
    assert message in nix_eval(lock_expr(bad, "specs.torch"), ok=False)


def test_lock_rejects_duplicates():
    bad = json.loads(json.dumps(LOCKED))
    bad["artifacts"].append(dict(bad["artifacts"][0]))
    assert "appears twice" in nix_eval(lock_expr(bad, "specs"), ok=False)


def test_runtime_env_defaults():
    env = nix_eval("import ./nix/runtime-env.nix { }")
    assert env == {
        "VLLM_ROCM_USE_AITER": "0",
        "VLLM_ATTENTION_BACKEND": "TRITON_ATTN",
        "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1",
        "MIOPEN_FIND_MODE": "FAST",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
    }
    assert "HSA_OVERRIDE_GFX_VERSION" not in env


def test_runtime_env_with_rocm_paths_and_override():
    env = nix_eval(
        'import ./nix/runtime-env.nix { rocmPath = "/nix/store/x-clr"; '
        'hipDeviceLibPath = "/nix/store/y-rocm-device-libs/amdgcn/bitcode"; hsaOverrideGfxVersion = "11.5.1"; }'
    )
    assert env["ROCM_PATH"] == "/nix/store/x-clr"
    assert env["HIP_DEVICE_LIB_PATH"].endswith("/amdgcn/bitcode")
    assert env["HSA_OVERRIDE_GFX_VERSION"] == "11.5.1"


def test_flake_lock_pins():
    lock = json.loads((ROOT / "flake.lock").read_text())
    nodes = lock["nodes"]
    assert set(nodes["root"]["inputs"]) == {"nixpkgs", "nix2container", "pyproject-nix", "uv2nix"}
    nixpkgs = nodes["nixpkgs"]["locked"]
    # nixos-unstable of 2026-02-04 (ROCm 7.1.x); narHash from hellas-ai/nix-strix-halo's
    # flake.lock at commit 8fee904 (docs/nix.md says why and where).
    assert nixpkgs["rev"] == "00c21e4c93d963c50d4c0c89bfa84ed6e0694df2"
    assert nixpkgs["narHash"] == "sha256-AYqlWrX09+HvGs8zM6ebZ1pwUqjkfpnv8mewYwAo+iM="
    assert nodes["nix2container"]["inputs"] == {"nixpkgs": ["nixpkgs"]}
    # uv2nix and pyproject.nix follow our nixpkgs, uv2nix our pyproject.nix (one copy of each).
    assert nodes["pyproject-nix"]["inputs"] == {"nixpkgs": ["nixpkgs"]}
    assert nodes["uv2nix"]["inputs"] == {"nixpkgs": ["nixpkgs"], "pyproject-nix": ["pyproject-nix"]}
    assert (nodes["uv2nix"]["locked"]["owner"], nodes["pyproject-nix"]["locked"]["repo"]) == (
        "pyproject-nix", "pyproject.nix")
    nodes_pinned = ("nixpkgs", "nix2container", "pyproject-nix", "uv2nix")
    for node in nodes_pinned:
        assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", nodes[node]["locked"]["narHash"])
        assert re.fullmatch(r"[0-9a-f]{40}", nodes[node]["locked"]["rev"])
    docs = (ROOT / "docs/nix.md").read_text()
    for node in nodes_pinned:
        assert nodes[node]["locked"]["rev"] in docs and nodes[node]["locked"]["narHash"] in docs
