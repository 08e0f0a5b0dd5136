# `vllm-server`: the launcher wrapped with the gfx1151 runtime environment, a C compiler on PATH
# (Triton and torch.compile compile at run time) and VLLM_ENGINE_PYTHON pointing at the one
# Python environment that holds torch, vLLM and the launcher (nix/python.nix `env`, a
# pyproject.nix virtual environment built from uv.lock). With no arguments it runs
# `vllm-launcher serve`; with arguments it is `vllm-launcher ARGS...`.
# Every runtime default is --set-default: a value the user or the unit sets wins.
{
  lib,
  runCommand,
  makeWrapper,
  stdenv,
  rocmPackages,
  # nix/python.nix's result
  python,
  runtimeEnv,
}:
let
  inherit (python) env pythonSet;
  launcher = pythonSet.vllm-launcher;
  setDefaults = lib.concatStringsSep " " (
    lib.mapAttrsToList (k: v: "--set-default ${k} ${lib.escapeShellArg v}") (
      runtimeEnv // { VLLM_ENGINE_PYTHON = "${env}/bin/python"; }
    )
  );
  path = lib.makeBinPath [
    stdenv.cc
    rocmPackages.clr
    env
  ];
in
runCommand "vllm-server-${launcher.version}"
  {
    nativeBuildInputs = [ makeWrapper ];
    passthru = {
      inherit env runtimeEnv;
      engineEnv = python.engineEnv;
      inherit (pythonSet) torch vllm;
      vllm-launcher = launcher;
    };
    meta = {
      description = "vLLM lane launcher with torch and vLLM for ROCm (gfx1151)";
      mainProgram = "vllm-server";
      platforms = [ "x86_64-linux" ];
    };
  }
  ''
    mkdir -p $out/bin
    makeWrapper ${env}/bin/vllm-launcher $out/bin/vllm-launcher \
      ${setDefaults} --prefix PATH : ${path}
    cat > $out/bin/vllm-server <<SH
    #!${stdenv.shell}
    if [ "\$#" -eq 0 ]; then set -- serve; fi
    exec $out/bin/vllm-launcher "\$@"
    SH
    chmod +x $out/bin/vllm-server
  ''
