"""What an attacker found on main (issue 19), each fixed and tried again here, against the real
server with fake engines on 127.0.0.1:

- the runtime directory and its sockets/ are refused (status 2, before anything in them is
  read or created) when another user owns them or could write them; a record the server did
  not write never gets a process group signalled;
- random multipart forms on the audio routes end in an OpenAI error or a forward, never a 500;
- a path with a trailing slash is an unknown path (404), never a redirect built from Host;
- secrets are masked by value: a configuration error, and an engine that prints its own key;
- two Authorization headers are refused (400) on every route.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher_cli import run_launcher
from measurements import record
from serving import fake_lanes_env, free_port, serving

pytestmark = pytest.mark.engine

OTHER_UID = 65534                   # nobody


def serve_refused(tmp_path: Path, fake_python: Path, runtime: Path) -> subprocess.CompletedProcess:
    env = {**fake_lanes_env(fake_python, {"a": {}}), "VLLM_RUNTIME_DIR": str(runtime), "VLLM_HOST": "127.0.0.1",
           "VLLM_PORT": str(free_port()), "TMPDIR": str(tmp_path)}
    return run_launcher(env, "serve", timeout=30)


def own_group_sleeper() -> subprocess.Popen:
    """A process in a group of its own that no launcher started: what a planted record names."""
    return subprocess.Popen(["sleep", "600"], start_new_session=True)


def plant_record(directory: Path, pgid: int, **fields) -> Path:
    """A record as a previous (SIGKILLed) server would leave it, its server long gone."""
    path = directory / f"engine-{pgid}.json"
    path.write_text(json.dumps({"lane": "a", "pgid": pgid, "server_pid": 2 ** 22 + 1, "server_start_time": 1,
                                **fields}))
    return path


def alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


@pytest.mark.parametrize("case", ["world-writable", "group-writable", "other-owner", "sockets-world-writable",
                                  "symlink"])
def test_an_unsafe_runtime_directory_is_refused_before_anything_in_it_is_read(tmp_path, fake_python, case):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    refused = runtime
    if case == "world-writable":
        runtime.chmod(0o1777)
    elif case == "group-writable":
        runtime.chmod(0o770)
    elif case == "other-owner":
        os.chown(runtime, OTHER_UID, OTHER_UID)
    elif case == "sockets-world-writable":
        refused = runtime / "sockets"
        refused.mkdir(mode=0o700)
        refused.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        runtime.rmdir()
        runtime.symlink_to(tmp_path / "elsewhere")
    sleeper = own_group_sleeper()
    try:
        if case != "symlink":
            plant_record(runtime, sleeper.pid)           # what another user could plant there
        result = serve_refused(tmp_path, fake_python, runtime)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{refused} is " in result.stderr and "accepted: a directory owned by this user (uid 0)" in result.stderr
        assert "nothing started" in result.stderr
        assert alive(sleeper), "the planted record's group was signalled"
        assert "reaping" not in result.stdout + result.stderr
        assert not (runtime / "sockets").exists() or case == "sockets-world-writable"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_absent_runtime_directory_is_created_private(tmp_path, fake_python):
    runtime = tmp_path / "deep" / "run"
    with serving(tmp_path, {**fake_lanes_env(fake_python, {"a": {}}), "VLLM_RUNTIME_DIR": str(runtime)}):
        for directory in (runtime, runtime / "sockets"):
            info = directory.stat()
            assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.getuid()), directory


def test_a_record_naming_a_group_it_does_not_describe_is_never_signalled(tmp_path, fake_python):
    """Records in the (private) runtime directory naming a live group that is not the launcher's
    engine: a bare pgid, and one copying everything anyone can read about the group (its start
    time, owner, pgid) but not the engine id in its environment. Neither is signalled."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    bare, forged = own_group_sleeper(), own_group_sleeper()
    try:
        stat = Path(f"/proc/{forged.pid}/stat").read_text().rsplit(")", 1)[1].split()
        plant_record(runtime, bare.pid)
        plant_record(runtime, forged.pid, start_time=int(stat[19]), uid=os.getuid(), engine_id="0" * 32)
        env = {**fake_lanes_env(fake_python, {"a": {}}), "VLLM_RUNTIME_DIR": str(runtime)}
        with serving(tmp_path, env) as served:           # listening: the reaper has run
            log = served.log()
            assert (f"not reaping process group {bare.pid} named by {runtime}/engine-{bare.pid}.json: the record "
                    "lacks the group's start time, owner or engine id") in log, log
            assert f"not reaping process group {forged.pid} named by " in log, log
            assert f"process {forged.pid} does not carry the engine's id" in log, log
            assert "left behind by a previous server" not in log
            assert alive(bare) and alive(forged)
    finally:
        for sleeper in (bare, forged):
            sleeper.send_signal(signal.SIGKILL)
            sleeper.wait()
    assert bare.returncode == forged.returncode == -signal.SIGKILL      # no SIGTERM reached them first


# ---------------------------------------------------------------------------------------------
# multipart forms on the audio routes: an OpenAI error or a forward, never a 500

BOUNDARY = "fuzzBoundary7"
_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
_name = st.one_of(st.sampled_from(["model", "file", "stream", "language", "", "mo\"del"]), _text)
_disposition = st.one_of(
    st.builds('form-data; name="{}"'.format, _name),
    st.builds('form-data; name="{}"; filename="{}"'.format, _name, _text),
    st.builds('form-data; filename="{}"'.format, _text),                       # no name
    st.builds("form-data; name*=utf-8''{}".format, _name),
    st.builds('attachment; name="{}"'.format, _name),
    st.sampled_from(["form-data", "form-data; name=", "form-data; name", ";;;", "inline", ""]),
    _text,
)
_header = st.one_of(
    st.builds("Content-Disposition: {}".format, _disposition),
    st.builds("Content-Type: {}".format, st.one_of(
        st.sampled_from(["audio/wav", "text/plain; charset=bogus-charset", f"multipart/mixed; boundary={BOUNDARY}x",
                         "application/octet-stream", ";", "/"]), _text)),
    st.builds("Content-Transfer-Encoding: {}".format, st.sampled_from(["base64", "quoted-printable", "8bit", "x-y"])),
    st.builds("{}: {}".format, _text, _text),
)
_payload = st.one_of(st.sampled_from([b"alias", b"a", b"true", b"=ZZ=", b"not base64 !"]), st.binary(max_size=64),
                     st.builds(lambda inner: f"--{BOUNDARY}x\r\n{inner}\r\n--{BOUNDARY}x--".encode(), _text))
_good = st.one_of(st.builds('form-data; name="{}"'.format, st.sampled_from(["file", "language", "stream", "x"])),
                  st.builds('form-data; name="file"; filename="{}"'.format, _text))
_wild = st.tuples(st.lists(_header, max_size=4), _payload)


@st.composite
def _part(draw) -> tuple[list[str], bytes]:
    """Mostly a well-formed field (so that forms are rebuilt and forwarded), else anything."""
    if draw(st.integers(0, 7)):
        extra = [] if draw(st.integers(0, 3)) else [draw(_header)]
        return [f"Content-Disposition: {draw(_good)}", *extra], draw(_payload)
    return draw(_wild)


@st.composite
def forms(draw) -> tuple[bytes, str]:
    """A multipart body (mostly with `model` = the alias, so the form is rebuilt) and its content type."""
    parts = draw(st.lists(_part(), max_size=4))
    if draw(st.integers(0, 4)):
        parts.insert(draw(st.integers(0, len(parts))), (['Content-Disposition: form-data; name="model"'], b"alias"))
    if draw(st.integers(0, 4)):
        parts.insert(draw(st.integers(0, len(parts))), (['Content-Disposition: form-data; name="file"; filename="a.wav"',
                                                         "Content-Type: audio/wav"], draw(st.binary(max_size=32))))
    body = b"".join(f"--{BOUNDARY}\r\n".encode() + "\r\n".join(headers).encode() + b"\r\n\r\n" + payload + b"\r\n"
                    for headers, payload in parts) + f"--{BOUNDARY}--\r\n".encode()
    if draw(st.integers(0, 9)) == 0:                                # truncated or trailed by garbage
        body = body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=8))
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    if draw(st.integers(0, 9)) == 0:
        content_type = draw(st.sampled_from([f'multipart/form-data; boundary="{BOUNDARY}"; charset=utf-8',
                                             "multipart/form-data; boundary=", "multipart/form-data; boundary=other"]))
    return body, content_type


FUZZ_EXAMPLES = 300


def test_multipart_forms_end_in_an_openai_error_or_a_forward_never_a_500(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ALIASES": "alias"}}, VLLM_API_KEY="k")
    answers: dict[int, int] = {}
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(forms(), st.sampled_from(["/v1/audio/transcriptions", "/v1/audio/translations"]))
        def one_form(form, route):
            body, content_type = form
            response = client.post(route, content=body, headers={"Authorization": "Bearer k",
                                                                 "Content-Type": content_type})
            answers[response.status_code] = answers.get(response.status_code, 0) + 1
            assert response.status_code in (200, 400, 404, 413), (response.status_code, response.text[:300], body)
            assert response.headers["content-type"].startswith("application/json"), response.text[:300]
            if response.status_code != 200:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, error

        began = time.monotonic()
        one_form()
        seconds = time.monotonic() - began
        assert "Traceback" not in served.log(), served.log()[-3000:]
    record(f"multipart fuzz: {FUZZ_EXAMPLES} forms in {seconds:.1f} s, answers by status {dict(sorted(answers.items()))}")
    assert answers.get(200) and answers.get(400)            # both forwards and refusals were tried


# ---------------------------------------------------------------------------------------------
# no redirects; one reading of Authorization

AUTH = {"Authorization": "Bearer k"}
TRAILING = [("GET", "/lanes/alpha/"), ("POST", "/lanes/beta/load/"), ("POST", "/lanes/alpha/unload/"),
            ("GET", "/metrics/"), ("GET", "/health/"), ("GET", "/lanes/"), ("GET", "/v1/models/"), ("GET", "/livez/")]


def test_a_trailing_slash_is_an_unknown_path_never_a_redirect_built_from_host(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"alpha": {}, "beta": {}}, VLLM_API_KEY="k", VLLM_METRICS_REQUIRE_KEY="true")
    with serving(tmp_path, env) as served, served.client() as client:
        for method, path in TRAILING:
            for headers in ({"Host": "evil.example"}, {"Host": "evil.example", **AUTH}):
                answer = client.request(method, path, headers=headers)
                assert answer.status_code == 404 and "location" not in answer.headers, (path, answer.headers)
                assert answer.json()["error"]["code"] == "not_found", answer.text
        # where the key comes first (the OpenAI routes), it still does
        answer = client.post("/v1/chat/completions/", json={"model": "alpha"}, headers={"Host": "evil.example"})
        assert answer.status_code == 401 and "location" not in answer.headers
        answer = client.post("/v1/chat/completions/", json={"model": "alpha"}, headers={"Host": "evil.example", **AUTH})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
        assert client.get("/lanes/alpha", headers=AUTH).status_code == 200       # without the slash: the route


KEYED = [("POST", "/v1/chat/completions", {"json": {"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 1}}),
         ("GET", "/v1/models", {}), ("GET", "/lanes", {}), ("GET", "/lanes/a", {}), ("POST", "/lanes/a/load", {}),
         ("GET", "/metrics", {})]


def test_two_authorization_headers_are_refused_on_every_route(tmp_path, fake_python):
    """Not the first on one route and the last on another (a proxy in front may read either):
    400 everywhere, whichever of the two holds the key."""
    env = fake_lanes_env(fake_python, {"a": {}}, VLLM_API_KEY="k", VLLM_METRICS_REQUIRE_KEY="true")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        for method, path, kwargs in KEYED:
            assert client.request(method, path, headers=AUTH, **kwargs).status_code == 200, path
            for pair in (["Bearer k", "Bearer wrong"], ["Bearer wrong", "Bearer k"], ["Bearer k", "Bearer k"]):
                answer = client.request(method, path, headers=[("Authorization", value) for value in pair], **kwargs)
                assert answer.status_code == 400, (path, pair, answer.status_code, answer.text[:200])
                error = answer.json()["error"]
                assert error["code"] == "invalid_authorization" and "send exactly one" in error["message"], error


# ---------------------------------------------------------------------------------------------
# secrets masked by value

def test_an_engine_that_prints_its_own_key_has_it_masked_everywhere(tmp_path):
    """The per-start key the launcher gives each engine: an engine printing it before dying
    leaves it in no 503, no /lanes and no log line."""
    keys = tmp_path / "keys"
    engine = tmp_path / "leaky-python"
    engine.write_text(f'#!/bin/sh\necho "$VLLM_API_KEY" >> {keys}\necho "starting with key $VLLM_API_KEY"\nexit 3\n')
    engine.chmod(0o755)
    env = {**fake_lanes_env(engine, {"a": {}}), "VLLM_ENGINE_MAX_RESTARTS": "1", "LOG_DIRECTORY": str(tmp_path / "logs")}
    with serving(tmp_path, env) as served, served.client() as client:
        failed = client.post("/lanes/a/load")
        message = failed.json()["error"]["message"]
        assert failed.status_code == 503 and "starting with key ***" in message, message
        lanes = client.get("/lanes").text
        assert "starting with key ***" in json.loads(lanes)["lanes"]["a"]["last_error"]
    shown = message + lanes + served.log() + "".join(path.read_text() for path in (tmp_path / "logs").iterdir())
    assert "starting with key ***" in served.log()
    started = keys.read_text().split()
    # the preload's start, and the load's own when it came after the preload had failed (with the
    # engine's keeper a start takes longer, so the load often joins the preload's start)
    assert started and all(len(key) > 20 for key in started)
    for key in started:
        assert key not in shown


def test_a_secret_in_any_variable_is_masked_in_configuration_errors(tmp_path):
    """The API key (from its file too), a proxy's password and the cluster's token, each pasted
    into a variable that is not named as a secret: the error names the variable, never the value."""
    key_file, token_file = tmp_path / "key", tmp_path / "token"
    key_file.write_text("key-from-the-file-9876\n")
    token_file.write_text("cluster-token-abcdef0123\n")
    token_file.chmod(0o600)
    base = {"VLLM_LANES": "alpha", "VLLM_LANE_ALPHA_MODEL": "org/m",
            "HTTPS_PROXY": "http://user:proxy-password-1@proxy.example:3128", "VLLM_MAX_MODEL_LEN": "proxy-password-1",
            "VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_INTERFACE": "lo", "VLLM_CLUSTER_TOKEN_FILE": str(token_file),
            "VLLM_DTYPE": "cluster-token-abcdef0123"}
    for key, how in (("sk-the-api-key-12345", {"VLLM_API_KEY": "sk-the-api-key-12345"}),
                     ("key-from-the-file-9876", {"VLLM_API_KEY_FILE": str(key_file)})):
        env = {**base, **how, "VLLM_LANE_ALPHA_GPU_MEMORY_UTILIZATION": key, "VLLM_SWAP_SPACE": f"{key}x"}
        for command in ("config", "serve"):
            result = run_launcher(env, command)
            assert result.returncode == 2, result.stderr
            for variable in ("VLLM_LANE_ALPHA_GPU_MEMORY_UTILIZATION", "VLLM_MAX_MODEL_LEN", "VLLM_DTYPE",
                             "VLLM_SWAP_SPACE"):
                assert f"{variable}='***" in result.stderr, (variable, result.stderr)
            for secret in (key, "proxy-password-1", "cluster-token-abcdef0123"):
                assert secret not in result.stdout + result.stderr, (secret, result.stderr)
