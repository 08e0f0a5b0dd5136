"""The module's lane settings, rendered by the pure nix/lane-env.nix, fed to the launcher
(issue 7 acceptance 2): the launcher must resolve the same three lanes with the models, names
and limits the module set, so the module and the launcher cannot drift.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nix_evaluator import ROOT, nix_eval

pytestmark = pytest.mark.nix

LAUNCHER = Path(sys.executable).parent / "vllm-launcher"
THREE = "(import ./nix/tests/three-lanes.nix).settings"


def render(expr: str) -> dict:
    return nix_eval(f"(import ./nix/lane-env.nix).render ({expr})")


def test_three_lane_environment():
    out = render(THREE)
    env = out["environment"]
    assert out["errors"] == []
    assert env["VLLM_LANES"] == "coder,fast_rag,orchestrator"
    assert env["VLLM_DEFAULT_LANE"] == "orchestrator"
    assert env["VLLM_GPU_MEMORY_UTILIZATION"] == "0.45"
    assert env["VLLM_ENFORCE_EAGER"] == "true"
    assert env["VLLM_LANE_CODER_GPU_MEMORY_UTILIZATION"] == "0.5"
    assert env["VLLM_LANE_FAST_RAG_ALIASES"] == "rag,fast"
    assert env["VLLM_LANE_CODER_EXTRA_ARGS"] == "'--seed' '7'"
    assert env["VLLM_LANE_CODER_ENV_HIP_VISIBLE_DEVICES"] == "0"
    assert "VLLM_LANE_FAST_RAG_QUANTIZATION" not in env  # null = unset
    assert env["VLLM_LOG_REQUESTS"] == "true" and env["LOG_DIRECTORY"] == "/var/log/vllm"
    assert all(isinstance(v, str) for v in env.values())


def test_three_lanes_through_the_launcher():
    env = render(THREE)["environment"]
    assert LAUNCHER.exists(), f"{LAUNCHER} missing: pip install -e launcher"
    run_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run([str(LAUNCHER), "config", "--format", "json"], env=run_env,
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["default_lane"] == "orchestrator"
    # the module's logRequests / logDirectory, as the launcher reads them
    assert config["server"]["log_requests"] is True and config["server"]["log_directory"] == "/var/log/vllm"
    lanes = config["lanes"]
    assert set(lanes) == {"orchestrator", "coder", "fast_rag"}
    expected = {
        "orchestrator": ("/srv/models/orchestrator", "DeepSeek-R1-Distill-Qwen-32B", "32768", "0.45"),
        "coder": ("/srv/models/coder", "Qwen2.5-Coder-32B-Instruct", "16384", "0.5"),
        "fast_rag": ("/srv/models/fast_rag", "Mistral-7B-Instruct", "8192", "0.45"),
    }
    for name, (model, served, max_len, gpu_util) in expected.items():
        lane = lanes[name]
        argv = lane["argv"]
        assert lane["model"] == model and lane["served_model_name"] == served
        assert argv[argv.index("--model") + 1] == model
        assert argv[argv.index("--max-model-len") + 1] == max_len
        assert float(argv[argv.index("--gpu-memory-utilization") + 1]) == float(gpu_util)
    assert {"planner"} <= set(lanes["orchestrator"]["names"])
    assert {"rag", "fast"} <= set(lanes["fast_rag"]["names"])
    assert lanes["coder"]["argv"][-2:] == ["--seed", "7"]
    assert lanes["coder"]["env"].get("HIP_VISIBLE_DEVICES") == "0"
    assert "bfloat16" in lanes["fast_rag"]["argv"]


def test_assertions_on_bad_configurations():
    errors = render(
        '{ lanes = { a.model = "x"; A.model = "y"; "b-c".model = "z"; nomodel = { }; }; defaultLane = "q"; }'
    )["errors"]
    text = "\n".join(errors)
    assert "letters, digits and `_`: b-c" in text
    assert "differ ignoring case" in text and "A, a" in text
    assert 'defaultLane = "q" is not one of the lanes' in text
    assert "nomodel have no model" in text
    assert render("{ }")["errors"][0].startswith("services.vllm.lanes: define at least one lane")
    assert "unknown engine setting(s) lanes.x.gpuMemoryUtilisation" in "\n".join(
        render('{ lanes.x = { model = "m"; gpuMemoryUtilisation = 0.5; }; }')["errors"])


# --- several machines (issue 14): the module's cluster settings, as the launcher reads them -----

TWO = "(import ./nix/tests/two-boxes.nix)"
# The module passes the token as the systemd credential `cluster-token` (LoadCredential); here a
# real file stands in for $CREDENTIALS_DIRECTORY/cluster-token.
CLUSTER_OPTIONS_ONLY = '["enable" "openFirewall" "trustInterface"]'


def render_head(token_file: str) -> dict:
    """The head's lane server environment, as nix/module.nix renders it (minus the unit's own
    variables): lanes, defaults and the cluster's settings."""
    return render(
        f'builtins.removeAttrs {TWO}.head ["enable" "openFirewall" "modelsDir" "cluster"] // '
        f'{{ cluster = builtins.removeAttrs {TWO}.head.cluster {CLUSTER_OPTIONS_ONLY} '
        f'// {{ tokenFile = "{token_file}"; }}; }}')


def render_cluster(which: str, token_file: str, extra: str = "") -> dict:
    return nix_eval(
        f'(import ./nix/lane-env.nix).renderCluster (builtins.removeAttrs {TWO}.{which}.cluster '
        f'{CLUSTER_OPTIONS_ONLY} // {{ tokenFile = "{token_file}"; {extra} }})')


def test_lane_env_tables_are_the_launchers():
    # lane-env.nix repeats the names of settings.py (and the ports' defaults, for the firewall):
    # every engine and cluster setting, lane-only where the launcher reads it per lane only
    from vllm_launcher.settings import CLUSTER_SETTINGS, ENGINE_SETTINGS

    tables = nix_eval("let l = import ./nix/lane-env.nix; in { inherit (l) settings cluster; }")
    engine = {s["setting"]: s.get("laneOnly", False) for s in tables["settings"]}
    assert engine == {s.key: s.lane_only for s in ENGINE_SETTINGS}
    cluster = {s["key"]: s.get("default") for s in tables["cluster"]}
    assert set(cluster) == {s.key.upper() for s in CLUSTER_SETTINGS}
    for setting in CLUSTER_SETTINGS:
        if cluster[setting.key.upper()] is not None:  # the ports
            assert cluster[setting.key.upper()] == setting.default, setting.key


def test_two_box_head_through_the_launcher(tmp_path: Path):
    from vllm_launcher.config import load_config
    from vllm_launcher.placement import lane_placement

    token = tmp_path / "cluster-token"
    token.write_text("0" * 64 + "\n")
    token.chmod(0o600)
    out = render_head(str(token))
    env = out["environment"]
    assert out["errors"] == []
    assert env["VLLM_CLUSTER_ROLE"] == "head" and env["VLLM_CLUSTER_INTERFACE"] == "enp1s0f0"
    assert env["VLLM_LANE_BIG_NODES"] == "2" and env["VLLM_LANE_BIG_TENSOR_PARALLEL_SIZE"] == "2"
    assert env["VLLM_LANE_BIG_DISTRIBUTED_EXECUTOR_BACKEND"] == "mp"
    # only what the configuration sets: the launcher's defaults are not restated
    assert not {"VLLM_CLUSTER_PORT", "VLLM_CLUSTER_GPUS", "VLLM_CLUSTER_ADDRESS"} & set(env)

    run_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run([str(LAUNCHER), "config", "--format", "json"], env=run_env,
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    cluster = config["cluster"]
    assert cluster["role"] == "head" and cluster["address"] is None and cluster["interface"] == "enp1s0f0"
    assert cluster["token_file"] == str(token) and cluster["gpus"] == 1 and cluster["port"] == 6379
    assert set(config["lanes"]) == {"big", "coder"} and config["default_lane"] == "coder"
    argv = config["lanes"]["big"]["argv"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"
    # the lane's NODES, read back by the launcher: two machines, one GPU each
    lanes = load_config(run_env).lanes
    assert lanes["big"].settings["NODES"] == 2
    placement = lane_placement(lanes["big"], cluster["gpus"])
    assert (placement.gpus, placement.nodes, placement.per_node) == (2, 2, 1)
    assert lane_placement(lanes["coder"], cluster["gpus"]).nodes == 1


def test_two_box_worker_through_the_launcher(tmp_path: Path):
    from vllm_launcher.config import load_cluster_config

    out = render_cluster("worker", str(tmp_path / "cluster-token"), "port = 7000; gpus = 1;")
    assert out["errors"] == []
    env = out["environment"]
    assert env == {"VLLM_CLUSTER_ROLE": "worker", "VLLM_CLUSTER_ADDRESS": "192.168.100.1",
                   "VLLM_CLUSTER_INTERFACE": "enp1s0f0", "VLLM_CLUSTER_TOKEN_FILE": str(tmp_path / "cluster-token"),
                   "VLLM_CLUSTER_PORT": "7000", "VLLM_CLUSTER_GPUS": "1"}
    cluster, _python = load_cluster_config(env)
    assert cluster.role == "worker" and cluster.address == "192.168.100.1:7000" and cluster.port == 7000
    # the worker's firewall: no GCS port (the head's), the node ports and the worker range
    assert out["firewall"] == {"ports": list(cluster.fixed_ports().values())[1:],
                               "ranges": [{"from": cluster.min_worker_port, "to": cluster.max_worker_port}]}
    head = render_cluster("head", "/etc/vllm/cluster-token")["firewall"]
    assert head["ports"][0] == 6379 and head["ports"][1:] == out["firewall"]["ports"]


def test_cluster_assertions_pure():
    def errors(settings: str) -> str:
        return "\n".join(nix_eval(f"(import ./nix/lane-env.nix).renderCluster ({settings})")["errors"])

    text = errors('{ role = "worker"; }')
    assert "cluster.headAddress: a worker joins the head" in text
    assert "cluster.interface: name the network interface" in text and "cluster.tokenFile: give the file" in text
    assert 'cluster.role: set it to "head"' in errors('{ interface = "e"; tokenFile = "/t"; }')
    assert "is in the Nix store" in errors(
        '{ role = "head"; interface = "e"; tokenFile = "/nix/store/0000000000000000-token"; }')
    assert "unknown setting(s) gpu" in errors('{ role = "head"; interface = "e"; tokenFile = "/t"; gpu = 1; }')
    assert errors('{ role = "head"; interface = "e"; tokenFile = "/t"; }') == ""
    # a lane-only setting in the defaults (the launcher would ignore VLLM_NODES)
    assert "defaults: nodes can only be set per lane" in "\n".join(
        render('{ defaults.nodes = 2; lanes.a.model = "m"; }')["errors"])


def test_sleep_level_through_the_launcher():
    """sleepLevel (defaults and per lane) reaches the launcher: the engine command of a sleep
    lane has --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1; a lane set to 0 has neither."""
    out = render('{ defaults.sleepLevel = 1; lanes = { a = { model = "org/a"; sleepLevel = 2; }; '
                 'b.model = "org/b"; c = { model = "org/c"; sleepLevel = 0; }; }; }')
    env = out["environment"]
    assert out["errors"] == [] and env["VLLM_SLEEP_LEVEL"] == "1" and env["VLLM_LANE_A_SLEEP_LEVEL"] == "2"
    run_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run([str(LAUNCHER), "config", "--format", "json"], env=run_env,
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lanes = json.loads(result.stdout)["lanes"]
    for name, asleep in (("a", True), ("b", True), ("c", False)):
        assert ("--enable-sleep-mode" in lanes[name]["argv"]) is asleep, lanes[name]["argv"]
        assert (lanes[name]["env"].get("VLLM_SERVER_DEV_MODE") == "1") is asleep
    bad = subprocess.run([str(LAUNCHER), "config", "--format", "json"], env={**run_env, "VLLM_LANE_A_SLEEP_LEVEL": "3"},
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert bad.returncode == 2 and "VLLM_LANE_A_SLEEP_LEVEL" in bad.stderr, bad.stderr
