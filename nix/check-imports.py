"""flake checks torch-import / vllm-import: run by the built environment's Python.

    python check-imports.py torch|vllm [python-env/pyproject.toml]

Imports the modules that matter (for vLLM the ones the launcher runs:
vllm.entrypoints.openai.api_server, which imports model_hosting_container_standards at the
top; vllm.entrypoints.cli.main, a multi-node lane's followers; ray, the cluster) and checks every Requires-Dist of the installed distribution whose marker holds here
against what the environment has installed. pyproject.nix installs wheels with `--no-deps`,
so this is the one place the private wheels' own METADATA meets the locked closure.
A requirement the closure leaves out on purpose, an override-dependencies entry of the given
pyproject.toml whose marker never holds (PyPI's CUDA torchvision and timm, issue 18), is
named but not a failure.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
import tomllib
from collections.abc import Callable

from packaging.requirements import Requirement

MODULES = {"torch": ("torch",),
           "vllm": ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.cli.main", "ray")}
# The ROCm torch wheel requires pytorch-triton-rocm; with the registry-shaped uv.lock the
# `triton` package provides the same module (nix/python-overlay.nix).
ALIASES = {"pytorch-triton-rocm": ("pytorch-triton-rocm", "triton")}


def installed(name: str) -> str | None:
    for candidate in ALIASES.get(name, (name,)):
        try:
            return md.version(candidate)
        except md.PackageNotFoundError:
            continue
    return None


def left_out(pyproject: str | None) -> set[str]:
    """Projects the closure overrides out: override-dependencies entries whose marker never holds."""
    if pyproject is None:
        return set()
    with open(pyproject, "rb") as file:
        overrides = tomllib.load(file).get("tool", {}).get("uv", {}).get("override-dependencies", [])
    return {canonical(r.name) for r in map(Requirement, overrides) if r.marker is not None and not r.marker.evaluate()}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def unmet(requires: list[str], version_of: Callable[[str], str | None],
          omitted: set[str]) -> tuple[list[str], list[str]]:
    """(requirements not met, requirements left out on purpose) of a Requires-Dist list."""
    problems, skipped = [], []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = version_of(req.name)
        if version is None and canonical(req.name) in omitted:
            skipped.append(str(req))
        elif version is None:
            problems.append(f"{req} : not installed")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            # Local versions (+rocm711) are compared without their local part, as pip does.
            if not req.specifier.contains(version.split("+")[0], prereleases=True):
                problems.append(f"{req} : {version} installed")
    return problems, skipped


def main(dist: str, pyproject: str | None = None) -> int:
    problems, skipped = unmet(md.requires(dist) or [], installed, left_out(pyproject))
    for problem in problems:
        print(f"{dist}: requirement not met: {problem}", file=sys.stderr)
    for requirement in skipped:
        print(f"{dist}: {requirement}: left out on purpose ({pyproject}, override-dependencies)")
    for module in MODULES[dist]:
        importlib.import_module(module)
    print(f"{dist} {md.version(dist)}: {', '.join(MODULES[dist])} import; "
          f"{len(md.requires(dist) or [])} requirements checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
