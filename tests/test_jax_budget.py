"""SymplecticAdjoint(checkpoint=<int>): a budget of c states, binomial replay.

The budgeted gradient must equal the checkpoint="states" one to rounding (float64,
1e-12 relative) for fixed and adaptive step sizes, under jit and vmap; the forward
outputs must be identical; the schedule must reverse the steps in order N-1, ..., 0
from the right states with the minimal number of replays; and the budget must bound
XLA's temporary memory.
"""

from __future__ import annotations

from functools import cache

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402
from jax_support import Field, relerr  # noqa: E402
from jax_support import make_mlp as make_field  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402
from symplectic_adjoint.adapters._jax_reverse import _budget_sweep  # noqa: E402

pytestmark = pytest.mark.jax


Y0 = jnp.array([0.4, -0.3, 0.8])
ARGS = jnp.asarray(1.2)


def _solve(mlp, y0, args, ts, *, adjoint, solver, controller, dt0, t1=1.0):
    saveat = diffrax.SaveAt(ts=ts) if ts is not None else diffrax.SaveAt(t1=True, steps=True)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(Field(mlp)),
        solver,
        0.0,
        t1,
        dt0,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=64,
    )


@eqx.filter_jit
def value_and_grad(mlp, y0, args, ts, *, adjoint, solver, controller, dt0):
    def loss(diff):
        mlp, y0, args, ts = diff
        sol = _solve(
            mlp, y0, args, ts, adjoint=adjoint, solver=solver, controller=controller, dt0=dt0
        )
        ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
        weights = jnp.arange(1, ys.size + 1, dtype=ys.dtype).reshape(ys.shape) / ys.size
        return jnp.sum(weights * ys**2), (sol.ys, sol.stats["num_accepted_steps"])

    return eqx.filter_value_and_grad(loss, has_aux=True)((mlp, y0, args, ts))


def compare(budgets, **kwargs):
    mlp = make_field()
    (_, (ys_ref, n_ref)), g_ref = value_and_grad(
        mlp, Y0, ARGS, adjoint=SymplecticAdjoint(), **kwargs
    )
    for c in budgets:
        (_, (ys, n)), g = value_and_grad(
            mlp, Y0, ARGS, adjoint=SymplecticAdjoint(checkpoint=c), **kwargs
        )
        assert int(n) == int(n_ref)
        assert bool(jnp.all((ys == ys_ref) | (jnp.isnan(ys) & jnp.isnan(ys_ref)))), c
        assert relerr(g, g_ref) <= 1e-12, (c, relerr(g, g_ref))
    return int(n_ref)


def test_fixed_steps():
    n = compare(
        (1, 2, 3, 5, 20),
        ts=None,
        solver=diffrax.Tsit5(),
        controller=diffrax.ConstantStepSize(),
        dt0=1.0 / 13,
    )
    assert n == 13


def test_adaptive_steps_with_output_times():
    n = compare(
        (1, 3),
        ts=jnp.array([0.1, 0.35, 0.5, 0.77, 1.0]),
        solver=diffrax.Dopri5(),
        controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
        dt0=0.05,
    )
    assert n > 5


def test_vmap_different_step_counts():
    mlp = make_field()
    t1s = jnp.array([0.35, 1.0, 1.7])  # 4, 10 and 17 steps of 0.1

    def grads(adjoint):
        def loss(diff, t1):
            mlp, y0 = diff
            sol = _solve(
                mlp,
                y0,
                ARGS,
                None,
                adjoint=adjoint,
                solver=diffrax.Tsit5(),
                controller=diffrax.ConstantStepSize(),
                dt0=0.1,
                t1=t1,
            )
            ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
            return jnp.sum(ys**2), sol.stats["num_accepted_steps"]

        fn = eqx.filter_grad(loss, has_aux=True)
        vmapped = eqx.filter_vmap(fn, in_axes=((None, 0), 0))
        return eqx.filter_jit(vmapped)((mlp, jnp.stack([Y0, -Y0, 0.5 * Y0])), t1s)

    g_ref, n_ref = grads(SymplecticAdjoint())
    assert len(set(n_ref.tolist())) == 3
    for c in (1, 3):
        g, n = grads(SymplecticAdjoint(checkpoint=c))
        assert (n == n_ref).all()
        assert relerr(g, g_ref) <= 1e-12


@cache
def min_replays(length: int, free: int) -> int:
    """Fewest replayed steps to reverse ``length`` steps from a stored start state with
    ``free`` further slots (the recursion the binomial split attains)."""
    if length == 1:
        return 0
    if free == 0:
        return length * (length - 1) // 2
    return min(
        m + min_replays(m, free) + min_replays(length - m, free - 1) for m in range(1, length)
    )


# A sweep whose states are their own step indices (y_n = n: a replay adds 1), whose
# reverse step writes (n, y_n) into the next row of `seen`.
def _replay(n, y):
    return y + 1.0


def _step_adjoint(n, y, k, seen, unused, active):
    # The protocol: the old carry where `active` is false (a row of a vmapped sweep
    # that reverses nothing this round).
    new = (k + 1, seen.at[k].set(jnp.stack([n.astype(y.dtype), y])), unused)
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, (k, seen, unused))


def _empty_carry():
    return jnp.asarray(0), jnp.full((40, 2), -1.0), jnp.asarray(0.0)


def _check_order(n, count, seen):
    # Steps N-1, ..., 0, each from its own state.
    assert int(count) == n
    expected = jnp.arange(n - 1, -1, -1, dtype=seen.dtype)
    assert (seen[:n, 0] == expected).all() and (seen[:n, 1] == expected).all()


@pytest.mark.parametrize("budget", [1, 2, 3, 6])
def test_schedule_order_states_and_replays(budget):
    """With y_n = n (replay adds 1), every reverse step must see its own index as state,
    the steps must come in order N-1, ..., 0, and the replay count must be minimal."""

    def sweep(num_steps):
        return _budget_sweep(
            budget, jnp.asarray(0.0), num_steps, _replay, _step_adjoint, _empty_carry()
        )

    def check(n, count, seen, replayed):
        _check_order(n, count, seen)
        if n:
            assert int(replayed) == min_replays(n, budget - 1), (n, int(replayed))

    lengths = (0, 1, 2, 7, 23, 40)
    for n in lengths:
        (count, seen, _), replayed = jax.jit(sweep)(jnp.asarray(n))
        check(n, count, seen, replayed)
    # Under vmap every row has its own length (an adaptive solve's N) and schedule; the
    # loop runs until the longest is done, and the others must not move meanwhile.
    (count, seen, _), replayed = jax.jit(jax.vmap(sweep))(jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        check(n, count[row], seen[row], replayed[row])


def doubling_layout(n: int, c: int) -> tuple[set, int]:
    """The states the forward pass keeps after ``n`` steps with ``c`` slots, and the
    stride: multiples of a stride that doubles (odd multiples dropped) when all ``c``
    slots are full; ``c = 1`` keeps ``y_0`` alone."""
    kept, stride = {0}, 1 if c > 1 else n + 1
    for m in range(1, n + 1):
        if m % stride:
            continue
        if len(kept) == c:
            kept, stride = {p for p in kept if p % (2 * stride) == 0}, 2 * stride
            if m % stride:
                continue
        kept.add(m)
    return kept, stride


def plan_replays(n: int, c: int, kept: set, stride: int) -> int:
    """The fewer replays of the two plans: segments between the kept states (the k-th
    with c - 1 - k free slots), or from y_0 alone."""
    starts = sorted(p for p in kept if p < n)
    segments = sum(min_replays(min(a + stride, n) - a, c - 1 - k) for k, a in enumerate(starts))
    return min(segments, min_replays(n, c - 1))


@pytest.mark.parametrize("budget", [1, 2, 3, 6])
def test_forward_keeps_multiples_of_a_doubling_stride(budget):
    """The recording loop's slot rule, step by step against the reference layout: every
    multiple of the stride up to the last step is held, nothing else, in at most
    ``budget`` slots, each slot holding the state its position names."""
    from symplectic_adjoint.adapters._jax_record import Record, _keep_budgeted

    def put(buf, i, x, pred):
        return buf.at[i].set(jnp.where(pred, x, buf[i]))

    def run(n):
        zeros = jnp.zeros(1)
        rec = Record(
            ys=jnp.zeros(budget).at[0].set(0.0), tprev=zeros, tnext=zeros, save_before=zeros,
            save_after=zeros, ts_before=zeros, ts_after=zeros, ks=None,
            pos=jnp.full(budget, -1, jnp.int32).at[0].set(0),
            stride=jnp.asarray(1 if budget > 1 else 10**6, jnp.int32),
        )  # fmt: skip

        def body(m, rec):
            # Every other attempt is rejected: it must leave no trace.
            rec = _keep_budgeted(rec, m, -jnp.asarray(m, jnp.float64), False, put)
            return _keep_budgeted(rec, m, jnp.asarray(m, jnp.float64), True, put)

        return jax.lax.fori_loop(1, n + 1, body, rec)

    for n in (0, 1, 5, 6, 7, 12, 13, 31, 40):
        rec = jax.jit(run, static_argnums=0)(n)
        pos = [int(p) for p in rec.pos]
        kept, stride = doubling_layout(n, budget)
        assert {p for p in pos if p >= 0} == kept, (n, pos, kept)
        if budget > 1:
            assert int(rec.stride) == stride
        assert all(float(y) == p for y, p in zip(rec.ys, pos, strict=True) if p >= 0)


@pytest.mark.parametrize("budget", [2, 3, 6])
def test_schedule_from_forward_checkpoints(budget):
    """From the states the forward pass kept, the sweep reverses N-1, ..., 0 from the
    right states, with the replays of the cheaper of its two plans (the segments
    between the kept states, or y_0 alone); also under vmap, one layout per row."""

    def layout(n):
        kept, stride = doubling_layout(n, budget)
        pos = sorted(kept) + [-1] * (budget - len(kept))
        slots = jnp.asarray([max(p, 0) for p in pos], jnp.float64)
        return slots, jnp.asarray(pos, jnp.int32), jnp.asarray(stride, jnp.int32)

    def sweep(num_steps, stored):
        return _budget_sweep(
            budget, stored[0][0], num_steps, _replay, _step_adjoint, _empty_carry(),
            stored=stored,
        )  # fmt: skip

    # With 2 slots, 30 steps replay fewer from y_0 alone (126) than from the kept y_0,
    # y_16 (136): both plans are exercised.
    lengths = (0, 1, 2, 7, 13, 23, 30, 40)
    outs = []
    for n in lengths:
        outs.append((n, jax.jit(sweep)(jnp.asarray(n), layout(n))))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[layout(n) for n in lengths])
    rows = jax.jit(jax.vmap(sweep))(jnp.asarray(lengths), stacked)
    outs += [(n, jax.tree.map(lambda x, r=r: x[r], rows)) for r, n in enumerate(lengths)]
    for n, ((count, seen, _), replayed) in outs:
        _check_order(n, count, seen)
        if n:
            kept, stride = doubling_layout(n, budget)
            assert int(replayed) == plan_replays(n, budget, kept, stride), (n, int(replayed))


def test_budget_bounds_memory():
    """At 200 steps of a 64x64 state the budget's temporaries are far below one state
    per step."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    weight = 0.1 * jax.random.normal(key1, (64, 64))
    y0 = jax.random.normal(key2, (64, 64))
    term = diffrax.ODETerm(lambda t, y, w: jnp.tanh(y @ w))

    def temp_bytes(adjoint):
        def loss(w, y0):
            sol = diffrax.diffeqsolve(
                term,
                diffrax.Tsit5(),
                0.0,
                1.0,
                1.0 / 200,
                y0,
                args=w,
                adjoint=adjoint,
                max_steps=200,
            )
            return jnp.sum(sol.ys**2)

        compiled = jax.jit(jax.grad(loss)).lower(weight, y0).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    states = temp_bytes(SymplecticAdjoint())
    budget = temp_bytes(SymplecticAdjoint(checkpoint=4))
    state_bytes = 64 * 64 * 8
    assert states >= 200 * state_bytes
    assert budget < states / 4, (budget, states)
