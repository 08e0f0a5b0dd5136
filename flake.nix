{
  description = "vLLM lanes behind one OpenAI endpoint on AMD Strix Halo (gfx1151, ROCm 7.1), from pinned private wheels";

  inputs = {
    # Pinned in flake.lock to a nixos-unstable revision of 2026-02-04, chosen for rocmPackages
    # 7.1.x (the wheels were built for ROCm 7.1.1). Not verified that it has them (no nixpkgs
    # here): nix/packages.nix refuses any other rocmPackages.clr.version at evaluation; docs/nix.md
    # "Which nixpkgs" says how to check and what to do.
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    nix2container = {
      url = "github:nlewo/nix2container";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    # The Python environment: python-env/uv.lock built with uv2nix on pyproject.nix's builders
    # (nix/python.nix); no nixpkgs Python package set.
    pyproject-nix = {
      url = "github:pyproject-nix/pyproject.nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    uv2nix = {
      url = "github:pyproject-nix/uv2nix";
      inputs.pyproject-nix.follows = "pyproject-nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      nix2container,
      pyproject-nix,
      uv2nix,
    }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};

      # Everything this flake builds (nix/packages.nix), for any nixpkgs package set, artifacts
      # lock and uv lock: users who consume the flake pass their own locks instead of forking
      # (`inputs.vllm-strix.lib.packagesFor { inherit pkgs; lockFile = ./artifacts.lock.json;
      # pythonEnvDir = ./python-env; }`, docs/nix.md section 5).
      packagesFor =
        {
          pkgs,
          lockFile ? ./artifacts.lock.json,
          pythonEnvDir ? ./python-env,
          hsaOverrideGfxVersion ? null,
        }:
        import ./nix/packages.nix {
          inherit
            pkgs
            lockFile
            pythonEnvDir
            hsaOverrideGfxVersion
            uv2nix
            pyproject-nix
            ;
          nix2container = nix2container.packages.${pkgs.stdenv.hostPlatform.system}.nix2container;
        };

      # `overlayWithLock ./my-artifacts.lock.json`, or with your own uv lock too:
      # `overlayWithLock { lockFile = ./my-artifacts.lock.json; pythonEnvDir = ./python-env; }`.
      overlayWithLock =
        locks: final: prev:
        let
          built = packagesFor (
            { pkgs = prev; } // (if builtins.isAttrs locks then locks else { lockFile = locks; })
          );
        in
        {
          inherit (built)
            vllm-server
            vllm-launcher
            torch-rocm
            vllm-env
            vllm-engine-env
            ;
        };

      built = packagesFor { inherit pkgs; };

      # Imports in the built environment: what `pythonImportsCheck` did in nixpkgs' builders,
      # plus the module the launcher runs (not just `vllm`) and every Requires-Dist of the
      # installed torch and vLLM wheels (pyproject.nix installs wheels with --no-deps, so nothing
      # else compares the private wheels' own METADATA with the lock).
      importCheck =
        name: code:
        pkgs.runCommand "vllm-strix-${name}" { } ''
          export HOME=$TMPDIR
          ${built.vllm-env}/bin/python ${./nix/check-imports.py} ${code} ${./python-env/pyproject.toml}
          touch $out
        '';
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
          vllm-engine-env
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
        # Needs neither the wheels nor ROCm: `nix run .#artifacts -- lock DIR`. uv (nixpkgs'
        # binary, not a Python package) re-locks python-env/uv.lock; nix-store adds the wheels.
        artifacts = {
          type = "app";
          program = toString (
            pkgs.writeShellScript "vllm-artifacts" ''
              export PATH=${
                pkgs.lib.makeBinPath [
                  pkgs.nix
                  pkgs.uv
                ]
              }:$PATH
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
        # The launcher alone (its own tests run in `make test`: the lock has no pytest plugins).
        launcher-cli = pkgs.runCommand "vllm-launcher-cli" { } ''
          export HOME=$TMPDIR
          ${built.vllm-launcher}/bin/vllm-launcher --help > $out
        '';
        # Need the wheels in the store (artifacts add).
        torch-import = importCheck "torch-import" "torch";
        vllm-import = importCheck "vllm-import" "vllm";
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
