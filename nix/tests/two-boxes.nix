# The README's two-box Strix Halo example ("Several machines"): the services.vllm option trees
# of the head (the lane server and the Ray head, a lane `big` across both machines with tensor
# parallelism 2) and of the worker (its Ray node only). Used by tests/test_nix_module.py (through
# the module) and tests/test_nix_lane_env.py (through lane-env.nix and the launcher).
let
  link = {
    interface = "enp1s0f0";
    tokenFile = "/etc/vllm/cluster-token";
    openFirewall = true;
  };
in
{
  head = {
    enable = true;
    host = "0.0.0.0";
    openFirewall = true;
    modelsDir = "/srv/models";
    defaults = {
      gpuMemoryUtilization = 0.85;
      maxModelLen = 32768;
    };
    defaultLane = "coder";
    lanes = {
      big = {
        model = "/srv/models/Qwen3-235B-A22B-GPTQ-Int4";
        tensorParallelSize = 2;
        nodes = 2;
        distributedExecutorBackend = "mp";
      };
      coder.model = "/srv/models/Qwen3-Coder-30B-A3B-Instruct";
    };
    cluster = link // {
      enable = true;
      role = "head";
    };
  };
  worker = {
    modelsDir = "/srv/models";
    cluster = link // {
      enable = true;
      role = "worker";
      headAddress = "192.168.100.1";
    };
  };
}
