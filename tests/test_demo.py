"""`make demo`: two tiny lanes served by real vLLM, answering on both lanes; a second run
installs nothing again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from measurements import record
from real_engine import requires_vllm
from serving import free_port, processes_with_tmpdir, start_server

pytestmark = [pytest.mark.e2e, requires_vllm]
ROOT = Path(__file__).resolve().parent.parent


def test_second_make_demo_installs_nothing():
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.exists():
        pytest.skip("the environment was not installed by `make` (.venv/.installed missing)")
    plan = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip" not in plan and "-m venv" not in plan, plan
    assert "vllm_launcher demo" in plan


def test_demo_serves_both_lanes(tmp_path):
    port = free_port()
    env = {"VLLM_START_TIMEOUT": "400", "VLLM_SWITCH_MAX_WAIT": "5"}
    served = start_server(tmp_path, {**env, "VLLM_PORT": str(port)}, wait_ready_lane="alpha", timeout=400,
                          command=("demo", "--dir", str(tmp_path / "demo"), "--port", str(port)))
    try:
        log = served.log()
        assert "curl -s http://127.0.0.1:%d/v1/chat/completions" % port in log
        for lane in ("alpha", "beta"):
            response = httpx.post(f"{served.url}/v1/chat/completions", timeout=400, json={
                "model": lane, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
            assert response.status_code == 200 and response.json()["model"] == lane, response.text
        lanes = served.lanes()
        record(f"make demo: alpha start {lanes['alpha']['last_start_seconds']:.1f} s, "
               f"switch to beta {lanes['beta']['last_switch_seconds']:.1f} s")
        assert (tmp_path / "demo" / "models" / "alpha" / "config.json").exists()
    finally:
        assert served.terminate() == 0
    assert not served.leftovers() and not processes_with_tmpdir(str(tmp_path))
