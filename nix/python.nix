# The engines' Python environment, built from a uv lock with uv2nix and pyproject.nix.
#
# nixpkgs supplies only the interpreter (python311), stdenv tools, autoPatchelf and the ROCm
# libraries; every Python package is the one python-env/uv.lock pins (185 packages: vLLM
# 0.12.0's ROCm requirements, torch 2.9.1, the launcher), each installed from its PyPI wheel.
# nix/python-overlay.nix then swaps torch and vLLM for the private wheels of
# artifacts.lock.json and adds what the wheels need beyond the manylinux libraries.
#
# API used (read in the sources, see docs/nix.md "Which uv2nix"):
#   uv2nix lib/workspace.nix   loadWorkspace { workspaceRoot; uvLock?; } -> mkPyprojectOverlay,
#                              deps.default
#   pyproject.nix build/packages.nix   callPackage build.packages { python; } -> a scope with
#                              overrideScope, mkVirtualEnv NAME SPEC, resolveVirtualEnv
# No build-system overlay (pyproject-nix/build-system-pkgs): with sourcePreference = "wheel"
# every locked package is a wheel (none is sdist-only, amdsmi included); the only source build
# is the launcher (setuptools, which the lock itself holds).
{
  lib,
  callPackage,
  python311,
  # flake inputs (or, in tests, the same attributes from plain imports)
  uv2nix,
  pyproject-nix,
  # the directory with pyproject.toml and uv.lock (this repository's python-env/, or yours)
  workspaceRoot,
  # an already parsed uv.lock (tests); null: read workspaceRoot/uv.lock
  uvLock ? null,
  # the overlay of nix/python-overlay.nix, already called with the lock's sources
  overlay,
}:
let
  workspace = uv2nix.lib.workspace.loadWorkspace (
    {
      inherit workspaceRoot;
    }
    // lib.optionalAttrs (uvLock != null) { inherit uvLock; }
  );

  lockOverlay = workspace.mkPyprojectOverlay { sourcePreference = "wheel"; };

  pythonSet = (callPackage pyproject-nix.build.packages { python = python311; }).overrideScope (
    lib.composeManyExtensions [
      lockOverlay
      overlay
    ]
  );

  # The workspace root (python-env/pyproject.toml, a virtual project) and what it asks for.
  rootName = lib.head (builtins.attrNames workspace.deps.default);
  rootDependencies = pythonSet.${rootName}.passthru.dependencies;
  launcherName = "vllm-launcher";

  # Everything but the launcher: torch, vLLM, amdsmi and their closure. Its store paths are the
  # image's big layer, which a launcher change must not touch (nix/container.nix).
  engineSpec = removeAttrs rootDependencies [ launcherName ];
  launcherSpec = {
    ${launcherName} = rootDependencies.${launcherName} or [ ];
  };
in
{
  inherit
    workspace
    pythonSet
    engineSpec
    launcherSpec
    ;
  python = pythonSet.python;
  # Every package the environment installs (derivations of the set).
  closure = pythonSet.resolveVirtualEnv workspace.deps.default;

  # torch, vLLM, amdsmi and their closure, without the launcher.
  engineEnv = pythonSet.mkVirtualEnv "vllm-engine-env" engineSpec;
  # The launcher alone (no torch): `nix run .#artifacts`, the module's VM test.
  launcherEnv = pythonSet.mkVirtualEnv "vllm-launcher-env" launcherSpec;
  # The one Python holding torch, vLLM and the launcher (VLLM_ENGINE_PYTHON).
  env = pythonSet.mkVirtualEnv "vllm-env" workspace.deps.default;
}
