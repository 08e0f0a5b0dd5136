# `nix develop .#vllm`: vllm-server and vllm-launcher on PATH, the gfx1151 runtime defaults
# exported, and on entry the versions and the lane configuration the launcher resolves from
# the current environment.
{
  lib,
  mkShell,
  vllmServer,
  runtimeEnv,
  nix,
}:
mkShell {
  name = "vllm";
  packages = [
    vllmServer
    vllmServer.env
    nix
  ];
  env = runtimeEnv // {
    VLLM_ENGINE_PYTHON = "${vllmServer.env}/bin/python";
  };
  shellHook = ''
    echo "vllm devshell: torch ${vllmServer.torch.version}, vLLM ${vllmServer.vllm.version}, launcher ${vllmServer.vllm-launcher.version}"
    echo "ROCm ${vllmServer.runtimeEnv.ROCM_PATH or "(ROCM_PATH unset)"}"
    echo "lanes (vllm-launcher config --format env):"
    vllm-launcher config --format env 2>&1 | sed 's/^/  /' || true
    echo "run: vllm-server   (or: vllm-launcher check)"
  '';
}
