"""`vllm-launcher check`: what a user runs before starting. One Finding per line.

Levels: ok and info never fail; warn is worth reading; fail makes the check exit 1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .config import LauncherConfig
from .host_checks import GFX1151_TARGET_VERSION, Finding, gpu_targets, host_findings
from .memory_plan import describe, memory_plan
from .vllm_info import VllmInfo, detect

# Settings that are wrong on gfx1151 (../shared/docs/nix-packaging.md, gfx1151 runtime settings).
BAD_ON_GFX1151 = {
    ("HSA_OVERRIDE_GFX_VERSION", "11.0.0"):
        "makes HIP load gfx1100 code objects; leave it unset for gfx1151 builds (11.5.1 is the identity)",
    ("VLLM_ROCM_USE_AITER", "1"):
        "AITER targets MI300-class GPUs and can crash vLLM on RDNA APUs; set VLLM_ROCM_USE_AITER=0",
}


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
    findings += host_findings(config, info.is_cpu_build)    # devices, GPU target, GTT, IOMMU, kernel, firmware
    findings += check_rocm_settings(config)
    findings += check_models(config)
    findings += check_memory(config)
    findings += check_cluster(config)
    return findings
