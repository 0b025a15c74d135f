"""Checkpoint schedules: which step states to keep, which steps to recompute.

The adjoint of step ``n`` needs only the state ``y_n`` (the stages are recomputed from
it), so any checkpointing schedule composes with the symplectic adjoint. This module
plans the reverse pass as a list of small actions that an adapter executes:

* :class:`Restore` ``(n, free)``: make the stored ``y_n`` the working state (and drop the
  stored copy when ``free``);
* :class:`Advance` ``(n, store)``: replay step ``n`` (recorded step size, never the
  controller) to get ``y_{n+1}``; keep a stored copy when ``store``;
* :class:`Reverse` ``(n)``: run the adjoint of step ``n`` from the working ``y_n``.

Two planners:

* :func:`offline_schedule` for a known number of steps ``n`` and ``c`` stored states:
  the optimal binomial (revolve) schedule from ``checkpoint_schedules``'
  ``MultistageCheckpointSchedule``. With ``r`` the least integer with
  ``C(c + r, c) >= n``, the forward steps it takes besides the one recomputation each
  step's adjoint always does (the initial sweep's first ``n - 1`` steps plus every
  replay) number ``r n - C(c + r, c + 1)``, the Griewank--Walther minimum.
* :class:`OnlineCheckpointer` for adaptive solves, whose step count is unknown until the
  forward pass ends: during the forward pass it keeps every ``stride``-th state and
  doubles the stride (dropping every other kept state) whenever the budget is full; the
  reverse pass then runs an offline schedule on each segment between kept states with
  the slots that are free at that time.

``c`` counts every stored state, ``y_0`` included; the working state is not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from math import comb
from typing import Any

__all__ = [
    "Restore",
    "Advance",
    "Reverse",
    "Schedule",
    "offline_schedule",
    "store_all_schedule",
    "OnlineCheckpointer",
    "binomial_forward_steps",
    "execute",
]


@dataclasses.dataclass(frozen=True)
class Restore:
    n: int
    free: bool


@dataclasses.dataclass(frozen=True)
class Advance:
    n: int
    store: bool


@dataclasses.dataclass(frozen=True)
class Reverse:
    n: int


Action = Restore | Advance | Reverse


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A complete plan for ``n`` steps.

    Attributes:
        n: number of steps.
        forward_store: indices of the states the forward sweep stores (always has 0).
        actions: the reverse-pass actions, in order.
    """

    n: int
    forward_store: tuple[int, ...]
    actions: tuple[Action, ...]

    @property
    def recomputed_steps(self) -> int:
        """Steps replayed during the reverse pass (beyond the forward sweep)."""
        return sum(isinstance(a, Advance) for a in self.actions)

    @property
    def max_stored(self) -> int:
        """The largest number of states held in storage at any time."""
        held = set(self.forward_store)
        peak = len(held)
        for a in self.actions:
            if isinstance(a, Restore) and a.free:
                held.discard(a.n)
            elif isinstance(a, Advance) and a.store:
                held.add(a.n + 1)
            peak = max(peak, len(held))
        return peak


def binomial_forward_steps(n: int, c: int) -> int:
    """Griewank--Walther minimum ``r n - C(c + r, c + 1)`` (``r`` least: ``C(c+r, c) >= n``)."""
    if n < 1 or c < 1:
        raise ValueError("need at least one step and one checkpoint")
    r = 0
    while comb(c + r, c) < n:
        r += 1
    return r * n - comb(c + r, c + 1)


def store_all_schedule(n: int) -> Schedule:
    """Store every state; reverse without any recomputation (the default mode)."""
    return Schedule(
        n=n,
        forward_store=tuple(range(n)),
        actions=tuple(a for m in reversed(range(n)) for a in (Restore(m, True), Reverse(m))),
    )


def offline_schedule(n: int, c: int) -> Schedule:
    """Optimal binomial schedule for ``n`` steps keeping at most ``c`` states.

    Translates ``checkpoint_schedules.MultistageCheckpointSchedule(n, 0, c)``: its
    "adjoint dependency" of step ``m`` is, for the symplectic adjoint, just ``y_m``, so a
    ``Forward`` that writes adjoint dependencies for the single step ``m -> m + 1``
    becomes "keep ``y_m`` as the working state" and is not executed.
    """
    if c < 1:
        raise ValueError(f"a checkpoint budget must keep at least one state (got {c})")
    if n < 1:
        return Schedule(n=max(n, 0), forward_store=(0,), actions=())
    if c >= n:
        return store_all_schedule(n)
    import checkpoint_schedules as cs  # type: ignore[import-untyped]

    forward_store: list[int] = []
    actions: list[Action] = []
    in_forward = True
    work = 0  # index of the state currently in the working slot
    carried = None  # working state handed from the forward sweep to the reverse pass
    for op in cs.MultistageCheckpointSchedule(n, 0, c):
        if isinstance(op, cs.EndReverse):
            break
        if isinstance(op, cs.EndForward):
            in_forward, carried = False, work
        elif isinstance(op, cs.Forward):
            if op.write_adj_deps and op.n1 - op.n0 != 1:  # pragma: no cover - never seen
                raise RuntimeError(f"unexpected multi-step taping {op!r}")
            last = op.n1 - 1 if op.write_adj_deps else op.n1
            if op.write_ics:
                if in_forward:
                    forward_store.append(op.n0)
                else:
                    actions[-1] = _storing(actions[-1] if actions else None, op.n0)
            if not in_forward:
                actions.extend(Advance(m, False) for m in range(op.n0, last))
            work = last
        elif isinstance(op, cs.Reverse):
            if op.n0 != work or op.n1 != work + 1:  # pragma: no cover - schedule invariant
                raise RuntimeError(f"reverse of a step whose state is not at hand: {op!r}")
            actions.append(Reverse(work))
        elif isinstance(op, (cs.Copy, cs.Move)):
            actions.append(Restore(op.n, isinstance(op, cs.Move)))
            work = op.n
        else:  # pragma: no cover - MultistageCheckpointSchedule emits nothing else
            raise RuntimeError(f"unsupported checkpoint action {op!r}")
    # The sweep's last state is reversed first, straight from the forward pass: the
    # adapter keeps it beside the checkpoints (the working state, not counted in c).
    assert carried is not None  # the schedule always ends its forward phase
    if carried in forward_store:
        actions.insert(0, Restore(carried, False))
    else:
        forward_store.append(carried)
        actions.insert(0, Restore(carried, True))
    return Schedule(n=n, forward_store=tuple(sorted(forward_store)), actions=tuple(actions))


def _storing(prev: Action | None, m: int) -> Action:
    """The action that produced the working state ``y_m``, changed to also keep it."""
    if isinstance(prev, Advance) and prev.n + 1 == m:
        return Advance(prev.n, True)
    if isinstance(prev, Restore) and prev.n == m:
        return Restore(m, False)
    raise RuntimeError(f"cannot store y_{m} after {prev!r}")  # pragma: no cover


class OnlineCheckpointer:
    """Budgeted checkpointing for a forward pass of unknown length.

    Call :meth:`keep` with each new step index ``m`` (the state ``y_m`` just computed,
    ``m = 0`` first); it says whether to store ``y_m`` and which stored indices to drop.
    After the last step call :meth:`schedule` with the number of steps ``n``.

    The kept states are the multiples of a stride that doubles whenever the budget
    ``c`` would be exceeded, so after ``n`` steps at least ``c // 2`` evenly spaced
    states are held and the forward pass never holds more than ``c``.
    """

    def __init__(self, c: int) -> None:
        if c < 1:
            raise ValueError(f"a checkpoint budget must keep at least one state (got {c})")
        self.c = c
        self.stride = 1
        self.kept: list[int] = []

    def keep(self, m: int) -> tuple[bool, list[int]]:
        if m % self.stride:
            return False, []
        dropped: list[int] = []
        while len(self.kept) >= self.c:
            self.stride *= 2
            dropped += [i for i in self.kept if i % self.stride]
            self.kept = [i for i in self.kept if i % self.stride == 0]
            if m % self.stride:
                return False, dropped
        self.kept.append(m)
        return True, dropped

    def schedule(self, n: int) -> Schedule:
        """Reverse plan: each segment between kept states, last first, gets an offline
        schedule with the slots not held by earlier segments' start states."""
        kept = [i for i in self.kept if i < n]
        bounds = [*kept, n]
        actions: list[Action] = []
        for k in reversed(range(len(kept))):
            start, length = bounds[k], bounds[k + 1] - bounds[k]
            # States 0..k-1 stay held for the earlier segments; the rest are free.
            sub = offline_schedule(length, self.c - k)
            # Replay the sub-schedule's forward sweep from the stored segment start,
            # storing what it would store; its first action restores the last state.
            actions.append(Restore(start, False))
            for j in range(length - 1):
                actions.append(Advance(start + j, (j + 1) in sub.forward_store))
            actions.extend(dataclasses.replace(a, n=a.n + start) for a in sub.actions)
            if 0 not in _freed(sub.actions):
                actions.append(Restore(start, True))  # drop the segment's start
        return Schedule(n=n, forward_store=tuple(kept), actions=tuple(actions))


def _freed(actions: Iterable[Action]) -> set[int]:
    return {a.n for a in actions if isinstance(a, Restore) and a.free}


def execute(
    schedule: Schedule,
    stored: dict[int, Any],
    *,
    advance: Callable[[int, Any], Any],
    reverse: Callable[[int, Any], None],
) -> int:
    """Run a reverse plan.

    Arguments:
        schedule: the plan.
        stored: the states the forward sweep stored, by step index (mutated: replays
            add to it, freeing restores remove from it).
        advance: ``advance(m, y_m) -> y_{m+1}`` replays step ``m`` with its recorded size.
        reverse: ``reverse(m, y_m)`` runs the adjoint of step ``m``.

    Returns the number of replayed steps.
    """
    work: Any = None
    replays = 0
    for a in schedule.actions:
        if isinstance(a, Restore):
            work = stored.pop(a.n) if a.free else stored[a.n]
        elif isinstance(a, Advance):
            work = advance(a.n, work)
            replays += 1
            if a.store:
                stored[a.n + 1] = work
        else:
            reverse(a.n, work)
            work = None
    return replays
