"""Host checks (issue 23 point 3): one test per finding on a fake sysfs/procfs tree, from a
healthy Strix Halo box (no warning) to a GTT limit too small for the lanes loaded together (an
error naming both figures); `check` prints them and `serve` logs them at start.

The tree's files are what the kernel shows (amdgpu's sysfs, KFD's topology, module parameters);
its lanes are real launcher configurations whose memory plan comes from model directories
(sparse safetensors files of the chosen size).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from fake_host import GIB, config, findings, only, tree
from launcher_cli import run_launcher
from serving import fake_lanes_env, serving, write_fake_python
from vllm_launcher.config import load_config
from vllm_launcher.host_checks import check_devices


@pytest.fixture
def two_lanes(tmp_path):
    return config(tmp_path, {"coder": 40, "chat": 30})


def test_healthy_box_has_no_warning(tmp_path, two_lanes):
    lines = findings(tree(tmp_path / "root"), two_lanes)
    assert not [line for line in lines if line.startswith(("WARN", "FAIL"))], lines
    assert only(lines, "/dev/kfd").startswith("OK   /dev/kfd accessible")
    assert only(lines, "/dev/dri/renderD128").startswith("OK   /dev/dri/renderD128 accessible")
    assert only(lines, "GPU target").startswith("OK   GPU target gfx1151 (110501)")
    gtt = only(lines, "GPU memory limit")
    assert gtt.startswith("OK   GPU memory limit 124.5 GiB (GTT 124.0 GiB (card1/mem_info_gtt_total), "
                          "ttm.pages_limit 32505856 pages = 124.0 GiB, VRAM 0.5 GiB)"), gtt
    assert "lanes coder:" in gtt                     # the larger lane alone: the budget is one lane's share
    assert only(lines, "IOMMU") == "OK   IOMMU off (amd_iommu=off)"
    assert only(lines, "MES firmware") == "OK   card1: MES firmware 0x80 (the version ROCm issue 5724 was fixed by)"
    assert only(lines, "CWSR").startswith("OK   CWSR on with kernel 6.18.2-arch1-1")
    assert "INFO kernel 6.18.2-arch1-1" in lines


def test_gtt_too_small_for_the_lanes_loaded_together_names_both_figures(tmp_path):
    # two lanes of 0.45 share beside each other (budget 0.9): 40 + 30 GiB of weights against the
    # kernel's default TTM limit, half of a 128 GiB box
    cfg = config(tmp_path, {"coder": 40, "chat": 30}, VLLM_GPU_MEMORY_BUDGET="0.9")
    root = tree(tmp_path / "root", sys__module__ttm__parameters__pages_limit=str(64 * GIB // 4096))
    line = only(findings(root, cfg), "GPU memory limit")
    assert line.startswith("FAIL GPU memory limit 64.5 GiB ("), line
    assert "ttm.pages_limit 16777216 pages = 64.0 GiB" in line
    assert "is below the 70.1 GiB the lanes loaded together need (lanes coder, chat:" in line
    assert "ttm.pages_limit is below the GTT size: ROCm allocations stop at it" in line
    # the fix, in kernel parameters and the NixOS option, for the GiB the lanes need
    # 70 GiB of GTT beside the 0.5 GiB of VRAM: weights and KV cache only, hence "at least"
    assert "raise it to at least 70 GiB at boot: ttm.pages_limit=18350080 amdgpu.gttsize=71680" in line
    assert "services.vllm.strixHalo = { enable = true; gttSizeGiB = 70; }" in line
    # the same lanes one at a time (default budget: the largest share) fit
    alone = only(findings(root, config(tmp_path / "b", {"coder": 40, "chat": 30})), "GPU memory limit")
    assert alone.startswith("OK   GPU memory limit 64.5 GiB") and "lanes coder: 40.0 GiB" in alone, alone


def test_gtt_size_itself_too_small_and_amdttm(tmp_path):
    # AMD's DKMS driver: amdttm's limit is the one read; the GTT size (amdgpu.gttsize) is smaller
    cfg = config(tmp_path, {"big": 60}, VLLM_GPU_MEMORY_BUDGET="0.9")
    root = tree(tmp_path / "root", sys__class__drm__card1__device__mem_info_gtt_total=str(48 * GIB),
                sys__module__amdttm__parameters__pages_limit=str(124 * GIB // 4096),
                sys__module__ttm__parameters__pages_limit=None)
    line = only(findings(root, cfg), "GPU memory limit")
    assert line.startswith("FAIL GPU memory limit 48.5 GiB (GTT 48.0 GiB (card1/mem_info_gtt_total), "
                           "amdttm.pages_limit 32505856 pages = 124.0 GiB, VRAM 0.5 GiB) is below the 60.0 GiB"), line
    assert "amdttm.pages_limit=15728640 amdgpu.gttsize=61440" in line and "below the GTT size" not in line
    assert "gttSizeGiB = 60; }, and amdttm.pages_limit=15728640 in boot.kernelParams" in line


def test_gtt_unknown_needs_and_no_card(tmp_path):
    hub = load_config({"VLLM_MODEL": "org/not-downloaded"})
    lines = findings(tree(tmp_path / "root"), hub)
    assert only(lines, "GPU memory limit").startswith("INFO GPU memory limit 124.5 GiB")
    assert "no lane's memory need is known; lanes not counted, their size unknown until downloaded: default" in lines[3]
    no_card = tree(tmp_path / "bare", sys__class__drm__card1__device__mem_info_gtt_total=None)
    assert only(findings(no_card, hub), "GTT").startswith("INFO GPU memory limit (GTT) not checked")


def test_devices_missing(tmp_path, two_lanes):
    root = tree(tmp_path / "root", dev__kfd=None, dev__dri__renderD128=None)
    lines = findings(root, two_lanes)
    assert "FAIL /dev/kfd missing: no ROCm GPU driver, or not passed to the container" in lines
    assert "FAIL /dev/dri/renderD* missing: no ROCm GPU driver, or not passed to the container" in lines
    # a CPU build of vLLM needs none of it
    assert "INFO /dev/kfd missing (CPU build of vLLM: not needed)" in findings(root, two_lanes, cpu_build=True)


def device_lines_as(root: Path, uid: int | None) -> list[str]:
    """check_devices(root) in a forked child, as `uid` (with no supplementary groups) when given."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.write(write, json.dumps([f.line() for f in check_devices(False, root)]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0, out
    return json.loads(out)


def test_device_not_accessible_to_the_user():
    """Root may open anything: as root the check runs as nobody (whom the mode 0660 root-group
    node shuts out); otherwise the node's mode shuts out its owner."""
    base = Path(tempfile.mkdtemp(prefix="host-checks-", dir="/tmp"))
    try:
        base.chmod(0o755)
        root = tree(base)
        kfd = root / "dev/kfd"
        if os.geteuid() == 0:
            os.chown(kfd, 0, 0)
            kfd.chmod(0o660)
            lines = device_lines_as(root, 65534)
        else:
            kfd.chmod(0o000)
            lines = device_lines_as(root, None)
    finally:
        shutil.rmtree(base)
    line = only(lines, "/dev/kfd")
    assert line.startswith("FAIL /dev/kfd not accessible to "), line
    if os.geteuid() == 0:
        assert line == ("FAIL /dev/kfd not accessible to nobody: mode 0660, group 'root', which nobody is not in: "
                        "add it (NixOS: users.users.nobody.extraGroups = [ \"root\" ]; services.vllm's unit has "
                        "render and video itself)"), line
    else:
        assert "mode 0000" in line and "gives the group no read-write access" in line, line
    assert only(lines, "/dev/dri/renderD128") == "OK   /dev/dri/renderD128 accessible"      # 0666


def test_gpu_target(tmp_path, two_lanes):
    other = tree(tmp_path / "gfx1100",
                 sys__class__kfd__kfd__topology__nodes__1__properties="gfx_target_version 110000")
    line = only(findings(other, two_lanes), "GPU target")
    assert line.startswith("WARN GPU target gfx1100 (110000), not gfx1151 (Strix Halo)"), line
    none = tree(tmp_path / "none", sys__class__kfd__kfd__topology__nodes__1__properties=None)
    assert only(findings(none, two_lanes), "KFD topology").startswith(
        "FAIL no GPU in the KFD topology (/sys/class/kfd/kfd/topology/nodes/*/properties): amdgpu is not loaded")


def test_iommu_translating_warns_passthrough_informs(tmp_path, two_lanes):
    on = tree(tmp_path / "on", proc__cmdline="root=/dev/nvme0n1p2 quiet")
    (on / "sys/class/iommu/ivhd0").mkdir()
    line = only(findings(on, two_lanes), "IOMMU")
    assert line.startswith("WARN IOMMU on (ivhd0) and translating the GPU's memory accesses: field reports "
                           "measured amd_iommu=off 5-12 % faster"), line
    assert "amd_iommu=off (NixOS: services.vllm.strixHalo.disableIommu = true)" in line
    pt = tree(tmp_path / "pt", proc__cmdline="root=/dev/nvme0n1p2 iommu=pt")
    (pt / "sys/class/iommu/ivhd0").mkdir()
    assert only(findings(pt, two_lanes), "IOMMU").startswith("INFO IOMMU on (ivhd0) in passthrough for the GPU")
    # passthrough seen from the GPU's IOMMU group, without a command-line word
    group = tree(tmp_path / "group", proc__cmdline="quiet",
                 sys__class__drm__card1__device__iommu_group__type="identity")
    (group / "sys/class/iommu/ivhd0").mkdir()
    assert only(findings(group, two_lanes), "IOMMU").startswith("INFO IOMMU on (ivhd0) in passthrough")


def test_mes_firmware_known_bad_warns(tmp_path, two_lanes):
    bad = tree(tmp_path / "bad", sys__class__drm__card1__device__fw_version__mes_fw_version="0x00000083")
    line = only(findings(bad, two_lanes), "MES firmware")
    assert line.startswith("WARN card1: MES firmware 0x83: GPU hangs and memory access faults on Strix Halo "
                           "(ROCm issue 5724); go back to MES 0x80"), line
    other = tree(tmp_path / "other", sys__class__drm__card1__device__fw_version__mes_fw_version="0x00000086")
    assert only(findings(other, two_lanes), "MES firmware") == (
        "INFO card1: MES firmware 0x86, not on the known-bad list (0x83)")
    absent = tree(tmp_path / "absent", sys__class__drm__card1__device__fw_version__mes_fw_version=None)
    assert only(findings(absent, two_lanes), "MES firmware").startswith(
        "INFO MES firmware version not shown by this kernel")


def test_known_bad_lists_are_for_gfx1151_only(tmp_path, two_lanes):
    # a gfx1100 (RDNA3 discrete) box with the same numbers: its MES versions are another series
    other = tree(tmp_path / "gfx1100", sys__class__kfd__kfd__topology__nodes__1__properties="gfx_target_version 110000",
                 sys__class__drm__card1__device__fw_version__mes_fw_version="0x00000083",
                 proc__sys__kernel__osrelease="6.17.9")
    lines = findings(other, two_lanes)
    assert only(lines, "MES firmware") == "INFO card1: MES firmware 0x83 (the known-bad list is for gfx1151)"
    assert only(lines, "CWSR").startswith("INFO CWSR on with kernel 6.17.9; the hangs reported with it")
    assert [line for line in lines if line.startswith("WARN")] == [only(lines, "GPU target")]


def test_cwsr_on_before_kernel_6_18_rc6_warns(tmp_path, two_lanes):
    for release in ("6.17.9-200.fc42.x86_64", "6.18.0-rc5"):
        old = tree(tmp_path / release, proc__sys__kernel__osrelease=release)
        line = only(findings(old, two_lanes), "CWSR")
        assert line.startswith(f"WARN CWSR on (amdgpu.cwsr_enable=1) with kernel {release}: field reports of "
                               "gfx1151 hangs"), line
        assert "amdgpu.cwsr_enable=0 (NixOS: services.vllm.strixHalo.disableCwsr = true)" in line
    for release in ("6.18.0-rc6", "6.18.0", "7.1.3"):
        new = tree(tmp_path / release, proc__sys__kernel__osrelease=release)
        assert only(findings(new, two_lanes), "CWSR").startswith("OK   CWSR on with kernel"), release
    off = tree(tmp_path / "off", proc__sys__kernel__osrelease="6.17.9", sys__module__amdgpu__parameters__cwsr_enable="0")
    assert only(findings(off, two_lanes), "CWSR").startswith("INFO CWSR off (amdgpu.cwsr_enable=0)")


def test_check_prints_the_host_checks(tmp_path):
    """The wiring: `vllm-launcher check` on this machine's own tree."""
    result = run_launcher({"VLLM_MODEL": "org/model", "VLLM_ENGINE_PYTHON": "/bin/false"}, "check")
    release = Path("/proc/sys/kernel/osrelease").read_text().strip()
    assert f"INFO kernel {release}" in result.stdout.splitlines(), result.stdout
    assert "/dev/kfd" in result.stdout and "GPU memory limit" in result.stdout and "IOMMU" in result.stdout


@pytest.mark.engine
def test_serve_logs_the_host_checks_at_start(tmp_path):
    env = fake_lanes_env(write_fake_python(tmp_path), {"a": {}})
    release = Path("/proc/sys/kernel/osrelease").read_text().strip()
    with serving(tmp_path, env) as served:
        log = served.log()
    assert f"host check: INFO kernel {release}" in log, log[-3000:]
    assert "host check: " in log and "/dev/kfd" in log
