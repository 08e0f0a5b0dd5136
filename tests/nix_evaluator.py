"""The real Nix evaluator (Debian's nix-bin, installed by .ci/run) for the tests of nix/ and
flake.nix; without it they fail rather than skip. NIXPKGS_LIB names a nixpkgs.lib checkout for
the tests that evaluate the NixOS module (run_eval, evaluate)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import tiers

ROOT = Path(__file__).resolve().parent.parent


def nix_instantiate() -> str:
    tiers.require("nix", doing="runs the Nix evaluator")
    found = shutil.which("nix-instantiate")
    assert found, "nix-instantiate not found: install Debian's nix-bin (.ci/run does)"
    return found


def nix_eval(expr: str, *, ok: bool = True) -> object:
    result = subprocess.run(
        [nix_instantiate(), "--eval", "--strict", "--json", "-E", expr],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    if not ok:
        assert result.returncode != 0, result.stdout
        return result.stderr
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def nixpkgs_lib() -> Path:
    value = os.environ.get("NIXPKGS_LIB")
    if not value:
        pytest.skip("NIXPKGS_LIB is unset: set it to a nix-community/nixpkgs.lib checkout to evaluate the module")
    path = Path(value)
    if (path / "lib" / "default.nix").exists():
        path = path / "lib"
    if not (path / "default.nix").exists():
        pytest.fail(f"NIXPKGS_LIB={value}: no default.nix of nixpkgs' lib there")
    return path


def run_eval(module: str, *, pkgs_has_server: bool = True) -> subprocess.CompletedProcess:
    """Evaluate nix/tests/eval-module.nix with `module` (Nix text) as the configuration."""
    lib = nixpkgs_lib()
    with tempfile.NamedTemporaryFile("w", suffix=".nix", delete=False) as handle:
        handle.write(module + "\n")
    try:
        return subprocess.run(
            [nix_instantiate(), "--eval", "--strict", "--json", "nix/tests/eval-module.nix",
             "--arg", "lib", f"import {lib}", "--arg", "configuration", handle.name,
             "--arg", "pkgsHasServer", "true" if pkgs_has_server else "false"],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )
    finally:
        os.unlink(handle.name)


def evaluate(services_vllm: str) -> dict:
    result = run_eval(f"{{ services.vllm = {services_vllm}; }}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
