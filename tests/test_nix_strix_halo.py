"""services.vllm.strixHalo (issue 23 point 4): the pure nix/strix-halo.nix, evaluated with the
real nix-instantiate, gives the kernel parameters asked for and nothing else, in the units the
kernel reads (ttm.pages_limit in 4 KiB pages, amdgpu.gttsize in MiB); the host check reads a box
booted with them as the size asked for, and what it suggests for a too-small GTT is what this
file sets. The module wiring is in tests/test_nix_module.py (needs nixpkgs.lib).
"""

from __future__ import annotations

import pytest

from fake_host import GIB, config, findings, only, tree
from nix_evaluator import nix_eval

pytestmark = pytest.mark.nix


def strix(args: str) -> dict:
    return nix_eval(f"(import ./nix/strix-halo.nix) {args}")


def test_nothing_unless_asked():
    nothing = strix("{ }")
    assert nothing["kernelParams"] == [] and nothing["errors"] == []
    assert strix("{ disableIommu = true; }")["kernelParams"] == ["amd_iommu=off"]
    assert strix("{ disableCwsr = true; }")["kernelParams"] == ["amdgpu.cwsr_enable=0"]
    # docs/nix.md section 4's parameters for a 128 GB box: 124 GiB
    assert strix("{ gttSizeGiB = 124; }")["kernelParams"] == ["ttm.pages_limit=32505856", "amdgpu.gttsize=126976"]


@pytest.mark.parametrize("value", ["0", "-4", '"64"', "64.5", "5000"])
def test_bad_sizes_name_the_option(value):
    out = strix(f"{{ gttSizeGiB = {value}; }}")
    assert out["kernelParams"] == [] and len(out["errors"]) == 1
    assert out["errors"][0].startswith(f"services.vllm.strixHalo.gttSizeGiB = {value} is not a size in GiB: "
                                       "a whole number from 1 to 4096"), out["errors"]


@pytest.mark.parametrize("size", [64, 124])
def test_host_check_reads_a_box_booted_with_them(tmp_path, size):
    params = dict(p.split("=") for p in strix(f"{{ gttSizeGiB = {size}; }}")["kernelParams"])
    # what the kernel shows after such a boot: the page limit as given, the GTT size in bytes
    root = tree(tmp_path / "root", sys__module__ttm__parameters__pages_limit=params["ttm.pages_limit"],
                sys__class__drm__card1__device__mem_info_gtt_total=str(int(params["amdgpu.gttsize"]) * 1024**2))
    line = only(findings(root, config(tmp_path, {"a": 10})), "GPU memory limit")
    assert f"GTT {size}.0 GiB" in line and f"ttm.pages_limit {params['ttm.pages_limit']} pages = {size}.0 GiB" in line


def test_host_check_suggests_what_the_option_sets(tmp_path):
    cfg = config(tmp_path, {"coder": 40, "chat": 30}, VLLM_GPU_MEMORY_BUDGET="0.9")
    root = tree(tmp_path / "root", sys__module__ttm__parameters__pages_limit=str(64 * GIB // 4096))
    line = only(findings(root, cfg), "GPU memory limit")
    assert line.startswith("FAIL") and "gttSizeGiB = 70;" in line
    assert " ".join(strix("{ gttSizeGiB = 70; }")["kernelParams"]) in line
