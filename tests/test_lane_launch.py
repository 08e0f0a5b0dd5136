"""Each lane at run time is one object (router.Lane): its slice of the configuration
(engine_command.LaneLaunch: its settings, its placement computed once, the few server settings its
engine needs, the environment as engines see it) and its supervisor, which gets that slice and no
LauncherConfig. The engine the server starts from the slice is the one `vllm-launcher config` shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_cluster import cluster_env
from vllm_launcher import placement
from vllm_launcher.config import LauncherConfig, load_config
from vllm_launcher.engine_command import build_engine_spec, engine_spec, lane_launch
from vllm_launcher.placement import Placement
from vllm_launcher.router import Router
from vllm_launcher.vllm_info import VllmInfo

V032 = VllmInfo("vllm", "0.32.0")
EXTRA = {"VLLM_API_KEY": "front-door-key-1234", "HF_TOKEN": "hf_token_abcdef", "NCCL_DEBUG": "INFO",
         "UNRELATED_VARIABLE": "not for engines"}


@pytest.fixture
def config(tmp_path: Path, fake_python: Path) -> LauncherConfig:
    """Lanes small (one GPU) and big (two: on two nodes of the cluster)."""
    return load_config({**cluster_env(tmp_path, fake_python), **EXTRA})


def test_a_lanes_launch_is_its_slice_of_the_configuration(config: LauncherConfig):
    big, small = lane_launch(config, "big"), lane_launch(config, "small")
    assert (big.lane, small.lane) == (config.lane("big"), config.lane("small"))
    assert big.placement == Placement(gpus=2, nodes=2, per_node=1) and big.cluster == config.cluster
    assert small.placement is None and small.cluster is None        # this machine alone: no cluster
    server = config.server
    assert (big.engine_python, big.log_level, big.start_timeout, big.stop_timeout) == (
        server.engine_python, server.log_level, server.start_timeout, server.stop_timeout)
    # the environment as engines see it: the allow-list, without the launcher's own variables
    assert big.environ["HF_TOKEN"] == "hf_token_abcdef" and big.environ["NCCL_DEBUG"] == "INFO"
    assert not {"VLLM_API_KEY", "UNRELATED_VARIABLE", "VLLM_LANES", "VLLM_CLUSTER_TOKEN_FILE"} & set(big.environ)
    # ... while every secret of the whole environment is still masked in its engine's output
    assert {"front-door-key-1234", "hf_token_abcdef", "0" * 64} <= set(big.secrets)


@pytest.mark.parametrize("lane", ["small", "big"])
def test_the_server_starts_the_engine_the_commands_show(config: LauncherConfig, lane: str):
    shown = build_engine_spec(config, lane, V032, uds="/run/x.sock", api_key="internal-key")
    started = engine_spec(lane_launch(config, lane), V032, listen="/run/x.sock", api_key="internal-key")
    assert started == shown
    assert ("--distributed-executor-backend" in started.argv) == (lane == "big")     # the placement's


def test_each_supervisor_gets_its_lanes_slice_and_the_placement_is_computed_once(config, tmp_path, monkeypatch):
    placed: list[str] = []
    compute = placement.lane_placement
    monkeypatch.setattr(placement, "lane_placement", lambda lane, gpus: placed.append(lane.name) or compute(lane, gpus))
    router = Router(config, V032, sockets=tmp_path)
    assert sorted(placed) == ["big", "small"]
    for name, lane in router.lanes.items():
        assert lane.supervisor.launch is lane.launch and lane.config is config.lane(name)
        assert not any(isinstance(value, LauncherConfig) for value in vars(lane.supervisor).values())
    assert router.lanes["big"].launch.placement == Placement(2, 2, 1)
