"""services.vllm evaluated with the real module system of nixpkgs.lib (issue 7 point 4), and its
unit file scored by `systemd-analyze security --offline=true` (issue 11).

nixpkgs.lib is not vendored: point NIXPKGS_LIB at a checkout of nix-community/nixpkgs.lib (the
directory holding lib/default.nix, or its lib/). Without it these tests skip, saying so; the
score test also skips without a systemd-analyze that knows --offline (systemd >= 250).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nix_evaluator import ROOT, evaluate, nix_instantiate, run_eval

pytestmark = pytest.mark.nix


THREE = '(import {root}/nix/tests/three-lanes.nix).settings // {{ enable = true; {extra} }}'


def three(extra: str = "") -> dict:
    return evaluate(THREE.format(root=ROOT, extra=extra))


def test_unit_environment_is_lane_env():
    out = three()
    assert out["failedAssertions"] == []
    env = out["environment"]
    rendered = json.loads(subprocess.run(
        [nix_instantiate(), "--eval", "--strict", "--json", "-E",
         "((import ./nix/lane-env.nix).render ((import ./nix/tests/three-lanes.nix).settings "
         "// { logLevel = \"INFO\"; startTimeout = 1800; })).environment"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    for key, value in rendered.items():
        assert env[key] == value, key
    assert env["VLLM_ROCM_USE_AITER"] == "0" and "HSA_OVERRIDE_GFX_VERSION" not in env
    assert env["HOME"] == "/var/lib/vllm" and env["TRITON_CACHE_DIR"].startswith("/var/cache/vllm")
    assert env["VLLM_CACHE_ROOT"].startswith("/var/cache/vllm") and env["HF_HOME"].startswith("/var/lib/vllm")
    # three-lanes.nix sets the log options: the launcher's VLLM_LOG_REQUESTS and LOG_DIRECTORY
    assert env["VLLM_LOG_REQUESTS"] == "true" and env["LOG_DIRECTORY"] == "/var/log/vllm"
    assert out["serviceConfig"]["LogsDirectory"] == "vllm"  # systemd creates it for the DynamicUser


def test_log_options_default_and_off():
    env = evaluate('{ enable = true; lanes.a.model = "m"; }')["environment"]
    assert env["VLLM_LOG_REQUESTS"] == "false" and "LOG_DIRECTORY" not in env
    out = evaluate('{ enable = true; lanes.a.model = "m"; user = "vllm"; logDirectory = "/srv/vllm-logs"; }')
    assert out["failedAssertions"] == [] and out["environment"]["LOG_DIRECTORY"] == "/srv/vllm-logs"
    assert out["serviceConfig"]["ReadWritePaths"] == ["/srv/vllm-logs"] and "LogsDirectory" not in out["serviceConfig"]


def test_service_config():
    sc = three('apiKeyFile = "/run/secrets/key"; environmentFile = "/run/secrets/env"; modelsDir = "/srv/models";'
               ' openFirewall = true; rocmOverrideGfx = "11.5.1";')
    svc = sc["serviceConfig"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure" and svc["KillMode"] == "control-group"
    assert int(svc["TimeoutStartSec"]) >= 1800
    assert svc["DynamicUser"] is True and svc["StateDirectory"] == "vllm" and svc["CacheDirectory"] == "vllm"
    assert svc["PrivateDevices"] is False and svc["DevicePolicy"] == "closed"
    assert svc["DeviceAllow"] == ["char-drm", "char-kfd"]
    assert svc["SupplementaryGroups"] == ["render", "video"]
    # what vLLM, torch and ROCm need stays: Triton's generated code, /proc/meminfo and cpuinfo,
    # netlink, the network (no PrivateNetwork, no IP allow list: a later Ray cluster), /dev/shm
    assert svc["MemoryDenyWriteExecute"] is False and svc["ProcSubset"] == "all"
    assert svc["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]
    assert not {"PrivateNetwork", "IPAddressDeny", "IPAddressAllow", "PrivateIPC", "PrivateUsers"} & set(svc)
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] is True
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["SystemCallFilter"] == ["@system-service", "@resources", "~@privileged"]
    assert svc["SystemCallErrorNumber"] == "EPERM"
    assert svc["ProtectProc"] == "invisible" and svc["PrivateMounts"] is True
    assert svc["LimitNOFILE"] == 65536
    assert svc["BindReadOnlyPaths"] == ["/srv/models"]
    assert svc["LoadCredential"] == ["api-key:/run/secrets/key"]
    assert svc["EnvironmentFile"] == ["/run/secrets/env"]
    assert sc["environment"]["VLLM_API_KEY_FILE"] == "%d/api-key"
    assert sc["environment"]["HSA_OVERRIDE_GFX_VERSION"] == "11.5.1"
    assert sc["firewall"] == [8000]
    assert "/run/secrets" not in json.dumps(sc["environment"])  # secrets stay out of the store


def test_static_user():
    out = three('user = "vllm";')
    assert out["serviceConfig"]["User"] == "vllm" and out["serviceConfig"]["DynamicUser"] is False
    assert out["users"]["vllm"]["isSystemUser"] is True and out["groups"] == ["vllm"]


def test_assertions():
    out = evaluate('{ enable = true; lanes = { a.model = "x"; A.model = "y"; "b-c".model = "z"; }; defaultLane = "q"; }')
    text = "\n".join(out["failedAssertions"])
    assert "b-c" in text and "differ ignoring case" in text and 'defaultLane = "q"' in text
    assert evaluate("{ enable = true; }")["failedAssertions"][0].startswith("services.vllm.lanes: define at least one lane")


def test_state_and_log_directories_under_dynamic_user():
    text = "\n".join(evaluate('{ enable = true; lanes.a.model = "m"; stateDir = "/srv/vllm"; }')["failedAssertions"])
    assert 'stateDir = "/srv/vllm" is outside /var/lib' in text and "services.vllm.user" in text
    text = "\n".join(evaluate('{ enable = true; lanes.a.model = "m"; logDirectory = "/srv/logs"; }')["failedAssertions"])
    assert 'logDirectory = "/srv/logs" is outside /var/log' in text
    assert evaluate('{ enable = true; lanes.a.model = "m"; stateDir = "/var/lib"; }')["failedAssertions"]
    # a static user may live elsewhere: the directory becomes writable, systemd does not create it
    out = evaluate('{ enable = true; lanes.a.model = "m"; user = "vllm"; stateDir = "/srv/vllm"; }')
    assert out["failedAssertions"] == [] and out["serviceConfig"]["ReadWritePaths"] == ["/srv/vllm"]
    assert "StateDirectory" not in out["serviceConfig"] and out["environment"]["HOME"] == "/srv/vllm"
    out = evaluate('{ enable = true; lanes.a.model = "m"; stateDir = "/var/lib/vllm-two"; }')
    assert out["failedAssertions"] == [] and out["serviceConfig"]["StateDirectory"] == "vllm-two"


FLAKE_MODULE = """{ lib, fakePackage, ... }: {
  # what flake.nix's nixosModules.vllm does with self.packages.<system>.vllm-server
  services.vllm.package = lib.mkDefault (fakePackage // { outPath = "/nix/store/11111111111111111111111111111111-flake-server"; });
  services.vllm = { enable = true; lanes.a.model = "m"; };
}"""


def test_package_option():
    # the flake's mkDefault wins over mkPackageOption's pkgs.vllm-server, with or without it in pkgs
    for has in (True, False):
        result = run_eval(FLAKE_MODULE, pkgs_has_server=has)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["package"].endswith("-flake-server") and "-flake-server/bin/vllm-server serve" in out["unitFile"]
    # imported alone: pkgs.vllm-server (the overlay) is the default ...
    assert evaluate('{ enable = true; lanes.a.model = "m"; }')["package"].endswith("-vllm-server-fake")
    # ... and without it evaluation stops naming the attribute
    result = run_eval('{ services.vllm = { enable = true; lanes.a.model = "m"; }; }', pkgs_has_server=False)
    assert result.returncode != 0 and "vllm-server cannot be found in pkgs" in result.stderr


# `systemd-analyze security --offline=true` on the unit file rendered from the evaluation.
# Measured with systemd 252: 2.1 before issue 11, 1.6 after (nixpkgs' ollama module: 1.6).
EXPOSURE_MAX = 1.6
# What is left, each needed by vLLM, torch, ROCm or the cluster work (reasons in nix/module.nix).
EXPOSED = {
    "SystemCallFilter=~@resources",  # setrlimit, sched_setaffinity, mbind/set_mempolicy
    "RootDirectory=/RootImage=",  # the Nix store closure runs from the host's /nix/store
    "SupplementaryGroups=",  # render, video: /dev/kfd and /dev/dri/renderD*
    "PrivateDevices=",  # the GPU devices
    "MemoryDenyWriteExecute=",  # Triton/inductor JIT
    "RestrictAddressFamilies=~AF_NETLINK",  # glibc getaddrinfo(AI_ADDRCONFIG), getifaddrs
    "RestrictAddressFamilies=~AF_UNIX",  # sd_notify, vLLM's ZeroMQ ipc sockets
    "RestrictAddressFamilies=~AF_(INET|INET6)",  # the HTTP endpoint, engines, Ray
    "ProcSubset=",  # /proc/meminfo, /proc/cpuinfo
    "PrivateNetwork=",  # it serves the network
    "PrivateUsers=",  # would show render/video as nogroup inside (systemd issue 41994)
    "ProtectHome=",  # tmpfs: modelsDir may be bind-mounted from /home
    "DeviceAllow=",  # char-drm, char-kfd (char-rtc:r comes with ProtectClock)
    "IPAddressDeny=",  # clients and a Ray cluster on any address
}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.skip("systemd-analyze not found (Debian: apt-get install systemd)")
    help_text = subprocess.run([found, "security", "--help"], capture_output=True, text=True).stdout
    if "--offline" not in help_text:
        pytest.skip(f"{found} has no --offline (systemd >= 250 needed)")
    return found


def score(analyze: str, unit: Path) -> tuple[float, set[str], str]:
    """systemd-analyze's overall exposure of a unit file and the items it still counts."""
    verify = subprocess.run([analyze, "verify", "--man=false", str(unit)], capture_output=True, text=True)
    assert not re.search(r"Unknown key|Failed to parse|Invalid", verify.stderr), verify.stderr
    text = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", text.stdout)
    assert match, text.stdout + text.stderr
    items = json.loads(subprocess.run([analyze, "security", "--offline=true", "--json=short", str(unit)],
                                      capture_output=True, text=True, timeout=60, check=True).stdout)
    exposed = {item["name"] for item in items if item["exposure"] not in (None, "0.0")}
    return float(match.group(1)), exposed, text.stdout


def test_security_exposure(tmp_path: Path):
    analyze = systemd_analyze()
    out = three('apiKeyFile = "/run/secrets/key"; environmentFile = "/run/secrets/env"; modelsDir = "/srv/models";')
    unit = tmp_path / "vllm.service"
    unit.write_text(out["unitFile"])
    exposure, exposed, text = score(analyze, unit)
    assert exposure <= EXPOSURE_MAX, text
    assert exposed == EXPOSED, text


@pytest.mark.parametrize("box", ["head", "worker"])
def test_security_exposure_cluster(tmp_path: Path, box: str):
    # the Ray node's unit (and, on the head, the lane server beside it) keep the same hardening
    # and score: Ray needs nothing the lane server does not
    analyze = systemd_analyze()
    out = two_boxes(box)
    units = {"vllm-cluster.service": out["cluster"]["unitFile"]}
    if box == "head":
        units["vllm.service"] = out["server"]["unitFile"]
    for name, text in units.items():
        unit = tmp_path / name
        unit.write_text(text)
        exposure, exposed, report = score(analyze, unit)
        assert exposure <= EXPOSURE_MAX, report
        assert exposed == EXPOSED, report


def test_disabled_module_defines_nothing():
    out = evaluate("{ enable = false; }")
    assert out["environment"] is None and out["firewall"] == []


# --- several machines (issue 14): services.vllm.cluster --------------------------------------

TWO = "(import {root}/nix/tests/two-boxes.nix).{box} // {{ {extra} }}"


def two_boxes(box: str, extra: str = "") -> dict:
    return evaluate(TWO.format(root=ROOT, box=box, extra=extra))


# serviceConfig keys that differ between the lane server and the Ray node by design
OWN_KEYS = {"Type", "NotifyAccess", "ExecStart", "TimeoutStartSec", "TimeoutStopSec", "LogsDirectory",
            "LoadCredential", "RestartPreventExitStatus"}


def test_cluster_head():
    out = two_boxes("head")
    assert out["failedAssertions"] == []
    assert out["services"] == ["vllm", "vllm-cluster"]
    server, node = out["server"], out["cluster"]
    # the lane server starts after this machine's Ray node and shares its private /tmp (Ray's session)
    assert "vllm-cluster.service" in server["after"] and server["requires"] == ["vllm-cluster.service"]
    assert server["unitConfig"] == {"JoinsNamespaceOf": "vllm-cluster.service"}
    assert "Requires=vllm-cluster.service" in server["unitFile"]
    assert node["serviceConfig"]["ExecStart"].endswith("/bin/vllm-server cluster start")
    assert node["serviceConfig"]["Type"] == "exec" and node["wantedBy"] == ["multi-user.target"]
    # one user for both (the dynamic user "vllm"), the same GPU access, directories and hardening
    shared = {k: v for k, v in server["serviceConfig"].items() if k not in OWN_KEYS}
    assert {k: v for k, v in node["serviceConfig"].items() if k not in OWN_KEYS} == shared
    assert shared["User"] == "vllm" and shared["DynamicUser"] is True
    assert shared["BindReadOnlyPaths"] == ["/srv/models"] and shared["DeviceAllow"] == ["char-drm", "char-kfd"]
    # the token: a credential of each unit, never in the store or the environment
    for unit in (server, node):
        assert unit["serviceConfig"]["LoadCredential"] == ["cluster-token:/etc/vllm/cluster-token"]
        assert unit["environment"]["VLLM_CLUSTER_TOKEN_FILE"] == "%d/cluster-token"
        assert unit["environment"]["VLLM_CLUSTER_ROLE"] == "head"
        assert unit["environment"]["VLLM_CLUSTER_INTERFACE"] == "enp1s0f0"
        assert "/etc/vllm" not in json.dumps(unit["environment"])
        assert "VLLM_CLUSTER_PORT" not in unit["environment"]  # the launcher's default is not restated
    env = server["environment"]
    assert env["VLLM_LANE_BIG_NODES"] == "2" and env["VLLM_LANE_BIG_TENSOR_PARALLEL_SIZE"] == "2"
    assert env["VLLM_LANE_BIG_DISTRIBUTED_EXECUTOR_BACKEND"] == "mp"
    assert not any(name.startswith("VLLM_LANE") for name in node["environment"])
    # firewall: the API port everywhere; Ray's ports on the cluster link only, which is trusted
    assert out["firewall"] == [8000]
    assert out["trustedInterfaces"] == ["enp1s0f0"]
    assert out["firewallInterfaces"] == {"enp1s0f0": {
        "allowedTCPPorts": [6379, 6380, 6381, 6382, 6383, 6384, 6385],
        "allowedTCPPortRanges": [{"from": 10002, "to": 10199}]}}


def test_cluster_worker():
    out = two_boxes("worker")
    assert out["failedAssertions"] == []
    # a worker runs only its node: no lane server unit
    assert out["services"] == ["vllm-cluster"] and out["server"] is None and out["environment"] is None
    node = out["cluster"]
    env = node["environment"]
    assert env["VLLM_CLUSTER_ROLE"] == "worker" and env["VLLM_CLUSTER_ADDRESS"] == "192.168.100.1"
    assert env["VLLM_ROCM_USE_AITER"] == "0" and env["HOME"] == "/var/lib/vllm"  # the runtime defaults
    assert node["serviceConfig"]["SupplementaryGroups"] == ["render", "video"]
    assert node["serviceConfig"]["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]
    assert node["requires"] == [] and node["unitConfig"] == {}
    assert out["firewall"] == [] and out["trustedInterfaces"] == ["enp1s0f0"]
    ports = out["firewallInterfaces"]["enp1s0f0"]["allowedTCPPorts"]
    assert 6379 not in ports and ports == [6380, 6381, 6382, 6383, 6384, 6385]


def test_cluster_ports_and_firewall_options():
    out = two_boxes("head", f"cluster = (import {ROOT}/nix/tests/two-boxes.nix).head.cluster // {{ port = 7000; "
                    "minWorkerPort = 20000; maxWorkerPort = 20063; gpus = 1; objectStoreMemory = \"8Gi\"; };")
    env = out["cluster"]["environment"]
    assert env["VLLM_CLUSTER_PORT"] == "7000" and env["VLLM_CLUSTER_MIN_WORKER_PORT"] == "20000"
    assert env["VLLM_CLUSTER_GPUS"] == "1" and env["VLLM_CLUSTER_OBJECT_STORE_MEMORY"] == "8Gi"
    assert out["server"]["environment"]["VLLM_CLUSTER_PORT"] == "7000"  # the server asks the head there
    rules = out["firewallInterfaces"]["enp1s0f0"]
    assert rules["allowedTCPPorts"][0] == 7000 and rules["allowedTCPPortRanges"] == [{"from": 20000, "to": 20063}]
    closed = two_boxes("worker", f"cluster = (import {ROOT}/nix/tests/two-boxes.nix).worker.cluster // "
                       "{ openFirewall = false; trustInterface = false; };")
    assert closed["failedAssertions"] == []
    assert closed["firewallInterfaces"] == {} and closed["trustedInterfaces"] == []


def test_cluster_assertions():
    def failed(services_vllm: str) -> str:
        return "\n".join(evaluate(services_vllm)["failedAssertions"])

    text = failed('{ cluster = { enable = true; role = "worker"; }; }')
    assert "services.vllm.cluster.headAddress: a worker joins the head" in text
    assert "services.vllm.cluster.interface: name the network interface" in text
    assert "services.vllm.cluster.tokenFile: give the file holding the cluster's token" in text
    assert 'services.vllm.cluster.role: set it to "head"' in failed(
        '{ cluster = { enable = true; interface = "e"; tokenFile = "/t"; }; }')
    assert "is in the Nix store" in failed(
        '{ cluster = { enable = true; role = "head"; interface = "e"; tokenFile = "/nix/store/00000000-t"; }; }')
    # a worker machine serves no lanes
    text = failed('{ enable = true; lanes.a.model = "m"; cluster = { enable = true; role = "worker"; '
                  'headAddress = "h"; interface = "e"; tokenFile = "/t"; }; }')
    assert 'cluster.role = "worker": a worker machine runs only its cluster node' in text
    # a lane across machines needs the cluster's head here
    text = failed('{ enable = true; lanes.big = { model = "m"; tensorParallelSize = 2; nodes = 2; }; }')
    assert "services.vllm.lanes: big span several machines (nodes > 1): enable services.vllm.cluster" in text
    # lane-only settings are no `defaults` option
    result = run_eval('{ services.vllm = { enable = true; lanes.a.model = "m"; defaults.nodes = 2; }; }')
    assert result.returncode != 0 and "defaults.nodes' does not exist" in result.stderr
    # the state directory rules hold for a worker too (it has no lane server)
    assert "is outside /var/lib" in failed('{ stateDir = "/srv/vllm"; cluster = { enable = true; role = "worker"; '
                                           'headAddress = "h"; interface = "e"; tokenFile = "/t"; }; }')


# --- resource limits and restart policy (issue 18) -----------------------------------------------

def test_limits_only_when_set(tmp_path: Path):
    svc = evaluate('{ enable = true; lanes.a.model = "m"; }')["serviceConfig"]
    assert "MemoryMax" not in svc and "CPUQuota" not in svc and "MemoryLimit" not in svc
    # seed 001's MemoryLimit=64G as MemoryMax=, on both units of the head
    out = two_boxes("head", 'limits = { memoryMax = "64G"; cpuQuota = "2560%"; };')
    assert out["failedAssertions"] == []
    for unit in (out["server"], out["cluster"]):
        assert unit["serviceConfig"]["MemoryMax"] == "64G" and unit["serviceConfig"]["CPUQuota"] == "2560%"
    assert "MemoryMax=64G\n" in out["server"]["unitFile"] and "CPUQuota=2560%\n" in out["server"]["unitFile"]
    analyze = shutil.which("systemd-analyze")
    if analyze:  # the rendered unit parses (no "Invalid ..., ignoring")
        unit = tmp_path / "vllm.service"
        unit.write_text(out["server"]["unitFile"])
        verify = subprocess.run([analyze, "verify", "--man=false", str(unit)], capture_output=True, text=True)
        assert not re.search(r"Unknown key|Failed to parse|Invalid|ignoring", verify.stderr), verify.stderr


def test_bad_limits_fail_with_the_option_named():
    text = "\n".join(evaluate('{ enable = true; lanes.a.model = "m"; limits = { memoryMax = "64GB"; '
                              'cpuQuota = "80"; }; }')["failedAssertions"])
    assert 'services.vllm.limits.memoryMax = "64GB" is not a size' in text
    assert 'services.vllm.limits.cpuQuota = "80" is not a CPUQuota= value' in text


def test_restart_policy_of_both_units():
    out = two_boxes("head")
    for unit in (out["server"], out["cluster"]):
        svc = unit["serviceConfig"]
        # on-failure (not seed 001's always) and no restart loop on a configuration error (exit 2)
        assert svc["Restart"] == "on-failure" and svc["RestartPreventExitStatus"] == "2"


# --- Strix Halo host settings (issue 23 point 4): services.vllm.strixHalo --------------------

def test_strix_halo_kernel_params_only_when_enabled():
    out = evaluate('{ enable = true; lanes.a.model = "m"; strixHalo = { enable = true; gttSizeGiB = 124; '
                   'disableIommu = true; disableCwsr = true; }; }')
    assert out["failedAssertions"] == []
    assert out["kernelParams"] == ["ttm.pages_limit=32505856", "amdgpu.gttsize=126976", "amd_iommu=off",
                                   "amdgpu.cwsr_enable=0"]
    # opt-in: options set without enable change nothing; enable alone sets only what is asked
    assert evaluate('{ enable = true; lanes.a.model = "m"; strixHalo.gttSizeGiB = 124; }')["kernelParams"] == []
    assert evaluate('{ enable = true; lanes.a.model = "m"; strixHalo.enable = true; }')["kernelParams"] == []
    # without the lane server too (a cluster worker's box)
    worker = evaluate("{ strixHalo = { enable = true; disableCwsr = true; }; }")
    assert worker["kernelParams"] == ["amdgpu.cwsr_enable=0"] and worker["environment"] is None


def test_strix_halo_bad_size_names_the_option():
    result = run_eval('{ services.vllm.strixHalo = { enable = true; gttSizeGiB = 0; }; }')
    assert result.returncode != 0
    assert "services.vllm.strixHalo.gttSizeGiB" in result.stderr and "positive integer" in result.stderr, result.stderr
    assert "strixHalo" in evaluate("{ }")["options"]
