"""`vllm-launcher check`: what a user runs before starting. One Finding per line.

Levels: ok and info never fail; warn is worth reading; fail makes the check exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .config import LauncherConfig
from .host_checks import GFX1151_TARGET_VERSION, Finding, gpu_targets, host_findings
from .memory_plan import describe, memory_plan
from .vllm_info import VllmInfo, detect, model_registry

# What docs/nix.md suggests for a vision lane on vLLM 0.12 (no Mllama there), without torchvision.
VISION_MODEL_ON_012 = "google/gemma-3-12b-it (Gemma3ForConditionalGeneration)"
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
    sources = [("environment", config.environ)] + [(f"lane {lane.name}", lane.env) for lane in config.lanes.values()]
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


def hub_cache_dir(environ: dict[str, str]) -> Path:
    """Where huggingface_hub keeps downloaded repositories (its own variables, in its order)."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"])
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or
                                                   os.path.join(environ.get("HOME") or str(Path.home()), ".cache"),
                                                   "huggingface")
    return Path(home) / "hub"


def model_config_file(model: str, local: bool, environ: dict[str, str]) -> Path | None:
    """A lane's config.json: in its directory, or for a hub id in the Hugging Face cache."""
    if local:
        return Path(model) / "config.json"
    repo = hub_cache_dir(environ) / ("models--" + model.replace("/", "--"))
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return repo / "snapshots" / revision / "config.json"


def check_architectures(config: LauncherConfig) -> list[Finding]:
    """Each lane's model architecture (config.json `architectures`) against the model registry of
    the engine Python's vLLM: a lane vLLM cannot serve fails here, not at its first request."""
    lanes = {}
    for lane in config.lanes.values():
        path = model_config_file(lane.model, lane.model_is_local, {**config.environ, **lane.env})
        try:
            architectures = json.loads(path.read_text()).get("architectures") if path else None
        except (OSError, ValueError, AttributeError):
            architectures = None
        if architectures:
            lanes[lane.name] = list(architectures)
    if not lanes:
        return []
    asked = tuple(sorted({architecture for found in lanes.values() for architecture in found}))
    registry = model_registry(config.server.engine_python, asked)
    if isinstance(registry, str):
        return [Finding("warn", f"model architectures not checked: vLLM's model registry: {registry}")]
    findings = []
    for name, architectures in lanes.items():
        level, why = registry.verdict(architectures)
        if level == "fail" and "torchvision" in why:
            why += ("; it needs torchvision: add a ROCm torchvision wheel built for your torch to the artifacts "
                    f"(docs/nix.md, torchvision), or serve e.g. {VISION_MODEL_ON_012}")
        elif level == "fail":
            why += f"; serve a model of an architecture it has, e.g. {VISION_MODEL_ON_012} for images"
        findings.append(Finding(level, f"lane {name}: {why}"))
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
    imports = findings[0].level == "ok"          # vLLM imports: its model registry can be read
    findings += host_findings(config, info.is_cpu_build)    # devices, GPU target, GTT, IOMMU, kernel, firmware
    findings += check_rocm_settings(config)
    findings += check_models(config)
    if imports:
        findings += check_architectures(config)
    findings += check_memory(config)
    findings += check_cluster(config)
    return findings
