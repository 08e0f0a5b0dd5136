# flake check `module-vm`: a NixOS VM runs services.vllm with two lanes whose engine is the fake
# vLLM of ./fake-vllm (no GPU, no model), and checks that the unit becomes active (Type=notify)
# under the module's hardening, answers /health, lists both lanes' names and writes its log
# directory. Needs nixpkgs and KVM: it runs on a NixOS
# builder (`nix flake check`), not on the CI machines of this repository.
{
  lib,
  testers,
  runCommand,
  makeWrapper,
  python311,
  nixosModule,
  vllmLauncher,
}:
let
  # The fake engine needs only the standard library: the bare interpreter with the fake `vllm`
  # (module and dist-info, which the launcher reads for the version) on PYTHONPATH; no nixpkgs
  # Python package set, as everywhere in this flake.
  fakeServer = runCommand "vllm-server-fake-engine" { nativeBuildInputs = [ makeWrapper ]; } ''
    mkdir -p $out/bin
    makeWrapper ${python311.interpreter} $out/bin/engine-python \
      --prefix PYTHONPATH : ${./fake-vllm}
    makeWrapper ${vllmLauncher}/bin/vllm-launcher $out/bin/vllm-server \
      --set VLLM_ENGINE_PYTHON $out/bin/engine-python
  '';
in
testers.runNixOSTest {
  name = "vllm-module";
  nodes.machine = {
    imports = [ nixosModule ];
    services.vllm = {
      enable = true;
      package = fakeServer;
      port = 8000;
      logRequests = true;
      logDirectory = "/var/log/vllm";
      lanes = {
        alpha = {
          model = "org/alpha-model";
          servedModelName = "alpha";
        };
        beta = {
          model = "org/beta-model";
          aliases = [ "b" ];
        };
      };
    };
  };
  testScript = ''
    machine.wait_for_unit("vllm.service")
    machine.wait_until_succeeds("curl -fs http://127.0.0.1:8000/health")
    models = machine.succeed("curl -fs http://127.0.0.1:8000/v1/models")
    assert "alpha" in models, models
    machine.succeed("systemctl show vllm.service -p KillMode | grep control-group")
    # the hardening of issue 11 leaves Python, the launcher and the engine working; its limits hold
    machine.succeed("systemctl show vllm.service -p LimitNOFILE | grep -x LimitNOFILE=65536")
    machine.succeed("test -n \"$(ls -A /var/log/vllm)\"")  # LOG_DIRECTORY in the LogsDirectory
    machine.log(machine.succeed("systemd-analyze security vllm.service | tail -1"))
    machine.succeed("systemctl stop vllm.service")
    machine.fail("pgrep -f vllm.entrypoints.openai.api_server")
  '';
}
