# `packages.vllm-container`: an OCI image built with nix2container (github nlewo/nix2container,
# default.nix buildImage/buildLayer). `nix build .#vllm-container` gives a small JSON, not a
# tarball: load it with `nix run .#vllm-container.copyToPodman` (docs/containers.md).
#
# Layers, heaviest and most stable first, each passed to the next so nothing is duplicated:
#   1. native libraries           (ROCm, glibc, gcc's runtime: exactly the packages the wheels'
#                                  recorded sonames and the run-time loaded libraries map to,
#                                  nix/native-libraries.nix; change with the pin or a wheel)
#   2. torch                      (changes with the torch wheel)
#   3. the engines' environment   (vllm-engine-env: vLLM and the whole locked closure, without
#                                  the launcher; changes with uv.lock or the vLLM wheel)
#   4. the launcher, the final venv (vllm-env: symlinks into layer 3 plus the launcher) and the
#      vllm-server wrapper: all a launcher commit changes; a few hundred kB
# The tag is `<vLLM version>-<launcher version>` (`+` is not allowed in a tag: `_`), e.g.
# 0.12.0_rocm711-0.1.0, so a new wheel or a new launcher is a new tag.
{
  lib,
  runCommand,
  buildEnv,
  bashInteractive,
  coreutils,
  curl,
  cacert,
  nix2container,
  vllmServer,
  runtimeEnv,
  uid ? 1000,
  gid ? 1000,
}:
let
  user = "vllm";
  home = "/var/lib/vllm";
  inherit (vllmServer) torch vllm vllm-launcher;
  tag = lib.replaceStrings [ "+" ] [ "_" ] "${vllm.version}-${vllm-launcher.version}";

  # /etc/passwd, /etc/group, /tmp (1777 via perms below), HOME and the models mount point.
  rootfs = runCommand "vllm-container-root" { } ''
    mkdir -p $out/etc $out/tmp $out${home} $out/models
    echo "root:x:0:0:root:/root:/bin/sh" > $out/etc/passwd
    echo "${user}:x:${toString uid}:${toString gid}:vLLM:${home}:/bin/sh" >> $out/etc/passwd
    echo "root:x:0:" > $out/etc/group
    echo "${user}:x:${toString gid}:" >> $out/etc/group
  '';

  tools = buildEnv {
    name = "vllm-container-tools";
    paths = [
      vllmServer
      bashInteractive
      coreutils
      curl # for the health check: curl -f http://localhost:8000/health
      cacert
    ];
    pathsToLink = [
      "/bin"
      "/etc"
    ];
  };

  # The packages nix/native-libraries.nix maps the artifacts' `needs` and the dlopen'ed
  # libraries to (nix/python-overlay.nix puts them on torch's passthru), with their closures.
  rocmLayer = nix2container.buildLayer { deps = torch.imageLibraries; };
  torchLayer = nix2container.buildLayer {
    deps = [ torch ];
    layers = [ rocmLayer ];
  };
  engineLayer = nix2container.buildLayer {
    deps = [ vllmServer.engineEnv ];
    layers = [
      rocmLayer
      torchLayer
    ];
  };
  launcherLayer = nix2container.buildLayer {
    deps = [ vllmServer ];
    layers = [
      rocmLayer
      torchLayer
      engineLayer
    ];
  };

  env = runtimeEnv // {
    HOME = home;
    HF_HOME = "${home}/huggingface";
    VLLM_CACHE_ROOT = "${home}/cache/vllm";
    TRITON_CACHE_DIR = "${home}/cache/triton";
    VLLM_HOST = "0.0.0.0";
    VLLM_PORT = "8000";
    VLLM_ENGINE_PYTHON = "${vllmServer.env}/bin/python";
    SSL_CERT_FILE = "${cacert}/etc/ssl/certs/ca-bundle.crt";
    PATH = "/bin";
  };
in
(nix2container.buildImage {
  name = "vllm-strix";
  inherit tag;
  copyToRoot = [
    rootfs
    tools
  ];
  layers = [
    rocmLayer
    torchLayer
    engineLayer
    launcherLayer
  ];
  perms = [
    {
      path = rootfs;
      regex = "/tmp$";
      mode = "1777";
    }
    {
      path = rootfs;
      regex = "${home}|/models";
      mode = "0755";
      uid = uid;
      gid = gid;
      uname = user;
      gname = user;
    }
  ];
  config = {
    # Either role, chosen by the command, not by overloading `serve`: `serve` (the default) is
    # the lane server; `cluster start` is this machine's Ray node in the role VLLM_CLUSTER_ROLE
    # names (head, or worker joining VLLM_CLUSTER_ADDRESS), in the foreground as the container's
    # PID 1 (it handles SIGTERM and reaps what Ray leaves; give `podman run --stop-timeout 60`:
    # Ray drains for up to 30 s); `cluster head` / `cluster join ADDRESS` say the role on the command line. The
    # node and the server on one head are two containers of this image sharing Ray's /tmp/ray
    # (a named volume) and the host's network (docs/containers.md, "Several machines").
    Entrypoint = [ "${vllmServer}/bin/vllm-launcher" ];
    Cmd = [ "serve" ];
    User = "${toString uid}:${toString gid}";
    WorkingDir = home;
    Env = lib.mapAttrsToList (k: v: "${k}=${v}") env;
    ExposedPorts."8000/tcp" = { };
    Volumes = {
      "/models" = { };
      ${home} = { };
    };
    StopSignal = "SIGTERM";
    Labels = {
      "org.opencontainers.image.title" = "vllm-strix";
      "org.opencontainers.image.description" =
        "vLLM lanes behind one OpenAI endpoint, for AMD Strix Halo (gfx1151, ROCm)";
      "org.opencontainers.image.version" = tag;
      "org.opencontainers.image.licenses" = "MIT";
      "org.opencontainers.image.base.name" = "scratch (nix2container)";
      "io.vllm-strix.torch.version" = torch.version;
      "io.vllm-strix.vllm.version" = vllm.version;
      "io.vllm-strix.launcher.version" = vllm-launcher.version;
    };
  };
})
// {
  # For tests and `nix eval .#vllm-container.layerInputs`: what each layer is built from.
  layerInputs = {
    inherit tag;
    rocm = torch.imageLibraries;
    torch = [ torch ];
    engine = [ vllmServer.engineEnv ];
    launcher = [ vllmServer ];
  };
}
