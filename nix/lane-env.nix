# Module-style lane settings -> the launcher's environment variables (issue 2's contract).
# There is no second configuration format: the NixOS module, the container examples and the
# tests all go through this function, and the launcher reads only the variables it returns.
#
# Pure (builtins only), so CI evaluates it without nixpkgs:
#   nix-instantiate --eval --strict --json -E \
#     '(import ./nix/lane-env.nix).render { lanes.coder.model = "/models/coder"; }'
#
# render :: config -> { environment :: attrsOf str; assertions :: [{ assertion; message; }]; errors :: [str]; }
#   config = {
#     host, port, apiKeyFile, logLevel, logRequests, logDirectory, enginePython,
#     startTimeout                  # server-wide; null = unset (launcher default)
#     defaults = { <setting> = value; }   # global engine settings  -> VLLM_<SETTING>
#     lanes.<name> = { <setting> = value; environment = { NAME = "value"; }; }
#                                   # per lane -> VLLM_LANE_<NAME>_<SETTING>, VLLM_LANE_<NAME>_ENV_<VAR>
#     defaultLane                   # null = the first lane in VLLM_LANES (alphabetical)
#     cluster = { role; headAddress; interface; tokenFile; gpus; ... }
#                                   # this machine's Ray node -> VLLM_CLUSTER_* (see renderCluster)
#   }
# Values: null = unset; booleans "true"/"false"; aliases comma-joined; extraArgs a string
# (passed verbatim) or a list of arguments (each shell-quoted, then space-joined).
let
  inherit (builtins)
    attrNames
    concatMap
    concatStringsSep
    elem
    filter
    head
    isBool
    isFloat
    isInt
    isList
    isString
    length
    listToAttrs
    map
    match
    replaceStrings
    toJSON
    typeOf
    ;

  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  toUpper = replaceStrings lower upper;

  # Engine settings: option name -> SETTING, with the value kind the module declares.
  # Order and names follow issue 2 section 2.
  settings = [
    { name = "model"; setting = "MODEL"; kind = "str"; }
    { name = "servedModelName"; setting = "SERVED_MODEL_NAME"; kind = "str"; }
    { name = "aliases"; setting = "ALIASES"; kind = "strList"; }
    { name = "gpuMemoryUtilization"; setting = "GPU_MEMORY_UTILIZATION"; kind = "float"; }
    { name = "maxModelLen"; setting = "MAX_MODEL_LEN"; kind = "int"; }
    { name = "tensorParallelSize"; setting = "TENSOR_PARALLEL_SIZE"; kind = "int"; }
    { name = "pipelineParallelSize"; setting = "PIPELINE_PARALLEL_SIZE"; kind = "int"; }
    { name = "dtype"; setting = "DTYPE"; kind = "str"; }
    { name = "enforceEager"; setting = "ENFORCE_EAGER"; kind = "bool"; }
    { name = "blockSize"; setting = "BLOCK_SIZE"; kind = "int"; }
    { name = "swapSpace"; setting = "SWAP_SPACE"; kind = "float"; }
    { name = "numGpuBlocksOverride"; setting = "NUM_GPU_BLOCKS_OVERRIDE"; kind = "int"; }
    { name = "kvCacheDtype"; setting = "KV_CACHE_DTYPE"; kind = "str"; }
    { name = "kvCacheMemoryBytes"; setting = "KV_CACHE_MEMORY_BYTES"; kind = "int"; }
    { name = "maxNumSeqs"; setting = "MAX_NUM_SEQS"; kind = "int"; }
    { name = "maxNumBatchedTokens"; setting = "MAX_NUM_BATCHED_TOKENS"; kind = "int"; }
    { name = "enablePrefixCaching"; setting = "ENABLE_PREFIX_CACHING"; kind = "bool"; }
    { name = "enableChunkedPrefill"; setting = "ENABLE_CHUNKED_PREFILL"; kind = "bool"; }
    { name = "cpuOffloadGb"; setting = "CPU_OFFLOAD_GB"; kind = "float"; }
    { name = "quantization"; setting = "QUANTIZATION"; kind = "str"; }
    { name = "trustRemoteCode"; setting = "TRUST_REMOTE_CODE"; kind = "bool"; }
    { name = "tokenizer"; setting = "TOKENIZER"; kind = "str"; }
    { name = "loadFormat"; setting = "LOAD_FORMAT"; kind = "str"; }
    { name = "attentionBackend"; setting = "ATTENTION_BACKEND"; kind = "str"; }
    { name = "distributedExecutorBackend"; setting = "DISTRIBUTED_EXECUTOR_BACKEND"; kind = "str"; }
    { name = "sleepLevel"; setting = "SLEEP_LEVEL"; kind = "int"; }
    { name = "warmup"; setting = "WARMUP"; kind = "bool"; }
    { name = "engineStallTimeout"; setting = "ENGINE_STALL_TIMEOUT"; kind = "float"; }
    # agents (docs/agents.md); the launcher checks the names against the engines' vLLM
    { name = "toolCallParser"; setting = "TOOL_CALL_PARSER"; kind = "str"; }
    { name = "reasoningParser"; setting = "REASONING_PARSER"; kind = "str"; }
    { name = "chatTemplate"; setting = "CHAT_TEMPLATE"; kind = "pathOrStr"; }
    { name = "extraArgs"; setting = "EXTRA_ARGS"; kind = "args"; }
    # lane only (VLLM_LANE_<LANE>_<SETTING>; the launcher reads no global VLLM_<SETTING>)
    { name = "idleTimeout"; setting = "IDLE_TIMEOUT"; kind = "int"; laneOnly = true; }
    { name = "nodes"; setting = "NODES"; kind = "int"; laneOnly = true; }
  ];
  settingNames = map (s: s.name) settings;
  laneOnlyNames = map (s: s.name) (filter (s: s.laneOnly or false) settings);

  # This machine's node of a Ray cluster (launcher/vllm_launcher/settings.py CLUSTER_SETTINGS):
  # option name -> VLLM_CLUSTER_<KEY>. Only what is set is passed; `default` repeats the
  # launcher's default for the ports, which renderCluster needs for the firewall when a port is
  # left unset (tests/test_nix_lane_env.py checks them against settings.py). `head`: the GCS
  # port, listened on by the head only; `range`: the worker port range's ends.
  cluster = [
    { name = "role"; key = "ROLE"; kind = "str"; }
    { name = "headAddress"; key = "ADDRESS"; kind = "str"; }
    { name = "interface"; key = "INTERFACE"; kind = "str"; }
    { name = "tokenFile"; key = "TOKEN_FILE"; kind = "str"; }
    { name = "gpus"; key = "GPUS"; kind = "int"; }
    { name = "cpus"; key = "CPUS"; kind = "int"; }
    { name = "objectStoreMemory"; key = "OBJECT_STORE_MEMORY"; kind = "bytes"; }
    { name = "tempDir"; key = "TEMP_DIR"; kind = "str"; }
    { name = "port"; key = "PORT"; kind = "port"; default = 6379; head = true; }
    { name = "nodeManagerPort"; key = "NODE_MANAGER_PORT"; kind = "port"; default = 6380; }
    { name = "objectManagerPort"; key = "OBJECT_MANAGER_PORT"; kind = "port"; default = 6381; }
    { name = "agentGrpcPort"; key = "AGENT_GRPC_PORT"; kind = "port"; default = 6382; }
    { name = "agentHttpPort"; key = "AGENT_HTTP_PORT"; kind = "port"; default = 6383; }
    { name = "runtimeEnvAgentPort"; key = "RUNTIME_ENV_AGENT_PORT"; kind = "port"; default = 6384; }
    { name = "metricsPort"; key = "METRICS_PORT"; kind = "port"; default = 6385; }
    { name = "minWorkerPort"; key = "MIN_WORKER_PORT"; kind = "port"; default = 10002; range = true; }
    { name = "maxWorkerPort"; key = "MAX_WORKER_PORT"; kind = "port"; default = 10199; range = true; }
  ];
  clusterNames = map (s: s.name) cluster;

  # Server-wide settings: option name -> variable.
  server = [
    { name = "host"; variable = "VLLM_HOST"; }
    { name = "port"; variable = "VLLM_PORT"; }
    { name = "apiKeyFile"; variable = "VLLM_API_KEY_FILE"; }
    { name = "logLevel"; variable = "VLLM_LOG_LEVEL"; }
    { name = "logRequests"; variable = "VLLM_LOG_REQUESTS"; }
    { name = "logDirectory"; variable = "LOG_DIRECTORY"; }
    { name = "enginePython"; variable = "VLLM_ENGINE_PYTHON"; }
    { name = "startTimeout"; variable = "VLLM_START_TIMEOUT"; }
  ];

  shellQuote = s: "'" + replaceStrings [ "'" ] [ "'\\''" ] s + "'";

  render1 =
    what: value:
    if isBool value then
      (if value then "true" else "false")
    else if isInt value then
      toString value
    else if isFloat value then
      toJSON value # 0.45 -> "0.45" (toString would give "0.450000")
    else if isString value then
      value
    else if typeOf value == "path" then
      toString value # a chat template file beside the configuration
    else if isList value && what == "args" then
      concatStringsSep " " (map shellQuote value)
    else if isList value then
      concatStringsSep "," value
    else if value ? outPath then
      toString value # a path or a derivation
    else
      throw "lane-env: cannot render a ${typeOf value} as an environment value";

  # { name -> value } for the settings present (non-null) in `attrs`.
  settingVars =
    prefix: attrs:
    map (s: {
      name = prefix + s.setting;
      value = render1 s.kind attrs.${s.name};
    }) (filter (s: (attrs.${s.name} or null) != null) settings);

  unknownKeys = allowed: attrs: filter (k: !(elem k allowed)) (attrNames attrs);

  validLane = name: match "[A-Za-z0-9_]+" name != null;
  validVar = name: match "[A-Za-z_][A-Za-z0-9_]*" name != null;

  render =
    cfg:
    let
      lanes = cfg.lanes or { };
      defaults = cfg.defaults or { };
      laneNames = attrNames lanes;
      upperNames = map toUpper laneNames;
      sameIgnoringCase = filter (n: length (filter (m: toUpper m == toUpper n) laneNames) > 1) laneNames;
      badNames = filter (n: !validLane n) laneNames;
      defaultLane = cfg.defaultLane or null;
      missingModel = filter (n: (lanes.${n}.model or null) == null && (defaults.model or null) == null) laneNames;
      laneEnvBad = concatMap (
        n: map (v: "${n}.${v}") (filter (v: !validVar v) (attrNames (lanes.${n}.environment or { })))
      ) laneNames;
      unknownDefaults = unknownKeys settingNames defaults;
      laneOnlyDefaults = filter (k: elem k laneOnlyNames) (attrNames defaults);
      unknownLane = concatMap (
        n: map (k: "lanes.${n}.${k}") (unknownKeys (settingNames ++ [ "environment" ]) lanes.${n})
      ) laneNames;
      prefix = cfg.optionPrefix or "services.vllm";

      assertions = [
        {
          assertion = laneNames != [ ];
          message = "${prefix}.lanes: define at least one lane, e.g. ${prefix}.lanes.default.model = \"/models/my-model\";";
        }
        {
          assertion = badNames == [ ];
          message = "${prefix}.lanes: lane names may contain only letters, digits and `_`: ${concatStringsSep ", " badNames}";
        }
        {
          assertion = sameIgnoringCase == [ ];
          message = "${prefix}.lanes: lane names must differ ignoring case (they become VLLM_LANE_<NAME>_*): ${concatStringsSep ", " sameIgnoringCase}";
        }
        {
          assertion = defaultLane == null || elem defaultLane laneNames;
          message = "${prefix}.defaultLane = \"${toString defaultLane}\" is not one of the lanes (${concatStringsSep ", " laneNames})";
        }
        {
          assertion = missingModel == [ ];
          message = "${prefix}: lane(s) ${concatStringsSep ", " missingModel} have no model: set ${prefix}.lanes.<name>.model or ${prefix}.defaults.model";
        }
        {
          assertion = laneEnvBad == [ ];
          message = "${prefix}.lanes.<name>.environment: not an environment variable name: ${concatStringsSep ", " laneEnvBad}";
        }
        {
          assertion = laneOnlyDefaults == [ ];
          message = "${prefix}.defaults: ${concatStringsSep ", " laneOnlyDefaults} can only be set per lane (${prefix}.lanes.<name>.<setting>, VLLM_LANE_<LANE>_<SETTING>)";
        }
        {
          assertion = unknownDefaults == [ ] && unknownLane == [ ];
          message = "${prefix}: unknown engine setting(s) ${concatStringsSep ", " (unknownDefaults ++ unknownLane)}; known: ${concatStringsSep " " settingNames}";
        }
      ];

      serverVars = map (s: {
        name = s.variable;
        value = render1 "str" cfg.${s.name};
      }) (filter (s: (cfg.${s.name} or null) != null) server);

      laneVars = concatMap (
        n:
        let
          lane = lanes.${n};
          p = "VLLM_LANE_${toUpper n}_";
        in
        settingVars p lane
        ++ map (v: {
          name = "${p}ENV_${v}";
          value = render1 "str" lane.environment.${v};
        }) (attrNames (lane.environment or { }))
      ) laneNames;

      environment = listToAttrs (
        serverVars
        ++ clusterVars (cfg.cluster or { })
        ++ settingVars "VLLM_" defaults
        ++ [
          {
            name = "VLLM_LANES";
            value = concatStringsSep "," laneNames;
          }
        ]
        ++ (
          if laneNames == [ ] then
            [ ]
          else
            [
              {
                name = "VLLM_DEFAULT_LANE";
                value = if defaultLane == null then head laneNames else defaultLane;
              }
            ]
        )
        ++ laneVars
      );
    in
    {
      inherit environment assertions;
      errors = map (a: a.message) (filter (a: !a.assertion) assertions);
      lanes = laneNames;
      upperLanes = upperNames;
    };
  clusterVars =
    attrs:
    map (s: {
      name = "VLLM_CLUSTER_${s.key}";
      value = render1 s.kind attrs.${s.name};
    }) (filter (s: (attrs.${s.name} or null) != null) cluster);

  # renderCluster :: cluster -> { environment; assertions; errors; firewall = { ports; ranges; }; }
  #   cluster = { role, headAddress, interface, tokenFile, gpus, ..., <port options> }, null = unset
  # The environment of this machine's node (`vllm-launcher cluster start`); render's `cluster`
  # argument adds the same variables to the lane server's. firewall: the TCP ports this node
  # listens on for the other machines (the GCS port on the head only) and the worker range.
  renderCluster =
    c:
    let
      prefix = c.optionPrefix or "services.vllm.cluster";
      role = c.role or null;
      portOf = s: if (c.${s.name} or null) != null then c.${s.name} else s.default;
      fixed = filter (s: s.kind == "port" && !(s.range or false) && (role == "head" || !(s.head or false))) cluster;
      unknown = unknownKeys (clusterNames ++ [ "optionPrefix" ]) c;
      tokenFile = c.tokenFile or null;
      inStore = tokenFile != null && match "/nix/store/.*" (toString tokenFile) != null;
      assertions = [
        {
          assertion = role == "head" || role == "worker";
          message = "${prefix}.role: set it to \"head\" (the machine that runs the lane server) or \"worker\" (a machine that only lends its GPU), got ${toJSON role}";
        }
        {
          assertion = role != "worker" || (c.headAddress or null) != null;
          message = "${prefix}.headAddress: a worker joins the head; set it to the head's address on the cluster link (host or host:port), e.g. \"192.168.100.1\"";
        }
        {
          assertion = (c.interface or null) != null;
          message = "${prefix}.interface: name the network interface of the private cluster link, e.g. \"enp1s0f0\" (its IPv4 address is the node's address; NCCL/RCCL and Gloo use it)";
        }
        {
          assertion = tokenFile != null;
          message = "${prefix}.tokenFile: give the file holding the cluster's token, the same on every machine and outside the Nix store (`vllm-launcher cluster new-token /etc/vllm/cluster-token` writes one)";
        }
        {
          assertion = !inStore;
          message = "${prefix}.tokenFile = \"${toString tokenFile}\" is in the Nix store, which every local user can read: keep the token outside it (e.g. /etc/vllm/cluster-token, or a sops/agenix secret)";
        }
        {
          assertion = unknown == [ ];
          message = "${prefix}: unknown setting(s) ${concatStringsSep ", " unknown}; known: ${concatStringsSep " " clusterNames}";
        }
      ];
    in
    {
      environment = listToAttrs (clusterVars c);
      inherit assertions;
      errors = map (a: a.message) (filter (a: !a.assertion) assertions);
      firewall = {
        ports = map portOf fixed;
        ranges = [
          {
            from = portOf (head (filter (s: s.name == "minWorkerPort") cluster));
            to = portOf (head (filter (s: s.name == "maxWorkerPort") cluster));
          }
        ];
      };
    };
in
{
  inherit
    render
    renderCluster
    settings
    server
    cluster
    shellQuote
    ;
}
