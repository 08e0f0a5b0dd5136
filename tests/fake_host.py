"""A fake host for the host checks: a sysfs/procfs tree of a healthy Strix Halo box (tree(), with
files changed or removed), lanes of real launcher configurations whose memory plan comes from
sparse model files of a chosen size (config()), and the findings' lines (findings(), only())."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_launcher.config import load_config
from vllm_launcher.host_checks import host_findings

GIB = 1024**3
HEALTHY = {
    "dev/kfd": "",
    "dev/dri/renderD128": "",
    "sys/class/kfd/kfd/topology/nodes/0/properties": "cpu_cores_count 16\ngfx_target_version 0\n",
    "sys/class/kfd/kfd/topology/nodes/1/properties": "simd_count 80\ngfx_target_version 110501\n",
    "sys/class/drm/card1/device/mem_info_vram_total": str(512 * 1024**2),
    "sys/class/drm/card1/device/mem_info_gtt_total": str(124 * GIB),
    "sys/class/drm/card1/device/fw_version/mes_fw_version": "0x00000080",
    "sys/class/drm/card1-DP-1/status": "disconnected",
    "sys/module/ttm/parameters/pages_limit": str(124 * GIB // 4096),
    "sys/module/amdgpu/parameters/cwsr_enable": "1",
    "proc/sys/kernel/osrelease": "6.18.2-arch1-1",
    "proc/cmdline": "initrd=\\initramfs-linux.img root=/dev/nvme0n1p2 amd_iommu=off",
}


def tree(root: Path, **changes: str | None) -> Path:
    """The healthy box, with files changed ("a/b": text) or removed (None)."""
    files = dict(HEALTHY)
    for key, value in changes.items():
        files[key.replace("__", "/")] = value
    for path, text in files.items():
        if text is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text + ("\n" if text and not text.endswith("\n") else ""))
            (root / path).chmod(0o666 if path.startswith("dev/") else 0o644)
    (root / "sys/class/iommu").mkdir(parents=True, exist_ok=True)
    return root


def model(directory: Path, weights_gib: float) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "torch_dtype": "bfloat16"}))
    with open(directory / "model.safetensors", "wb") as handle:      # sparse: no disk used
        handle.truncate(int(weights_gib * GIB))
    return directory


def config(tmp_path: Path, lanes: dict[str, float], **server: str):
    """Lanes of the given weights (GiB), each GPU_MEMORY_UTILIZATION 0.45, MAX_MODEL_LEN 4096."""
    env = {"VLLM_LANES": ",".join(lanes), **server}
    for name, weights in lanes.items():
        env[f"VLLM_LANE_{name.upper()}_MODEL"] = str(model(tmp_path / "models" / name, weights))
        env[f"VLLM_LANE_{name.upper()}_GPU_MEMORY_UTILIZATION"] = "0.45"
        env[f"VLLM_LANE_{name.upper()}_MAX_MODEL_LEN"] = "4096"
    return load_config(env)


def findings(root: Path, cfg, cpu_build: bool = False) -> list[str]:
    return [f.line() for f in host_findings(cfg, cpu_build, root)]


def only(lines: list[str], needle: str) -> str:
    matched = [line for line in lines if needle in line]
    assert len(matched) == 1, (needle, lines)
    return matched[0]
