"""services.vllm.limits (issue 18 point 5): the pure nix/unit-limits.nix, evaluated with the real
nix-instantiate, gives MemoryMax=/CPUQuota= only when set, and accepts exactly the values
systemd parses (checked against `systemd-analyze verify`, systemd 252 here). The module wiring
is in tests/test_nix_module.py (needs nixpkgs.lib).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nix_evaluator import nix_eval

pytestmark = pytest.mark.nix


def limits(args: str) -> dict:
    return nix_eval(f"(import ./nix/unit-limits.nix) {args}")


def test_nothing_unless_set():
    out = limits("{ }")
    assert out["serviceConfig"] == {} and out["errors"] == []
    assert limits('{ memoryMax = "64G"; }')["serviceConfig"] == {"MemoryMax": "64G"}
    assert limits('{ cpuQuota = "2560%"; }')["serviceConfig"] == {"CPUQuota": "2560%"}
    assert limits("{ memoryMax = 68719476736; }")["serviceConfig"] == {"MemoryMax": "68719476736"}


def test_bad_values_name_the_option_and_the_forms():
    errors = limits('{ memoryMax = "64GB"; cpuQuota = "80"; }')["errors"]
    assert len(errors) == 2
    assert errors[0].startswith('services.vllm.limits.memoryMax = "64GB" is not a size')
    assert '"64G"' in errors[0] and '"infinity"' in errors[0]
    assert errors[1].startswith('services.vllm.limits.cpuQuota = "80" is not a CPUQuota= value')
    assert "ONE CPU" in errors[1]


# (setting, value): ours must accept exactly what systemd parses
CASES = [
    ("MemoryMax", "64G"), ("MemoryMax", "1P"), ("MemoryMax", "1073741824"), ("MemoryMax", "50%"),
    ("MemoryMax", "12.55%"), ("MemoryMax", "100%"), ("MemoryMax", "infinity"),
    ("MemoryMax", "64GB"), ("MemoryMax", "64g"), ("MemoryMax", "0"), ("MemoryMax", "0%"),
    ("MemoryMax", "150%"), ("MemoryMax", "100.5%"), ("MemoryMax", "12.555%"), ("MemoryMax", "-1G"),
    ("CPUQuota", "800%"), ("CPUQuota", "2560%"), ("CPUQuota", "12.5%"),
    ("CPUQuota", "80"), ("CPUQuota", "0%"), ("CPUQuota", "12.555%"), ("CPUQuota", "80 %"),
]


def systemd_parses(tmp_path: Path, setting: str, value: str) -> bool:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not found (Debian: apt-get install systemd)")
    unit = tmp_path / "limits-probe.service"
    unit.write_text(f"[Service]\nExecStart=/bin/true\n{setting}={value}\n")
    result = subprocess.run([analyze, "verify", "--man=false", str(unit)], capture_output=True, text=True,
                            timeout=60)
    return f"{setting}=" not in result.stderr and "ignoring" not in result.stderr


@pytest.mark.parametrize(("setting", "value"), CASES, ids=[f"{s}={v}" for s, v in CASES])
def test_accepts_what_systemd_parses(tmp_path: Path, setting: str, value: str):
    option = {"MemoryMax": "memoryMax", "CPUQuota": "cpuQuota"}[setting]
    ours = limits(f'{{ {option} = "{value}"; }}')
    assert (ours["errors"] == []) == systemd_parses(tmp_path, setting, value), (value, ours["errors"])
    if not ours["errors"]:
        assert ours["serviceConfig"] == {setting: value}
