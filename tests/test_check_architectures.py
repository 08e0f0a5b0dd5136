"""`vllm-launcher check` names a lane whose model architecture the engine's vLLM cannot serve.

Against the real vLLM 0.12.0 of the locked closure (.venv-closure) as the engine Python: lanes
with local model directories whose config.json names an architecture its registry has and
imports, one it dropped (the seeds' vision lane, Llama 3.2 Vision: MllamaForConditionalGeneration,
supported until 0.10.2), one whose model class needs torchvision (which the closure leaves out,
issue 18), and one it does not know. The registry is read once per engine environment and kept
in the cache directory (XDG_CACHE_HOME): a second check answers from there.
"""

from __future__ import annotations

import json

import pytest

from closure_env import CLOSURE_DIR, CLOSURE_PYTHON, VLLM_DIST_VERSION, closure_ready
from launcher_cli import run_launcher

pytestmark = [pytest.mark.closure,
              pytest.mark.skipif(not closure_ready(), reason=f"{CLOSURE_DIR} is missing: run `make closure`")]

LANES = {
    "text": "Qwen2ForCausalLM",
    "fast_rag": "MllamaForConditionalGeneration",
    "qwen_vl": "Qwen2_5_VLForConditionalGeneration",
    "gemma": "Gemma3ForConditionalGeneration",
    "odd": "NoSuchModelForCausalLM",
}


def lane_lines(stdout: str) -> dict[str, str]:
    return {lane: next(line for line in stdout.splitlines() if f"lane {lane}: " in line and arch in line)
            for lane, arch in LANES.items()}


def test_check_rejects_the_architectures_vllm_012_cannot_serve(tmp_path):
    env = {"VLLM_ENGINE_PYTHON": str(CLOSURE_PYTHON), "VLLM_LANES": ",".join(LANES),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "VLLM_GPU_MEMORY_GB": "48"}
    for lane, architecture in LANES.items():
        model = tmp_path / lane
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        env[f"VLLM_LANE_{lane.upper()}_MODEL"] = str(model)
    first = run_launcher(env, "check", timeout=300)
    assert first.returncode == 1, first.stdout + first.stderr
    lines = lane_lines(first.stdout)
    vllm = f"vLLM {VLLM_DIST_VERSION}"          # 0.12.0+cpu: the version the closure's vLLM reports
    assert lines["text"].startswith(f"OK   lane text: Qwen2ForCausalLM is in {vllm}'s model registry")
    assert lines["gemma"].startswith("OK   ")
    assert lines["fast_rag"].startswith(
        f"FAIL lane fast_rag: MllamaForConditionalGeneration cannot start on {vllm}: its model registry lists it "
        "as supported until v0.10.2 only"), lines["fast_rag"]
    assert lines["qwen_vl"].startswith(f"FAIL lane qwen_vl: Qwen2_5_VLForConditionalGeneration cannot start on "
                                       f"{vllm}: its model class does not import here"), lines["qwen_vl"]
    assert "No module named 'torchvision'" in lines["qwen_vl"] and "add a ROCm torchvision wheel" in lines["qwen_vl"]
    assert "e.g. google/gemma-3-12b-it (Gemma3ForConditionalGeneration)" in lines["fast_rag"]
    assert lines["odd"].startswith(f"WARN lane odd: NoSuchModelForCausalLM not in {vllm}'s model registry")

    # The second check answers from the cache: edited there, Qwen2 is no longer registered.
    [cache] = (tmp_path / "cache" / "vllm-launcher").glob("model-registry-*.json")
    facts = json.loads(cache.read_text())
    facts["supported"].remove("Qwen2ForCausalLM")
    cache.write_text(json.dumps(facts))
    again = lane_lines(run_launcher(env, "check", timeout=300).stdout)
    assert again["text"].startswith(f"WARN lane text: Qwen2ForCausalLM not in {vllm}'s model registry")
    assert {lane: line for lane, line in again.items() if lane != "text"} == {
        lane: line for lane, line in lines.items() if lane != "text"}
