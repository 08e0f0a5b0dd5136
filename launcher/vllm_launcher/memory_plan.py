"""The seeds' "resource calculator": will a lane fit in its share of device memory?

weights (safetensors sizes, else parameters from config.json x dtype bytes)
+ KV cache per token (2 x layers x KV heads x head dim x KV dtype bytes) x max model length,
against GPU_MEMORY_UTILIZATION x device memory. Reads only files; never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import LaneConfig

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1}
VLLM_DEFAULT_UTILIZATION = 0.9
GIB = 1024**3


def amdgpu_memory(root: Path | str = "/") -> list[tuple[str, int, int]]:
    """(card, VRAM bytes, GTT bytes) of every amdgpu card, from its sysfs mem_info_*_total under
    root ("/" on the host; a fake tree in tests/test_host_checks.py)."""
    cards = []
    for device in sorted(Path(root, "sys/class/drm").glob("card*/device")):
        if not device.parent.name[4:].isdigit():       # card0-DP-1 and the like: connectors
            continue
        values: list[int | None] = []
        for name in ("mem_info_vram_total", "mem_info_gtt_total"):
            try:
                values.append(int(Path(device, name).read_text()))
            except (OSError, ValueError):
                values.append(None)
        if values[1] is not None:
            cards.append((device.parent.name, values[0] or 0, values[1]))
    return cards


def device_memory_bytes(gpu_memory_gb: float | None) -> tuple[int | None, str]:
    """Device memory and where the number came from: amdgpu sysfs (VRAM + GTT on an APU such
    as Strix Halo, whose GPU memory is mostly GTT), else VLLM_GPU_MEMORY_GB, else unknown."""
    total = sum(vram + gtt for _, vram, gtt in amdgpu_memory())
    if total:
        return total, "amdgpu sysfs (VRAM + GTT)"
    if gpu_memory_gb:
        return int(gpu_memory_gb * 1e9), "VLLM_GPU_MEMORY_GB"
    return None, "unknown (set VLLM_GPU_MEMORY_GB)"


def _model_config(lane: LaneConfig) -> dict[str, Any] | None:
    if not lane.model_is_local:
        return None
    try:
        return json.loads(Path(lane.model, "config.json").read_text())
    except (OSError, ValueError):
        return None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # multimodal configs keep the language model's numbers in text_config
    return config.get("text_config") or config


def _estimate_parameters(cfg: dict[str, Any]) -> int | None:
    """Decoder-only transformer parameter count from the usual config.json fields."""
    try:
        hidden = cfg["hidden_size"]
        layers = cfg["num_hidden_layers"]
        vocab = cfg["vocab_size"]
    except KeyError:
        return None
    heads = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    intermediate = cfg.get("intermediate_size", 4 * hidden)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def kv_bytes_per_token(cfg: dict[str, Any], kv_dtype_bytes: int) -> int | None:
    try:
        layers = cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
    except KeyError:
        return None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    return 2 * layers * kv_heads * head_dim * kv_dtype_bytes


def _dtype_bytes(lane: LaneConfig, cfg: dict[str, Any]) -> int:
    dtype = lane.settings.get("DTYPE", "auto")
    if dtype == "auto":
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return DTYPE_BYTES.get(dtype, 2)


def memory_plan(lane: LaneConfig, gpu_memory_gb: float | None = None) -> dict[str, Any]:
    """Bytes throughout; None where a number cannot be known (hub model not downloaded)."""
    cfg_full = _model_config(lane)
    cfg = _text_config(cfg_full) if cfg_full else None
    plan: dict[str, Any] = {"weights_bytes": None, "weights_source": None, "kv_bytes_per_token": None,
                            "max_model_len": lane.settings.get("MAX_MODEL_LEN"), "kv_cache_bytes": None}
    if lane.model_is_local:
        sizes = [p.stat().st_size for p in Path(lane.model).glob("*.safetensors")] if Path(lane.model).is_dir() else []
        if sizes:
            plan.update(weights_bytes=sum(sizes), weights_source="safetensors files")
    if cfg is not None:
        dtype_bytes = _dtype_bytes(lane, cfg)
        if plan["weights_bytes"] is None:
            params = _estimate_parameters(cfg)
            if params:
                plan.update(weights_bytes=params * dtype_bytes, weights_source="config.json parameters x dtype")
        kv_dtype = lane.settings.get("KV_CACHE_DTYPE", "auto")
        kv_bytes = DTYPE_BYTES.get(kv_dtype, dtype_bytes) if kv_dtype != "auto" else dtype_bytes
        plan["kv_bytes_per_token"] = kv_bytes_per_token(cfg, kv_bytes)
        if plan["max_model_len"] is None:
            plan["max_model_len"] = cfg.get("max_position_embeddings")
    if plan["kv_bytes_per_token"] and plan["max_model_len"]:
        plan["kv_cache_bytes"] = plan["kv_bytes_per_token"] * plan["max_model_len"]

    device, source = device_memory_bytes(gpu_memory_gb)
    utilization = lane.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    share = int(device * utilization) if device else None
    needed = (plan["weights_bytes"] or 0) + (plan["kv_cache_bytes"] or 0) if plan["weights_bytes"] else None
    plan.update(device_bytes=device, device_source=source, gpu_memory_utilization=utilization,
                share_bytes=share, needed_bytes=needed,
                fits=(needed <= share) if (needed is not None and share is not None) else None)
    return plan


def describe(lane: str, plan: dict[str, Any]) -> str:
    def gib(value):
        return "?" if value is None else f"{value / GIB:.2f} GiB"

    verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown"}[plan["fits"]]
    return (f"lane {lane}: weights {gib(plan['weights_bytes'])} + KV cache {gib(plan['kv_cache_bytes'])} "
            f"({plan['kv_bytes_per_token'] or '?'} B/token x {plan['max_model_len'] or '?'} tokens) "
            f"= {gib(plan['needed_bytes'])} of share {gib(plan['share_bytes'])} "
            f"({plan['gpu_memory_utilization']} x {gib(plan['device_bytes'])}, {plan['device_source']}): {verdict}")
