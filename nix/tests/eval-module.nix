# Evaluate nix/module.nix with nixpkgs.lib's module system (no nixpkgs needed) and return
# what the tests check: failed assertions, the unit's environment and serviceConfig, the unit
# file NixOS would write from them, users, firewall. Usage (tests/test_nix_module.py):
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix \
#     --arg lib 'import <nixpkgs.lib>/lib' --arg configuration ./some-config.nix
{
  lib,
  configuration,
  # false: `pkgs` without vllm-server, as on a system without this flake's overlay (the flake's
  # nixosModules.vllm then sets `package` itself; the tests do the same with mkDefault).
  pkgsHasServer ? true,
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
      { _module.args.pkgs = lib.optionalAttrs pkgsHasServer { vllm-server = fakePackage; }; }
      { _module.args.fakePackage = fakePackage; }
      configuration
    ];
  };
  cfg = evaluated.config;
  unit = cfg.systemd.services.vllm or null;
  clusterUnit = cfg.systemd.services.vllm-cluster or null;

  # The unit file as NixOS writes it (nixos/lib/systemd-lib.nix: attrsToSection, toOption and
  # serviceToUnit's Environment="NAME=value" lines): a list gives one `Key=item` line per item,
  # booleans become true/false. For `systemd-analyze security --offline=true` (the tests).
  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;
  attrsToSection =
    as:
    lib.concatStrings (
      lib.concatLists (
        lib.mapAttrsToList (
          name: value: map (x: "${name}=${toOption x}\n") (if lib.isList value then value else [ value ])
        ) as
      )
    );
  unitFileOf =
    unit:
    if unit == null then
      null
    else
      ''
        [Unit]
        Description=${unit.description}
        Wants=${lib.concatStringsSep " " unit.wants}
        After=${lib.concatStringsSep " " unit.after}
        ${lib.optionalString ((unit.requires or [ ]) != [ ]) "Requires=${lib.concatStringsSep " " unit.requires}"}
        ${attrsToSection (unit.unitConfig or { })}
        [Service]
        ${lib.concatStrings (lib.mapAttrsToList (n: v: "Environment=\"${n}=${v}\"\n") unit.environment)}
        ${attrsToSection unit.serviceConfig}
        [Install]
        WantedBy=${lib.concatStringsSep " " unit.wantedBy}
      '';
  unitFile = unitFileOf unit;
  # the same view of a unit, for the cluster node's
  describe =
    unit:
    if unit == null then
      null
    else
      {
        inherit (unit) environment serviceConfig wantedBy;
        after = unit.after or [ ];
        requires = unit.requires or [ ];
        unitConfig = unit.unitConfig or { };
        unitFile = unitFileOf unit;
      };
in
{
  services = builtins.attrNames cfg.systemd.services;
  server = describe unit;
  cluster = describe clusterUnit;
  trustedInterfaces = cfg.networking.firewall.trustedInterfaces;
  firewallInterfaces = cfg.networking.firewall.interfaces;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  environment = if unit == null then null else unit.environment;
  serviceConfig = if unit == null then null else unit.serviceConfig;
  wantedBy = if unit == null then null else unit.wantedBy;
  inherit unitFile;
  package = if unit == null then null else cfg.services.vllm.package.outPath;
  users = cfg.users.users;
  groups = builtins.attrNames cfg.users.groups;
  firewall = cfg.networking.firewall.allowedTCPPorts;
  kernelParams = cfg.boot.kernelParams;
  options = builtins.attrNames evaluated.options.services.vllm;
}
