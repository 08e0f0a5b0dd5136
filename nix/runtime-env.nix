# The one set of gfx1151 (Strix Halo) runtime defaults, shared by the devShell, the
# `vllm-server` wrapper, the OCI image and the NixOS module. Pure (builtins only):
#   nix-instantiate --eval --strict --json nix/runtime-env.nix
# Callers that have nixpkgs pass the ROCm store paths:
#   import ./runtime-env.nix {
#     rocmPath = "${rocmPackages.clr}";
#     hipDeviceLibPath = "${rocmPackages.rocm-device-libs}/amdgcn/bitcode";
#   }
# (the same two settings nixpkgs' own vllm wrapper sets: pkgs/development/python-modules/vllm).
# Facts: ../shared/docs/nix-packaging.md "gfx1151 runtime settings".
{
  rocmPath ? null,
  hipDeviceLibPath ? null,
  # null: leave HSA_OVERRIDE_GFX_VERSION unset (right for gfx1151-native builds). "11.5.1" is
  # the identity; "11.0.0" makes HIP load gfx1100 code objects: only on explicit request.
  hsaOverrideGfxVersion ? null,
}:
{
  # AITER targets MI300-class GPUs (gfx9); on RDNA APUs it is at best a no-op, at worst a crash.
  VLLM_ROCM_USE_AITER = "0";
  # vLLM 0.12's default backend on gfx11. The launcher reads this as its global
  # ATTENTION_BACKEND setting and hands it to the engine in the form that version accepts.
  VLLM_ATTENTION_BACKEND = "TRITON_ATTN";
  TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL = "1";
  MIOPEN_FIND_MODE = "FAST";
  # Telemetry off.
  VLLM_NO_USAGE_STATS = "1";
  VLLM_DO_NOT_TRACK = "1";
  DO_NOT_TRACK = "1";
}
// (if rocmPath == null then { } else { ROCM_PATH = rocmPath; })
// (if hipDeviceLibPath == null then { } else { HIP_DEVICE_LIB_PATH = hipDeviceLibPath; })
// (
  if hsaOverrideGfxVersion == null then
    { }
  else
    { HSA_OVERRIDE_GFX_VERSION = hsaOverrideGfxVersion; }
)
