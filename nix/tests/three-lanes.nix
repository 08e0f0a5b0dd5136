# A three-lane services.vllm configuration (the seeds' orchestrator / coder / fast_rag lanes),
# used by tests/test_nix_lane_env.py (through lane-env.nix) and tests/test_nix_module.py (through
# the module). `settings` is the module's option tree under services.vllm.
{
  settings = {
    host = "127.0.0.1";
    port = 8000;
    defaultLane = "orchestrator";
    logRequests = true;
    logDirectory = "/var/log/vllm";
    defaults = {
      gpuMemoryUtilization = 0.45;
      dtype = "float32";
      enforceEager = true;
    };
    lanes = {
      orchestrator = {
        model = "/srv/models/orchestrator";
        servedModelName = "DeepSeek-R1-Distill-Qwen-32B";
        aliases = [ "planner" ];
        maxModelLen = 32768;
      };
      coder = {
        model = "/srv/models/coder";
        servedModelName = "Qwen2.5-Coder-32B-Instruct";
        maxModelLen = 16384;
        gpuMemoryUtilization = 0.5;
        extraArgs = [ "--seed" "7" ];
        environment.HIP_VISIBLE_DEVICES = "0";
      };
      fast_rag = {
        model = "/srv/models/fast_rag";
        servedModelName = "Mistral-7B-Instruct";
        aliases = [ "rag" "fast" ];
        maxModelLen = 8192;
        dtype = "bfloat16";
        quantization = null;
      };
    };
  };
}
