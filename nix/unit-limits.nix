# services.vllm.limits -> the units' systemd resource limits (issue 18; seed 001 asked for
# MemoryLimit=64G and CPUQuota=80%). Nothing is set unless asked: a key appears only when its
# option is not null.
#
# Pure (builtins only), so CI evaluates it without nixpkgs, as nix/lane-env.nix:
#   nix-instantiate --eval --strict --json -E \
#     '(import ./nix/unit-limits.nix) { memoryMax = "64G"; cpuQuota = "800%"; }'
#
# :: { memoryMax ? null, cpuQuota ? null } -> { serviceConfig; assertions; errors; }
#
# MemoryMax=, not the seed's MemoryLimit=: that is the deprecated cgroup-v1 setting
# (systemd.resource-control(5) says to use MemoryMax= instead).
#
# CPUQuota= is relative to ONE CPU (systemd.resource-control(5): "relative to the total CPU time
# available on one CPU. Use values > 100% for allotting CPU time on more than one CPU"): the
# seed's 80% would give the whole service, engines and Ray included, 0.8 of one core; 80 % of a
# 32-thread Strix Halo is 2560%.
#
# Unified memory: the GPU's memory is the same RAM. Whether its allocations count against
# MemoryMax= depends on the kernel, and is not verified on the target here. What was found:
# amdgpu's GTT buffers come from TTM's page pool, which mainline does not charge to the memory
# cgroup; Dave Airlie's series that would ("memcg: add support for GPU page counters", v4/v5 on
# dri-devel, 2026-02-24) lost AMD's TTM maintainer's ack the same day (he proposes a dmem cgroup
# pool for GTT instead), and ROCm issue #6370 (ROCm/legacy-rocm-build, 2026-06-19) reports that
# memcg does not see GTT on Strix Halo under Linux 7.1. So today the limit most likely bounds the
# CPU side only (Python, the launcher, Ray, the page cache of model files being read) and the
# OOM killer does not see the model; on a kernel that charges GTT it must also leave room for
# gpuMemoryUtilization x the GPU's memory. Either way, set it from a measurement on the machine
# (docs/containers.md, "Resource limits").
let
  inherit (builtins)
    filter
    isInt
    isString
    match
    toJSON
    ;

  # What systemd 252 parses (tests/test_nix_unit_limits.py checks each case with
  # `systemd-analyze verify`). MemoryMax=: bytes with an optional 1024-based K/M/G/T/P suffix, a
  # percentage of physical memory (at most 100, two decimals), or infinity.
  sizeRe = "[1-9][0-9]*[KMGTP]?|100([.]0{1,2})?%|[0-9]{1,2}([.][0-9]{1,2})?%|infinity";
  # CPUQuota=: a percentage with at most two decimals, above 100% for more than one CPU.
  quotaRe = "[0-9]+([.][0-9]{1,2})?%";

  validSize = v: (isInt v && v > 0) || (isString v && match sizeRe v != null && match "0+([.]0+)?%" v == null);
  validQuota = v: isString v && match quotaRe v != null && match "0+([.]0+)?%" v == null;
  show = v: if isString v then toJSON v else toString v;
in
{
  memoryMax ? null,
  cpuQuota ? null,
}:
let
  assertions = [
    {
      assertion = memoryMax == null || validSize memoryMax;
      message = "services.vllm.limits.memoryMax = ${show memoryMax} is not a size systemd's MemoryMax= takes: bytes with an optional K, M, G or T suffix (1024-based, upper case) such as \"64G\", a percentage of the host's memory such as \"50%\", or \"infinity\".";
    }
    {
      assertion = cpuQuota == null || validQuota cpuQuota;
      message = "services.vllm.limits.cpuQuota = ${show cpuQuota} is not a CPUQuota= value: a percentage of ONE CPU such as \"800%\" (8 CPUs' worth); above 100% for more than one CPU.";
    }
  ];
in
{
  serviceConfig =
    (if memoryMax == null then { } else { MemoryMax = toString memoryMax; })
    // (if cpuQuota == null then { } else { CPUQuota = cpuQuota; });
  inherit assertions;
  errors = map (a: a.message) (filter (a: !a.assertion) assertions);
}
