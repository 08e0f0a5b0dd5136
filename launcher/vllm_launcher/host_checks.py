"""Host checks: what the kernel lets the engines do on this box (issue 23, point 3).

`vllm-launcher check` prints them and `serve` logs them at start. Everything is read from files
under one root directory (`root`, "/" on the host, a fake sysfs/procfs tree in the tests):

  /dev/kfd, /dev/dri/renderD*                         the GPU devices, and this user's access
  /sys/class/kfd/kfd/topology/nodes/*/properties      gfx_target_version (110501 = gfx1151)
  /sys/class/drm/card*/device/mem_info_{vram,gtt}_total, /sys/module/ttm/parameters/pages_limit
                                                      what the GPU may map, against the lanes
  /sys/class/iommu/*, /proc/cmdline                   the IOMMU
  /proc/sys/kernel/osrelease, /sys/module/amdgpu/parameters/cwsr_enable,
  /sys/class/drm/card*/device/fw_version/mes_fw_version   kernel, CWSR and MES firmware

Levels as in preflight: fail where the box certainly cannot run the lanes (no device, a GTT
limit below the lanes' own weights and KV cache); warn, never fail, where the evidence is a
field report (IOMMU, firmware, CWSR). Each finding says what to set: the kernel parameter and
the NixOS option (services.vllm.strixHalo, nix/strix-halo.nix).
"""

from __future__ import annotations

import grp
import itertools
import logging
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import VLLM_DEFAULT_SHARE, LauncherConfig
from .memory_plan import GIB, amdgpu_memory, memory_plan

GFX1151_TARGET_VERSION = "110501"     # /sys/class/kfd/.../properties: gfx_target_version
PAGE_BYTES = 4096                     # ttm.pages_limit counts PAGE_SIZE pages: 4 KiB on x86_64
NIXOS = "services.vllm.strixHalo"     # the option set of nix/module.nix (nix/strix-halo.nix)

# MES firmware (amdgpu's sysfs fw_version/mes_fw_version, 0444: the MES scheduler version & 0xfff,
# the figure amdgpu_firmware_info in debugfs shows to root).
# Known bad on gfx1151, each with its source; nothing here is a guess.
MES_KNOWN_BAD = {
    # ROCm/legacy-rocm-build issue 5724 (Strix Halo, closed 2025-12): GPU hangs and memory access
    # faults with MES 0x83, fixed by linux-firmware's revert to 0x80 (2025-12-01); AMD there:
    # "you have to be on MES 0x80", amdgpu.cwsr_enable=0 does not help with 0x83.
    0x83: "GPU hangs and memory access faults on Strix Halo (ROCm issue 5724); go back to MES 0x80: "
          "a linux-firmware with the 2025-12-01 revert (NixOS: a nixpkgs whose linux-firmware has it, "
          "hardware.firmware); amdgpu.cwsr_enable=0 does not help with this one",
}
MES_KNOWN_GOOD = {0x80: "the version ROCm issue 5724 was fixed by"}
# CWSR (compute wave save/restore) on: gfx1151 hangs under ROCm with MES 0x80 (ROCm/legacy-rocm-build
# issue 5590); AMD (issue 5991, 2026-03): keep amdgpu.cwsr_enable=0 until kernel 6.18-rc6+, which
# has its upstreamed change disabling CWSR by default. (major, minor, rc): rc 0 = a release.
CWSR_FIXED_KERNEL = (6, 18, 6)


@dataclass(frozen=True)
class Finding:
    level: str      # ok | info | warn | fail
    message: str

    def line(self) -> str:
        return f"{self.level.upper():4} {self.message}"


def _under(root: Path | str, path: str) -> Path:
    return Path(root, path.lstrip("/"))


def _read(root: Path | str, path: str) -> str | None:
    try:
        return _under(root, path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _shown(root: Path | str, path: Path) -> str:
    """A path as it is on the host (the fake root cut off)."""
    return "/" + str(path.relative_to(root)) if str(root) != "/" else str(path)


def gpu_targets(root: Path | str = "/") -> list[str]:
    """gfx_target_version of every KFD GPU node (empty without a ROCm kernel driver)."""
    targets = []
    for path in sorted(_under(root, "/sys/class/kfd/kfd/topology/nodes").glob("*/properties")):
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "gfx_target_version" and value.strip() not in ("", "0"):
                    targets.append(value.strip())
        except OSError:
            pass
    return targets


def gfx_name(target_version: str) -> str:
    """110501 -> gfx1151 (KFD: major * 10000 + minor * 100 + stepping, minor/stepping in hex)."""
    value = int(target_version)
    return f"gfx{value // 10000}{(value // 100) % 100:x}{value % 100:x}"


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _why_not(path: Path) -> str:
    """Why this process may not open a device node, and what to do."""
    st = path.stat()
    group, mode, user = _group_name(st.st_gid), stat.S_IMODE(st.st_mode), _user()
    head = f"mode {mode:04o}, group {group!r}"
    if st.st_gid in os.getgroups() or st.st_gid == os.getegid():
        return f"{head}, which {user} is in, but the mode gives the group no read-write access (udev rules?)"
    try:
        listed = user in grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        listed = False
    if listed:
        return f"{head}: {user} was added to it after this session began; log in again (or restart the service)"
    return (f"{head}, which {user} is not in: add it (NixOS: users.users.{user}.extraGroups = [ \"{group}\" ]; "
            "services.vllm's unit has render and video itself)")


def check_devices(cpu_build: bool, root: Path | str = "/") -> list[Finding]:
    """/dev/kfd and the render nodes exist and this user (the service's, under `serve`) may open them."""
    missing = "info" if cpu_build else "fail"
    findings = []
    render_nodes = sorted(_under(root, "/dev/dri").glob("renderD*"))
    paths = [_under(root, "/dev/kfd"), *render_nodes] if render_nodes else [_under(root, "/dev/kfd"), None]
    for path in paths:
        shown = "/dev/dri/renderD*" if path is None else _shown(root, path)
        if path is None or not path.exists():
            findings.append(Finding(missing, f"{shown} missing" + (" (CPU build of vLLM: not needed)" if cpu_build
                                                                   else ": no ROCm GPU driver, or not passed to the container")))
        elif not os.access(path, os.R_OK | os.W_OK):
            findings.append(Finding(missing, f"{shown} not accessible to {_user()}: {_why_not(path)}"))
        elif os.geteuid() == 0:
            findings.append(Finding("ok", f"{shown} accessible to root, who may open anything: run check as the "
                                    "service's user, or read serve's log, for that user's access"))
        else:
            findings.append(Finding("ok", f"{shown} accessible"))
    return findings


def check_gpu_target(cpu_build: bool, root: Path | str = "/") -> list[Finding]:
    targets = gpu_targets(root)
    if not targets:
        return [Finding("info" if cpu_build else "fail",
                        "no GPU in the KFD topology (/sys/class/kfd/kfd/topology/nodes/*/properties)"
                        + (" (CPU build of vLLM: not needed)" if cpu_build else
                           ": amdgpu is not loaded or the GPU is not ROCm-capable"))]
    names = ", ".join(f"{gfx_name(t)} ({t})" for t in targets)
    if GFX1151_TARGET_VERSION in targets:
        return [Finding("ok", f"GPU target {names} (gfx_target_version, KFD topology)")]
    return [Finding("warn", f"GPU target {names}, not gfx1151 (Strix Halo): this project's settings and "
                    "known-bad lists are for gfx1151, and the ROCm wheels must be built for your target")]


def _co_resident_sets(config: LauncherConfig) -> tuple[list[str], int, list[str]]:
    """The set of lanes the scheduler may keep loaded together (their shares within the memory
    budget, default the largest share) that needs the most memory by the memory plan (weights +
    KV cache); and the lanes whose need is unknown (hub models not downloaded)."""
    lanes = list(config.lanes.values())
    shares = {lane.name: lane.gpu_memory_utilization or VLLM_DEFAULT_SHARE for lane in lanes}
    budget = config.server.gpu_memory_budget or max(shares.values())
    needs = {lane.name: memory_plan(lane, config.server.gpu_memory_gb)["needed_bytes"] for lane in lanes}
    unknown = [name for name, need in needs.items() if need is None]
    known = [name for name in shares if needs[name] is not None]
    best: tuple[int, list[str]] = (0, [])
    if len(known) > 16:          # 2^16 sets at most; beyond, each lane alone (a lower bound)
        candidates = ([name] for name in known)
    else:
        candidates = (list(c) for r in range(1, len(known) + 1) for c in itertools.combinations(known, r))
    for names in candidates:
        if sum(shares[n] for n in names) <= budget + 1e-9:
            total = sum(needs[n] for n in names)
            if total > best[0]:
                best = (total, names)
    return best[1], best[0], unknown


def _module_param(root: Path | str, module: str, name: str) -> str | None:
    return _read(root, f"/sys/module/{module}/parameters/{name}")


def ttm_pages_limit(root: Path | str = "/") -> tuple[int, str] | None:
    """TTM's page limit and its module: ttm, or amdttm where AMD's DKMS driver is loaded (then
    `ttm.pages_limit` is a parameter of a module that does not load: amdttm.pages_limit)."""
    for module in ("amdttm", "ttm"):
        value = _module_param(root, module, "pages_limit")
        if value is not None and value.isdigit():
            return int(value), module
    return None


def gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _raise_hint(gib_needed: int, module: str) -> str:
    pages, mib = gib_needed * GIB // PAGE_BYTES, gib_needed * 1024
    nixos = f"{NIXOS} = {{ enable = true; gttSizeGiB = {gib_needed}; }}"
    if module != "ttm":      # the option sets ttm.pages_limit, which AMD's DKMS driver does not read
        nixos += f", and {module}.pages_limit={pages} in boot.kernelParams"
    return (f"raise it to at least {gib_needed} GiB at boot: {module}.pages_limit={pages} amdgpu.gttsize={mib} "
            f"(NixOS: {nixos}); leave a few GiB of the box's memory to the system")


def check_gtt(config: LauncherConfig, cpu_build: bool, root: Path | str = "/") -> list[Finding]:
    """What the GPU may map (VRAM + GTT, GTT capped by TTM's pages_limit: KFD refuses ROCm
    allocations beyond it, amdgpu_amdkfd_gpuvm.c max_ttm_mem_limit) against the lanes that may be
    loaded together. Each lane's need is a lower bound (weights + KV cache, no activations)."""
    cards = amdgpu_memory(root)
    if not cards:
        return [Finding("info", "GPU memory limit (GTT) not checked: no amdgpu card with mem_info_gtt_total"
                        + (" (CPU build of vLLM)" if cpu_build else ""))]
    card, vram, gtt = max(cards, key=lambda c: c[1] + c[2])
    ttm = ttm_pages_limit(root)
    module = ttm[1] if ttm else "ttm"
    mappable_gtt = min(gtt, ttm[0] * PAGE_BYTES) if ttm else gtt
    limit = vram + mappable_gtt
    parts = [f"GTT {gib(gtt)} ({card}/mem_info_gtt_total)"]
    if ttm:
        parts.append(f"{module}.pages_limit {ttm[0]} pages = {gib(ttm[0] * PAGE_BYTES)}")
    if vram:
        parts.append(f"VRAM {gib(vram)}")
    how = ", ".join(parts)
    notes = []
    if ttm and ttm[0] * PAGE_BYTES < gtt:
        notes.append(f"{module}.pages_limit is below the GTT size: ROCm allocations stop at it")
    names, needed, unknown = _co_resident_sets(config)
    if unknown:
        notes.append(f"lanes not counted, their size unknown until downloaded: {', '.join(unknown)}")
    tail = ("; " + "; ".join(notes)) if notes else ""
    if not names:
        return [Finding("info", f"GPU memory limit {gib(limit)} ({how}); no lane's memory need is known{tail}")]
    lanes = ", ".join(names)
    if needed > limit:
        wanted = -(-(needed - vram) // GIB)          # GiB of GTT, rounded up
        return [Finding("fail", f"GPU memory limit {gib(limit)} ({how}) is below the {gib(needed)} the lanes "
                        f"loaded together need (lanes {lanes}: weights + KV cache by the memory plan); "
                        f"{_raise_hint(wanted, module)}{tail}")]
    return [Finding("ok", f"GPU memory limit {gib(limit)} ({how}) holds the lanes loaded together "
                    f"(lanes {lanes}: {gib(needed)}){tail}")]


def _cmdline(root: Path | str) -> list[str]:
    return (_read(root, "/proc/cmdline") or "").split()


def check_iommu(root: Path | str = "/") -> list[Finding]:
    """Field report (../shared/docs/strix-halo-field.md, Host settings): amd_iommu=off measured
    5-12 % faster on Strix Halo and page faults are reported with the IOMMU on: a warning."""
    cmdline = _cmdline(root)
    units = sorted(p.name for p in _under(root, "/sys/class/iommu").glob("*"))
    if "amd_iommu=off" in cmdline or not units:
        return [Finding("ok", "IOMMU off" + (" (amd_iommu=off)" if "amd_iommu=off" in cmdline else ""))]
    groups = set()
    for path in _under(root, "/sys/class/drm").glob("card*/device/iommu_group/type"):
        try:
            groups.add(path.read_text().strip())
        except OSError:
            pass
    if "iommu=pt" in cmdline or "amd_iommu=pt" in cmdline or groups == {"identity"}:
        return [Finding("info", f"IOMMU on ({', '.join(units)}) in passthrough for the GPU (iommu=pt); the field "
                        "reports measured amd_iommu=off, not passthrough")]
    return [Finding("warn", f"IOMMU on ({', '.join(units)}) and translating the GPU's memory accesses: field "
                    "reports measured amd_iommu=off 5-12 % faster on Strix Halo and page faults with it on; set "
                    f"the kernel parameter amd_iommu=off (NixOS: {NIXOS}.disableIommu = true) unless this box "
                    "passes devices to virtual machines")]


def kernel_version(release: str) -> tuple[int, int, int] | None:
    """osrelease -> (major, minor, rc), rc 0 for a release: "6.18.0-rc5" -> (6, 18, 5)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        return None
    rc = re.search(r"-rc(\d+)", release)
    return int(match[1]), int(match[2]), int(rc[1]) if rc else 0


def _before(version: tuple[int, int, int], fixed: tuple[int, int, int]) -> bool:
    # a release (rc 0) of a version comes after all of its release candidates
    def key(v):
        return v[0], v[1], v[2] if v[2] else 1_000
    return key(version) < key(fixed)


def check_kernel_and_cwsr(root: Path | str = "/", gfx1151: bool = True) -> list[Finding]:
    """The kernel, and CWSR against it; the hang reports are of gfx1151 only (other GPUs: info)."""
    release = _read(root, "/proc/sys/kernel/osrelease")
    findings = [Finding("info", f"kernel {release}" if release else "kernel version unknown (/proc/sys/kernel/osrelease)")]
    cwsr = _module_param(root, "amdgpu", "cwsr_enable")
    if cwsr is None:
        return findings          # amdgpu not loaded: nothing to judge
    if cwsr.strip() == "0":
        findings.append(Finding("info", "CWSR off (amdgpu.cwsr_enable=0): the workaround for gfx1151 hangs of "
                                "ROCm issue 5590 (compute waves are then not preempted mid-wave)"))
        return findings
    version = kernel_version(release or "")
    fixed = ".".join(map(str, CWSR_FIXED_KERNEL[:2])) + f"-rc{CWSR_FIXED_KERNEL[2]}"
    if version is not None and _before(version, CWSR_FIXED_KERNEL) and not gfx1151:
        findings.append(Finding("info", f"CWSR on with kernel {release}; the hangs reported with it (ROCm issue "
                                "5590) are of gfx1151, which this box does not have"))
    elif version is not None and _before(version, CWSR_FIXED_KERNEL):
        findings.append(Finding("warn", f"CWSR on (amdgpu.cwsr_enable={cwsr.strip()}) with kernel {release}: field "
                                "reports of gfx1151 hangs under ROCm with it on (ROCm issue 5590), and AMD advises "
                                f"amdgpu.cwsr_enable=0 until kernel {fixed} (ROCm issue 5991); set the kernel parameter "
                                f"amdgpu.cwsr_enable=0 (NixOS: {NIXOS}.disableCwsr = true) or run a newer kernel"))
    else:
        findings.append(Finding("ok", f"CWSR on with kernel {release} (AMD advises amdgpu.cwsr_enable=0 only "
                                f"before {fixed}, ROCm issue 5991)"))
    return findings


def check_mes_firmware(root: Path | str = "/", gfx1151: bool = True) -> list[Finding]:
    """Each card's MES firmware against the known-bad list, which is of gfx1151's MES only."""
    findings = []
    for path in sorted(_under(root, "/sys/class/drm").glob("card*/device/fw_version/mes_fw_version")):
        card = path.parent.parent.parent.name
        try:
            version = int(path.read_text().strip(), 16)
        except (OSError, ValueError):
            findings.append(Finding("info", f"{card}: MES firmware version unreadable ({_shown(root, path)})"))
            continue
        if not gfx1151:
            findings.append(Finding("info", f"{card}: MES firmware {version:#x} (the known-bad list is for gfx1151)"))
        elif version in MES_KNOWN_BAD:
            findings.append(Finding("warn", f"{card}: MES firmware {version:#x}: {MES_KNOWN_BAD[version]}"))
        elif version in MES_KNOWN_GOOD:
            findings.append(Finding("ok", f"{card}: MES firmware {version:#x} ({MES_KNOWN_GOOD[version]})"))
        else:
            findings.append(Finding("info", f"{card}: MES firmware {version:#x}, not on the known-bad list "
                                    f"({', '.join(f'{v:#x}' for v in MES_KNOWN_BAD)})"))
    if not findings and _module_param(root, "amdgpu", "cwsr_enable") is not None:
        findings.append(Finding("info", "MES firmware version not shown by this kernel (no "
                                "fw_version/mes_fw_version); as root: grep MES /sys/kernel/debug/dri/*/amdgpu_firmware_info"))
    return findings


def host_findings(config: LauncherConfig, cpu_build: bool, root: Path | str = "/") -> list[Finding]:
    gfx1151 = GFX1151_TARGET_VERSION in gpu_targets(root)
    return (check_devices(cpu_build, root) + check_gpu_target(cpu_build, root) + check_gtt(config, cpu_build, root)
            + check_iommu(root) + check_kernel_and_cwsr(root, gfx1151) + check_mes_firmware(root, gfx1151))


def log_host_findings(config: LauncherConfig, cpu_build: bool, root: Path | str = "/") -> list[Finding]:
    """`serve` at start: the same findings in its log (the service user's view of the devices)."""
    log = logging.getLogger("vllm_launcher.host")
    levels = {"ok": logging.INFO, "info": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}
    findings = host_findings(config, cpu_build, root)
    for finding in findings:
        log.log(levels[finding.level], "host check: %s", finding.line())
    return findings
