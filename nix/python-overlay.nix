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
# 2. Their native libraries come from the wheels themselves: `artifacts lock` recorded the
#    sonames each wheel needs and does not bundle, nix/native-libraries.nix maps them to
#    packages (ROCm, glibc, gcc's runtime, ...) or to another artifact's directory (vLLM ->
#    torch/lib), and autoPatchelf (already in nativeBuildInputs of every uv2nix wheel: uv2nix
#    lib/build.nix `remote`) links against exactly those. An unmapped soname stops evaluation;
#    nothing is ignored.
# 3. PyPI wheels that need more than the manylinux libraries, through the same table: numba
#    (libtbb.so.12, libgomp.so.1), amdsmi (loads libamd_smi.so at run time: the table's
#    `dlopened`).
#
# From pyproject.nix: `final.pyprojectWheelHook`, `final.python` (build/packages.nix
# mkPythonSet). From uv2nix: `passthru.package`, the parsed uv.lock entry with `source` and
# `wheels` (lib/build.nix `remote`, lib/lock1.nix parsePackage).
{
  lib,
  pkgs,
  autoPatchelfHook,
  # pkgs.rocmPackages after nix/packages.nix checked its version against the wheels'
  rocmPackages,
  # nix/lock.nix: `specs` (plain data) and `sources` (fixed-output derivations), by artifact name
  specs,
  sources,
  # the lock's `artifacts` list as written (with each wheel's `needs` and `provides`)
  artifacts,
  lockName ? "artifacts.lock.json",
}:
final: prev:
let
  inherit (final.python) sitePackages;

  # What each artifact needs, from the lock; and the libraries loaded at run time by packages
  # of this set. Lazy: an artifact's unmapped soname stops evaluation when that artifact (or the
  # image, which takes them all) is evaluated.
  native = (import ./native-libraries.nix).resolve {
    pkgs = pkgs // {
      inherit rocmPackages;
    };
    inherit artifacts;
    where = lockName;
    loaders = builtins.attrNames prev;
  };

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
    let
      name = artifactFor slot;
      old = prev.${slot};
      needs = native.artifacts.${name};
      # Libraries of another artifact (vLLM's libtorch.so: torch's torch/lib). The wheel's own
      # (torch's libc10.so) autoPatchelf finds in $out itself (auto-patchelf.py, add_existing).
      searchPaths = lib.concatMapStrings (d: ''
        addAutoPatchelfSearchPath "${final.${slotOf d.artifact}}/${sitePackages}/${d.dir}"
      '') needs.searchDirs;
    in
    assert checkAgreement name old.passthru.package;
    old.overrideAttrs (prevAttrs: {
      src = sources.${name};
      version = specs.${name}.version;
      nativeBuildInputs = [
        final.pyprojectWheelHook
        autoPatchelfHook
      ];
      buildInputs = needs.packages;
      # Stripping these wheels breaks their ELF alignment (as in nixpkgs'
      # pkgs/development/python-modules/torch/bin/default.nix).
      dontStrip = true;
      preFixup = searchPaths;
      passthru = prevAttrs.passthru // {
        artifact = specs.${name};
        # soname -> what gives it ("rocmPackages.clr", "artifact torch (torch/lib)", ...)
        inherit (needs) sonames;
        nativeLibraries = needs.packages;
      };
    });

  torch = (fromArtifact "torch").overrideAttrs (prevAttrs: {
    passthru = prevAttrs.passthru // {
      # Every package the artifacts need and the run-time loaded libraries of this set, once:
      # the image's native-library layer (nix/container.nix).
      imageLibraries = native.packages;
    };
  });
  vllm = fromArtifact "vllm";
  triton = fromArtifact "triton";
  pytorch-triton-rocm = fromArtifact "pytorch-triton-rocm";
in
lib.optionalAttrs (isSwapped "torch") { inherit torch; }
// lib.optionalAttrs (isSwapped "vllm") { inherit vllm; }
// lib.optionalAttrs (isSwapped "triton") { inherit triton; }
// lib.optionalAttrs (isSwapped "pytorch-triton-rocm") { inherit pytorch-triton-rocm; }
// lib.optionalAttrs (prev ? numba) {
  # numba/np/ufunc/tbbpool links libtbb.so.12 and omppool links libgomp.so.1.0.0 (readelf -d
  # of numba-0.61.2-cp311-...-manylinux2014_x86_64.whl).
  numba = prev.numba.overrideAttrs (prevAttrs: {
    buildInputs =
      (prevAttrs.buildInputs or [ ])
      ++ map native.library [
        "libtbb.so.12"
        "libgomp.so.1"
      ];
  });
}
// lib.optionalAttrs (prev ? amdsmi && native.dlopened ? "libamd_smi.so") {
  # vLLM picks its ROCm platform by importing amdsmi, whose ctypes wrapper looks for
  # libamd_smi.so beside itself among other places (nix/native-libraries.nix `dlopened`).
  # ROCM_PATH is clr here (nix/runtime-env.nix), so the library goes beside the wrapper.
  amdsmi = prev.amdsmi.overrideAttrs (prevAttrs: {
    postInstall = (prevAttrs.postInstall or "") + ''
      ln -s ${native.dlopened."libamd_smi.so"}/lib/libamd_smi.so $out/${sitePackages}/amdsmi/libamd_smi.so
    '';
  });
}
// lib.optionalAttrs (prev ? torchvision) {
  # Only as an artifact: a torchvision wheel built for the same ROCm torch (its needs then name
  # torch's libraries and ROCm's, resolved as any artifact's). PyPI's is a CUDA build whose _C.so
  # links libcudart and libtorch_cuda; beside a ROCm torch `import torchvision` fails, and with it
  # transformers and vLLM's API server. python-env keeps it out of the closure (issue 18).
  torchvision =
    if isSwapped "torchvision" then
      fromArtifact "torchvision"
    else
      throw ''
        vllm-strix: the Python closure (uv.lock) has PyPI's torchvision, a CUDA build that cannot
        load beside a ROCm torch (and with it no engine starts). Take it out of the closure
        (python-env/pyproject.toml's override-dependencies keep it out), or add a ROCm torchvision
        wheel built for your torch to the artifacts lock and run `vllm-launcher artifacts lock DIR`.'';
}
