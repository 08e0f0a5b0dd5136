"""User-space instructions per request of the front server, counted by callgrind: a figure
that other users' load on the machine does not move.  The server runs under valgrind with
instrumentation off; after a warm-up it is switched on for N non-streaming requests at
concurrency 8 to the fake engine, dumped and switched off.  valgrind comes from the system
(Debian: apt-get install valgrind); the launcher's code is the one on PYTHONPATH, else the
installed one.

    .venv/bin/python -m bench.callgrind LABEL [N]

adds `instructions_per_request` to bench/results/profile-LABEL.json (or writes it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from .common import RESULTS, WORK, log
from .overhead import body, engine_python
from .processes import Started, free_port, lanes_env


async def _load(url: str, n: int, concurrency: int) -> None:
    import httpx

    left = n
    async with httpx.AsyncClient(timeout=120.0, trust_env=False) as client:
        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                response = await client.post(url, json=body("fake", 16, False))
                await response.aread()
                response.raise_for_status()
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(label: str, n: int = 300) -> int:
    directory = WORK / f"callgrind-{label}"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("callgrind.out.*"):
        old.unlink()
    port = free_port()
    env = lanes_env(engine_python(directory, None, free_port()), {"fake": {"ENV_FAKE_TOKEN_DELAY": "0"}},
                    VLLM_LOG_LEVEL="WARNING")
    env.update({"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
                "VLLM_HOST": "127.0.0.1", "VLLM_PORT": str(port), "VLLM_RUNTIME_DIR": str(directory / "run"),
                "TMPDIR": str(directory)})
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    prefix = f"--vgdb-prefix={directory / 'vgdb'}"
    server = Started.spawn(["valgrind", "--tool=callgrind", "--instr-atstart=no", prefix,
                            f"--callgrind-out-file={directory}/callgrind.out.%p", sys.executable, "-m",
                            "vllm_launcher", "serve"], env, directory / "server.log")
    url = f"http://127.0.0.1:{port}"
    control = ["callgrind_control", prefix]
    try:
        server.wait_answer(url + "/lanes", 600,
                           ok=lambda r: r.status_code == 200 and r.json()["lanes"]["fake"]["state"] == "ready")
        asyncio.run(_load(url + "/v1/chat/completions", 50, 4))                      # warm-up
        subprocess.run([*control, "-i", "on", str(server.pid)], check=True, capture_output=True)
        asyncio.run(_load(url + "/v1/chat/completions", n, 8))
        subprocess.run([*control, "-d", str(server.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-i", "off", str(server.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        server.stop(grace=30.0)
    dump = sorted(directory.glob("callgrind.out.*.1"))[-1]
    totals = [line for line in dump.read_text(errors="replace").splitlines() if line.startswith("totals:")]
    return int(totals[-1].split()[1]) // n


def main(argv: list[str]) -> int:
    label, n = argv[0], int(argv[1]) if len(argv) > 1 else 300
    per_request = measure(label, n)
    path = RESULTS / f"profile-{label}.json"
    result = json.loads(path.read_text()) if path.exists() else {"label": label}
    result["instructions_per_request"] = per_request
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"{label}: {per_request} user-space instructions per request (callgrind, {n} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
