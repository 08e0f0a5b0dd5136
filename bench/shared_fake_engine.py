"""The engine of the overhead benchmark: tests/fake_engine.py's application (its public
`build_app`), run by `vllm-launcher serve` as a lane's engine through VLLM_ENGINE_PYTHON, and
served on two listeners by one process and one event loop: the address the server gives it
(`--uds PATH`, or `--host H --port P`) for the server, and 127.0.0.1:`--direct-port` for the
benchmark's direct path and for LiteLLM.  So all three paths reach the same engine.

The engine's key (VLLM_API_KEY, set by the server) is dropped: the direct path sends none.

    python bench/shared_fake_engine.py --direct-port N -m vllm.entrypoints.openai.api_server --model M \
        --served-model-name S (--uds PATH | --host H --port P)
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_engine import build_app  # noqa: E402  (tests/fake_engine.py, a program of its own)


def option(argv: list[str], name: str) -> str | None:
    """The value after NAME on the command line (vLLM's form: `--name value`), or None."""
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def listeners(argv: list[str]) -> list[socket.socket]:
    """The server's address (a Unix socket or host and port), then the direct port."""
    sockets = []
    if option(argv, "--uds"):
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(option(argv, "--uds"))
        sockets.append(unix)
    elif option(argv, "--port"):
        sockets.append(socket.create_server((option(argv, "--host") or "127.0.0.1", int(option(argv, "--port")))))
    if option(argv, "--direct-port"):
        sockets.append(socket.create_server(("127.0.0.1", int(option(argv, "--direct-port")))))
    for sock in sockets:
        sock.listen(2048)
    return sockets


def main(argv: list[str]) -> None:
    os.environ.pop("VLLM_API_KEY", None)
    served, model = option(argv, "--served-model-name"), option(argv, "--model")
    sockets = listeners(argv)
    print(f"bench fake engine pid {os.getpid()} for {served} on {[s.getsockname() for s in sockets]}", flush=True)
    config = uvicorn.Config(build_app(served, model), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main(sys.argv[1:])
