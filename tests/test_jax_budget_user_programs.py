"""Checkpoint budgets (``SymplecticAdjoint(checkpoint=c)``) in programs a diffrax user
would write, against ``checkpoint="states"`` and ``RecursiveCheckpointAdjoint``.

The forward pass keeps up to ``c`` states at multiples of a doubling stride and the
reverse sweep starts from the segments between them (or from ``y_0`` alone): these
programs put the step count ``N`` where that layout changes (``N = c, 2c, c 2^k +- 1``,
``N = 0, 1``, ``N = max_steps`` with ``throw=False``), give every ``vmap`` row its own
``N``, reject steps, stop at events and pass budgets beyond ``max_steps + 1``. float64:
forward outputs identical to ``"states"``, gradients within 1e-12 of ``"states"`` (the
replayed states differ from diffrax's by rounding) and 1e-10 of RCA.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402
from tests.jax_support import relerr  # noqa: E402

pytestmark = pytest.mark.jax

jax.config.update("jax_enable_x64", True)

RCA = diffrax.RecursiveCheckpointAdjoint()
MAX_STEPS = 40


def _field(t, y, a):
    return jnp.stack([y[1], -a[0] * jnp.sin(y[0]) + a[1] * jnp.cos(t) * y[1]])


def _identical(a, b) -> bool:
    return all(
        bool(jnp.all((x == y) | (jnp.isnan(x) & jnp.isnan(y))))
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    )


def _agree(program, budget, *, tol_rca=1e-10, tol_states=1e-12):
    """``program(adjoint) -> ((loss, outputs), grads)``; the budget's against both
    references."""
    (_, out_r), g_r = program(RCA)
    (_, out_s), g_s = program(SymplecticAdjoint())
    (_, out_b), g_b = program(SymplecticAdjoint(checkpoint=budget))
    assert _identical(out_b, out_s)
    assert relerr(g_b, g_s) <= tol_states, relerr(g_b, g_s)
    assert relerr(g_b, g_r) <= tol_rca, relerr(g_b, g_r)
    return out_s


def _fixed_steps_loss(adjoint, diff, steps=True):
    # Midpoint steps of 1/N on [0, 1] (N traced). The loss weights every saved step
    # differently, so a state from the wrong step shows.
    y0, args, t1, dt0 = diff
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_field), diffrax.Midpoint(), 0.0, t1, dt0, y0, args=args,
        saveat=diffrax.SaveAt(t1=True, steps=steps), adjoint=adjoint, max_steps=MAX_STEPS,
        throw=False,
    )  # fmt: skip
    ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
    weights = jnp.arange(1, ys.size + 1, dtype=ys.dtype).reshape(ys.shape) / ys.size
    return jnp.sum(weights * jnp.sin(ys)), (sol.ys, sol.stats["num_accepted_steps"])


@eqx.filter_jit
def _per_row(adjoint, steps):
    """Per-row value and gradient (``vmap`` of ``grad``) of one solve per step count in
    ``steps`` (more than ``MAX_STEPS`` stops there)."""
    rows = len(steps)
    y0 = jnp.tile(jnp.array([0.7, -0.2]), (rows, 1))
    args = jnp.tile(jnp.array([1.3, 0.4]), (rows, 1))
    t1 = jnp.where(steps > 0, 1.0, 0.0)
    dt0 = jnp.where(steps > 0, 1.0 / jnp.maximum(steps, 1), 0.1)
    grad = jax.value_and_grad(lambda d: _fixed_steps_loss(adjoint, d), has_aux=True)
    return jax.vmap(lambda *d: grad(d))(y0, args, t1, dt0)


def _layout_steps(c: int) -> list[int]:
    """Step counts where the doubling layout of ``c`` slots changes: ``N = c 2^k`` and
    its neighbours, 1, and past ``MAX_STEPS``."""
    around = {c * 2**k + d for k in range(4) for d in (-1, 0, 1)}
    return sorted({1, 2, MAX_STEPS, MAX_STEPS + 3} | {n for n in around if 1 <= n <= MAX_STEPS})


BUDGETS = [1, 2, 3, 4, 7, 16, MAX_STEPS, MAX_STEPS + 1, MAX_STEPS + 5]


@pytest.mark.parametrize(
    "budget", [c if c == 3 else pytest.param(c, marks=pytest.mark.slow) for c in BUDGETS]
)
def test_step_counts_where_the_layout_changes_per_vmap_row(budget):
    """One row per step count around ``c 2^k`` (and 1, 2, ``max_steps`` reached), each
    its own layout and reverse plan in one ``vmap``ped gradient."""
    steps = jnp.asarray(_layout_steps(budget))
    ys, n = _agree(lambda adj: _per_row(adj, steps), budget)
    assert n.tolist() == [min(int(s), MAX_STEPS) for s in steps]


@pytest.mark.parametrize("budget", [2] + [pytest.param(c, marks=pytest.mark.slow) for c in (1, 7)])
def test_zero_length_solve(budget):
    """``t0 == t1``: no step; ``sol.ys`` is ``y_0`` (``SaveAt(t1=True)``; with
    ``steps=True`` diffrax saves nothing there). Compared unbatched: RCA's ``t1``
    cotangent of a zero-length row under ``vmap`` is NaN."""
    diff = (jnp.array([0.7, -0.2]), jnp.array([1.3, 0.4]), jnp.asarray(0.0), jnp.asarray(0.1))

    def program(adjoint):
        return eqx.filter_jit(
            jax.value_and_grad(lambda d: _fixed_steps_loss(adjoint, d, False), has_aux=True)
        )(diff)

    assert int(_agree(program, budget)[1]) == 0


def _vdp(t, y, args):
    return jnp.stack(
        [y[1], args["mu"] * (1 - y[0] ** 2) * y[1] - y[0] + args["w"] * jnp.sin(3 * t)]
    )


@pytest.mark.parametrize(
    "budget", [2] + [pytest.param(c, marks=pytest.mark.slow) for c in (1, 7, 402)]
)
def test_adaptive_steps_with_rejections_jump_times_and_dict_args(budget):
    """Van der Pol (mu = 4) at rtol 1e-9 with ``jump_ts``: about 160 accepted and 17
    rejected steps; the rejected attempts must leave no state in the slots."""

    @eqx.filter_jit
    def program(adjoint):
        def loss(diff):
            y0, args = diff
            controller = diffrax.PIDController(
                rtol=1e-9, atol=1e-9, pcoeff=0.3, icoeff=0.4, jump_ts=jnp.array([0.37, 1.1])
            )
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_vdp), diffrax.Tsit5(), 0.0, 3.0, 0.5, y0, args=args,
                stepsize_controller=controller, adjoint=adjoint, max_steps=400,
            )  # fmt: skip
            stats = sol.stats
            return jnp.sum(sol.ys**2), (
                sol.ys,
                stats["num_accepted_steps"],
                stats["num_rejected_steps"],
            )

        diff = (jnp.array([1.5, 0.3]), {"mu": jnp.asarray(4.0), "w": jnp.asarray(0.5)})
        return jax.value_and_grad(loss, has_aux=True)(diff)

    _, accepted, rejected = _agree(program, budget)
    assert int(accepted) > 100 and int(rejected) > 10


def _pendulum(t, y, a):
    return jnp.stack([y[1], -a * jnp.sin(y[0]) * (1 + y[1] ** 2)])


def _pendulum_rows(adjoint, diff, max_steps):
    def one(y0, a):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_pendulum),
            diffrax.Tsit5(), 0.0, 2.0, 0.3, y0, args=a,
            saveat=diffrax.SaveAt(t1=True, steps=True),
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            adjoint=adjoint, max_steps=max_steps, throw=False,
        )  # fmt: skip
        ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
        return jnp.sum(ys[-1] ** 2) + 1e-3 * jnp.sum(ys**2), (
            sol.ys,
            sol.stats["num_accepted_steps"],
        )

    losses, aux = jax.vmap(one)(*diff)
    return jnp.sum(losses), aux


@pytest.mark.parametrize(
    ("budget", "max_steps"),
    [
        pytest.param(3, 20, marks=pytest.mark.slow),
        pytest.param(7, 120, marks=pytest.mark.slow),
        pytest.param(16, 120, marks=pytest.mark.slow),
    ],
)
def test_grad_of_vmap_rows_with_different_adaptive_step_counts(budget, max_steps):
    """Grad of a ``vmap``ped adaptive solve: rows of 3 to 92 accepted steps (with
    ``max_steps=20``, which counts rejected attempts too, two rows stop early at 12
    and 17), each with its own stride and plan, parameter cotangents summed."""
    diff = (
        jnp.array([[0.5, 0.1], [1.2, -0.4], [2.9, 0.8], [0.05, 0.0]]),
        jnp.array([0.5, 3.0, 9.0, 0.05]),
    )

    @eqx.filter_jit
    def program(adjoint):
        fn = lambda d: _pendulum_rows(adjoint, d, max_steps)  # noqa: E731
        return jax.value_and_grad(fn, has_aux=True)(diff)

    # The a = 9 row starts near the unstable equilibrium: rounding differences between
    # replayed and recorded states grow to ~1e-11 over its ~100 steps.
    _, n = _agree(program, budget, tol_states=1e-10)
    assert len(set(n.tolist())) == 4


@pytest.mark.parametrize("budget", [pytest.param(c, marks=pytest.mark.slow) for c in (2, 201)])
def test_terminating_event_without_root_finder_saving_steps(budget):
    """A boolean ``Event`` stops the solve at the end of the first step with
    ``y[0] < -0.5``: ``N`` is known only at run time; gradients w.r.t. y0, args and t0."""

    @eqx.filter_jit
    def program(adjoint):
        def loss(diff):
            y0, args, t0 = diff
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_field), diffrax.Tsit5(), t0, 5.0, 0.05, y0, args=args,
                event=diffrax.Event(lambda t, y, args, **kw: y[0] < -0.5),
                saveat=diffrax.SaveAt(t1=True, steps=True), adjoint=adjoint, max_steps=200,
            )  # fmt: skip
            ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
            return jnp.sum(ys**2), (sol.ys, sol.stats["num_accepted_steps"])

        diff = (jnp.array([1.0, 0.0]), jnp.array([4.0, 0.1]), jnp.asarray(0.1))
        return jax.value_and_grad(loss, has_aux=True)(diff)

    assert 5 < int(_agree(program, budget)[1]) < 200


@pytest.mark.parametrize(
    "budget", [pytest.param(c, marks=pytest.mark.slow) for c in (1, 5, 17, 33)]
)
def test_step_to_grid_output_times_and_dense_evaluate(budget):
    """``StepTo`` on an uneven grid, ``SaveAt(ts=..., steps=True, dense=True)`` and a
    loss on ``sol.evaluate``; gradients w.r.t. the grid (t0, t1 and the step ends)."""
    grid = jnp.sort(
        jnp.concatenate(
            [jnp.array([0.0, 2.0]), jax.random.uniform(jax.random.PRNGKey(1), (14,), maxval=2.0)]
        )
    )

    @eqx.filter_jit
    def program(adjoint):
        def loss(diff):
            y0, args, grid = diff
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_field), diffrax.Dopri5(), grid[0], grid[-1], None, y0,
                args=args, stepsize_controller=diffrax.StepTo(ts=grid),
                saveat=diffrax.SaveAt(ts=grid[::3], steps=True, dense=True),
                adjoint=adjoint, max_steps=32,
            )  # fmt: skip
            dense = jax.vmap(sol.evaluate)(jnp.linspace(0.1, 1.9, 5))
            ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)
            return jnp.sum(ys**2) + jnp.sum(jnp.cos(dense)), (sol.ys,)

        diff = (jnp.array([0.7, -0.2]), jnp.array([1.3, 0.4]), grid)
        return jax.value_and_grad(loss, has_aux=True)(diff)

    _agree(program, budget)


@pytest.mark.parametrize("integer", [np.int64, np.int32], ids=lambda t: t.__name__)
def test_numpy_integer_budget(integer):
    """A budget taken from NumPy (``np.arange`` of budgets, a config array) is the same
    budget as the Python int: same gradient, no trace-time dtype clash under x64 and no
    'JAX array set as static' warning."""
    steps = jnp.asarray(_layout_steps(3))  # the layout test's program: compiled once

    def program(adjoint):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*static.*")
            return _per_row(adjoint, steps)

    (_, out_i), g_i = program(SymplecticAdjoint(checkpoint=integer(3)))
    (_, out_p), g_p = program(SymplecticAdjoint(checkpoint=3))
    assert _identical(out_i, out_p) and _identical(g_i, g_p)
    assert SymplecticAdjoint(checkpoint=integer(3)) == SymplecticAdjoint(checkpoint=3)


def test_budget_memory_is_one_state_per_slot():
    """XLA's temporaries grow by one state per budget slot: the forward pass's slots are
    the backward pass's (no second copy), at 200 Tsit5 steps of a 64x64 float64 state
    (under x64 diffrax promotes a float32 state to the float64 time dtype); a budget
    beyond ``max_steps + 1`` holds no more than ``max_steps + 1`` states."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    weight = jax.random.normal(key1, (64, 64)) / 8
    y0 = jax.random.normal(key2, (64, 64))
    term = diffrax.ODETerm(lambda t, y, w: jnp.tanh(y @ w))

    def temp_states(budget):
        def loss(w, y0):
            sol = diffrax.diffeqsolve(
                term, diffrax.Tsit5(), 0.0, 1.0, 1 / 200, y0, args=w,
                adjoint=SymplecticAdjoint(checkpoint=budget), max_steps=200,
            )  # fmt: skip
            return jnp.sum(sol.ys**2)

        compiled = jax.jit(jax.grad(loss)).lower(weight, y0).compile()
        return compiled.memory_analysis().temp_size_in_bytes / y0.nbytes

    # Measured: 22.2 states at c = 10 (10 slots; the rest are the step's working
    # buffers and the cotangents; 9442660^, which kept y_0 alone in the forward pass,
    # also 22.2), and 191.1 more at c = 500 (201 slots, 191 more; the 0.1 is slot
    # bookkeeping) -- 490.2 more before budgets were capped at max_steps + 1.
    ten, many = temp_states(10), temp_states(500)
    assert ten <= 26, ten
    assert many - ten <= 191.25, (ten, many)


@pytest.mark.parametrize(
    ("budget", "steps"),
    [(2, 131071), (2, 100000), (4, 300000), (3, 40), (6, 1000), (1000, 5000)],
)
def test_plan_choice_at_long_solves(budget, steps):
    """The reverse sweep's choice between the stored segments and ``y_0`` alone follows
    the exact replay counts (Python integers) for long solves too. With 2 slots and
    131071 steps (kept: y_0, y_65536) the last segment has no free slot: 2.1e9 replays,
    which wrapped in int32 to a negative count and picked that plan over 4.5e7 replays
    from y_0."""
    from symplectic_adjoint.adapters._jax_reverse import _plan_replays
    from symplectic_adjoint.core.checkpointing import segment_replays

    stride = 1
    while (steps // stride) + 1 > budget:  # the forward layout's final stride
        stride *= 2
    starts = range(0, steps, stride)
    assert len(starts) <= budget
    exact_stored = sum(
        segment_replays(min(a + stride, steps) - a, budget - 1 - k) for k, a in enumerate(starts)
    )
    exact_y0 = segment_replays(steps, budget - 1)
    cost_stored, cost_y0 = jax.jit(_plan_replays, static_argnums=0)(
        budget, jnp.asarray(steps, jnp.int32), jnp.asarray(stride, jnp.int32)
    )
    assert bool(cost_stored < cost_y0) == (exact_stored < exact_y0)
    assert float(cost_y0) == pytest.approx(exact_y0, rel=1e-7)


def test_budget_refuses_a_max_steps_beyond_its_int32_schedule():
    """Past the int32 range of the traced schedule the backward pass could loop forever
    (a wrapped split): refused at trace time, naming the alternatives."""
    term = diffrax.ODETerm(lambda t, y, args: -y)

    def loss(y0, max_steps):
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, 1.0, 0.5, y0, max_steps=max_steps,
            adjoint=SymplecticAdjoint(checkpoint=4),
        )  # fmt: skip
        return jnp.sum(sol.ys)

    with pytest.raises(ValueError, match="int32.*max_steps.*RecursiveCheckpointAdjoint"):
        jax.grad(loss)(jnp.ones(2), 3_000_000)
    assert jnp.isfinite(jax.grad(loss)(jnp.ones(2), 1_000_000)).all()  # within the range
