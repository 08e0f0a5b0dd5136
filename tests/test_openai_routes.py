"""Only OpenAI routes reach an engine: the forwarded list against vLLM's own router, the path
check, and attack paths sent to a server whose fake engine records every path it receives."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest

from real_engine import requires_vllm
from serving import CHAT, chat_body, fake_lanes_env, serving
from vllm_launcher.openai_routes import ANSWERED_HERE, FORWARDED, forwarded_route

# vLLM's app as `vllm serve` builds it, for every task, without an engine: its routes as JSON.
VLLM_ROUTES = """
import json, sys, types, typing, warnings
warnings.simplefilter("ignore")
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.openai import api_server
from vllm.tasks import SupportedTask
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m"])
model_config = types.SimpleNamespace(get_pooling_task=lambda tasks: "embed",
                                     hf_config=types.SimpleNamespace(num_labels=1))
app = api_server.build_app(args, typing.get_args(SupportedTask), model_config)
json.dump([[sorted(getattr(r, "methods", None) or []), r.path] for r in app.routes], sys.stdout)
"""


@pytest.mark.e2e
@requires_vllm
def test_every_forwarded_route_is_served_by_vllm_under_v1():
    found = subprocess.run([sys.executable, "-c", VLLM_ROUTES], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    served = {(method, path) for methods, path in json.loads(found.stdout) for method in methods}
    assert {("POST", "/invocations"), ("POST", "/v1/embeddings")} <= served    # the whole app, pooling too
    ours = {("POST", f"/v1/{route}") for route in FORWARDED} | {("GET", f"/v1/{route}") for route in ANSWERED_HERE}
    assert ours - served == set(), sorted(served)


@pytest.mark.parametrize("raw,route", [
    (b"/v1/chat/completions", "chat/completions"),
    (b"/v1/audio/transcriptions", "audio/transcriptions"),
    (b"/v1/%63hat/completions", "chat/completions"),        # a harmless escape is decoded
    (b"/v1/rerank", "rerank"),
])
def test_forwarded_route_accepts_the_listed_routes(raw, route):
    assert forwarded_route(raw) == route


ATTACK_PATHS = [
    "/v1/%2e%2e/pause", "/v1/%2E%2E/pause", "/v1/../invocations", "/v1/chat/completions/../../pause",
    "/v1//completions", "/v1/%2fpause", "/v1/%2Fpause", "/v1/chat%2fcompletions", "/v1/./chat/completions",
    "/v1/.%2e/pause", "/v1/%5c..%5cpause", "/v1/..\\pause", "/v1/chat/completions/", "/v1/chat/completions/.",
    "/v1/chat/completions%00", "/v1/chat/completions;x", "/v1/tokenize", "/v1/load_lora_adapter",
    "/v1/messages/../pause", "/v1/messages/", "/v1/messages%2fcount_tokens", "/v1/messages/count_tokens/..",
    "/v1/chat/completions/render", "/v1/responses/r1/cancel", "/v1/%ff", "/v1/",
    "/v1/models/../../pause", "/v1/audio/../../invocations",
]


@pytest.mark.parametrize("raw", ATTACK_PATHS)
def test_forwarded_route_refuses_anything_else(raw):
    assert forwarded_route(raw.encode()) is None


def raw_post(url: str, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    """POST with the path exactly as given (httpx would normalise dot segments)."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.engine
def test_attack_paths_never_reach_the_engine(tmp_path, fake_python):
    paths = tmp_path / "engine-paths"
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_PATH_LOG": str(paths)}})
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        body = json.dumps(chat_body("a")).encode()
        for path in ATTACK_PATHS:
            status, answer = raw_post(served.url, path, body)
            assert status == 404, (path, status, answer[:300])
            assert set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}, path
        status, answer = raw_post(served.url, "/v1/%63hat/completions", body)     # reaches it, canonical
        assert status == 200 and json.loads(answer)["model"] == "a"
        received = paths.read_text().splitlines()
    assert [line for line in received if line.startswith("POST")] == [f"POST {CHAT}"], received
    assert set(received) <= {f"POST {CHAT}", "GET /health", "GET /v1/models"}, received


@pytest.mark.engine
def test_every_forwarded_route_reaches_the_engine(tmp_path, fake_python):
    paths = tmp_path / "engine-paths"
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_PATH_LOG": str(paths), "ALIASES": "alias-a"}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        for route in ("responses", "rerank", "score"):
            answer = client.post(f"/v1/{route}", json={"model": "alias-a", "input": "x"})
            assert answer.status_code == 200 and answer.json() == {"object": route, "model": "a"}, answer.text
        assert client.post("/v1/embeddings", json={"model": "a", "input": "x"}).status_code == 200
        assert client.post(CHAT, json=chat_body("alias-a")).json()["model"] == "a"
        assert client.post("/v1/completions", json={"model": "a", "prompt": "x"}).json()["model"] == "a"
        answer = client.post("/v1/messages", json={"model": "alias-a", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "x"}]})
        assert answer.status_code == 200 and answer.json()["model"] == "a", answer.text
        for model in ("a", "alias-a"):          # an alias is rewritten inside the form
            for route in ("transcriptions", "translations"):
                answer = client.post(f"/v1/audio/{route}", data={"model": model, "language": "en"},
                                     files={"file": ("a.wav", b"RIFF\x00\x01\r\n--not-a-boundary\r\n", "audio/wav")})
                assert answer.status_code == 200, answer.text
                assert answer.json()["text"].startswith("a heard"), answer.text
        missing = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF", "audio/wav")})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_model"
    posted = {line for line in paths.read_text().splitlines() if line.startswith("POST")}
    assert posted == {f"POST /v1/{route}" for route in FORWARDED}
