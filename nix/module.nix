# NixOS module `services.vllm`, in the style of nixpkgs' nixos/modules/services/misc/ollama.nix
# (options, DynamicUser, DeviceAllow, hardening) and comfyui.nix.
# Every setting becomes the launcher's environment through ./lane-env.nix: there is no second
# configuration format, and `vllm-launcher config` on the host shows what the unit runs.
# The flake's nixosModules.vllm wraps this file and sets `package` to its own vllm-server.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types literalExpression;
  cfg = config.services.vllm;
  laneEnv = import ./lane-env.nix;
  runtimeEnvFor = import ./runtime-env.nix;

  staticUser = cfg.user != null;
  defaultStateDir = "/var/lib/vllm";
  stateUnderVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;

  kindType = {
    str = types.str;
    strList = types.listOf types.str;
    float = types.either types.float types.int;
    int = types.ints.unsigned;
    bool = types.bool;
    args = types.either types.str (types.listOf types.str);
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
  };
  # One option per engine setting of lane-env.nix, null meaning "inherit / launcher default".
  settingOptions = lib.listToAttrs (
    map (s: {
      inherit (s) name;
      value = mkOption {
        type = types.nullOr kindType.${s.kind};
        default = null;
        description =
          descriptions.${s.name}
            or "vLLM engine setting ${s.setting} (launcher variable VLLM_LANE_<LANE>_${s.setting}).";
      };
    }) laneEnv.settings
  );

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

  rendered = laneEnv.render {
    inherit (cfg) host port defaultLane;
    logLevel = cfg.logLevel;
    startTimeout = cfg.startTimeout;
    apiKeyFile = if cfg.apiKeyFile == null then null else "%d/api-key";
    defaults = clean cfg.defaults;
    lanes = lib.mapAttrs (_: clean) cfg.lanes;
  };

  runtimeEnv = runtimeEnvFor {
    hsaOverrideGfxVersion = cfg.rocmOverrideGfx;
  };

  cacheDir = "/var/cache/vllm";
in
{
  options.services.vllm = {
    enable = lib.mkEnableOption "vLLM model lanes behind one OpenAI-compatible endpoint";

    package = mkOption {
      type = types.package;
      default = pkgs.vllm-server;
      defaultText = literalExpression "inputs.<this flake>.packages.\${pkgs.stdenv.hostPlatform.system}.vllm-server";
      description = "The vllm-server package (launcher, torch and vLLM for ROCm).";
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
      type = types.submodule { options = settingOptions; };
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
      description = "HOME and Hugging Face home of the service; compile caches go to ${cacheDir}.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = rendered.assertions ++ [
      {
        assertion = cfg.user != null || cfg.group == null || cfg.group == cfg.user;
        message = "services.vllm.group needs services.vllm.user (null user = DynamicUser).";
      }
      {
        assertion = lib.hasPrefix "/" cfg.stateDir;
        message = "services.vllm.stateDir must be an absolute path, got \"${cfg.stateDir}\".";
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

    networking.firewall = lib.mkIf cfg.openFirewall { allowedTCPPorts = [ cfg.port ]; };

    environment.systemPackages = [ cfg.package ];

    systemd.services.vllm = {
      description = "vLLM model lanes (OpenAI-compatible endpoint)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # Order: runtime defaults < the module's caches < lanes/settings < user's variables.
      environment =
        runtimeEnv
        // {
          HOME = cfg.stateDir;
          HF_HOME = "${cfg.stateDir}/huggingface";
          VLLM_CACHE_ROOT = "${cacheDir}/vllm";
          TRITON_CACHE_DIR = "${cacheDir}/triton";
        }
        // rendered.environment
        // cfg.environmentVariables;

      serviceConfig =
        lib.optionalAttrs staticUser {
          User = cfg.user;
          Group = cfg.group;
        }
        // {
          # The launcher sends READY=1 (sd_notify) once it listens.
          Type = "notify";
          NotifyAccess = "main";
          DynamicUser = !staticUser;
          ExecStart = "${cfg.package}/bin/vllm-server serve";
          # Loading a first model can take minutes; the launcher itself bounds each engine
          # start with VLLM_START_TIMEOUT.
          TimeoutStartSec = toString (cfg.startTimeout + 120);
          TimeoutStopSec = "3min"; # drain in-flight requests, then stop the engine group
          Restart = "on-failure";
          RestartSec = "10s";
          # Every engine process (API server, EngineCore, workers) is in the unit's cgroup:
          # stopping the service takes all of them.
          KillMode = "control-group";

          WorkingDirectory = cfg.stateDir;
          StateDirectory = lib.mkIf stateUnderVarLib (lib.removePrefix "/var/lib/" cfg.stateDir);
          ReadWritePaths = lib.mkIf (!stateUnderVarLib) [ cfg.stateDir ];
          CacheDirectory = "vllm";
          StateDirectoryMode = "0750";
          BindReadOnlyPaths = lib.optional (cfg.modelsDir != null) (toString cfg.modelsDir);
          LoadCredential = lib.optional (cfg.apiKeyFile != null) "api-key:${cfg.apiKeyFile}";
          EnvironmentFile = lib.optional (cfg.environmentFile != null) cfg.environmentFile;

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

          # Hardening as far as torch allows. Not MemoryDenyWriteExecute: Triton and inductor
          # generate and load code at run time. /dev/shm stays usable (no PrivateIPC): vLLM's
          # shared-memory queues need it.
          MemoryDenyWriteExecute = false;
          ProcSubset = "all"; # /proc/meminfo, /proc/cpuinfo
          ProtectSystem = "strict";
          ProtectHome = "tmpfs"; # hides /home, still allows bind-mounting modelsDir from it
          PrivateTmp = true;
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
            "AF_UNIX"
            "AF_NETLINK"
          ];
          CapabilityBoundingSet = [ "" ];
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "@resources"
          ];
          UMask = "0077";
        };
    };
  };
}
