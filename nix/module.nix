# NixOS module `services.vllm`, in the style of nixpkgs' nixos/modules/services/misc/ollama.nix
# (options, DynamicUser, DeviceAllow, hardening) and comfyui.nix.
# Every setting becomes the launcher's environment through ./lane-env.nix: there is no second
# configuration format, and `vllm-launcher config` on the host shows what the unit runs.
# The flake's nixosModules.vllm wraps this file and sets `package` (mkDefault) to its own
# vllm-server; imported alone, the module takes `pkgs.vllm-server` (overlays.default adds it).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types literalExpression;
  cfg = config.services.vllm;
  ccfg = cfg.cluster;
  laneEnv = import ./lane-env.nix;
  unitLimits = import ./unit-limits.nix cfg.limits;
  strixHalo = import ./strix-halo.nix { inherit (cfg.strixHalo) gttSizeGiB disableIommu disableCwsr; };
  runtimeEnvFor = import ./runtime-env.nix;

  staticUser = cfg.user != null;
  defaultStateDir = "/var/lib/vllm";
  # Directories systemd creates and hands to the (dynamic) user: StateDirectory= and
  # LogsDirectory= take paths relative to /var/lib and /var/log.
  under = base: dir: lib.hasPrefix "${base}/" dir && lib.removePrefix "${base}/" dir != "";
  stateUnderVarLib = under "/var/lib" cfg.stateDir;
  logsUnderVarLog = cfg.logDirectory != null && under "/var/log" cfg.logDirectory;
  # Writable paths systemd does not create (static users only, see the assertions).
  extraWritable =
    lib.optional (!stateUnderVarLib) cfg.stateDir
    ++ lib.optional (cfg.logDirectory != null && !logsUnderVarLog) cfg.logDirectory;

  kindType = {
    str = types.str;
    strList = types.listOf types.str;
    float = types.either types.float types.int;
    int = types.ints.unsigned;
    bool = types.bool;
    args = types.either types.str (types.listOf types.str);
    pathOrStr = types.either types.path types.str;
  };
  descriptions = {
    model = "Hugging Face id or local model directory (`--model`).";
    servedModelName = "Name clients use (`--served-model-name`); the launcher derives one when null.";
    aliases = "Extra names a request's `model` may use for this lane.";
    gpuMemoryUtilization = "Share of device memory for this engine, 0 < x <= 1 (at most 0.90 on Strix Halo).";
    maxModelLen = "Context length (`--max-model-len`); set it explicitly on Strix Halo.";
    dtype = "auto, half, float16, bfloat16, float or float32 (bf16/fp16/fp32 accepted).";
    quantization = "`--quantization` (awq, gptq, ...).";
    enforceEager = "Disable CUDA/HIP graphs (`--enforce-eager`).";
    extraArgs = "Further vLLM arguments: a list (each shell-quoted) or one shell string.";
    distributedExecutorBackend = ''
      `ray` (vLLM's Ray executor places its workers on the cluster) or `mp` (vLLM's own workers;
      on several machines the launcher starts vLLM's followers on the other nodes through Ray).
      null: vLLM's choice on one machine, `ray` for a lane on several.
    '';
    nodes = ''
      Machines (Ray cluster nodes) this lane's engine spans (VLLM_LANE_<LANE>_NODES); null = as
      many as its tensor x pipeline size needs at `cluster.gpus` each. More than one needs
      `services.vllm.cluster` (role head) on this machine.
    '';
    toolCallParser = ''
      vLLM tool-call parser of the model family (`--enable-auto-tool-choice --tool-call-parser`),
      e.g. hermes (Qwen 2.5/3), llama3_json (Llama 3.1-3.3), mistral, qwen3_coder; checked against
      the installed vLLM when the launcher starts (docs/agents.md lists the families).
    '';
    reasoningParser = "vLLM reasoning parser of a reasoning model (`--reasoning-parser`), e.g. deepseek_r1, qwen3.";
    chatTemplate = "Chat template (`--chat-template`): a Jinja file, or the template itself.";
    idleTimeout = "Unload this lane after this many idle seconds (VLLM_LANE_<LANE>_IDLE_TIMEOUT).";
    sleepLevel = ''
      vLLM sleep mode (VLLM_LANE_<LANE>_SLEEP_LEVEL): 0 off (stop/start, the default), 1 (weights
      kept in host memory) or 2 (discarded). The engine starts with `--enable-sleep-mode` and
      VLLM_SERVER_DEV_MODE=1 and is put to sleep instead of stopped when switched out; a failed
      sleep or wake, or an engine that refuses sleep mode, falls back to stop/start.
    '';
  };
  # One option per engine setting of lane-env.nix, null meaning "inherit / launcher default".
  # `defaults` offers all but the lane-only ones (idleTimeout, nodes).
  settingOptionsFor =
    settings:
    lib.listToAttrs (
      map (s: {
        inherit (s) name;
        value = mkOption {
          type = types.nullOr kindType.${s.kind};
          default = null;
          description =
            descriptions.${s.name}
              or "vLLM engine setting ${s.setting} (launcher variable VLLM_LANE_<LANE>_${s.setting}).";
        };
      }) settings
    );
  settingOptions = settingOptionsFor laneEnv.settings;
  defaultsOptions = settingOptionsFor (lib.filter (s: !(s.laneOnly or false)) laneEnv.settings);

  laneModule = {
    options = settingOptions // {
      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = {
          HIP_VISIBLE_DEVICES = "0";
        };
        description = "Environment for this lane's engine only (VLLM_LANE_<LANE>_ENV_<NAME>).";
      };
    };
  };

  # Options -> lane-env.nix input: drop nulls and empty environments.
  clean = lib.filterAttrs (n: v: v != null && !(n == "environment" && v == { }));

  # The cluster's settings as the launcher reads them; the token is a systemd credential of each
  # unit that needs it (LoadCredential=cluster-token:<tokenFile>), so the variable names the
  # unit's credentials directory (%d) and the file never enters the store.
  clusterSettings = lib.filterAttrs (n: v: v != null && lib.elem n clusterNames) ccfg;
  clusterNames = map (s: s.name) laneEnv.cluster;
  clusterChecked = laneEnv.renderCluster clusterSettings;
  clusterForEnv =
    clusterSettings // lib.optionalAttrs (ccfg.tokenFile != null) { tokenFile = "%d/cluster-token"; };
  clusterRendered = laneEnv.renderCluster clusterForEnv;
  isHead = ccfg.enable && ccfg.role == "head";
  # Lanes that need the cluster: NODES > 1 set explicitly (a lane whose tensor x pipeline size
  # exceeds cluster.gpus needs it too; the launcher says so at start).
  multiNodeLanes = lib.attrNames (lib.filterAttrs (_: lane: (lane.nodes or null) != null && lane.nodes > 1) cfg.lanes);

  rendered = laneEnv.render {
    inherit (cfg) host port defaultLane;
    cluster = if ccfg.enable then clusterForEnv else { };
    inherit (cfg) logLevel logRequests logDirectory startTimeout;
    apiKeyFile = if cfg.apiKeyFile == null then null else "%d/api-key";
    defaults = clean cfg.defaults;
    lanes = lib.mapAttrs (_: clean) cfg.lanes;
  };


  runtimeEnv = runtimeEnvFor {
    hsaOverrideGfxVersion = cfg.rocmOverrideGfx;
  };

  cacheDir = "/var/cache/vllm";

  # What both units share: the user, the directories, the models, the GPU and the hardening.
  # On the head, vllm.service (the lane server, whose engines are Ray drivers) and
  # vllm-cluster.service (the Ray node, whose worker processes run vLLM's workers) run as the
  # same user: a static `user`, or the one DynamicUser named "vllm" (systemd shares a dynamic
  # user between the units naming it, and removes its IPC objects only when the last stops).
  baseEnvironment =
    runtimeEnv
    // {
      HOME = cfg.stateDir;
      HF_HOME = "${cfg.stateDir}/huggingface";
      VLLM_CACHE_ROOT = "${cacheDir}/vllm";
      TRITON_CACHE_DIR = "${cacheDir}/triton";
    };
  commonServiceConfig =
    (
      if staticUser then
        {
          User = cfg.user;
          Group = cfg.group;
          DynamicUser = false;
        }
      else
        {
          User = "vllm";
          DynamicUser = true;
        }
    )
    // {
      WorkingDirectory = cfg.stateDir;
      StateDirectory = lib.mkIf stateUnderVarLib (lib.removePrefix "/var/lib/" cfg.stateDir);
      CacheDirectory = "vllm";
      StateDirectoryMode = "0750";
      ReadWritePaths = lib.mkIf (extraWritable != [ ]) extraWritable;
      BindReadOnlyPaths = lib.optional (cfg.modelsDir != null) (toString cfg.modelsDir);
      EnvironmentFile = lib.optional (cfg.environmentFile != null) cfg.environmentFile;
      # Every process of the unit (engines, Ray's daemons and workers) is in its cgroup:
      # stopping the unit takes all of them.
      KillMode = "control-group";
      # on-failure, not seed 001's `always`: both restart after a crash, a signal (the OOM
      # killer's too), a timeout or a non-zero exit; `always` also restarts a clean exit 0, which
      # the launcher makes only when told to stop. Exit status 2 is a configuration error whose
      # message names the variable: restarting cannot fix it, so it stops instead of looping
      # every RestartSec.
      Restart = "on-failure";
      RestartSec = "10s";
      RestartPreventExitStatus = "2";

      # GPU access (/dev/kfd, /dev/dri/renderD*).
      PrivateDevices = false;
      DevicePolicy = "closed";
      DeviceAllow = [
        "char-drm"
        "char-kfd"
      ];
      SupplementaryGroups = [
        "render"
        "video"
      ];

      # Hardening as far as torch and Ray allow; `systemd-analyze security --offline=true` on
      # each rendered unit (tests/test_nix_module.py) scores what is left, each for a reason:
      # the GPU (PrivateDevices=false, DeviceAllow, SupplementaryGroups), Triton
      # (MemoryDenyWriteExecute=false), /proc/meminfo and /proc/cpuinfo (ProcSubset=all),
      # the network and a later Ray cluster (AF_INET/AF_INET6, AF_NETLINK, no PrivateNetwork,
      # no IPAddressDeny), the engines' sockets and sd_notify (AF_UNIX), @resources (below),
      # models under /home (ProtectHome=tmpfs), and no PrivateUsers: inside its user
      # namespace render/video show as nogroup (systemd issue 41994); the kernel's device
      # checks would still pass, but nothing here can prove every ROCm tool only relies on them.
      # /dev/shm stays usable (no PrivateIPC): vLLM's shared-memory queues and Ray's object store
      # (plasma: files in /dev/shm, mmapped, their descriptors passed over its Unix socket) need it.
      MemoryDenyWriteExecute = false; # Triton and inductor generate and load code at run time
      ProcSubset = "all"; # /proc/meminfo, /proc/cpuinfo
      # Hides other users' processes in /proc (hidepid=invisible). The launcher and every
      # engine process run as the one service user and still see each other (the launcher's
      # /proc/<pid> checks of its engine groups, psutil in vLLM); nothing in vLLM, torch or
      # ROCm looks at other users' processes. Ray's node (raylet, GCS, agents, workers) runs as
      # that one user too: its memory monitor and psutil read only its own processes' /proc
      # entries, and the agent's node statistics simply omit other users' processes.
      ProtectProc = "invisible";
      ProtectSystem = "strict";
      ProtectHome = "tmpfs"; # hides /home, still allows bind-mounting modelsDir from it
      PrivateTmp = true;
      # Mounts made inside the service do not propagate to the host. The service already has
      # its own mount namespace (ProtectSystem=strict, PrivateTmp) and never mounts anything
      # (no CAP_SYS_ADMIN, @mount filtered); mounts made on the host later, such as a models
      # disk, still propagate into it.
      PrivateMounts = true;
      NoNewPrivileges = true;
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      LockPersonality = true;
      ProtectClock = true;
      ProtectControlGroups = true;
      ProtectHostname = true;
      ProtectKernelLogs = true;
      ProtectKernelModules = true;
      ProtectKernelTunables = true;
      RestrictAddressFamilies = [
        "AF_INET"
        "AF_INET6"
        "AF_UNIX" # sd_notify, vLLM's ZeroMQ ipc:// sockets between API server and EngineCore
        "AF_NETLINK" # glibc: getaddrinfo(AI_ADDRCONFIG), getifaddrs() (gloo, Ray pick interfaces)
      ];
      CapabilityBoundingSet = [ "" ];
      SystemCallArchitectures = "native";
      # @system-service already contains @resources; it is named because vLLM needs it:
      # setrlimit (vLLM raises its RLIMIT_NOFILE soft limit), sched_setaffinity (OpenMP and
      # vLLM's CPU thread binding), mbind/set_mempolicy (NUMA-aware allocations in the HSA
      # runtime and torch). `~@privileged` then removes (`systemd-analyze syscall-filter
      # @privileged`, systemd 252): @chown (chown, fchown, fchownat, lchown), @clock,
      # @module, @raw-io, @reboot, @swap, _sysctl, acct, bpf, capset, chroot,
      # fanotify_init/fanotify_mark, nfsservctl, open_by_handle_at, pivot_root, quotactl,
      # sethostname/setdomainname, setfsuid, setgroups, setuid/setreuid/setresuid, vhangup.
      # With an empty CapabilityBoundingSet these could at most give a file or the process
      # to its own user. ROCm reaches the GPU with open/ioctl/mmap on /dev/kfd and
      # /dev/dri (@system-service); torch, Triton and vLLM write their caches with
      # open/rename/chmod and start engines with fork/execve/setsid/prctl (@process): none
      # of them changes owners or identities. Ray's C++ processes (gcs_server, raylet) and its
      # Python workers need sockets, epoll/eventfd (@io-event), fork/execve/prctl(PDEATHSIG)/
      # setsid (@process), fallocate/mmap on /dev/shm (@file-system, @basic-io), setrlimit and
      # sched_setaffinity (@resources): all in @system-service; they bind only unprivileged
      # ports (above 1024: no CAP_NET_BIND_SERVICE) and never change identity. What is left out,
      # @debug (ptrace, perf_event_open, pidfd_getfd), only matters to py-spy/`ray stack` run by
      # hand: they stop the target with ptrace. process_vm_readv/writev are no part of @debug
      # but of @ipc, which @system-service includes (systemd's seccomp-util.c; systemd-analyze
      # syscall-filter @ipc): the filter allows them, and the kernel's ptrace access check
      # (same user, Yama) is what limits them.
      SystemCallFilter = [
        "@system-service"
        "@resources"
        "~@privileged"
      ];
      # A filtered call fails with EPERM (what an unprivileged process mostly gets for these
      # calls anyway) instead of killing the engine with SIGSYS.
      SystemCallErrorNumber = "EPERM";
      # One descriptor per client connection and per proxied engine connection in the
      # front server, plus each engine's own sockets, shared-memory handles and model files:
      # systemd's default soft limit of 1024 would refuse connections under load. Ray's
      # raylet and GCS hold a gRPC connection per worker process too.
      # Processes: Ray starts a worker process per CPU besides its own daemons, each with
      # dozens of threads; systemd's default TasksMax (15 % of the smaller of kernel.pid_max,
      # which NixOS raises to 4194304, and threads-max) leaves ample room, so none is set.
      LimitNOFILE = 65536;
      UMask = "0077";
    }
    # MemoryMax=/CPUQuota= from services.vllm.limits, only those set (./unit-limits.nix).
    // unitLimits.serviceConfig;
  clusterCredential = lib.optional (ccfg.enable && ccfg.tokenFile != null) "cluster-token:${ccfg.tokenFile}";
in
{
  options.services.vllm = {
    enable = lib.mkEnableOption "vLLM model lanes behind one OpenAI-compatible endpoint";

    # mkPackageOption reads `pkgs.vllm-server` only when the default is used: the flake's
    # nixosModules.vllm overrides it (mkDefault beats the option default), and a system with
    # this flake's overlays.default has the attribute. Otherwise evaluation stops with
    # "vllm-server cannot be found in pkgs", which names the fix.
    package = lib.mkPackageOption pkgs "vllm-server" {
      extraDescription = ''
        (the launcher wrapped with torch and vLLM for ROCm). The flake's `nixosModules.vllm`
        sets it to the flake's own `packages.<system>.vllm-server`; with this file imported
        alone, add the flake's `overlays.default` or set it yourself.
      '';
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the front server listens on (VLLM_HOST).";
    };
    port = mkOption {
      type = types.port;
      default = 8000;
      description = "Port the front server listens on (VLLM_PORT).";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `port` in the firewall.";
    };

    lanes = mkOption {
      type = types.attrsOf (types.submodule laneModule);
      default = { };
      example = literalExpression ''
        {
          coder = { model = "/srv/models/qwen2.5-coder-32b"; maxModelLen = 32768; gpuMemoryUtilization = 0.45; };
          fast_rag = { model = "/srv/models/mistral-7b"; aliases = [ "rag" ]; };
        }
      '';
      description = ''
        Model lanes (names: letters, digits, `_`; unique ignoring case). Each becomes
        VLLM_LANE_<NAME>_* variables of the launcher; one engine runs at a time.
      '';
    };
    defaultLane = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Lane loaded at start (VLLM_DEFAULT_LANE); null = the first lane in alphabetical order.";
    };
    defaults = mkOption {
      type = types.submodule { options = defaultsOptions; };
      default = { };
      example = {
        gpuMemoryUtilization = 0.45;
        dtype = "bfloat16";
      };
      description = "Engine settings every lane inherits unless it sets its own (VLLM_<SETTING>); same names as a lane's.";
    };

    modelsDir = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/srv/models";
      description = "Directory holding local models, bind-mounted read-only into the service.";
    };
    apiKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/vllm-api-key";
      description = ''
        File holding the API key clients must send. Passed as a systemd credential (never copied
        into the Nix store); the launcher reads it through VLLM_API_KEY_FILE.
      '';
    };
    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/vllm.env";
      description = "EnvironmentFile for secrets such as HF_TOKEN (outside the Nix store).";
    };
    environmentVariables = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        HIP_VISIBLE_DEVICES = "0";
      };
      description = "Further environment for the service; wins over the runtime defaults.";
    };
    rocmOverrideGfx = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "11.5.1";
      description = ''
        Sets HSA_OVERRIDE_GFX_VERSION when not null. Leave null for gfx1151-native builds;
        "11.0.0" makes HIP load gfx1100 code objects and is only for builds without gfx1151.
      '';
    };
    logLevel = mkOption {
      type = types.enum [ "DEBUG" "INFO" "WARNING" "ERROR" "CRITICAL" ];
      default = "INFO";
      description = "VLLM_LOG_LEVEL.";
    };
    logRequests = mkOption {
      type = types.bool;
      default = false;
      description = "Log one line per request (VLLM_LOG_REQUESTS).";
    };
    logDirectory = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/log/vllm";
      description = ''
        Also write the launcher's logs to files in this directory (LOG_DIRECTORY); null = the
        journal only. Under /var/log systemd creates it for the service (LogsDirectory=); a
        directory elsewhere needs a static `user` and must exist.
      '';
    };
    startTimeout = mkOption {
      type = types.ints.positive;
      default = 1800;
      description = "Seconds an engine may take to load a model (VLLM_START_TIMEOUT).";
    };

    user = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "vllm";
      description = "User to run as; null = a systemd DynamicUser. Created when set.";
    };
    group = mkOption {
      type = types.nullOr types.str;
      default = cfg.user;
      defaultText = literalExpression "config.services.vllm.user";
      description = "Group to run as (with `user`). Created when set.";
    };
    stateDir = mkOption {
      type = types.str;
      default = defaultStateDir;
      description = ''
        HOME and Hugging Face home of the service; compile caches go to ${cacheDir}. Under
        DynamicUser (`user` = null) it must lie below /var/lib (systemd's StateDirectory=).
      '';
    };

    limits = {
      memoryMax = mkOption {
        type = types.nullOr (types.either types.str types.ints.positive);
        default = null;
        example = "64G";
        description = ''
          MemoryMax= of each unit (the lane server's, and the cluster node's where it runs): bytes
          or a size such as "64G" (seed 001's MemoryLimit=64G), a percentage of the host's memory,
          or "infinity"; null = no limit. On Strix Halo the GPU's memory is the same RAM:
          whether its allocations (amdgpu GTT) count against this limit depends on the kernel.
          Mainline does not charge them to the memory cgroup (patches that would were still under
          review in 2026), so the limit then bounds the CPU side only (Python, Ray, the page cache
          of the model files) and the OOM killer does not see the model; on a kernel that charges
          them, the limit must also leave room for gpuMemoryUtilization x the GPU's memory.
          Not verified on the target: compare `systemctl show vllm -p MemoryCurrent` with the
          GTT in use after a model has loaded (docs/containers.md, "Resource limits").
        '';
      };
      cpuQuota = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "2400%";
        description = ''
          CPUQuota= of each unit; null = no limit. A percentage of ONE CPU (systemd's meaning),
          so "2400%" is 24 CPUs' worth: seed 001's "80%" would give the whole service, engines and
          Ray included, 0.8 of one core; 80 % of a 32-thread Strix Halo is "2560%".
        '';
      };
    };

    # Opt-in kernel parameters for a Strix Halo host (./strix-halo.nix says why and where from);
    # `vllm-launcher check` names the option to set when its finding is there.
    strixHalo = {
      enable = lib.mkEnableOption ''
        the Strix Halo (gfx1151) host settings below as kernel parameters (boot.kernelParams);
        independent of services.vllm.enable, so a cluster worker can have them too'';
      gttSizeGiB = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 124;
        description = ''
          How much of the box's memory the GPU may map, in GiB: sets ttm.pages_limit (4 KiB
          pages; the limit ROCm allocations stop at) and amdgpu.gttsize (MiB; the GTT size on
          kernels that still read it) to the same size. The kernel's default, null here, is half
          of the memory: 64 GiB of a 128 GB box, too little for lanes that together need more
          (`vllm-launcher check` compares the lanes loaded together with it). Leave a few GiB
          to the system: 124 on a 128 GB box. With AMD's DKMS driver the TTM parameter is
          amdttm.pages_limit: add it to boot.kernelParams yourself.
        '';
      };
      disableIommu = mkOption {
        type = types.bool;
        default = false;
        description = ''
          amd_iommu=off. Field reports (not measured here): 5-12 % faster on Strix Halo, and page
          faults reported with the IOMMU on. Keep the IOMMU where the box passes devices to
          virtual machines.
        '';
      };
      disableCwsr = mkOption {
        type = types.bool;
        default = false;
        description = ''
          amdgpu.cwsr_enable=0 (no compute wave save/restore, so no preemption mid-wave). Field
          reports of gfx1151 hangs under ROCm with it on (ROCm/legacy-rocm-build issue 5590); AMD
          advises it until kernel 6.18-rc6 (issue 5991). It does not help with MES firmware 0x83
          (issue 5724), which needs the firmware back at 0x80.
        '';
      };
    };

    cluster = {
      enable = lib.mkEnableOption ''
        this machine's node of a Ray cluster, for lanes that span several machines
        (`vllm-launcher cluster start` in the unit vllm-cluster.service). On the head the lane
        server (services.vllm.enable) runs beside it; a worker runs only its node'';
      role = mkOption {
        type = types.nullOr (types.enum [ "head" "worker" ]);
        default = null;
        description = ''
          `head`: the machine that runs the lane server and the cluster's GCS; `worker`: a
          machine that lends its GPU and runs nothing else of this module (VLLM_CLUSTER_ROLE).
        '';
      };
      headAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "192.168.100.1";
        description = ''
          The head's address on the cluster link, host or host:port (VLLM_CLUSTER_ADDRESS);
          required on a worker. On the head null means its own interface address.
        '';
      };
      interface = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "enp1s0f0";
        description = ''
          Network interface of the private cluster link (VLLM_CLUSTER_INTERFACE): its IPv4
          address is the node's, and NCCL/RCCL and Gloo traffic uses it.
        '';
      };
      tokenFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/etc/vllm/cluster-token";
        description = ''
          File holding the cluster's token (Ray token authentication), the same content on every
          machine; outside the Nix store (root-only is fine). Passed to the units as the systemd
          credential `cluster-token` (LoadCredential), so a DynamicUser can read it; the launcher
          gets VLLM_CLUSTER_TOKEN_FILE=$CREDENTIALS_DIRECTORY/cluster-token.
        '';
      };
      gpus = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "GPUs this machine offers to the cluster (VLLM_CLUSTER_GPUS); null = the launcher's default, 1.";
      };
      cpus = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "CPUs this machine offers (VLLM_CLUSTER_CPUS); null = Ray's default, all.";
      };
      objectStoreMemory = mkOption {
        type = types.nullOr (types.either types.ints.positive types.str);
        default = null;
        example = "8Gi";
        description = ''
          Size of Ray's shared-memory object store (VLLM_CLUSTER_OBJECT_STORE_MEMORY; bytes or
          e.g. "8Gi"); null = Ray's default, 30 % of memory, taken from the same unified memory
          as the GPU's on Strix Halo as it fills.
        '';
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Open Ray's fixed ports (the GCS port on the head, the node ports and the worker port
          range on every node: the launcher's defaults or the ones set here) on `interface` only.
        '';
      };
      trustInterface = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Add `interface` to networking.firewall.trustedInterfaces: NCCL/RCCL and Gloo use
          ephemeral ports between the machines, which no port list covers. The link must be
          private (a direct cable or a switch only the cluster uses): whoever reaches Ray's
          ports with the token runs code on every machine.
        '';
      };
    }
    // lib.listToAttrs (
      map (s: {
        inherit (s) name;
        value = mkOption {
          type = types.nullOr types.port;
          default = null;
          description = "VLLM_CLUSTER_${s.key}; null = the launcher's default, ${toString s.default}.";
        };
      }) (lib.filter (s: s.kind == "port") laneEnv.cluster)
    );
    # Ray's temp directory (VLLM_CLUSTER_TEMP_DIR) is no option: the node keeps Ray's /tmp/ray,
    # in the unit's private /tmp, which the lane server's unit joins (JoinsNamespaceOf) so its
    # engines find the node's sockets.
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.strixHalo.enable {
      assertions = strixHalo.assertions;
      boot.kernelParams = strixHalo.kernelParams;
    })

    (lib.mkIf (cfg.enable || ccfg.enable) {
      assertions = unitLimits.assertions ++ [
        {
          assertion = cfg.user != null || cfg.group == null || cfg.group == cfg.user;
          message = "services.vllm.group needs services.vllm.user (null user = DynamicUser).";
        }
        {
          assertion = lib.hasPrefix "/" cfg.stateDir;
          message = "services.vllm.stateDir must be an absolute path, got \"${cfg.stateDir}\".";
        }
        {
          # A DynamicUser's UID is allocated at start: only the directories systemd creates and
          # chowns for it (StateDirectory= under /var/lib) are writable and keep their contents.
          assertion = staticUser || stateUnderVarLib;
          message = "services.vllm.stateDir = \"${cfg.stateDir}\" is outside /var/lib, which a DynamicUser (services.vllm.user = null) cannot own: use a directory below /var/lib or set services.vllm.user.";
        }
      ];

      users = lib.mkIf staticUser {
        users.${cfg.user} = {
          isSystemUser = true;
          group = cfg.group;
          home = cfg.stateDir;
          extraGroups = [
            "render"
            "video"
          ];
        };
        groups.${cfg.group} = { };
      };

      environment.systemPackages = [ cfg.package ];
    })

    (lib.mkIf cfg.enable {
      assertions = rendered.assertions ++ [
        {
          assertion = staticUser || cfg.logDirectory == null || logsUnderVarLog;
          message = "services.vllm.logDirectory = \"${toString cfg.logDirectory}\" is outside /var/log, which a DynamicUser (services.vllm.user = null) cannot write: use a directory below /var/log or set services.vllm.user.";
        }
        {
          assertion = multiNodeLanes == [ ] || isHead;
          message = "services.vllm.lanes: ${lib.concatStringsSep ", " multiNodeLanes} span several machines (nodes > 1): enable services.vllm.cluster with role = \"head\" on this machine (and role = \"worker\" on the others).";
        }
      ];

      networking.firewall = lib.mkIf cfg.openFirewall { allowedTCPPorts = [ cfg.port ]; };

      systemd.services.vllm = {
        description = "vLLM model lanes (OpenAI-compatible endpoint)";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        # On the head the lane server starts after this machine's Ray node and shares its
        # private /tmp, where Ray keeps the node's session (sockets of the raylet and the object
        # store) that the engines, Ray drivers, connect to. Requires=: stopping or restarting
        # the node (explicitly) stops or restarts the server; a node that crashes is restarted
        # on its own while one-node lanes keep serving.
        after = [ "network-online.target" ] ++ lib.optional isHead "vllm-cluster.service";
        requires = lib.optional isHead "vllm-cluster.service";
        unitConfig = lib.mkIf isHead { JoinsNamespaceOf = "vllm-cluster.service"; };
        # Order: runtime defaults < the module's caches < lanes/settings < user's variables.
        environment = baseEnvironment // rendered.environment // cfg.environmentVariables;

        serviceConfig = commonServiceConfig // {
          # The launcher sends READY=1 (sd_notify) once it listens.
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${cfg.package}/bin/vllm-server serve";
          # Loading a first model can take minutes; the launcher itself bounds each engine
          # start with VLLM_START_TIMEOUT.
          TimeoutStartSec = toString (cfg.startTimeout + 120);
          # Drain in-flight requests, then stop the engine groups. At SIGTERM the launcher extends
          # this (sd_notify EXTEND_TIMEOUT_USEC) to its own bound: VLLM_DRAIN_TIMEOUT + 5 s +
          # VLLM_STOP_TIMEOUT + 15 s, so a raised drain timeout needs no change here.
          TimeoutStopSec = "3min";
          LogsDirectory = lib.mkIf logsUnderVarLog (lib.removePrefix "/var/log/" cfg.logDirectory);
          LoadCredential = lib.optional (cfg.apiKeyFile != null) "api-key:${cfg.apiKeyFile}" ++ clusterCredential;
        };
      };
    })

    (lib.mkIf ccfg.enable {
      assertions = clusterChecked.assertions ++ [
        {
          assertion = ccfg.role != "worker" || !cfg.enable;
          message = "services.vllm.cluster.role = \"worker\": a worker machine runs only its cluster node (vllm-cluster.service), the head serves every lane; set services.vllm.enable = false here and define the lanes on the head.";
        }
      ];

      networking.firewall = {
        trustedInterfaces = lib.mkIf (ccfg.trustInterface && ccfg.interface != null) [ ccfg.interface ];
        interfaces = lib.mkIf (ccfg.openFirewall && ccfg.interface != null) {
          ${ccfg.interface} = {
            allowedTCPPorts = clusterChecked.firewall.ports;
            allowedTCPPortRanges = clusterChecked.firewall.ranges;
          };
        };
      };

      # This machine's Ray node: `vllm-launcher cluster start` in the role VLLM_CLUSTER_ROLE says,
      # with the same user, GPU access, models and hardening as the lane server (Ray's worker
      # processes here run vLLM's workers, which load the weights and use the GPU).
      systemd.services.vllm-cluster = {
        description = "vLLM cluster node (Ray ${if ccfg.role == null then "node" else ccfg.role})";
        wantedBy = [ "multi-user.target" ];
        # the interface's address must be there; a worker waits up to 60 s for the head, then
        # exits and is restarted
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        environment = baseEnvironment // clusterRendered.environment // cfg.environmentVariables;
        serviceConfig = commonServiceConfig // {
          Type = "exec";
          ExecStart = "${cfg.package}/bin/vllm-server cluster start";
          # SIGTERM: Ray drains the node for up to 30 s, the launcher waits 45 s, then stops
          # every process the node left.
          TimeoutStopSec = "2min";
          LoadCredential = clusterCredential;
        };
      };
    })
  ];
}
