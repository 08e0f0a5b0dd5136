{
  description = "vLLM lanes behind one OpenAI endpoint on AMD Strix Halo (gfx1151, ROCm 7.1), from pinned private wheels";

  inputs = {
    # Pinned in flake.lock to a nixos-unstable revision of 2026-02-04 whose rocmPackages are
    # 7.1.x (the wheels were built for ROCm 7.1.1); see docs/nix.md "Which nixpkgs".
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    nix2container = {
      url = "github:nlewo/nix2container";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      nix2container,
    }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};

      # Everything this flake builds, for any nixpkgs package set and any lock file: users who
      # consume the flake pass their own lock instead of forking
      # (`inputs.vllm-strix.lib.packagesFor { inherit pkgs; lockFile = ./my.lock.json; }`).
      packagesFor =
        {
          pkgs,
          lockFile ? ./artifacts.lock.json,
          hsaOverrideGfxVersion ? null,
        }:
        let
          inherit (pkgs) lib rocmPackages;
          locked = import ./nix/lock.nix { inherit lockFile; };
          sources = locked.sources { inherit (pkgs) requireFile fetchurl; };
          # The wheels are ROCm 7.1.1 builds: refuse another ROCm instead of failing at run time
          # with missing sonames (pitfall 1 in the packaging notes).
          rocmVersion = rocmPackages.clr.version;
          checkedRocm =
            if lib.versions.majorMinor rocmVersion == "7.1" then
              rocmPackages
            else
              throw "vllm-strix: the wheels need ROCm 7.1.x, this nixpkgs has rocmPackages ${rocmVersion}; use this flake's nixpkgs pin (flake.lock) or wheels built for ${rocmVersion}";
          runtimeEnv = import ./nix/runtime-env.nix {
            rocmPath = "${checkedRocm.clr}";
            hipDeviceLibPath = "${checkedRocm.rocm-device-libs}/amdgcn/bitcode";
            inherit hsaOverrideGfxVersion;
          };
          python = pkgs.callPackage ./nix/python.nix {
            rocmPackages = checkedRocm;
            inherit sources;
            inherit (locked) versions;
          };
          vllm-server = pkgs.callPackage ./nix/vllm-server.nix {
            rocmPackages = checkedRocm;
            inherit python runtimeEnv;
          };
          # The launcher alone (no torch, no wheels): what `nix run .#artifacts` needs.
          vllm-launcher = python.pkgs.vllm-launcher;
        in
        {
          inherit python runtimeEnv vllm-server vllm-launcher;
          torch-rocm = python.pkgs.torch;
          vllm = python.pkgs.vllm;
          vllm-env = vllm-server.env;
          vllm-container = pkgs.callPackage ./nix/container.nix {
            inherit (nix2container.packages.${pkgs.stdenv.hostPlatform.system}) nix2container;
            vllmServer = vllm-server;
            inherit runtimeEnv;
          };
          devShell = pkgs.callPackage ./nix/devshell.nix {
            vllmServer = vllm-server;
            inherit runtimeEnv;
          };
        };

      overlayWithLock =
        lockFile: final: prev:
        let
          built = packagesFor {
            pkgs = prev;
            inherit lockFile;
          };
        in
        {
          inherit (built)
            vllm-server
            vllm-launcher
            torch-rocm
            vllm-env
            ;
        };

      built = packagesFor { inherit pkgs; };
      launcherTested = built.vllm-launcher.override { testsSrc = ./tests; };
    in
    {
      lib = {
        inherit packagesFor overlayWithLock;
        laneEnv = import ./nix/lane-env.nix;
        runtimeEnv = import ./nix/runtime-env.nix;
        lock = import ./nix/lock.nix;
      };

      overlays.default = overlayWithLock ./artifacts.lock.json;

      packages.${system} = {
        inherit (built)
          torch-rocm
          vllm
          vllm-env
          vllm-launcher
          vllm-server
          vllm-container
          ;
        default = built.vllm-server;
      };

      devShells.${system} = {
        vllm = built.devShell;
        default = built.devShell;
      };

      apps.${system} = {
        vllm-server = {
          type = "app";
          program = "${built.vllm-server}/bin/vllm-server";
        };
        # Needs neither the wheels nor ROCm: `nix run .#artifacts -- lock DIR`.
        artifacts = {
          type = "app";
          program = toString (
            pkgs.writeShellScript "vllm-artifacts" ''
              export PATH=${pkgs.lib.makeBinPath [ pkgs.nix ]}:$PATH
              exec ${built.vllm-launcher}/bin/vllm-launcher artifacts "$@"
            ''
          );
        };
      };

      nixosModules = {
        vllm =
          { lib, pkgs, ... }:
          {
            imports = [ ./nix/module.nix ];
            services.vllm.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.vllm-server;
          };
        default = self.nixosModules.vllm;
      };

      formatter.${system} = pkgs.nixfmt-tree;

      checks.${system} = {
        # The launcher's tests that need no engine (pytest in checkPhase).
        launcher-tests = launcherTested;
        # pythonImportsCheck of torch and vLLM: need the wheels in the store (artifacts add).
        torch-import = built.torch-rocm;
        vllm-import = built.vllm;
        # The pure Nix parts, evaluated the way CI does without nixpkgs.
        nix-eval =
          pkgs.runCommand "vllm-nix-eval"
            {
              nativeBuildInputs = [ pkgs.nix ];
            }
            ''
              export NIX_STATE_DIR=$TMPDIR/state NIX_STORE_DIR=$TMPDIR/store
              nix-instantiate --eval --strict --json ${./nix/runtime-env.nix} --arg rocmPath null > $out
              nix-instantiate --eval --strict --json -E \
                '((import ${./nix/lane-env.nix}).render (import ${./nix/tests/three-lanes.nix}).settings).errors' >> $out
            '';
        # NixOS VM test: the module starts the launcher with a fake vLLM engine.
        module-vm = pkgs.callPackage ./nix/tests/module-vm.nix {
          nixosModule = self.nixosModules.vllm;
          vllmLauncher = built.vllm-launcher;
        };
      };
    };
}
