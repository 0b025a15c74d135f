"""Checkpoint schedules: every step's adjoint sees the right state, the binomial count
is met, and the budget holds at every moment. States are simulated by their step index.

Budget: ``c`` checkpoints stored besides the working state (the latest state of the
forward pass, or the state the reverse pass has just restored or replayed).
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest

from symplectic_adjoint.core.checkpointing import (
    Advance,
    OfflineCheckpointer,
    OnlineCheckpointer,
    Restore,
    Reverse,
    Schedule,
    binomial_forward_steps,
    binomial_split,
    execute,
    offline_replays,
    offline_schedule,
    reverse_replays,
    segment_replays,
    segment_replays_traced,
    store_all_schedule,
    validate_checkpoint,
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


def forward_offers(checkpointer, n, c):
    """Offer ``y_0 .. y_{n-1}``; at every moment at most ``c`` states are stored besides
    the latest one. Returns the stored states."""
    stored: dict[int, int] = {}
    for m in range(n):
        store, dropped = checkpointer.keep(m)
        for d in dropped:
            del stored[d]
        if store:
            stored[m] = m
        assert len(stored.keys() - {m}) <= c, (m, sorted(stored))
    return stored


def _reverse_within_budget(schedule, stored, c):
    """Run the plan by hand: each step reversed from its own state, in order n-1..0, at
    most ``c`` states stored besides the working one after every action, nothing left
    stored at the end. Returns the replays."""
    assert set(schedule.forward_store) == set(stored)
    order, replays, work = [], 0, None
    for a in schedule.actions:
        if isinstance(a, Restore):
            work = stored.pop(a.n) if a.free else stored[a.n]
        elif isinstance(a, Advance):
            assert work == a.n, (a, work)
            work, replays = a.n + 1, replays + 1
            if a.store:
                stored[a.n + 1] = work
        else:
            assert work == a.n, (a, work)
            order.append(a.n)
        assert len(stored.keys() - {work}) <= c, (a, sorted(stored), work)
    assert order == list(reversed(range(schedule.n))) and not stored
    return replays


# --------------------------------------------------------------------- validation
@pytest.mark.parametrize("good", ["states", "stages", 1, 30])
def test_validate_checkpoint_accepts_the_modes_and_budgets(good):
    assert validate_checkpoint(good, where="odeint(checkpoint=...)") == good


def test_validate_checkpoint_normalises_numpy_integers():
    np = pytest.importorskip("numpy")
    value = validate_checkpoint(np.int64(4), where="odeint(checkpoint=...)")
    assert value == 4 and type(value) is int


@pytest.mark.parametrize("bad", ["state", "all", 0, -2, 2.0, True, False, None, [3]])
@pytest.mark.parametrize("where", ["odeint(checkpoint=...)", "SymplecticAdjoint(checkpoint=...)"])
def test_validate_checkpoint_names_value_place_and_options(bad, where):
    with pytest.raises(ValueError) as info:
        validate_checkpoint(bad, where=where)
    message = str(info.value)
    assert message.startswith(where) and f"checkpoint={bad!r}" in message
    # What the adapters' tests match (tests/test_jax_errors.py, tests/test_torch_api.py).
    for pattern in ("'states'.*'stages'.*int >= 1", "budget"):
        assert pytest.raises(ValueError, validate_checkpoint, bad, where=where).match(pattern)


# ------------------------------------------------------------- counts and the split
@cache
def _recursion(length: int, free: int) -> int:
    """T(l, f) = min_m [m + T(m, f) + T(l - m, f - 1)], T(1, f) = 0, T(l, 0) = l(l-1)/2:
    the task stack below, by brute force."""
    if length <= 1:
        return 0
    if free == 0:
        return length * (length - 1) // 2
    return min(m + _recursion(m, free) + _recursion(length - m, free - 1) for m in range(1, length))


SPLIT_CASES = [(length, free) for length in range(2, 200) for free in range(1, 7)]


def test_binomial_forward_steps_known_values():
    # n = 10, c = 3: r = 2 (C(5, 3) = 10), 2 * 10 - C(5, 4) = 15; c = 1 is quadratic.
    assert binomial_forward_steps(10, 3) == 15
    assert binomial_forward_steps(6, 1) == 15
    assert binomial_forward_steps(4, 4) == 3
    # c = 10, the fixed-grid cases of issue 16: r = 5.
    assert binomial_forward_steps(2559, 10) == 11430
    assert binomial_forward_steps(5119, 10) == 26346


def test_segment_replays_is_the_recursion_and_the_closed_form():
    for length, free in itertools.product(range(0, 200), range(0, 7)):
        assert segment_replays(length, free) == _recursion(length, free), (length, free)
        if length >= 1:
            assert segment_replays(length, free) == binomial_forward_steps(length, free + 1)
    # c = 2 takes the square-root path for r: check it far out against c = 3's loop.
    for n in (1, 2, 3, 6, 7, 10**6, 10**6 + 1, 123_456_789):
        r = 0
        while (r + 1) * (r + 2) // 2 < n:
            r += 1
        assert binomial_forward_steps(n, 2) == r * n - (r + 2) * (r + 1) * r // 6


def test_binomial_split_attains_the_minimum_for_every_short_segment():
    for length, free in SPLIT_CASES:
        m = binomial_split(length, free)
        assert 1 <= m <= length - 1, (length, free, m)
        cost = m + _recursion(m, free) + _recursion(length - m, free - 1)
        assert cost == _recursion(length, free), (length, free, m)


def _task_stack(length: int, free: int):
    """The JAX adapter's budget sweep (``adapters/_jax_reverse.py``) in plain Python:
    tasks ``(a, b, f)``, ``y_a`` in a slot, ``f`` slots free. Returns (order, replays,
    the most slots held)."""
    stack, slots = [(0, length, free)], {0}
    order, replays, peak = [], 0, 1
    while stack:
        a, b, f = stack.pop()
        if b - a == 1:  # leaf: reverse a from its slot, free the slot
            order.append(a)
            slots.remove(a)
        elif f == 0:  # tail: replay a -> b-1, reverse b-1
            replays += b - 1 - a
            order.append(b - 1)
            stack.append((a, b - 1, 0))
        else:  # split: replay a -> m, store y_m; the right part goes first
            m = a + binomial_split(b - a, f)
            replays += m - a
            slots.add(m)
            stack += [(a, m, f), (m, b, f - 1)]
        peak = max(peak, len(slots))
    return order, replays, peak


def test_task_stack_of_the_split_is_optimal_and_within_budget():
    for length, free in [(length, 0) for length in range(1, 200)] + SPLIT_CASES:
        order, replays, peak = _task_stack(length, free)
        assert order == list(reversed(range(length)))
        assert replays == _recursion(length, free) == segment_replays(length, free)
        assert peak <= free + 1, (length, free, peak)


def test_binomial_split_under_jax_jit_gives_the_same_integers():
    jax = pytest.importorskip("jax")
    jnp, lax = jax.numpy, jax.lax

    @jax.jit
    @jax.vmap
    def split(length, free):
        return binomial_split(length, free, while_loop=lax.while_loop, minimum=jnp.minimum)

    lengths = jnp.asarray([length for length, _ in SPLIT_CASES], jnp.int32)
    frees = jnp.asarray([free for _, free in SPLIT_CASES], jnp.int32)
    got = split(lengths, frees)
    assert got.dtype == jnp.int32
    assert got.tolist() == [binomial_split(length, free) for length, free in SPLIT_CASES]


def test_traced_segment_replays_is_the_recursion_in_python_and_under_jax_jit():
    # Every length/free pair, the edge cases (length 0/1, free 0) included, against the
    # recursion itself; then the same integers from traced int32 arrays.
    cases = [(length, free) for length in range(0, 60) for free in range(0, 8)]
    python = [
        segment_replays_traced(
            length, free, while_loop=_python_loop,
            where=lambda p, a, b: a if p else b, maximum=max,
        )
        for length, free in cases
    ]  # fmt: skip
    assert python == [_recursion(length, free) for length, free in cases]
    jax = pytest.importorskip("jax")
    jnp, lax = jax.numpy, jax.lax

    @jax.jit
    @jax.vmap
    def traced(length, free):
        return segment_replays_traced(
            length, free, while_loop=lax.while_loop, where=jnp.where, maximum=jnp.maximum
        )

    got = traced(*(jnp.asarray(col, jnp.int32) for col in zip(*cases, strict=True)))
    assert got.dtype == jnp.int32 and got.tolist() == python


def _python_loop(cond, body, value):
    while cond(value):
        value = body(value)
    return value


@pytest.mark.parametrize(("length", "free"), [(1, 1), (0, 3), (5, 0), (2, -1)])
def test_binomial_split_refuses_a_segment_it_cannot_split(length, free):
    with pytest.raises(ValueError, match="length >= 2 and free >= 1"):
        binomial_split(length, free)


# ------------------------------------------------------------------ offline plans
@pytest.mark.parametrize(("n", "c"), GRID)
def test_offline_schedule_reverses_every_step_with_its_own_state(n, c):
    schedule = offline_schedule(n, c)
    order, _ = _run(schedule, {i: i for i in schedule.forward_store})
    assert order == list(reversed(range(n)))


@pytest.mark.parametrize(("n", "c"), GRID)
def test_offline_schedule_meets_the_binomial_minimum(n, c):
    # Forward steps besides each adjoint's own recomputation: the sweep's first n - 1
    # steps plus every replay equal r n - C(c + r, c + 1).
    schedule = offline_schedule(n, c)
    _, replays = _run(schedule, {i: i for i in schedule.forward_store})
    assert (n - 1) + replays == binomial_forward_steps(n, c)
    assert replays == schedule.recomputed_steps == offline_replays(n, c)


@pytest.mark.parametrize(("n", "c"), GRID)
def test_offline_schedule_keeps_at_most_c_states_besides_the_working_one(n, c):
    schedule = offline_schedule(n, c)
    assert schedule.max_stored <= c + 1
    stored = {i: i for i in schedule.forward_store}
    assert len(stored.keys() - {n - 1}) <= c  # y_{n-1}: the sweep's working state
    _reverse_within_budget(schedule, stored, c)


def test_budget_of_one_recomputes_from_the_initial_state():
    schedule = offline_schedule(6, 1)
    assert schedule.forward_store == (0, 5) and schedule.recomputed_steps == 15 - 5


def test_store_all_schedule_replays_nothing():
    schedule = store_all_schedule(7)
    order, replays = _run(schedule, {i: i for i in range(7)})
    assert replays == 0 and order == list(range(6, -1, -1))
    assert not any(isinstance(a, Advance) for a in schedule.actions)


def test_actions_are_the_documented_kinds():
    kinds = {type(a) for a in offline_schedule(20, 3).actions}
    assert kinds <= {Restore, Advance, Reverse}


# ------------------------------------------------------------------- lazy actions
@pytest.mark.parametrize(
    "make", [lambda: offline_schedule(50, 4), lambda: store_all_schedule(9), lambda: _online(60, 3)]
)
def test_actions_are_generated_lazily_and_can_be_iterated_again(make):
    schedule = make()
    assert not isinstance(schedule.actions, (tuple, list))
    first, second = list(schedule.actions), list(schedule.actions)
    assert first == second and first
    assert schedule.recomputed_steps == schedule.recomputed_steps


def test_a_schedule_of_a_billion_steps_starts_at_once():
    # Materialising it would take O(n log n) actions; the first ones come from O(c) state.
    schedule = offline_schedule(10**9, 10)
    assert len(schedule.forward_store) <= 11 and schedule.forward_store[-1] == 10**9 - 1
    head = list(itertools.islice(schedule.actions, 4))
    assert head[:2] == [Restore(10**9 - 1, True), Reverse(10**9 - 1)]


# ------------------------------------------------------------------- checkpointers
def _online(n, c):
    online = OnlineCheckpointer(c)
    for m in range(n):
        online.keep(m)
    return online.schedule(n)


@pytest.mark.parametrize(("n", "c"), GRID)
def test_offline_checkpointer_stores_what_the_offline_schedule_needs(n, c):
    checkpointer = OfflineCheckpointer(n, c)
    stored = forward_offers(checkpointer, n, c)
    schedule = checkpointer.schedule(n)
    assert schedule.forward_store == offline_schedule(n, c).forward_store
    assert _reverse_within_budget(schedule, stored, c) == offline_replays(n, c)


@pytest.mark.parametrize(("n", "c"), [(40, 3), (100, 5), (17, 2), (30, 1)])
def test_offline_checkpointer_reverses_a_solve_that_stopped_early(n, c):
    for stop in range(1, n):
        checkpointer = OfflineCheckpointer(n, c)
        stored = forward_offers(checkpointer, stop, c)
        schedule = checkpointer.schedule(stop)
        replays = _reverse_within_budget(schedule, stored, c)
        kept = sorted(i for i in schedule.forward_store if i < stop - 1) or [0]
        if stop - 1 in schedule.forward_store:
            assert replays == reverse_replays(kept, stop, c)


@pytest.mark.parametrize(("n", "c"), GRID + [(n, c) for n in range(1, 80) for c in (2, 3, 4)])
def test_online_checkpointer_never_exceeds_the_budget(n, c):
    online = OnlineCheckpointer(c)
    stored = forward_offers(online, n, c)
    assert set(online.kept) <= set(stored) and online.kept[0] == 0
    schedule = online.schedule(n)
    replays = _reverse_within_budget(schedule, stored, c)
    assert replays == reverse_replays(online.kept, n, c)
    assert schedule.max_stored <= c + 1


def test_online_schedule_stays_close_to_offline():
    assert _online(1000, 10).recomputed_steps <= 1.5 * offline_replays(1000, 10)


def test_online_schedule_replays_nothing_while_the_budget_holds_every_state():
    for c in (1, 2, 5, 10):
        for n in range(1, c + 2):
            assert _online(n, c).recomputed_steps == 0 == offline_replays(n, c)


def test_checkpointers_take_the_steps_in_order_and_the_count_offered():
    for checkpointer in (OnlineCheckpointer(3), OfflineCheckpointer(10, 3)):
        checkpointer.keep(0)
        with pytest.raises(ValueError, match="in order: expected 1, got 2"):
            checkpointer.keep(2)
        with pytest.raises(ValueError, match=r"schedule\(5\) after keep\(\) was called for 1"):
            checkpointer.schedule(5)
    offline = OfflineCheckpointer(2, 3)
    offline.keep(0), offline.keep(1)
    with pytest.raises(ValueError, match="beyond the 2 steps"):
        offline.keep(2)


def test_no_steps_no_actions():
    for schedule in (OnlineCheckpointer(2).schedule(0), OfflineCheckpointer(0, 2).schedule(0)):
        assert isinstance(schedule, Schedule) and list(schedule.actions) == []


def test_reverse_replays_refuses_impossible_checkpoints():
    for kept, n, c in [
        ([], 5, 2),
        ([1], 5, 2),
        ([0, 5], 5, 2),
        ([0, 1, 2], 5, 2),
        ([0, 2, 2], 5, 3),
    ]:
        with pytest.raises(ValueError, match="kept"):
            reverse_replays(kept, n, c)


@pytest.mark.parametrize("c", [0, -1])
def test_budget_below_one_is_refused(c):
    with pytest.raises(ValueError, match="at least one state"):
        offline_schedule(5, c)
    with pytest.raises(ValueError, match="at least one state"):
        OnlineCheckpointer(c)
    with pytest.raises(ValueError, match="at least one state"):
        OfflineCheckpointer(5, c)
