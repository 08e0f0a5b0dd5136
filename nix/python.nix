# One python311 package set holding torch (ROCm wheel), vLLM (ROCm wheel) and the launcher, so
# nothing in the closure pulls a second torch (../shared/docs/nix-packaging.md). Everything
# else comes from the pinned nixpkgs; python311 is not nixpkgs' default set, so most packages
# here build from source (no binary cache for them).
{
  lib,
  python311,
  rocmPackages,
  # { torch = <drv>; vllm = <drv>; pytorch-triton-rocm = <drv>?; } from nix/lock.nix `sources`
  sources,
  # versions from the lock (readable while unlocked)
  versions,
  launcherSrc ? ../launcher,
}:
let
  python = python311.override {
    self = python;
    packageOverrides =
      pyFinal: pyPrev:
      {
        torch = pyFinal.callPackage ./torch-rocm.nix {
          src = sources.torch;
          version = versions.torch;
          inherit rocmPackages;
        };
        vllm = pyFinal.callPackage ./vllm.nix {
          src = sources.vllm;
          version = versions.vllm;
          inherit rocmPackages;
        };
        vllm-launcher = pyFinal.callPackage ./launcher.nix { src = launcherSrc; };
        # rocmPackages.amdsmi is built for the default python only (pitfall 7 in
        # ../shared/docs/nix-packaging.md): rebuild its Python binding for this set.
        amdsmi = pyFinal.toPythonModule (
          rocmPackages.amdsmi.override {
            inherit (pyFinal) python wrapPython;
          }
        );
      }
      // lib.optionalAttrs (sources ? pytorch-triton-rocm) {
        triton = pyFinal.callPackage ./triton-rocm.nix {
          src = sources.pytorch-triton-rocm;
          version = versions.pytorch-triton-rocm;
        };
      };
  };
in
python
