# torch 2.9.1 for ROCm 7.1 from the private wheel pinned in artifacts.lock.json.
# Modelled on nixpkgs' pkgs/development/python-modules/torch/bin/default.nix (format = "wheel",
# autoPatchelfHook, torch/lib on the search path, dontStrip), with rocmPackages where that file
# has cudaPackages. Called from nix/python.nix inside the python311 package set.
#
# A wheel without a `+rocm` tag links ROCm from /opt/rocm rather than bundling it: autoPatchelf
# relinks every DT_NEEDED against the rocmPackages libraries below. When the build stops with
# "could not satisfy dependency libX.so.N", run `readelf -d` on the file it names
# (`unzip -l` the wheel, `readelf -d torch/lib/libtorch_hip.so | grep NEEDED`), add the
# rocmPackages attribute that ships libX to `rocmLibraries`, and rebuild (docs/nix.md).
{
  lib,
  buildPythonPackage,
  python,
  src,
  version,
  autoPatchelfHook,
  rocmPackages,
  libdrm,
  numactl,
  elfutils,
  zstd,
  # dependencies
  filelock,
  fsspec,
  jinja2,
  networkx,
  numpy,
  pyyaml,
  requests,
  setuptools,
  sympy,
  typing-extensions,
  triton,
}:
let
  # The ROCm runtime libraries torch's HIP build links (libamdhip64, libhipblas, libMIOpen, ...).
  # Names: pkgs/development/rocm-modules/default.nix.
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
in
buildPythonPackage {
  pname = "torch";
  inherit version src;
  format = "wheel";

  nativeBuildInputs = [ autoPatchelfHook ];
  buildInputs = rocmLibraries ++ [
    libdrm
    numactl
    elfutils
    zstd
  ];

  # Narrow on purpose, each with its reason; never "*".
  autoPatchelfIgnoreMissingDeps = [
    # hipSPARSELt: sparse matmul kernels only built for MI300 (gfx942); not packaged in
    # nixpkgs and never loaded on gfx1151.
    "libhipsparselt.so.0"
  ];

  postFixup = ''
    addAutoPatchelfSearchPath "$out/${python.sitePackages}/torch/lib"
  '';

  # Stripping these wheels breaks their ELF alignment (same note as torch/bin/default.nix).
  dontStrip = true;

  dependencies = [
    filelock
    fsspec
    jinja2
    networkx
    numpy
    pyyaml
    requests
    setuptools
    sympy
    typing-extensions
    triton
  ];
  # The wheel pins `pytorch-triton-rocm==3.5.x`; `triton` above provides that module (the
  # lock's pytorch-triton-rocm wheel when present, see nix/python.nix).
  pythonRemoveDeps = [ "pytorch-triton-rocm" ];
  pythonRelaxDeps = [ "sympy" "networkx" "fsspec" ];

  pythonImportsCheck = [ "torch" ];

  passthru = { inherit rocmLibraries; };

  meta = {
    description = "PyTorch ${version} for ROCm, from a locally built wheel (artifacts.lock.json)";
    homepage = "https://pytorch.org/";
    license = lib.licenses.bsd3;
    sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
    platforms = [ "x86_64-linux" ];
  };
}
