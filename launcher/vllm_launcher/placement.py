"""Which lanes run on the cluster and what they need of it: tensor x pipeline GPUs on NODES
machines (default: as many as that needs at VLLM_CLUSTER_GPUS each), and whether the cluster's
nodes as Ray reports them (ClusterState, asked by cluster.py) have it. Pure; used by the engine
command (a multi-node lane's argv: computed once per lane, engine_command.LaneLaunch), the
supervisor (waiting for the cluster) and `check`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import LaneConfig, LauncherConfig


@dataclass(frozen=True)
class Node:
    address: str
    head: bool
    alive: bool
    gpus: float
    cpus: float

    def describe(self) -> str:
        gpus = f"{self.gpus:g} GPU" + ("" if self.gpus == 1 else "s")
        return f"{self.address}{' (head)' if self.head else ''}: {gpus}, {self.cpus:g} CPU" \
            + ("" if self.alive else ", dead")


@dataclass(frozen=True)
class ClusterState:
    address: str
    ray_version: str
    nodes: tuple[Node, ...]

    @property
    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    @property
    def gpus(self) -> float:
        return sum(node.gpus for node in self.alive)

    def describe(self) -> str:
        alive = self.alive
        return (f"{len(alive)} node{'' if len(alive) == 1 else 's'} alive, {self.gpus:g} GPUs (Ray {self.ray_version}, "
                f"token auth): " + "; ".join(node.describe() for node in alive))

    def public(self) -> dict:
        return {"address": self.address, "ray": self.ray_version, "nodes_alive": len(self.alive), "gpus": self.gpus,
                "nodes": [node.__dict__ for node in self.nodes]}


@dataclass(frozen=True)
class Placement:
    gpus: int          # tensor x pipeline
    nodes: int
    per_node: int      # GPUs each node gives

    def describe(self) -> str:
        return (f"{self.gpus} GPU{'s' if self.gpus != 1 else ''} on {self.nodes} node"
                f"{'s' if self.nodes != 1 else ''} ({self.per_node} each)")


def lane_placement(lane: LaneConfig, gpus_per_node: int) -> Placement:
    """How many GPUs and machines a lane needs: tensor x pipeline GPUs, on NODES machines, or
    as many as that needs at VLLM_CLUSTER_GPUS each."""
    gpus = (lane.settings.get("TENSOR_PARALLEL_SIZE") or 1) * (lane.settings.get("PIPELINE_PARALLEL_SIZE") or 1)
    nodes = lane.settings.get("NODES") or max(1, math.ceil(gpus / max(gpus_per_node, 1)))
    return Placement(gpus, nodes, math.ceil(gpus / nodes))


def fits(placement: Placement, state: ClusterState) -> bool:
    return nodes_that_fit(placement, state) >= placement.nodes


def nodes_that_fit(placement: Placement, state: ClusterState) -> int:
    """Alive nodes with the GPUs one share of the lane needs."""
    return sum(node.gpus >= placement.per_node for node in state.alive)


def cluster_placement(config: LauncherConfig, lane_name: str) -> Placement | None:
    """A lane that runs on the cluster: its placement; None for a lane of this machine alone
    (no cluster configured, or it needs one node)."""
    if config.cluster is None:
        return None
    placement = lane_placement(config.lane(lane_name), config.cluster.gpus)
    return placement if placement.nodes > 1 else None
