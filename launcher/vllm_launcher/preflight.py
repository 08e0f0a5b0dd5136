"""`vllm-launcher check`: what a user runs before starting. One Finding per line.

Levels: ok and info never fail; warn is worth reading; fail makes the check exit 1.
"""

from __future__ import annotations

import glob
import grp
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import LauncherConfig
from .memory_plan import describe, memory_plan
from .vllm_info import VllmInfo, detect

GFX1151_TARGET_VERSION = "110501"     # /sys/class/kfd/.../properties: gfx_target_version
# Settings that are wrong on gfx1151 (../shared/docs/nix-packaging.md, gfx1151 runtime settings).
BAD_ON_GFX1151 = {
    ("HSA_OVERRIDE_GFX_VERSION", "11.0.0"):
        "makes HIP load gfx1100 code objects; leave it unset for gfx1151 builds (11.5.1 is the identity)",
    ("VLLM_ROCM_USE_AITER", "1"):
        "AITER targets MI300-class GPUs and can crash vLLM on RDNA APUs; set VLLM_ROCM_USE_AITER=0",
}


@dataclass(frozen=True)
class Finding:
    level: str      # ok | info | warn | fail
    message: str

    def line(self) -> str:
        return f"{self.level.upper():4} {self.message}"


def gpu_targets() -> list[str]:
    """gfx_target_version of every KFD GPU node (empty without a ROCm kernel driver)."""
    targets = []
    for path in glob.glob("/sys/class/kfd/kfd/topology/nodes/*/properties"):
        try:
            for line in Path(path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "gfx_target_version" and value.strip() not in ("", "0"):
                    targets.append(value.strip())
        except OSError:
            pass
    return targets


def check_vllm(python: str) -> tuple[list[Finding], VllmInfo]:
    info = detect(python)
    try:
        result = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [Finding("fail", f"vLLM: cannot run the engine Python {python}: {error}")], info
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [Finding("fail", f"vLLM: `import vllm` fails in {python}: {last}")], info
    return [Finding("ok", f"vLLM {result.stdout.strip()} importable ({info.describe()}) in {python}")], info


def check_devices(cpu_build: bool) -> list[Finding]:
    missing = "info" if cpu_build else "fail"
    findings = []
    render_nodes = sorted(glob.glob("/dev/dri/renderD*"))
    for path in ["/dev/kfd", *render_nodes] if render_nodes else ["/dev/kfd", "/dev/dri/renderD*"]:
        if not os.path.exists(path):
            findings.append(Finding(missing, f"{path} missing" + (" (CPU build of vLLM: not needed)" if cpu_build
                                                                   else ": no ROCm GPU driver, or not passed to the container")))
        elif not os.access(path, os.R_OK | os.W_OK):
            group = grp.getgrgid(os.stat(path).st_gid).gr_name
            member = group in {grp.getgrgid(g).gr_name for g in os.getgroups()}
            findings.append(Finding(missing, f"{path} not accessible: owned by group {group!r}, which this user "
                                    + ("is in (log in again?)" if member else f"is not in (add the user to {group!r})")))
        else:
            findings.append(Finding("ok", f"{path} accessible"))
    return findings


def check_rocm_settings(config: LauncherConfig) -> list[Finding]:
    targets = gpu_targets()
    on_gfx1151 = GFX1151_TARGET_VERSION in targets
    findings = []
    sources = [("environment", config.environ)] + [(f"lane {l.name}", l.env) for l in config.lanes.values()]
    for where, env in sources:
        for (name, bad), why in BAD_ON_GFX1151.items():
            if env.get(name, "").strip() == bad:
                level = "fail" if on_gfx1151 else "warn"
                gpu = "on this gfx1151" if on_gfx1151 else "on gfx1151 (Strix Halo)"
                findings.append(Finding(level, f"{name}={bad} ({where}) is wrong {gpu}: {why}"))
    if targets:
        findings.append(Finding("info", f"GPU targets (gfx_target_version): {', '.join(targets)}"))
    return findings


def check_models(config: LauncherConfig) -> list[Finding]:
    offline = config.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    findings = []
    for lane in config.lanes.values():
        if lane.model_is_local:
            path = Path(lane.model)
            if not (path / "config.json").is_file():
                findings.append(Finding("fail", f"lane {lane.name}: model directory {path} "
                                        + ("has no config.json" if path.is_dir() else "does not exist")))
            else:
                findings.append(Finding("ok", f"lane {lane.name}: model directory {path} present"))
        elif offline:
            findings.append(Finding("warn", f"lane {lane.name}: {lane.model} is a hub id and HF_HUB_OFFLINE is set: "
                                    "it must already be in the Hugging Face cache"))
        else:
            findings.append(Finding("info", f"lane {lane.name}: {lane.model} is a hub id, downloaded on first start"))
    findings += [Finding("warn", warning) for warning in config.warnings]
    return findings


def check_memory(config: LauncherConfig) -> list[Finding]:
    findings = []
    for lane in config.lanes.values():
        plan = memory_plan(lane, config.server.gpu_memory_gb)
        findings.append(Finding("warn" if plan["fits"] is False else "info", "memory plan: " + describe(lane.name, plan)))
    return findings


def check_cluster(config: LauncherConfig) -> list[Finding]:
    """With a cluster configured: its nodes and GPUs, and whether each multi-node lane fits."""
    if config.cluster is None:
        return []
    from .cluster import cluster_report

    return [Finding(level, message) for level, message in
            cluster_report(config.cluster, config.server.engine_python, config.environ, config.lanes)]


def run_checks(config: LauncherConfig) -> list[Finding]:
    findings, info = check_vllm(config.server.engine_python)
    findings += check_devices(info.is_cpu_build)
    findings += check_rocm_settings(config)
    findings += check_models(config)
    findings += check_memory(config)
    findings += check_cluster(config)
    return findings
