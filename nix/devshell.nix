# `nix develop .#vllm`: vllm-server and vllm-launcher on PATH, the gfx1151 runtime defaults
# exported, and on entry the versions and the lane configuration the launcher resolves from
# the current environment. For troubleshooting (seed 001): rocminfo (is gfx1151 an HSA agent?),
# amd-smi and rocm-smi (memory, clocks, processes), from the same rocmPackages as the image
# (nixpkgs' pkgs/development/rocm-modules/default.nix: rocminfo, amdsmi, rocm-smi).
# amd-smi and rocm-smi are Python scripts made with wrapPython (not propagated): each carries
# its interpreter (nixpkgs' python3) in its own shebang and wrapper, nothing of it goes on the
# shell's PATH or PYTHONPATH, and they come after the engines' venv, so `python` here stays the
# venv's 3.11.
{
  lib,
  mkShell,
  vllmServer,
  runtimeEnv,
  nix,
  rocmPackages,
}:
mkShell {
  name = "vllm";
  packages = [
    vllmServer
    vllmServer.env
    nix
    rocmPackages.rocminfo
    rocmPackages.amdsmi # amd-smi
    rocmPackages.rocm-smi # rocm-smi (deprecated upstream for amd-smi; seed 001 uses it)
  ];
  env = runtimeEnv // {
    VLLM_ENGINE_PYTHON = "${vllmServer.env}/bin/python";
  };
  shellHook = ''
    echo "vllm devshell: torch ${vllmServer.torch.version}, vLLM ${vllmServer.vllm.version}, launcher ${vllmServer.vllm-launcher.version}"
    echo "ROCm ${vllmServer.runtimeEnv.ROCM_PATH or "(ROCM_PATH unset)"}"
    echo "lanes (vllm-launcher config --format env):"
    vllm-launcher config --format env 2>&1 | sed 's/^/  /' || true
    echo "run: vllm-server   (or: vllm-launcher check); GPU: rocminfo, amd-smi, rocm-smi"
  '';
}
