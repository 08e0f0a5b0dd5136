"""The scheduling benchmark's pipeline (bench/scheduling.py) on a tiny configuration: it runs end
to end, its part of docs/performance.md renders, and its acceptance computation can fail."""

from __future__ import annotations

import re

import pytest

from bench import readme_scheduling, scheduling
from bench.readme import PAGE


@pytest.fixture(scope="module")
def tiny():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scheduling, "HOUR", 600.0)
        mp.setattr(scheduling, "HAMMER_SECONDS", 300.0)
        mp.setattr(scheduling, "BOOTSTRAP", 200)
        mp.setattr(scheduling, "BATCH_JOB", 400)
        out = scheduling.run(tuning_seeds=(1, 2), held_out_seeds=(21, 22), caps=(30.0, 1200.0))
        runs = {w: {p: e["runs"] for p, e in entry["policies"].items()} for w, entry in out["workloads"].items()}
        yield out, runs


def test_pipeline_runs_and_renders(tiny):
    out, _ = tiny
    assert set(out["workloads"]) == set(scheduling.WORKLOADS)
    for entry in out["workloads"].values():
        assert set(entry["policies"]) == set(scheduling.POLICIES)
        for p in entry["policies"].values():
            assert [r["seed"] for r in p["runs"]] == [21, 22]
            s = p["summary"]
            assert s["wait_mean"]["lo"] <= s["wait_mean"]["mean"] <= s["wait_mean"]["hi"]
    assert set(out["b_curve"]["tuning"]) == {"30", "1200"}
    assert out["acceptance"]["bound_ok"]  # the bound is a theorem: it holds on every workload
    text = readme_scheduling.scheduling_section(out)
    assert "fake engine only" in text and "--enable-sleep-mode" in text
    assert "| (d) agents + batch job | **ours** |" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)      # as docs/performance.md links them
    assert images and all((PAGE.parent / image).is_file() for image in images), images


def test_batch_job_beside_an_agent(tiny, monkeypatch):
    """(g), issue 21, one seed at the default B: ours answers every request of the job and the
    agent's and keeps the bound; ours before issue 21 (the whole job in the engine) aborts part of
    the job at the drain bound; llama-swap makes the agent wait for the whole job."""
    out, _ = tiny
    assert "(g) batch job + agent" in readme_scheduling.scheduling_section(out)
    monkeypatch.setattr(scheduling, "BATCH_JOB", 1000)
    runs = {}
    for policy in ("new", "capped", "llama_swap"):
        result, w = scheduling.run_one("batch_agent", 21, policy, scheduling.B_DEFAULT)
        runs[policy] = scheduling.measures(result, w, scheduling.B_DEFAULT)
    ours, before, ls = runs["new"], runs["capped"], runs["llama_swap"]
    assert ours["errors"] == 0 and ours["bound_violations"] == 0 and ours["unserved"] == 0
    assert before["errors"] > 100
    assert ours["classes"]["interactive"]["max"] < ls["classes"]["interactive"]["max"] / 3


def test_acceptance_can_fail(tiny):
    """fcfs in the place of ours on (b) is far worse than llama-swap: the check says so."""
    out, runs = tiny
    verdict = scheduling.acceptance(runs, out["acceptance"]["cap"], ours="fcfs")
    hammer = verdict["workloads"]["hammer"]
    assert hammer["wait_mean_diff"]["lo"] > 0 and not hammer["wait_mean_ok"]
    assert not hammer["ok"] and not verdict["ok"]
    same = scheduling.acceptance(runs, out["acceptance"]["cap"], ours="llama_swap")
    assert all(v["ok"] for v in same["workloads"].values())  # a policy is no worse than itself


def test_bootstrap_interval():
    ci = scheduling.bootstrap([1.0, 2.0, 3.0, 4.0])
    assert ci["mean"] == 2.5 and 1.0 <= ci["lo"] < 2.5 < ci["hi"] <= 4.0
    assert scheduling.bootstrap([-1.0, 1.0] * 5)["lo"] <= 0.0


def test_scheduling_block_alone_is_rewritten():
    """BENCH_PARTS=scheduling rewrites docs/performance.md between the scheduling markers only,
    which lie inside the bench section; the section's images resolve from docs/."""
    from bench.readme import BEGIN, END, SCHED_BEGIN, SCHED_END, replace_section

    text = PAGE.read_text()
    lines = text.splitlines()
    assert lines.index(BEGIN) < lines.index(SCHED_BEGIN) < lines.index(SCHED_END) < lines.index(END)
    new = replace_section(text, "new scheduling text\n", SCHED_BEGIN, SCHED_END)
    head, tail = text.split(SCHED_BEGIN)[0], text.split(SCHED_END)[1]
    assert new == f"{head}{SCHED_BEGIN}\nnew scheduling text\n{SCHED_END}{tail}"
