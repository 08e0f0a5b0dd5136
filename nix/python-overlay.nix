# The one overlay on top of the uv2nix package set (nix/python.nix): what the lock alone cannot
# say. Everything else in the set is exactly uv.lock (python-env/uv.lock), built from its PyPI
# wheels by pyproject.nix (no nixpkgs Python package set anywhere).
#
# 1. Private wheels. Every artifact of artifacts.lock.json whose name is a package of the set
#    (torch, vllm; pytorch-triton-rocm or torchvision when you add them) gets `src` = the
#    requireFile'd (or fetchurl'd) wheel, pinned by the lock's sha256 (nix/lock.nix). Both uv.lock
#    shapes work: the registry placeholder (PyPI's torch/vllm files, Requires-Dist from
#    [[tool.uv.dependency-metadata]]) and the path source `wheels/<filename>` that
#    `vllm-launcher artifacts lock DIR` writes; for the latter the two locks must agree on file
#    name and sha256, or evaluation stops. With the registry shape, a `pytorch-triton-rocm`
#    artifact replaces the `triton` placeholder (PyPI's triton 3.5.1, same module).
#    The same pattern as the public uv2nix torch overlays (sepiabrown/uv2nix-torchWithCuda,
#    saeedece/uv2nix-cuda-overrides: `prev.torch.overrideAttrs` with a new src and the GPU
#    libraries in buildInputs; packages built on torch get `addAutoPatchelfSearchPath
#    <torch>/torch/lib`).
# 2. ROCm: torch and vLLM link ROCm 7.1 by soname; autoPatchelf (already in nativeBuildInputs of
#    every uv2nix wheel: uv2nix lib/build.nix `remote`) relinks them against rocmPackages.
# 3. Wheels needing more than the manylinux libraries: numba (libtbb.so.12, libgomp), amdsmi
#    (dlopens libamd_smi.so), PyPI's torchvision (a CUDA build).
#
# Attribute sources (read at or near the pinned nixpkgs 00c21e4c with the search tool, repo
# NixOS/nixpkgs): rocmPackages.* in pkgs/development/rocm-modules/default.nix (amdsmi: its
# default.nix, version 7.1.1, installs lib/libamd_smi.so with CMAKE_INSTALL_LIBDIR=lib); onetbb in
# pkgs/by-name/on/onetbb/package.nix (oneTBB 2022.x, soname libtbb.so.12); libgomp in gcc's `lib`
# output (`lib.getLib stdenv.cc.cc`, also what pythonManylinuxPackages.manylinux2014 uses for
# libstdc++: pkgs/development/interpreters/python/manylinux/default.nix); libdrm, numactl,
# elfutils, zstd, autoPatchelfHook, pythonManylinuxPackages top-level (uv2nix's lib/build.nix
# uses the last two for every wheel). From pyproject.nix: `final.pyprojectWheelHook`,
# `final.python` (build/packages.nix mkPythonSet). From uv2nix: `passthru.package`, the parsed
# uv.lock entry with `source` and `wheels` (lib/build.nix `remote`, lib/lock1.nix parsePackage).
{
  lib,
  stdenv,
  autoPatchelfHook,
  rocmPackages,
  onetbb,
  libdrm,
  numactl,
  elfutils,
  zstd,
  pythonManylinuxPackages,
  # nix/lock.nix: `specs` (plain data) and `sources` (fixed-output derivations), by artifact name
  specs,
  sources,
}:
final: prev:
let
  inherit (final.python) sitePackages;

  # The ROCm runtime libraries torch's HIP build links (libamdhip64, libhipblas, libMIOpen, ...).
  # When a build stops with "auto-patchelf: could not satisfy dependency libX.so.N", see
  # docs/nix.md section 6.
  rocmLibraries = with rocmPackages; [
    clr # libamdhip64, libhiprtc
    rocm-runtime # libhsa-runtime64
    rocm-comgr
    rocblas
    hipblas
    hipblas-common
    hipblaslt
    miopen # libMIOpen
    rocrand
    hiprand
    rocfft
    hipfft
    rocsparse
    hipsparse
    rocsolver
    hipsolver
    rccl
    roctracer # libroctracer64, libroctx64
    rocprofiler-register
    rocm-smi # librocm_smi64
    amdsmi # libamd_smi
  ];
  nativeLibraries = [
    libdrm
    numactl
    elfutils
    zstd
  ]
  ++ pythonManylinuxPackages.manylinux2014;

  torchLib = "${final.torch}/${sitePackages}/torch/lib";

  # Which package of the set an artifact replaces.
  slotOf =
    name: if name == "pytorch-triton-rocm" && !(prev ? pytorch-triton-rocm) then "triton" else name;
  swapped = lib.filter (name: prev ? ${slotOf name}) (builtins.attrNames specs);
  isSwapped = slot: lib.any (name: slotOf name == slot) swapped;
  artifactFor = slot: lib.findFirst (name: slotOf name == slot) null swapped;

  # A path-shaped uv.lock entry (`source = { path = "wheels/<file>" }`) carries the wheel's own
  # file name and hash: it must be the artifact Nix uses.
  checkAgreement =
    name: package:
    let
      spec = specs.${name};
      wheel = lib.head (package.wheels or [ { } ]);
      lockHash = wheel.hash or null;
      lockFile = wheel.filename or (baseNameOf package.source.path);
    in
    if !(package.source ? path) then
      true
    else if lockFile != spec.filename || (lockHash != null && lockHash != "sha256:${spec.sha256}") then
      throw ''
        vllm-strix: uv.lock and artifacts.lock.json disagree about ${name}:
          uv.lock:             ${lockFile} ${toString lockHash}
          artifacts.lock.json: ${spec.filename} sha256:${spec.sha256}
        Run `vllm-launcher artifacts lock DIR` again (it writes both) and commit both locks.''
    else
      true;

  # The private wheel in place of the lock's file; always installed as a wheel, whatever
  # uv2nix chose for the placeholder.
  fromArtifact =
    slot:
    {
      extraBuildInputs ? [ ],
      searchTorchLib ? false,
      attrs ? { },
    }:
    let
      name = artifactFor slot;
      old = prev.${slot};
    in
    assert checkAgreement name old.passthru.package;
    old.overrideAttrs (
      prevAttrs:
      {
        src = sources.${name};
        version = specs.${name}.version;
        nativeBuildInputs = [
          final.pyprojectWheelHook
          autoPatchelfHook
        ];
        buildInputs = nativeLibraries ++ extraBuildInputs;
        # Stripping these wheels breaks their ELF alignment (as in nixpkgs'
        # pkgs/development/python-modules/torch/bin/default.nix).
        dontStrip = true;
        passthru = prevAttrs.passthru // {
          artifact = specs.${name};
        };
      }
      // lib.optionalAttrs searchTorchLib {
        preFixup = ''
          addAutoPatchelfSearchPath "${torchLib}"
        '';
      }
      // attrs
    );

  torch = fromArtifact "torch" {
    extraBuildInputs = rocmLibraries;
    attrs = {
      # Narrow on purpose, each with its reason; never "*".
      autoPatchelfIgnoreMissingDeps = [
        # hipSPARSELt: sparse matmul kernels only built for MI300 (gfx942); not packaged in
        # nixpkgs and never loaded on gfx1151.
        "libhipsparselt.so.0"
      ];
      postFixup = ''
        addAutoPatchelfSearchPath "$out/${sitePackages}/torch/lib"
      '';
      passthru = prev.torch.passthru // {
        inherit rocmLibraries;
        artifact = specs.${artifactFor "torch"};
      };
    };
  };

  # vLLM's _C, _rocm_C and _moe_C extensions link libtorch*, libc10* (torch/lib) and ROCm.
  vllm = fromArtifact "vllm" {
    extraBuildInputs = rocmLibraries;
    searchTorchLib = true;
  };

  triton = fromArtifact "triton" { };
  pytorch-triton-rocm = fromArtifact "pytorch-triton-rocm" { };
in
lib.optionalAttrs (isSwapped "torch") { inherit torch; }
// lib.optionalAttrs (isSwapped "vllm") { inherit vllm; }
// lib.optionalAttrs (isSwapped "triton") { inherit triton; }
// lib.optionalAttrs (isSwapped "pytorch-triton-rocm") { inherit pytorch-triton-rocm; }
// lib.optionalAttrs (prev ? numba) {
  # numba/np/ufunc/tbbpool links libtbb.so.12 and omppool links libgomp.so.1.0.0 (readelf -d
  # of numba-0.61.2-cp311-...-manylinux2014_x86_64.whl).
  numba = prev.numba.overrideAttrs (prevAttrs: {
    buildInputs = (prevAttrs.buildInputs or [ ]) ++ [
      onetbb
      (lib.getLib stdenv.cc.cc)
    ];
  });
}
// lib.optionalAttrs (prev ? amdsmi) {
  # vLLM picks its ROCm platform by importing amdsmi. PyPI's amdsmi is ctypes only:
  # amdsmi/amdsmi_wrapper.py find_smi_library() tries $ROCM_HOME/lib, $ROCM_PATH/lib, the
  # linker's path, then the file beside itself. ROCM_PATH is clr here (nix/runtime-env.nix), so
  # the library goes beside the wrapper, from the same rocmPackages as torch.
  amdsmi = prev.amdsmi.overrideAttrs (prevAttrs: {
    postInstall = (prevAttrs.postInstall or "") + ''
      ln -s ${rocmPackages.amdsmi}/lib/libamd_smi.so $out/${sitePackages}/amdsmi/libamd_smi.so
    '';
  });
}
// lib.optionalAttrs (prev ? torchvision) {
  # PyPI's torchvision is a CUDA build: torchvision/_C.so and image.so link libtorch_cuda.so,
  # libc10_cuda.so and libcudart.so.12, which a ROCm torch does not have. Those two extensions
  # stay unloadable (torchvision catches it: extension.py _has_ops() is False, io warns), so the
  # compiled ops (torchvision.ops.nms, roi_align, deform_conv2d) and torchvision.io's JPEG/PNG
  # decoding fail; transforms and models, which vLLM and timm use, are pure Python and work.
  # A ROCm torchvision wheel as an artifact named `torchvision` replaces it (fromArtifact).
  torchvision =
    if isSwapped "torchvision" then
      fromArtifact "torchvision" {
        extraBuildInputs = rocmLibraries;
        searchTorchLib = true;
      }
    else
      prev.torchvision.overrideAttrs (prevAttrs: {
        preFixup = (prevAttrs.preFixup or "") + ''
          addAutoPatchelfSearchPath "${torchLib}"
        '';
        autoPatchelfIgnoreMissingDeps = [
          "libtorch_cuda.so"
          "libc10_cuda.so"
          "libcudart.so.12"
        ];
      });
}
