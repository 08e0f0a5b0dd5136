# Everything this flake builds, for any nixpkgs package set, any artifacts lock and any uv lock:
# flake.nix's `lib.packagesFor` and `packages` are this function; tests/test_nix_python_set.py
# calls it with a stubbed `pkgs` and the uv2nix / pyproject.nix sources.
#
# From nixpkgs only: python311 (the interpreter), stdenv, autoPatchelfHook, requireFile/fetchurl,
# rocmPackages and the C libraries the wheels link (nix/native-libraries.nix). No nixpkgs
# Python package set: every Python package comes from uv.lock through uv2nix.
{
  pkgs,
  # flake inputs: pyproject-nix/uv2nix, pyproject-nix/pyproject.nix, nlewo/nix2container
  uv2nix,
  pyproject-nix,
  nix2container ? null,
  # artifacts.lock.json: the private wheels' file names and sha256
  lockFile ? ../artifacts.lock.json,
  # the directory holding pyproject.toml and uv.lock (python-env/ of this repository, or yours:
  # `vllm-launcher artifacts lock DIR` re-locks it with path sources `wheels/<filename>`)
  pythonEnvDir ? ../python-env,
  # a parsed uv.lock instead of pythonEnvDir/uv.lock (tests)
  uvLock ? null,
  hsaOverrideGfxVersion ? null,
}:
let
  inherit (pkgs) lib rocmPackages;
  locked = import ./lock.nix { inherit lockFile; };
  sources = locked.sources { inherit (pkgs) requireFile fetchurl; };

  # The wheels are ROCm 7.1.1 builds: refuse another ROCm instead of failing at run time with
  # missing sonames (pitfall 1 in the packaging notes).
  rocmVersion = rocmPackages.clr.version;
  checkedRocm =
    if lib.versions.majorMinor rocmVersion == "7.1" then
      rocmPackages
    else
      throw "vllm-strix: the wheels need ROCm 7.1.x, this nixpkgs has rocmPackages ${rocmVersion}; use this flake's nixpkgs pin (flake.lock) or wheels built for ${rocmVersion}";

  runtimeEnv = import ./runtime-env.nix {
    rocmPath = "${checkedRocm.clr}";
    hipDeviceLibPath = "${checkedRocm.rocm-device-libs}/amdgcn/bitcode";
    inherit hsaOverrideGfxVersion;
  };

  overlay = pkgs.callPackage ./python-overlay.nix {
    rocmPackages = checkedRocm;
    inherit (locked) specs;
    inherit sources;
    # each wheel's recorded `needs`/`provides`, for nix/native-libraries.nix
    inherit (locked.lock) artifacts;
    lockName = if lockFile == null then "artifacts.lock.json" else baseNameOf (toString lockFile);
  };

  python = pkgs.callPackage ./python.nix {
    inherit uv2nix pyproject-nix overlay uvLock;
    workspaceRoot = pythonEnvDir;
  };

  inherit (python) pythonSet;

  vllm-server = pkgs.callPackage ./vllm-server.nix {
    rocmPackages = checkedRocm;
    inherit python runtimeEnv;
  };
in
{
  inherit
    python
    pythonSet
    runtimeEnv
    vllm-server
    ;
  inherit (locked) versions;
  torch-rocm = pythonSet.torch;
  vllm = pythonSet.vllm;
  # torch, vLLM and their closure without the launcher (the image's big layer).
  vllm-engine-env = python.engineEnv;
  # The one Python with torch, vLLM and the launcher.
  vllm-env = python.env;
  # The launcher alone (no torch, no wheels): what `nix run .#artifacts` needs.
  vllm-launcher = python.launcherEnv;
  vllm-container =
    if nix2container == null then
      null
    else
      pkgs.callPackage ./container.nix {
        inherit nix2container runtimeEnv;
        vllmServer = vllm-server;
      };
  devShell = pkgs.callPackage ./devshell.nix {
    vllmServer = vllm-server;
    inherit runtimeEnv;
  };
}
