"""`python -m bench` (make bench): run the parts, write bench/results/*.json and *.png, and
regenerate the performance page (docs/performance.md).  `python -m bench report`: plots and page from
the stored JSON only.  BENCH_PARTS=scheduling,overhead,real selects parts; BENCH_QUICK=1 is
the short run."""

from __future__ import annotations

import os
import sys
import time

from .common import QUICK, WORK, LoadMonitor, log, machine_info, read_json, write_json

PARTS = ("scheduling", "overhead", "real")


def _ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import subprocess

        log("matplotlib is missing: installing the launcher's `bench` extra (pip install -e 'launcher[bench]')")
        subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "-e",
                        f"{os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'launcher')}[bench]"],
                       check=True)


def report(parts: tuple[str, ...] = PARTS) -> None:
    """Plots of the parts named (all: `python -m bench report`), and docs/performance.md (only its
    scheduling part when only that part ran)."""
    from .plots import all_plots
    from .readme import SCHED_BEGIN, SCHED_END, section, update_page
    from .readme_scheduling import scheduling_section

    sched, overhead, switch = read_json("scheduling.json"), read_json("overhead.json"), read_json("switch.json")
    all_plots(sched if "scheduling" in parts else None, overhead if {"overhead", "real"} & set(parts) else None,
              switch if "real" in parts else None)
    if tuple(parts) == ("scheduling",):
        update_page(scheduling_section(sched), SCHED_BEGIN, SCHED_END)
    else:
        update_page(section(sched, overhead, switch))


def main(argv: list[str]) -> int:
    _ensure_matplotlib()
    if argv[:1] == ["report"]:
        report()
        return 0
    if argv:
        print(__doc__)
        return 2
    wanted = [p.strip() for p in os.environ.get("BENCH_PARTS", ",".join(PARTS)).split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        print(f"unknown BENCH_PARTS {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    meta = machine_info()
    log(f"bench: parts {', '.join(wanted)}{' (quick)' if QUICK else ''}; load average {meta['loadavg_at_start']}")
    if "scheduling" in wanted:
        from . import scheduling

        result = scheduling.run()
        write_json("scheduling.json", {"meta": meta, **result}, digits=2, compact=("waits", "timelines"))
        write_json("switch_max_wait.json", {"meta": meta, **scheduling.b_summary(result)}, digits=2)
    if "overhead" in wanted:
        from . import overhead

        with LoadMonitor() as monitor:
            fake = overhead.run_fake()
        fake["load"] = monitor.summary()
        stored = read_json("overhead.json") or {}
        write_json("overhead.json", {**stored, "meta": meta, "fake": fake}, digits=7)
    if "real" in wanted:
        from . import real

        with LoadMonitor() as monitor:
            real_overhead, switch = real.run()
        load = monitor.summary()
        real_overhead["load"] = load
        stored = read_json("overhead.json") or {}
        write_json("overhead.json", {**stored, "meta": meta, "real": real_overhead}, digits=7)
        write_json("switch.json", {"meta": meta, "load": load, **switch})
    report(tuple(wanted))
    log(f"bench: done in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
