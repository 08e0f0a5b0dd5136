"""For the pure scheduler's tests: the actions a call returned, picked by kind, and a lane
brought up."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from vllm_launcher.scheduler import Action, LaneState, Scheduler, StartEngine

A = TypeVar("A", bound=Action)


def of(actions: Iterable[Action], kind: type[A]) -> list[A]:
    """The actions of one kind (Dispatch, StartEngine ...), in the order the scheduler gave them."""
    return [action for action in actions if isinstance(action, kind)]


def bring_up(s: Scheduler, lane: str, now: float) -> None:
    """Make ``lane`` READY (nothing else loaded), checking the actions on the way."""
    acts = s.load(lane, now)
    assert StartEngine(lane, 1) in acts
    s.engine_ready(lane, now)
    assert s.state(lane) is LaneState.READY
