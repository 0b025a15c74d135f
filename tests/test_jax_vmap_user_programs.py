"""User programs that batch solves with ``jax.vmap`` (each row its own solve), against
``RecursiveCheckpointAdjoint`` on the same program.

Under ``vmap`` the reverse sweep's conditionals and loops run while *any* row has work;
rows without work run the branch anyway and are masked where they add. These programs
make rows differ as much as they can: stiff next to trivial rows (hundreds of steps
against three), zero-length intervals, rows that stop at ``max_steps`` or at an event,
per-row parameters, times, output times and control data, a vector field that is
singular away from the trajectories (so garbage in an inactive row would show up as
NaN), nested ``vmap`` and reverse Jacobians. Outputs must agree to 1e-12, gradients to
1e-10 relative (1e-8 for implicit solvers with a Newton root finder at 1e-12), with the
same dtypes and no NaN where RCA has none.
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import optimistix as optx  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402
from tests.jax_support import relerr  # noqa: E402

jax.config.update("jax_enable_x64", True)

RCA = diffrax.RecursiveCheckpointAdjoint()
NEWTON = optx.Newton(rtol=1e-12, atol=1e-12)


def modes(default):
    """The checkpoint modes, ``default`` in the default run and the others slow (each
    case compiles RCA and the adjoint under vmap: seconds apiece)."""
    return [
        m if m == default else pytest.param(m, marks=pytest.mark.slow)
        for m in ("states", "stages", 2)
    ]


Y0 = jnp.array([[1.0, 0.5], [0.2, -0.3], [0.7, 0.1]])
# Row 0 stiff (hundreds of adaptive steps), row 1 trivial (a handful), row 2 moderate.
K = jnp.array([200.0, 0.0, 1.0])


def _vf(t, y, k):
    return -k * y + jnp.stack([y[1], -jnp.sin(y[0])]) * (1 + 0.1 * t)


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jtu.tree_leaves(tree))


def _dtypes(tree):
    return [(x.dtype, x.shape) for x in jtu.tree_leaves(tree)]


def _agree(program, checkpoint, *, tol=1e-10, out_tol=1e-12, reference=None):
    """``program(adjoint) -> (outputs, gradients)`` under the symplectic adjoint matches
    ``reference`` (RCA on the same program by default)."""
    ref_out, ref_grad = program(RCA) if reference is None else reference
    out, grad = program(SymplecticAdjoint(checkpoint=checkpoint))
    assert _finite(grad), "NaN/inf in the symplectic gradient"
    assert _finite(ref_grad)
    assert _dtypes(grad) == _dtypes(ref_grad)
    assert relerr(out, ref_out) <= out_tol
    assert relerr(grad, ref_grad) <= tol


def _solve(adj, y0, k, t0=0.0, t1=1.0, dt0=0.01, *, vf=_vf, solver=None, **kw):
    kw.setdefault("stepsize_controller", diffrax.PIDController(rtol=1e-6, atol=1e-8))
    kw.setdefault("max_steps", 1024)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver or diffrax.Tsit5(), t0, t1, dt0, y0, args=k, adjoint=adj, **kw
    )


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, k):
        return 0.3 * self.mlp(y) - k * y


def _mlp_field(key):
    return _Field(eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=key))


@pytest.mark.parametrize("checkpoint", modes("states"))
@pytest.mark.parametrize(
    "order", ["vmap_of_grad", pytest.param("grad_of_vmap", marks=pytest.mark.slow)]
)
def test_per_example_gradients_with_shared_mlp_and_times_match_rca(order, checkpoint):
    """Per-example gradients (``vmap(grad)``) and the batch gradient (``grad(vmap)``)
    w.r.t. a shared MLP, per-row y0 and stiffness, and t0/t1/dt0 (317/3/6 steps)."""
    params, static = eqx.partition(_mlp_field(jax.random.PRNGKey(0)), eqx.is_array)

    def program(adj):
        def loss(p, y, k, t0, t1, dt0):
            sol = _solve(adj, y, k, t0, t1, dt0, vf=eqx.combine(p, static))
            return jnp.sum(sol.ys**2)

        args = (params, Y0, K, 0.0, 1.0, 0.01)
        axes = (None, 0, 0, None, None, None)
        out = jax.vmap(loss, in_axes=axes)(*args)
        if order == "vmap_of_grad":
            grad = jax.jit(jax.vmap(jax.grad(loss, argnums=range(6)), in_axes=axes))(*args)
        else:
            batch = lambda *a: jnp.sum(jax.vmap(loss, in_axes=axes)(*a))  # noqa: E731
            grad = jax.jit(jax.grad(batch, argnums=range(6)))(*args)
        return out, grad

    _agree(program, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", modes(2))
def test_per_row_mlp_parameters_and_times_filter_vmap_filter_grad(checkpoint):
    """Each row its own MLP (``eqx.filter_vmap`` over a batched module), its own
    t0/t1/dt0, through ``eqx.filter_jit(eqx.filter_vmap(eqx.filter_grad))``."""
    fields = eqx.filter_vmap(_mlp_field)(jax.random.split(jax.random.PRNGKey(1), 3))
    t0 = jnp.array([0.0, 0.3, 0.1])
    t1 = jnp.array([1.0, 0.8, 2.0])
    dt0 = jnp.array([0.01, 0.05, 0.02])

    def program(adj):
        def loss(diff, y, k):
            field, a, b, c = diff
            return jnp.sum(_solve(adj, y, k, a, b, c, vf=field).ys ** 2)

        diff = (fields, t0, t1, dt0)
        out = eqx.filter_vmap(loss)(diff, Y0, K)
        return out, eqx.filter_jit(eqx.filter_vmap(eqx.filter_grad(loss)))(diff, Y0, K)

    _agree(program, checkpoint)


_ZERO_LENGTH_SOLVERS = {
    "Tsit5_pid": (lambda: diffrax.Tsit5(), diffrax.PIDController(rtol=1e-6, atol=1e-8)),
    "ImplicitEuler_const": (
        lambda: diffrax.ImplicitEuler(root_finder=NEWTON),
        diffrax.ConstantStepSize(),
    ),
}


@pytest.mark.parametrize("checkpoint", modes("stages"))
@pytest.mark.parametrize("case", list(_ZERO_LENGTH_SOLVERS))
def test_zero_length_row_matches_unbatched_rca(case, checkpoint):
    """Row 1 has t0 == t1 (no steps at all) next to rows with 20/35 steps. The reference
    is RCA row by row: RCA itself, vmapped, returns NaN for that row's t0/t1 gradients
    with ImplicitEuler and constant steps (diffrax's issue, not ours)."""
    make, controller = _ZERO_LENGTH_SOLVERS[case]
    t0 = jnp.array([0.0, 0.2, 0.1])
    t1 = jnp.array([1.0, 0.2, 0.7])
    dt0 = jnp.array([0.05, 0.1, 0.02])

    def loss(adj, *a):
        return jnp.sum(_solve(adj, *a, solver=make(), stepsize_controller=controller).ys ** 2)

    def program(adj):
        f = lambda *a: loss(adj, *a)  # noqa: E731
        args = (Y0, K, t0, t1, dt0)
        return jax.vmap(f)(*args), jax.jit(jax.vmap(jax.grad(f, argnums=range(5))))(*args)

    rows = [
        (loss(RCA, *a), jax.grad(lambda *x: loss(RCA, *x), argnums=range(5))(*a))
        for a in zip(Y0, K, t0, t1, dt0, strict=True)
    ]
    reference = jtu.tree_map(lambda *x: jnp.stack(x), *rows)
    tol = 1e-10 if case.startswith("Tsit5") else 1e-8
    _agree(program, checkpoint, tol=tol, reference=reference)


@pytest.mark.parametrize("checkpoint", modes(2))
@pytest.mark.parametrize("stop", ["max_steps", pytest.param("event", marks=pytest.mark.slow)])
def test_rows_stopping_early_match_rca(stop, checkpoint):
    """Rows stop at different steps: the stiff row hits ``max_steps`` (``throw=False``,
    outputs after it are inf) while the others finish, or a boolean event fires at a
    different step in each row."""
    if stop == "max_steps":
        kw = dict(max_steps=40, throw=False, saveat=diffrax.SaveAt(ts=jnp.linspace(0, 0.5, 4)))
        k, t1 = K * 10, 3.0
    else:
        kw = dict(event=diffrax.Event(lambda t, y, args, **_: jnp.sum(y**2) < 0.05))
        k, t1 = jnp.array([50.0, 0.1, 1.0]), 5.0

    def program(adj):
        def loss(y, k):
            ys = _solve(adj, y, k, 0.0, t1, **kw).ys
            return jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0) ** 2), ys

        losses, ys = jax.vmap(loss)(Y0, k)
        grad = jax.jit(jax.vmap(jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1))))(Y0, k)
        # Unsaved outputs (inf) must sit in the same places as RCA's.
        return (losses, jnp.isfinite(ys).astype(jnp.float64)), grad

    _agree(program, checkpoint)


def _singular_vf(t, y, k):
    # Finite on the trajectories (y > 0, t >= 0.1) but not at zeros: an inactive row that
    # evaluated at zero-filled padding without masking would put NaN into the gradients.
    return -k * (y - 2.0) + 0.01 * (jnp.log(y) + jnp.log(t) + 1.0 / (y[0] * y[1] * t))


@pytest.mark.parametrize("checkpoint", modes("states"))
@pytest.mark.parametrize(
    "solver", ["Tsit5", pytest.param("Dopri8", marks=pytest.mark.slow)], ids=str
)
def test_inactive_rows_do_not_poison_gradients(solver, checkpoint):
    y0 = jnp.array([[1.0, 1.5], [2.0, 2.0], [1.7, 1.1]])
    k = jnp.array([50.0, 0.1, 1.0])
    t0 = jnp.array([0.1, 0.2, 0.3])
    t1 = jnp.array([1.0, 1.5, 0.9])

    def program(adj):
        def loss(*a):
            ctrl = diffrax.PIDController(rtol=1e-5, atol=1e-6)
            sol = _solve(
                adj,
                *a,
                vf=_singular_vf,
                solver=getattr(diffrax, solver)(),
                stepsize_controller=ctrl,
            )
            return jnp.sum(sol.ys**2)

        args = (y0, k, t0, t1)
        return jax.vmap(loss)(*args), jax.jit(jax.vmap(jax.grad(loss, argnums=range(4))))(*args)

    _agree(program, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", modes(2))
@pytest.mark.parametrize("program_kind", ["vmap_vmap_grad", "grad_vmap_vmap", "jacrev_of_vmap"])
def test_nested_vmap_and_reverse_jacobian_match_rca(program_kind, checkpoint):
    ys = jnp.stack([Y0, Y0[::-1] * 0.5])
    ks = jnp.stack([K, K[::-1]]) * 0.025  # 5, 0, 0.025: different step counts per row

    def program(adj):
        def final(y, k):
            return _solve(adj, y, k, saveat=diffrax.SaveAt(ts=jnp.linspace(0.1, 1.0, 3))).ys

        loss = lambda y, k: jnp.sum(final(y, k) ** 2)  # noqa: E731
        if program_kind == "vmap_vmap_grad":
            return jax.vmap(jax.vmap(loss))(ys, ks), jax.vmap(jax.vmap(jax.grad(loss, (0, 1))))(
                ys, ks
            )
        if program_kind == "grad_vmap_vmap":
            total = lambda y, k: jnp.sum(jax.vmap(jax.vmap(loss))(y, k))  # noqa: E731
            return total(ys, ks), jax.grad(total, (0, 1))(ys, ks)
        batched = lambda y: jax.vmap(final)(y, ks[0])  # noqa: E731
        return batched(ys[0]), jax.jacrev(batched)(ys[0])

    _agree(program, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", modes("stages"))
@pytest.mark.parametrize("saves", ["dense_query_time", "per_row_ts"])
def test_per_row_dense_queries_and_output_times_match_rca(saves, checkpoint):
    k = K * 0.025
    per_row = (
        jnp.array([0.1, 0.95, 0.5])
        if saves == "dense_query_time"
        else jnp.array([[0.1, 0.5, 0.9], [0.0, 0.01, 1.0], [0.3, 0.3, 0.4]])
    )

    def program(adj):
        def loss(y, k, t):
            if saves == "dense_query_time":
                sol = _solve(adj, y, k, saveat=diffrax.SaveAt(dense=True))
                return jnp.sum(sol.evaluate(t) ** 2) + jnp.sum(sol.derivative(0.33) ** 2)
            return jnp.sum(_solve(adj, y, k, saveat=diffrax.SaveAt(t0=True, ts=t)).ys ** 2)

        total = lambda *a: jnp.sum(jax.vmap(loss)(*a))  # noqa: E731
        return jax.vmap(loss)(Y0, k, per_row), jax.jit(jax.grad(total, (0, 1, 2)))(Y0, k, per_row)

    _agree(program, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", modes("states"))
def test_neural_cde_per_row_control_data_matches_rca(checkpoint):
    ts = jnp.linspace(0, 1, 6)
    data = jnp.stack([jnp.stack([jnp.sin(ts * (i + 1)), jnp.cos(ts) * i], -1) for i in range(3)])
    w = jnp.array([[0.3, -0.2], [0.1, 0.5]])

    def field(w):
        return lambda t, y, a: jnp.tanh(w @ y).reshape(2, 1) * jnp.ones((2, 2)) + a * jnp.eye(2)

    class CDEField(eqx.Module):
        w: jax.Array

        def __call__(self, t, y, a):
            return field(self.w)(t, y, a)

    def program(adj):
        def loss(w, y, x, a):
            path = diffrax.CubicInterpolation(ts, diffrax.backward_hermite_coefficients(ts, x))
            term = diffrax.ControlTerm(CDEField(w), path).to_ode()
            ctrl = diffrax.PIDController(rtol=1e-7, atol=1e-9)
            sol = diffrax.diffeqsolve(
                term, diffrax.Dopri5(), 0.0, 1.0, 0.05, y, args=a, adjoint=adj, max_steps=256,
                stepsize_controller=ctrl, saveat=diffrax.SaveAt(ts=ts),
            )  # fmt: skip
            return jnp.sum(sol.ys**2)

        args, axes = (w, Y0, data, K * 1e-3), (None, 0, 0, 0)
        grad = jax.vmap(jax.grad(loss, argnums=range(4)), in_axes=axes)(*args)
        return jax.vmap(loss, in_axes=axes)(*args), grad

    _agree(program, checkpoint)


_IMPLICIT = {
    "Kvaerno3": lambda: diffrax.Kvaerno3(root_finder=NEWTON),
    "KenCarp3": lambda: diffrax.KenCarp3(root_finder=NEWTON),
    "Kvaerno5_gmres": lambda: diffrax.Kvaerno5(root_finder=NEWTON),
    "KenCarp5": lambda: diffrax.KenCarp5(root_finder=NEWTON),
}


@pytest.mark.parametrize("checkpoint", modes(2))
@pytest.mark.parametrize(
    "name",
    ["Kvaerno3"] + [pytest.param(n, marks=pytest.mark.slow) for n in list(_IMPLICIT)[1:]],
)
def test_implicit_per_row_times_and_stiffness_match_rca(name, checkpoint):
    """Implicit/IMEX solvers under ``vmap`` with per-row t0/t1/dt0 (one row t0 == t1),
    per-row stiffness and, for KenCarp, per-row output times, in every checkpoint mode."""
    t0 = jnp.array([0.0, 0.2, 0.1])
    t1 = jnp.array([1.0, 0.2, 0.7]) + (0.1 if name.startswith("KenCarp") else 0.0)
    dt0 = jnp.array([0.05, 0.1, 0.02])
    ctrl = diffrax.PIDController(rtol=1e-4, atol=1e-6)

    def loss(adj, y, k, a, b, c):
        if name.startswith("KenCarp"):
            explicit = diffrax.ODETerm(lambda t, y, k: _vf(t, y, 0.0))
            implicit = diffrax.ODETerm(lambda t, y, k: -k * y * (1 + y**2))
            sol = diffrax.diffeqsolve(
                diffrax.MultiTerm(explicit, implicit), _IMPLICIT[name](), a, b, c, y, args=k,
                adjoint=adj, max_steps=1024, stepsize_controller=ctrl,
                saveat=diffrax.SaveAt(ts=jnp.linspace(a, b, 4)),
            )  # fmt: skip
        else:
            sol = _solve(adj, y, k, a, b, c, solver=_IMPLICIT[name](), stepsize_controller=ctrl)
        return jnp.sum(sol.ys**2)

    def program(adj):
        if name.endswith("gmres") and isinstance(adj, SymplecticAdjoint):
            adj = SymplecticAdjoint(checkpoint=adj.checkpoint, linear_solver="gmres")
        f = lambda *a: loss(adj, *a)  # noqa: E731
        args = (Y0, K, t0, t1, dt0)
        return jax.vmap(f)(*args), jax.jit(jax.vmap(jax.grad(f, argnums=range(5))))(*args)

    _agree(program, checkpoint, tol=1e-8)


@pytest.mark.parametrize("checkpoint", modes("stages"))
def test_float32_state_gradients_keep_their_dtypes(checkpoint):
    """float32 y0 and args with x64 on (diffrax integrates in float64, as under RCA): the
    gradients come back float32, equal to RCA's to float32 rounding."""
    y0, k = Y0.astype(jnp.float32), (K * 0.025).astype(jnp.float32)

    def program(adj):
        loss = lambda y, k: jnp.sum(_solve(adj, y, k).ys ** 2)  # noqa: E731
        return jax.vmap(loss)(y0, k), jax.vmap(jax.grad(loss, (0, 1)))(y0, k)

    _agree(program, checkpoint, tol=1e-6, out_tol=1e-6)
    _, grad = program(SymplecticAdjoint(checkpoint=checkpoint))
    assert all(g.dtype == jnp.float32 for g in grad)


@pytest.mark.parametrize("second_order", ["hessian", "grad_of_grad"], ids=str)
def test_second_derivatives_refused_at_trace_time_like_rca(second_order):
    """Neither adjoint has second derivatives: JAX refuses forward mode through a custom
    VJP and reverse mode through the dynamic while loop, at trace time, for both."""

    def raised(adj):
        loss = lambda y: jnp.sum(_solve(adj, y, 1.0).ys ** 2)  # noqa: E731
        fn = (
            jax.hessian(loss)
            if second_order == "hessian"
            else jax.grad(lambda y: jnp.sum(jax.grad(loss)(y)))
        )
        with pytest.raises((TypeError, ValueError)) as info:
            jax.eval_shape(fn, Y0[0])
        return type(info.value)

    assert raised(SymplecticAdjoint()) is raised(RCA)
