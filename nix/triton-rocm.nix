# The triton that matches torch 2.9.1 for ROCm (pytorch-triton-rocm 3.5.x), from a third,
# optional wheel in artifacts.lock.json (entry name "pytorch-triton-rocm"). nix/python.nix uses
# it as `triton` when the lock has that entry; otherwise nixpkgs' triton is kept.
{
  lib,
  buildPythonPackage,
  src,
  version,
  autoPatchelfHook,
  zlib,
  filelock,
}:
buildPythonPackage {
  pname = "triton";
  inherit version src;
  format = "wheel";
  nativeBuildInputs = [ autoPatchelfHook ];
  buildInputs = [ zlib ];
  dontStrip = true;
  dependencies = [ filelock ];
  pythonImportsCheck = [ "triton" ];
  meta = {
    description = "Triton ${version} for ROCm, from a locally built wheel (artifacts.lock.json)";
    license = lib.licenses.mit;
    sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
    platforms = [ "x86_64-linux" ];
  };
}
