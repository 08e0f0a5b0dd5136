"""services.vllm evaluated with the real module system of nixpkgs.lib (issue 7 point 4).

nixpkgs.lib is not vendored: point NIXPKGS_LIB at a checkout of nix-community/nixpkgs.lib (the
directory holding lib/default.nix, or its lib/). Without it these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_nix_eval import ROOT, nix_instantiate


def nixpkgs_lib() -> Path:
    value = os.environ.get("NIXPKGS_LIB")
    if not value:
        pytest.skip("NIXPKGS_LIB is unset: set it to a nix-community/nixpkgs.lib checkout to evaluate the module")
    path = Path(value)
    if (path / "lib" / "default.nix").exists():
        path = path / "lib"
    if not (path / "default.nix").exists():
        pytest.fail(f"NIXPKGS_LIB={value}: no default.nix of nixpkgs' lib there")
    return path


def evaluate(services_vllm: str) -> dict:
    lib = nixpkgs_lib()
    with tempfile.NamedTemporaryFile("w", suffix=".nix", delete=False) as handle:
        handle.write(f"{{ services.vllm = {services_vllm}; }}\n")
    try:
        result = subprocess.run(
            [nix_instantiate(), "--eval", "--strict", "--json", "nix/tests/eval-module.nix",
             "--arg", "lib", f"import {lib}", "--arg", "configuration", handle.name],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )
    finally:
        os.unlink(handle.name)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


THREE = '(import {root}/nix/tests/three-lanes.nix).settings // {{ enable = true; {extra} }}'


def three(extra: str = "") -> dict:
    return evaluate(THREE.format(root=ROOT, extra=extra))


def test_unit_environment_is_lane_env():
    out = three()
    assert out["failedAssertions"] == []
    env = out["environment"]
    rendered = json.loads(subprocess.run(
        [nix_instantiate(), "--eval", "--strict", "--json", "-E",
         "((import ./nix/lane-env.nix).render ((import ./nix/tests/three-lanes.nix).settings "
         "// { logLevel = \"INFO\"; startTimeout = 1800; })).environment"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    for key, value in rendered.items():
        assert env[key] == value, key
    assert env["VLLM_ROCM_USE_AITER"] == "0" and "HSA_OVERRIDE_GFX_VERSION" not in env
    assert env["HOME"] == "/var/lib/vllm" and env["TRITON_CACHE_DIR"].startswith("/var/cache/vllm")
    assert env["VLLM_CACHE_ROOT"].startswith("/var/cache/vllm") and env["HF_HOME"].startswith("/var/lib/vllm")


def test_service_config():
    sc = three('apiKeyFile = "/run/secrets/key"; environmentFile = "/run/secrets/env"; modelsDir = "/srv/models";'
               ' openFirewall = true; rocmOverrideGfx = "11.5.1";')
    svc = sc["serviceConfig"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure" and svc["KillMode"] == "control-group"
    assert int(svc["TimeoutStartSec"]) >= 1800
    assert svc["DynamicUser"] is True and svc["StateDirectory"] == "vllm" and svc["CacheDirectory"] == "vllm"
    assert svc["PrivateDevices"] is False and svc["DevicePolicy"] == "closed"
    assert svc["DeviceAllow"] == ["char-drm", "char-kfd"]
    assert svc["SupplementaryGroups"] == ["render", "video"]
    assert svc["MemoryDenyWriteExecute"] is False
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] is True
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["SystemCallFilter"] == ["@system-service", "@resources"]
    assert svc["BindReadOnlyPaths"] == ["/srv/models"]
    assert svc["LoadCredential"] == ["api-key:/run/secrets/key"]
    assert svc["EnvironmentFile"] == ["/run/secrets/env"]
    assert sc["environment"]["VLLM_API_KEY_FILE"] == "%d/api-key"
    assert sc["environment"]["HSA_OVERRIDE_GFX_VERSION"] == "11.5.1"
    assert sc["firewall"] == [8000]
    assert "/run/secrets" not in json.dumps(sc["environment"])  # secrets stay out of the store


def test_static_user():
    out = three('user = "vllm";')
    assert out["serviceConfig"]["User"] == "vllm" and out["serviceConfig"]["DynamicUser"] is False
    assert out["users"]["vllm"]["isSystemUser"] is True and out["groups"] == ["vllm"]


def test_assertions():
    out = evaluate('{ enable = true; lanes = { a.model = "x"; A.model = "y"; "b-c".model = "z"; }; defaultLane = "q"; }')
    text = "\n".join(out["failedAssertions"])
    assert "b-c" in text and "differ ignoring case" in text and 'defaultLane = "q"' in text
    assert evaluate("{ enable = true; }")["failedAssertions"][0].startswith("services.vllm.lanes: define at least one lane")


def test_disabled_module_defines_nothing():
    out = evaluate("{ enable = false; }")
    assert out["environment"] is None and out["firewall"] == []
