# Evaluates nix/packages.nix -- the uv2nix package set, the overlay, vllm-server, the image's
# layers -- with the real uv2nix, pyproject.nix and nixpkgs.lib but a stubbed `pkgs`: nothing
# from nixpkgs is needed, so Debian's Nix 2.8 runs it (tests/test_nix_python_set.py).
#
# The stubs stand for the nixpkgs attributes the flake uses; each records its arguments and
# yields an attribute set shaped like a derivation (name, outPath, overrideAttrs, passthru), so
# that what is checked is the wiring: which file each package installs, with which libraries.
{
  lib,
  pyproject-nix-src,
  uv2nix-src,
  lockFile,
  pythonEnvDir,
  # builtins.fromJSON of a uv.lock turned into JSON (tests), or null for pythonEnvDir/uv.lock
  uvLock ? null,
  # merged into the stubbed pkgs: what a user's overlay adds (vllmStrixLibraries, ...)
  extraPkgs ? { },
}:
let
  pyproject-nix = import pyproject-nix-src { inherit lib; };
  uv2nix = import uv2nix-src { inherit lib pyproject-nix; };

  platform = lib.systems.elaborate "x86_64-linux";
  fakeHash = s: builtins.substring 0 32 (builtins.hashString "sha256" s);

  drv =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/${fakeHash name}-${name}";
      outputs = [ "out" ];
    }
    // attrs;

  # stdenv.mkDerivation: attrs or a `finalAttrs: { ... }` function; overrideAttrs with `old:` or
  # `final: prev:` (nixpkgs pkgs/stdenv/generic/make-derivation.nix, makeDerivationExtensible).
  mkDerivation =
    fpOrAttrs:
    let
      make =
        rattrs:
        let
          attrs = lib.fix rattrs;
          name = attrs.name or "${attrs.pname}-${attrs.version}";
        in
        (attrs.passthru or { })
        // attrs
        // {
          type = "derivation";
          inherit name;
          outPath = "/nix/store/${fakeHash name}-${name}";
          drvAttrs = attrs;
          overrideAttrs =
            f0:
            make (
              lib.extends (
                self: super:
                let
                  x = f0 super;
                in
                if lib.isFunction x then f0 self super else x
              ) rattrs
            );
        };
    in
    make (if lib.isFunction fpOrAttrs then fpOrAttrs else _: fpOrAttrs);

  cc = drv "gcc-wrapper" {
    libc = drv "glibc-2.40" {
      pname = "glibc";
      version = "2.40";
      linuxHeaders = drv "linux-headers-6.12" { version = "6.12"; };
    };
    cc = drv "gcc-14" { lib = drv "gcc-14-lib" { }; };
    isGNU = true;
  };

  stdenv = {
    inherit mkDerivation cc;
    hostPlatform = platform;
    buildPlatform = platform;
    targetPlatform = platform;
    isLinux = true;
    isDarwin = false;
    shell = "/bin/sh";
  };

  python311 = drv "python3-3.11.14" {
    pname = "python3";
    version = "3.11.14";
    pythonVersion = "3.11";
    sitePackages = "lib/python3.11/site-packages";
    interpreter = "/nix/store/${fakeHash "python"}-python3-3.11.14/bin/python3.11";
    implementation = "cpython";
    inherit stdenv;
    passthru = {
      implementation = "cpython";
      pythonVersion = "3.11";
      sourceVersion = {
        major = "3";
        minor = "11";
        patch = "14";
        suffix = "";
      };
    };
    pythonOnBuildForHost = python311;
  };

  rocmNames = [
    "clr"
    "rocm-runtime"
    "rocm-comgr"
    "rocblas"
    "hipblas"
    "hipblas-common"
    "hipblaslt"
    "miopen"
    "rocrand"
    "hiprand"
    "rocfft"
    "hipfft"
    "rocsparse"
    "hipsparse"
    "rocsolver"
    "hipsolver"
    "rccl"
    "roctracer"
    "rocprofiler-register"
    "rocm-smi"
    "amdsmi"
    "rocm-device-libs"
    "rocm-core"
    "aotriton"
    "rocprofiler-sdk"
    # no hipsparselt: nixpkgs has it only from ROCm 7.2 (nix/native-libraries.nix `absent`)
  ];

  pkgs = {
    inherit lib stdenv python311 pkgs;
    zlib = drv "zlib" { };
    callPackage = lib.callPackageWith pkgs;
    newScope = extra: lib.callPackageWith (pkgs // extra);
    buildPackages = pkgs;
    makeSetupHook = args: script: drv args.name { setupHook = script; };
    runCommand = name: env: script: drv name ({ inherit env script; } // (env.passthru or { }));
    runCommandLocal = pkgs.runCommand;
    writeText = name: text: drv name { inherit text; };
    writeShellScript = name: text: drv name { inherit text; };
    nixfmt-tree = drv "nixfmt-tree" { };
    replaceVars = src: vars: drv (baseNameOf (toString src)) vars;
    makeWrapper = drv "make-wrapper-hook" { };
    autoPatchelfHook = drv "auto-patchelf-hook" { };
    unzip = drv "unzip" { };
    uv = drv "uv" { };
    ugrep = drv "ugrep" { };
    onetbb = drv "onetbb-2022.3.0" { };
    libdrm = drv "libdrm" { };
    numactl = drv "numactl" { };
    elfutils = drv "elfutils" { };
    zstd = drv "zstd" { };
    bashInteractive = drv "bash" { };
    coreutils = drv "coreutils" { };
    curl = drv "curl" { };
    cacert = drv "cacert" { };
    nix = drv "nix" { };
    buildEnv = args: drv args.name args;
    mkShell = args: drv (args.name or "shell") args;
    pythonManylinuxPackages = {
      manylinux1 = [ (drv "manylinux1-libs" { }) ];
      manylinux2010 = [ (drv "manylinux2010-libs" { }) ];
      manylinux2014 = [ (drv "manylinux2014-libs" { }) ];
    };
    fetchurl =
      args:
      drv (args.name or (baseNameOf args.url)) {
        fetcher = "fetchurl";
        inherit (args) url;
        hash = args.hash or args.sha256;
      };
    requireFile =
      args:
      drv args.name {
        fetcher = "requireFile";
        inherit (args) sha256;
      };
    rocmPackages = lib.genAttrs rocmNames (n: drv "${n}-7.1.1" { version = "7.1.1"; });
  }
  // extraPkgs;

  nix2container = {
    buildLayer = args: drv "layers.json" { inherit args; };
    buildImage = args: drv "image-${args.name}.json" {
      inherit args;
      imageTag = args.tag;
    };
  };

  built = import ../packages.nix {
    inherit
      pkgs
      uv2nix
      pyproject-nix
      nix2container
      lockFile
      pythonEnvDir
      uvLock
      ;
  };

  inherit (built) pythonSet;
  names = drvs: map (d: d.pname or d.name) drvs;
  # The closure of a virtual environment, as pyproject.nix's make-venv hook receives it.
  venvNames = env: map (p: lib.last (lib.splitString "/" p)) (lib.splitString ":" env.NIX_PYPROJECT_DEPS);
  srcOf =
    p:
    if !(p ? src) then
      null
    else if builtins.isPath p.src then
      {
        name = baseNameOf p.src;
        fetcher = "path";
        sha256 = null;
      }
    else
      {
        name = p.src.name;
        fetcher = p.src.fetcher or "path";
        sha256 = p.src.sha256 or null;
      };
  describe = p: {
    inherit (p) pname version;
    src = srcOf p;
    nativeBuildInputs = names (p.nativeBuildInputs or [ ]);
    buildInputs = names (p.buildInputs or [ ]);
    ignoreMissing = p.autoPatchelfIgnoreMissingDeps or [ ];
    preFixup = p.preFixup or "";
    postFixup = p.postFixup or "";
    postInstall = p.postInstall or "";
    dependencies = builtins.attrNames (p.passthru.dependencies or { });
    sonames = p.passthru.sonames or null;
  };
  closure = built.python.closure;
in
{
  packages = lib.sort (a: b: a < b) (names closure);
  described = lib.listToAttrs (map (p: lib.nameValuePair p.pname (describe p)) closure);
  env = venvNames built.vllm-env;
  engineEnv = venvNames built.vllm-engine-env;
  launcherEnv = venvNames built.vllm-launcher;
  server = {
    inherit (built.vllm-server) name;
    script = built.vllm-server.script;
  };
  container = {
    tag = built.vllm-container.imageTag;
    layers = lib.mapAttrs (_: v: if builtins.isString v then v else names v) (
      removeAttrs built.vllm-container.layerInputs [ "tag" ]
    );
    layerCount = builtins.length built.vllm-container.args.layers;
  };
  versions = built.versions;

  # flake.nix's outputs with these inputs: names kept, the artifacts app on the launcher alone,
  # and lib.packagesFor taking a user's artifacts lock and python-env directory.
  flake =
    let
      outputs = (import ../../flake.nix).outputs {
        self = outputs;
        nixpkgs = {
          inherit lib;
          legacyPackages.x86_64-linux = pkgs;
        };
        nix2container.packages.x86_64-linux = { inherit nix2container; };
        inherit pyproject-nix uv2nix;
      };
      user = outputs.lib.packagesFor {
        inherit pkgs lockFile pythonEnvDir;
      };
      overlaid = outputs.lib.overlayWithLock { inherit lockFile pythonEnvDir; } pkgs pkgs;
    in
    {
      packages = builtins.attrNames outputs.packages.x86_64-linux;
      apps = builtins.attrNames outputs.apps.x86_64-linux;
      devShells = builtins.attrNames outputs.devShells.x86_64-linux;
      checks = builtins.attrNames outputs.checks.x86_64-linux;
      nixosModules = builtins.attrNames outputs.nixosModules;
      overlays = builtins.attrNames outputs.overlays;
      lib = builtins.attrNames outputs.lib;
      artifactsApp = outputs.apps.x86_64-linux.artifacts.program;
      userVllmSrc = user.vllm.src.name;
      userDevShellHook = user.devShell.shellHook;
      overlayPackages = builtins.attrNames overlaid;
      overlayVllmServer = overlaid.vllm-server.name;
    };
}
