"""`make demo`: two tiny lanes served by real vLLM, answering on both lanes (the run's shared
demo_served, tests/real_engine.py); a second run installs nothing again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from measurements import record
from real_engine import requires_vllm

pytestmark = [pytest.mark.e2e, requires_vllm]
ROOT = Path(__file__).resolve().parent.parent


def test_second_make_demo_installs_nothing():
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.exists():
        pytest.skip("the environment was not installed by `make` (.venv/.installed missing)")
    plan = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip" not in plan and "-m venv" not in plan, plan
    assert "vllm_launcher demo" in plan


def test_demo_serves_both_lanes(demo_served):
    served = demo_served
    log = served.log()
    assert f"curl -s {served.url}/v1/chat/completions" in log
    for lane in ("alpha", "beta"):
        response = httpx.post(f"{served.url}/v1/chat/completions", timeout=400, json={
            "model": lane, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert response.status_code == 200 and response.json()["model"] == lane, response.text
    lanes = served.lanes()
    record(f"make demo: alpha start {lanes['alpha']['last_start_seconds']:.1f} s, "
           f"switch to beta {lanes['beta']['last_switch_seconds']:.1f} s")
    assert (served.log_path.parent / "demo" / "models" / "alpha" / "config.json").exists()
