"""The fake engine with a fake of vLLM's Ray executor in front (run by the closure's Python, which
has Ray): with FAKE_RAY_WORKERS=N it connects to RAY_ADDRESS (token auth from the environment the
launcher gives it), reserves a placement group of N one-GPU bundles (STRICT_SPREAD: one per
node) and runs an actor in each, and serves (tests/fake_engine.py) only once they all answer.
While it serves, it asks each actor every 0.5 s; a worker that does not answer within 5 s (its
node is gone) ends the engine with status 1 and a line naming the lost node, as vLLM's Ray
executor fails when a worker's node dies. Everything it placed is the driver's: when the engine
stops, Ray removes its actors and placement group.

Any other command line (the launcher's cluster query runs `<python> -P -c ...`) goes to the
Python itself: see write_fake_ray_python.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PLACE_TIMEOUT = 60.0
PING_EVERY, PING_TIMEOUT = 0.5, 5.0


def write_fake_ray_python(directory: Path, python: Path) -> Path:
    """`<it> -m ...` runs this fake engine with `python`; anything else is `python` itself."""
    path = directory / "fake-ray-python"
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then exec {python} {TESTS / "fake_ray_engine.py"} "$@"; fi\n'
                    f'exec {python} "$@"\n')
    path.chmod(0o755)
    return path


def start_workers(count: int):
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=0, num_gpus=1)
    class FakeRayWorker:
        def node(self):
            return ray.util.get_node_ip_address()

        def ping(self):
            return True

    group = placement_group([{"GPU": 1}] * count, strategy="STRICT_SPREAD")
    try:
        ray.get(group.ready(), timeout=PLACE_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        print(f"fake ray executor: no placement for {count} one-GPU bundles on {count} nodes in "
              f"{PLACE_TIMEOUT:g} s", flush=True)
        os._exit(1)
    actors = [FakeRayWorker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=index)).remote() for index in range(count)]
    nodes = ray.get([actor.node.remote() for actor in actors], timeout=PLACE_TIMEOUT)
    print(f"fake ray executor: {count} workers up on {', '.join(nodes)} (placement group {group.id.hex()})",
          flush=True)

    def watch():
        while True:
            time.sleep(PING_EVERY)
            for actor, node in zip(actors, nodes, strict=True):
                try:
                    ray.get(actor.ping.remote(), timeout=PING_TIMEOUT)
                except Exception as error:           # noqa: BLE001 - any failure: the worker is lost
                    print(f"fake ray executor: lost the worker on node {node}: {type(error).__name__}", flush=True)
                    os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> None:
    count = int(os.environ.get("FAKE_RAY_WORKERS") or 0)
    if count:
        start_workers(count)
    sys.path.insert(0, str(TESTS))
    import fake_engine

    fake_engine.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
