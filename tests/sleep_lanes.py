"""Fake-engine lanes for the sleep-mode tests: local "models" whose memory plan has the weights
asked for (sparse files) on a 100 GB device, and the two-lane set where one lane is awake at a time."""

from __future__ import annotations

from pathlib import Path

from serving import fake_lanes_env

GB = 10**9
DEVICE_GB = 100                     # VLLM_GPU_MEMORY_GB: the memory plan's device


def model_dir(root: Path, name: str, weights_gb: float) -> Path:
    """A local "model": a sparse model.safetensors of that size (the memory plan's weights)."""
    path = root / name
    path.mkdir()
    with open(path / "model.safetensors", "wb") as weights:
        weights.truncate(int(weights_gb * GB))
    return path


def sleep_env(fake_python, tmp_path, lanes: dict[str, dict], **server) -> dict:
    env = fake_lanes_env(fake_python, lanes, VLLM_GPU_MEMORY_GB=str(DEVICE_GB), **server)
    for lane, extra in lanes.items():
        if "weights_gb" in extra:
            env.pop(f"VLLM_LANE_{lane.upper()}_weights_gb")
            env[f"VLLM_LANE_{lane.upper()}_MODEL"] = str(model_dir(tmp_path, lane, float(extra["weights_gb"])))
    return env


def one_awake_env(fake_python, tmp_path, **a_settings) -> dict:
    """Lanes a (SLEEP_LEVEL=1, 4 GB of weights: asleep it holds 0.04) and b (no sleep), shares
    0.45, budget 0.5: one lane awake at a time, a's sleeper fits beside b."""
    return sleep_env(fake_python, tmp_path, {"a": {"SLEEP_LEVEL": "1", "weights_gb": "4", **a_settings}, "b": {}},
                     VLLM_GPU_MEMORY_UTILIZATION="0.45", VLLM_GPU_MEMORY_BUDGET="0.5")
