"""For the pure scheduler's tests: the actions a call returned, picked by kind."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from vllm_launcher.scheduler import Action

A = TypeVar("A", bound=Action)


def of(actions: Iterable[Action], kind: type[A]) -> list[A]:
    """The actions of one kind (Dispatch, StartEngine ...), in the order the scheduler gave them."""
    return [action for action in actions if isinstance(action, kind)]
