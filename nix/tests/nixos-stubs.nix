# The few NixOS option declarations nix/module.nix touches, so the module can be evaluated
# with nixpkgs.lib's evalModules alone (tests/test_nix_module.py). Not a NixOS replacement:
# types are as loose as the real ones where the module does not depend on their details.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  anything = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    users.users = mkOption {
      type = types.attrsOf (types.attrsOf types.anything);
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.attrsOf types.anything);
      default = { };
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    networking.firewall.trustedInterfaces = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    networking.firewall.interfaces = mkOption {
      type = types.attrsOf (
        types.submodule {
          options.allowedTCPPorts = mkOption {
            type = types.listOf types.port;
            default = [ ];
          };
          options.allowedTCPPortRanges = mkOption {
            type = types.listOf (types.attrsOf types.port);
            default = [ ];
          };
        }
      );
      default = { };
    };
    boot.kernelParams = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    systemd.services = mkOption {
      type = types.attrsOf (
        types.submodule {
          freeformType = types.attrsOf types.anything;
          options.serviceConfig = anything;
          options.environment = mkOption {
            type = types.attrsOf types.str;
            default = { };
          };
        }
      );
      default = { };
    };
  };
}
