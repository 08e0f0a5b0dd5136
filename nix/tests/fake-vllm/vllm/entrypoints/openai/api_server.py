"""A stand-in for `python -m vllm.entrypoints.openai.api_server` in the NixOS VM test.

Answers /health, /version, /metrics and /v1/models with the served names it was given, so the
launcher sees a ready engine; it loads nothing and needs no GPU.
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--served-model-name", nargs="*", default=None)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
args, _unknown = parser.parse_known_args()
names = args.served_model_name or [args.model]


class Handler(BaseHTTPRequestHandler):
    def _send(self, status: int, body: dict | str) -> None:
        data = body if isinstance(body, str) else json.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            self._send(200, "")
        elif self.path == "/version":
            self._send(200, {"version": "0.12.0"})
        elif self.path == "/metrics":
            self._send(200, "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")
        elif self.path.startswith("/v1/models"):
            self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
        else:
            self._send(404, {"error": "not found"})


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
