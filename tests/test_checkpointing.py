"""Checkpoint schedules: every step's adjoint sees the right state, the binomial count
is met, and the budget holds. States are simulated by their step index."""

from __future__ import annotations

import pytest

from symplectic_adjoint.core.checkpointing import (
    Advance,
    OnlineCheckpointer,
    Restore,
    Reverse,
    binomial_forward_steps,
    execute,
    offline_schedule,
    store_all_schedule,
)

GRID = [(n, c) for n in (1, 2, 3, 5, 10, 17, 40, 100) for c in (1, 2, 3, 5, 10, 30)]


def _run(schedule, stored):
    """Execute with integer 'states'; return (reversed order, replays)."""
    order: list[int] = []

    def advance(m, y):
        assert y == m, f"step {m} replayed from the state of step {y}"
        return m + 1

    def reverse(m, y):
        assert y == m, f"adjoint of step {m} given the state of step {y}"
        order.append(m)

    replays = execute(schedule, stored, advance=advance, reverse=reverse)
    return order, replays


@pytest.mark.parametrize(("n", "c"), GRID)
def test_offline_schedule_reverses_every_step_with_its_own_state(n, c):
    schedule = offline_schedule(n, c)
    order, _ = _run(schedule, {i: i for i in schedule.forward_store})
    assert order == list(reversed(range(n)))


@pytest.mark.parametrize(("n", "c"), [g for g in GRID if g[1] < g[0]])
def test_offline_schedule_meets_the_binomial_minimum(n, c):
    # Forward steps besides each adjoint's own recomputation: the sweep's first n - 1
    # steps plus every replay equal r n - C(c + r, c + 1).
    schedule = offline_schedule(n, c)
    _, replays = _run(schedule, {i: i for i in schedule.forward_store})
    assert (n - 1) + replays == binomial_forward_steps(n, c)
    assert replays == schedule.recomputed_steps


def test_binomial_forward_steps_known_values():
    # n = 10, c = 3: r = 2 (C(5, 3) = 10), 2 * 10 - C(5, 4) = 15; c = 1 is quadratic.
    assert binomial_forward_steps(10, 3) == 15
    assert binomial_forward_steps(6, 1) == 15
    assert binomial_forward_steps(4, 4) == 3


@pytest.mark.parametrize(("n", "c"), GRID)
def test_offline_schedule_keeps_at_most_c_states_besides_the_working_one(n, c):
    assert offline_schedule(n, c).max_stored <= c + 1


def test_budget_of_one_recomputes_from_the_initial_state():
    schedule = offline_schedule(6, 1)
    assert schedule.forward_store == (0, 5) and schedule.recomputed_steps == 15 - 5


def test_store_all_schedule_replays_nothing():
    schedule = store_all_schedule(7)
    order, replays = _run(schedule, {i: i for i in range(7)})
    assert replays == 0 and order == list(range(6, -1, -1))
    assert not any(isinstance(a, Advance) for a in schedule.actions)


@pytest.mark.parametrize(("n", "c"), GRID)
def test_online_checkpointer_never_exceeds_the_budget(n, c):
    online = OnlineCheckpointer(c)
    held: set[int] = set()
    for m in range(n):
        store, dropped = online.keep(m)
        held -= set(dropped)
        if store:
            held.add(m)
        assert len(held) <= c
    schedule = online.schedule(n)
    assert set(schedule.forward_store) == held and 0 in held
    order, _ = _run(schedule, {i: i for i in held})
    assert order == list(reversed(range(n)))
    assert schedule.max_stored <= c + 1


def test_online_schedule_stays_close_to_offline():
    online = OnlineCheckpointer(10)
    for m in range(1000):
        online.keep(m)
    offline = offline_schedule(1000, 10)
    assert online.schedule(1000).recomputed_steps <= 1.5 * offline.recomputed_steps


def test_actions_are_the_documented_kinds():
    kinds = {type(a) for a in offline_schedule(20, 3).actions}
    assert kinds <= {Restore, Advance, Reverse}


@pytest.mark.parametrize("c", [0, -1])
def test_budget_below_one_is_refused(c):
    with pytest.raises(ValueError, match="at least one state"):
        offline_schedule(5, c)
    with pytest.raises(ValueError, match="at least one state"):
        OnlineCheckpointer(c)
