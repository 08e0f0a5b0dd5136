# Evaluate nix/module.nix with nixpkgs.lib's module system (no nixpkgs needed) and return
# what the tests check: failed assertions, the unit's environment and serviceConfig, users,
# firewall. Usage (tests/test_nix_module.py):
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix \
#     --arg lib 'import <nixpkgs.lib>/lib' --arg configuration ./some-config.nix
{
  lib,
  configuration,
}:
let
  fakePackage = {
    type = "derivation";
    name = "vllm-server-fake";
    outPath = "/nix/store/00000000000000000000000000000000-vllm-server-fake";
  };
  evaluated = lib.evalModules {
    modules = [
      ./nixos-stubs.nix
      ../module.nix
      { _module.args.pkgs = { vllm-server = fakePackage; }; }
      configuration
    ];
  };
  cfg = evaluated.config;
  unit = cfg.systemd.services.vllm or null;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  environment = if unit == null then null else unit.environment;
  serviceConfig = if unit == null then null else unit.serviceConfig;
  wantedBy = if unit == null then null else unit.wantedBy;
  users = cfg.users.users;
  groups = builtins.attrNames cfg.users.groups;
  firewall = cfg.networking.firewall.allowedTCPPorts;
  options = builtins.attrNames evaluated.options.services.vllm;
}
