# The wheels' own libraries -> nixpkgs packages: one table, used by nix/python-overlay.nix (what
# autoPatchelf links each private wheel against) and nix/container.nix (the image's native
# library layer). Pure (builtins only), so CI evaluates it with Debian's Nix and stub packages
# (tests/test_nix_native_libraries.py):
#   nix-instantiate --eval --strict --json -E '(import ./nix/native-libraries.nix).table'
#
# `vllm-launcher artifacts lock DIR` reads each wheel's ELF files and records per artifact in
# artifacts.lock.json `needs` (each soname its files list as DT_NEEDED that no file of the wheel
# has as DT_SONAME or file name -> the first file needing it) and `provides` (the libraries it
# bundles -> their directory in the wheel). Each needed soname is then, in this order:
#   1. provided by another artifact of the lock (vLLM's libtorch.so and libc10.so: torch's
#      torch/lib): that directory joins autoPatchelf's search path, no package;
#   2. in the user's `pkgs.vllmStrixLibraries` (an attribute set soname or name -> derivation,
#      added by an overlay of their own flake: a library nixpkgs lacks, docs/nix.md "First time
#      on a real machine");
#   3. in `table` below: an attribute path of the package set;
#   4. none of these: evaluation stops, naming the soname, the wheel and what to do. Never a
#      build that stops in autoPatchelf, never an ImportError at run time, nothing ignored.
# Keys of `table` and vllmStrixLibraries are a soname ("libc.so.6") or its name without the
# version ("libamdhip64.so", matching libamdhip64.so.7): the version is the ROCm release's, which
# nix/packages.nix checks against the wheels' (7.1) before anything here is used.
#
# `dlopened`: libraries loaded at run time, not linked, so no DT_NEEDED names them: each with
# the Python packages that load it and why. They join the image when one of those packages is
# in the Python set, unless an artifact bundles them (torch's own libamdhip64: two copies must
# never load); nix/python-overlay.nix puts libamd_smi.so beside amdsmi's wrapper.
let
  inherit (builtins)
    any
    attrNames
    concatMap
    concatStringsSep
    elem
    filter
    foldl'
    head
    isAttrs
    isString
    listToAttrs
    map
    match
    split
    ;

  # Attribute names in nixpkgs at the pin (read with the search tool in repo NixOS/nixpkgs):
  # rocmPackages.* from pkgs/development/rocm-modules/default.nix (clr "Replaces hip,
  # opencl-runtime, and rocclr": libamdhip64, libhiprtc; rocm-runtime: ROCR, libhsa-runtime64,
  # with hsakmt merged into it; amdsmi: lib/libamd_smi.so, CMAKE_INSTALL_LIBDIR=lib, in
  # rocm-modules/amdsmi/default.nix). hipsparselt is in rocm-modules/hipsparselt only from ROCm
  # 7.2.3: absent at a 7.1 pin, hence `absent` below. magma-hip is top-level (rocm-modules'
  # rocm-tests takes it as an argument). glibc: stdenv.cc.libc; gcc's runtime libraries:
  # stdenv.cc.cc.lib (the `lib` output, as pythonManylinuxPackages uses for libstdc++).
  table = {
    # glibc
    "libc.so.6" = "stdenv.cc.libc";
    "libm.so.6" = "stdenv.cc.libc";
    "libdl.so.2" = "stdenv.cc.libc";
    "libpthread.so.0" = "stdenv.cc.libc";
    "librt.so.1" = "stdenv.cc.libc";
    "libutil.so.1" = "stdenv.cc.libc";
    "libresolv.so.2" = "stdenv.cc.libc";
    "libanl.so.1" = "stdenv.cc.libc";
    "libmvec.so.1" = "stdenv.cc.libc";
    "ld-linux-x86-64.so.2" = "stdenv.cc.libc";
    # gcc's runtime
    "libstdc++.so.6" = "stdenv.cc.cc.lib";
    "libgcc_s.so.1" = "stdenv.cc.cc.lib";
    "libgomp.so.1" = "stdenv.cc.cc.lib";
    "libatomic.so.1" = "stdenv.cc.cc.lib";
    "libquadmath.so.0" = "stdenv.cc.cc.lib";
    # ROCm
    "libamdhip64.so" = "rocmPackages.clr";
    "libhiprtc.so" = "rocmPackages.clr";
    "libhiprtc-builtins.so" = "rocmPackages.clr";
    "libhsa-runtime64.so" = "rocmPackages.rocm-runtime";
    "libamd_comgr.so" = "rocmPackages.rocm-comgr";
    "librocm-core.so" = "rocmPackages.rocm-core";
    "librocblas.so" = "rocmPackages.rocblas";
    "libhipblas.so" = "rocmPackages.hipblas";
    "libhipblaslt.so" = "rocmPackages.hipblaslt";
    "libMIOpen.so" = "rocmPackages.miopen";
    "librccl.so" = "rocmPackages.rccl";
    "librocrand.so" = "rocmPackages.rocrand";
    "libhiprand.so" = "rocmPackages.hiprand";
    "librocfft.so" = "rocmPackages.rocfft";
    "libhipfft.so" = "rocmPackages.hipfft";
    "librocsparse.so" = "rocmPackages.rocsparse";
    "libhipsparse.so" = "rocmPackages.hipsparse";
    "librocsolver.so" = "rocmPackages.rocsolver";
    "libhipsolver.so" = "rocmPackages.hipsolver";
    "libroctracer64.so" = "rocmPackages.roctracer";
    "libroctx64.so" = "rocmPackages.roctracer";
    "librocprofiler-register.so" = "rocmPackages.rocprofiler-register";
    "librocprofiler-sdk.so" = "rocmPackages.rocprofiler-sdk";
    "librocprofiler-sdk-roctx.so" = "rocmPackages.rocprofiler-sdk";
    "librocm_smi64.so" = "rocmPackages.rocm-smi";
    "libamd_smi.so" = "rocmPackages.amdsmi";
    "libaotriton_v2.so" = "rocmPackages.aotriton";
    "libhipsparselt.so" = "rocmPackages.hipsparselt";
    "libmagma.so" = "magma-hip";
    # other C libraries ROCm builds and manylinux wheels link
    "libnuma.so" = "numactl";
    "libdrm.so" = "libdrm";
    "libdrm_amdgpu.so" = "libdrm";
    "libelf.so" = "elfutils";
    "libzstd.so" = "zstd";
    "libz.so" = "zlib";
    "libtbb.so" = "onetbb";
    "libpython3.11.so" = "python311";
  };

  # Packages of the table that some nixpkgs revisions lack, and what to do then.
  absent = {
    "rocmPackages.hipsparselt" = ''
      nixpkgs packages hipSPARSELt (pkgs/development/rocm-modules/hipsparselt) only from ROCm
      7.2; a 7.1 pin has none. PyTorch links it whenever its build machine had it, so the
      library must be there even on a GPU its kernels do not support (gfx1151).'';
  };

  dlopened = [
    {
      library = "libamdhip64.so";
      loaders = [
        "triton"
        "pytorch-triton-rocm"
      ];
      reason = "Triton's HIP driver (triton/backends/amd/driver.py, _get_path_to_hip_runtime_dylib) dlopens libamdhip64.so: TRITON_LIBHIP_PATH, the copy already mapped in the process (torch's), else one on its search paths ($ROCM_PATH/lib among them)";
    }
    {
      library = "libamd_smi.so";
      loaders = [ "amdsmi" ];
      reason = "PyPI's amdsmi is a ctypes wrapper: amdsmi_wrapper.py find_smi_library() loads libamd_smi.so from $ROCM_HOME/lib, $ROCM_PATH/lib, the linker's path, then beside itself; vLLM imports amdsmi to detect its ROCm platform";
    }
  ];

  # "libamdhip64.so.7" -> "libamdhip64.so"; "libfoo.so" and names without ".so" stay.
  stem =
    soname:
    let
      m = match "(.*[.]so)([.][0-9]+)+" soname;
    in
    if m == null then soname else head m;

  keysOf = soname: [
    soname
    (stem soname)
  ];

  splitPath = path: filter isString (split "[.]" path);
  getPath =
    set: path:
    foldl' (acc: n: if acc != null && isAttrs acc && acc ? ${n} then acc.${n} else null) set (
      splitPath path
    );

  firstOf = list: if list == [ ] then null else head list;
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  # { pkgs, artifacts, where?, loaders? } -> see `in` below.
  #   pkgs       the package set the table's paths are looked up in (nixpkgs, or stubs)
  #   artifacts  the `artifacts` list of artifacts.lock.json
  #   where      the lock's name, for messages
  #   loaders    names of the Python packages of the set (for `dlopened`)
  resolve =
    {
      pkgs,
      artifacts,
      where ? "artifacts.lock.json",
      loaders ? [ ],
    }:
    let
      user = pkgs.vllmStrixLibraries or { };
      byName = listToAttrs (
        map (a: {
          name = a.name;
          value = a;
        }) artifacts
      );

      # Where a name is found: { kind = "package"; key; package; } (key: dedup and messages)
      # or null when neither the user's set nor the table knows it.
      lookupPackage =
        soname: context:
        let
          userKey = firstOf (filter (k: user ? ${k}) (keysOf soname));
          tableKey = firstOf (filter (k: table ? ${k}) (keysOf soname));
          path = table.${tableKey};
          found = getPath pkgs path;
        in
        if userKey != null then
          {
            key = "vllmStrixLibraries.${userKey}";
            package = user.${userKey};
          }
        else if tableKey == null then
          null
        else if found == null then
          throw ''
            vllm-strix: ${soname} is needed by ${context};
            nix/native-libraries.nix maps it to `${path}`, which this package set does not have.
            ${absent.${path} or "Your nixpkgs may predate it, or name it otherwise."}
            Supply the library in your own flake: an overlay that adds it to the package set,
              final: prev: { vllmStrixLibraries = (prev.vllmStrixLibraries or { }) // {
                "${stem soname}" = <a derivation with lib/${soname}>; }; }
            (or `${path}` itself, e.g. through rocmPackages.overrideScope), then build from those
            packages (lib.packagesFor { pkgs = ...; }, or overlayWithLock after your overlay).
            docs/nix.md, "First time on a real machine", shows both.''
        else
          {
            key = path;
            package = found;
          };

      # Another artifact that bundles `soname` (exactly, or by its name without the version).
      providerOf =
        self: soname:
        firstOf (
          concatMap (
            a:
            let
              provides = a.provides or { };
              hits = filter (k: provides ? ${k}) (keysOf soname)
                ++ filter (k: stem k == stem soname) (attrNames provides);
            in
            if a.name == self || hits == [ ] then
              [ ]
            else
              [
                {
                  artifact = a.name;
                  dir = provides.${head hits};
                }
              ]
          ) artifacts
        );

      forArtifact =
        name:
        let
          entry = byName.${name} or (throw "vllm-strix: ${where} has no artifact '${name}'");
          file = entry.filename or name;
          # An unlocked entry (empty sha256) cannot be built: nix/lock.nix says what to run when
          # its wheel is needed, so it needs nothing here. A locked one without `needs` was
          # locked by a launcher that did not read the wheels' libraries.
          needs =
            if (entry.sha256 or "") == "" then
              { }
            else
              entry.needs or (throw ''
                vllm-strix: ${where}: artifact '${name}' (${file}) has no `needs`: the lock was
                written before `vllm-launcher artifacts lock` read the wheels' libraries. Run
                `vllm-launcher artifacts lock DIR` again (DIR holding the wheels) and commit the lock.'');
          own = entry.provides or { };
          one =
            soname:
            let
              neededBy = needs.${soname};
              context = "the wheel ${file} (artifact '${name}' of ${where}; DT_NEEDED of ${neededBy})";
              provider = providerOf name soname;
              package = lookupPackage soname context;
            in
            if own ? ${soname} then
              { kind = "bundled"; }
            else if provider != null then
              provider // { kind = "artifact"; }
            else if package != null then
              package // { kind = "package"; }
            else
              throw ''
                vllm-strix: ${soname} is needed by ${context},
                which does not bundle it; no other artifact provides it and nix/native-libraries.nix
                maps it to no package.
                What to do:
                  - find the package that ships it: `nix-locate --top-level --whole-name lib/${soname}`
                    (nix-index), or the ROCm libraries in nixpkgs' pkgs/development/rocm-modules;
                  - if nixpkgs has it, map it in your own flake with an overlay
                      final: prev: { vllmStrixLibraries = (prev.vllmStrixLibraries or { }) // {
                        "${stem soname}" = final.<the package>; }; }
                    or add "${stem soname}" = "<attribute path>"; to `table` in nix/native-libraries.nix;
                  - if it has not, build or fetch the library yourself and map it the same way.
                Please send back the soname, the wheel's file name and the `needs` of '${name}' in
                ${where} (docs/nix.md, "First time on a real machine").'';
          resolved = map (soname: { inherit soname; } // one soname) (attrNames needs);
          viaPackages = filter (r: r.kind == "package") resolved;
        in
        {
          # soname -> what satisfies it ("stdenv.cc.libc", "artifact torch (torch/lib)", ...)
          sonames = listToAttrs (
            map (r: {
              name = r.soname;
              value =
                if r.kind == "package" then
                  r.key
                else if r.kind == "artifact" then
                  "artifact ${r.artifact} (${r.dir})"
                else
                  "bundled";
            }) resolved
          );
          keys = unique (map (r: r.key) viaPackages);
          packages = dedup viaPackages;
          found = viaPackages;
          # Directories of other artifacts to search: [ { artifact; dir; } ]
          searchDirs = unique (
            map (r: { inherit (r) artifact dir; }) (filter (r: r.kind == "artifact") resolved)
          );
        };

      dedup =
        found:
        map (k: (head (filter (r: r.key == k) found)).package) (unique (map (r: r.key) found));

      # The dlopen'ed libraries whose loader is in the set and that no artifact bundles.
      dlopenEntries = filter (
        d: any (l: elem l loaders) d.loaders && providerOf "" d.library == null
      ) dlopened;
      dlopenFound = map (
        d:
        let
          context = "${concatStringsSep "/" d.loaders} (loaded at run time: ${d.reason})";
          found = lookupPackage d.library context;
        in
        if found == null then
          throw "vllm-strix: ${context}: ${d.library} is in no entry of nix/native-libraries.nix's table"
        else
          found // { inherit (d) library loaders; }
      ) dlopenEntries;

      names = map (a: a.name) artifacts;
      perArtifact = listToAttrs (
        map (n: {
          name = n;
          value = forArtifact n;
        }) names
      );
      allFound = concatMap (n: perArtifact.${n}.found) names ++ dlopenFound;
    in
    {
      artifacts = perArtifact;
      # The package of one soname, for the PyPI wheels nix/python-overlay.nix completes (numba).
      library =
        soname:
        let
          found = lookupPackage soname "a PyPI wheel of the Python set (nix/python-overlay.nix)";
        in
        if found == null then
          throw "vllm-strix: nix/python-overlay.nix asks for ${soname}, which nix/native-libraries.nix's table does not map"
        else
          found.package;
      # The dlopen'ed libraries: { library -> package }, and the loader's package for each.
      dlopened = listToAttrs (
        map (d: {
          name = d.library;
          value = d.package;
        }) dlopenFound
      );
      dlopenedKeys = listToAttrs (
        map (d: {
          name = d.library;
          value = d.key;
        }) dlopenFound
      );
      # Every package the artifacts and the dlopen'ed libraries need, once: the image's layer.
      keys = unique (map (x: x.key) allFound);
      packages = dedup allFound;
    };
in
{
  inherit
    table
    absent
    dlopened
    stem
    resolve
    ;
}
