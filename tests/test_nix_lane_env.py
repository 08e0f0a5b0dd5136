"""The module's lane settings, rendered by the pure nix/lane-env.nix, fed to the launcher
(issue 7 acceptance 2): the launcher must resolve the same three lanes with the models, names
and limits the module set, so the module and the launcher cannot drift.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_nix_eval import ROOT, nix_eval

LAUNCHER = Path(sys.executable).parent / "vllm-launcher"
THREE = "(import ./nix/tests/three-lanes.nix).settings"


def render(expr: str) -> dict:
    return nix_eval(f"(import ./nix/lane-env.nix).render ({expr})")


def test_three_lane_environment():
    out = render(THREE)
    env = out["environment"]
    assert out["errors"] == []
    assert env["VLLM_LANES"] == "coder,fast_rag,orchestrator"
    assert env["VLLM_DEFAULT_LANE"] == "orchestrator"
    assert env["VLLM_GPU_MEMORY_UTILIZATION"] == "0.45"
    assert env["VLLM_ENFORCE_EAGER"] == "true"
    assert env["VLLM_LANE_CODER_GPU_MEMORY_UTILIZATION"] == "0.5"
    assert env["VLLM_LANE_FAST_RAG_ALIASES"] == "rag,fast"
    assert env["VLLM_LANE_CODER_EXTRA_ARGS"] == "'--seed' '7'"
    assert env["VLLM_LANE_CODER_ENV_HIP_VISIBLE_DEVICES"] == "0"
    assert "VLLM_LANE_FAST_RAG_QUANTIZATION" not in env  # null = unset
    assert env["VLLM_LOG_REQUESTS"] == "true" and env["LOG_DIRECTORY"] == "/var/log/vllm"
    assert all(isinstance(v, str) for v in env.values())


def test_three_lanes_through_the_launcher():
    env = render(THREE)["environment"]
    assert LAUNCHER.exists(), f"{LAUNCHER} missing: pip install -e launcher"
    run_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run([str(LAUNCHER), "config", "--format", "json"], env=run_env,
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["default_lane"] == "orchestrator"
    # the module's logRequests / logDirectory, as the launcher reads them
    assert config["server"]["log_requests"] is True and config["server"]["log_directory"] == "/var/log/vllm"
    lanes = config["lanes"]
    assert set(lanes) == {"orchestrator", "coder", "fast_rag"}
    expected = {
        "orchestrator": ("/srv/models/orchestrator", "DeepSeek-R1-Distill-Qwen-32B", "32768", "0.45"),
        "coder": ("/srv/models/coder", "Qwen2.5-Coder-32B-Instruct", "16384", "0.5"),
        "fast_rag": ("/srv/models/fast_rag", "Mistral-7B-Instruct", "8192", "0.45"),
    }
    for name, (model, served, max_len, gpu_util) in expected.items():
        lane = lanes[name]
        argv = lane["argv"]
        assert lane["model"] == model and lane["served_model_name"] == served
        assert argv[argv.index("--model") + 1] == model
        assert argv[argv.index("--max-model-len") + 1] == max_len
        assert float(argv[argv.index("--gpu-memory-utilization") + 1]) == float(gpu_util)
    assert {"planner"} <= set(lanes["orchestrator"]["names"])
    assert {"rag", "fast"} <= set(lanes["fast_rag"]["names"])
    assert lanes["coder"]["argv"][-2:] == ["--seed", "7"]
    assert lanes["coder"]["env"].get("HIP_VISIBLE_DEVICES") == "0"
    assert "bfloat16" in lanes["fast_rag"]["argv"]


def test_assertions_on_bad_configurations():
    errors = render(
        '{ lanes = { a.model = "x"; A.model = "y"; "b-c".model = "z"; nomodel = { }; }; defaultLane = "q"; }'
    )["errors"]
    text = "\n".join(errors)
    assert "letters, digits and `_`: b-c" in text
    assert "differ ignoring case" in text and "A, a" in text
    assert 'defaultLane = "q" is not one of the lanes' in text
    assert "nomodel have no model" in text
    assert render("{ }")["errors"][0].startswith("services.vllm.lanes: define at least one lane")
    assert "unknown engine setting(s) lanes.x.gpuMemoryUtilisation" in "\n".join(
        render('{ lanes.x = { model = "m"; gpuMemoryUtilisation = 0.5; }; }')["errors"])
