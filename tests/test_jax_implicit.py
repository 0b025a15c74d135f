"""SymplecticAdjoint on diffrax's implicit (ImplicitEuler, Kvaerno3/4/5) and IMEX
(KenCarp3/4/5 on MultiTerm(explicit, implicit)) solvers, against RecursiveCheckpointAdjoint
on the same program: identical forward outputs, gradients to 1e-8 relative (measured
~1e-16: both are the implicit-function-theorem gradient at the same converged stages)."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")
lx = pytest.importorskip("lineax")
optx = pytest.importorskip("optimistix")

import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
from test_jax_adjoint import TS, make_problem, relerr  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

RCA = diffrax.RecursiveCheckpointAdjoint()
PID = diffrax.PIDController(rtol=1e-6, atol=1e-6)
CONST = diffrax.ConstantStepSize()
TIGHT = optx.Newton(rtol=1e-11, atol=1e-11)


class Linear(eqx.Module):
    """The explicit (non-stiff) half of an IMEX problem, with its own parameters."""

    A: jax.Array

    def __call__(self, t, y, args):
        return self.A @ y + 0.1 * jnp.cos(t)


@eqx.filter_jit
def value_and_grad(term, y0, args, ts, *, adjoint, solver, controller, saveat_kind, times=None):
    """Value and gradient in ``(term, y0, args, ts)``, and in ``times = (t0, t1, dt0)``
    when given (then the grid itself is differentiated)."""

    def loss(diff):
        term, y0, args, ts, (t0, t1, dt0) = diff
        saveat = diffrax.SaveAt(t1=True) if saveat_kind == "t1" else diffrax.SaveAt(ts=ts)
        sol = diffrax.diffeqsolve(
            term, solver, t0, t1, dt0, y0, args, saveat=saveat,
            stepsize_controller=controller, adjoint=adjoint, max_steps=64,
        )  # fmt: skip
        weights = jnp.arange(1, sol.ys.size + 1).reshape(sol.ys.shape) / sol.ys.size
        return jnp.sum(weights * sol.ys**2 + jnp.sin(sol.ys)), (
            sol.ys,
            sol.stats["num_accepted_steps"],
        )

    fixed = times is None
    if fixed:  # plain floats: not differentiated
        times = (0.0, 1.0, 0.1)
    out, grads = eqx.filter_value_and_grad(loss, has_aux=True)((term, y0, args, ts, times))
    return out, (grads[:4] if fixed else grads)


# (solver class, controller, SaveAt kind, checkpoint, linear solver): every implicit/IMEX
# solver x ConstantStepSize/PIDController x SaveAt(t1)/SaveAt(ts), the checkpoint mode
# alternating, plus two matrix-free transposed solves.
SOLVERS = [
    diffrax.ImplicitEuler, diffrax.Kvaerno3, diffrax.Kvaerno4, diffrax.Kvaerno5,
    diffrax.KenCarp3, diffrax.KenCarp4, diffrax.KenCarp5,
]  # fmt: skip
# First-order ImplicitEuler needs more than the tests' 64 steps at 1e-6.
PID_LOOSE = diffrax.PIDController(rtol=1e-3, atol=1e-3)
CASES = [
    (
        cls,
        PID_LOOSE if cls is diffrax.ImplicitEuler and j else controller,
        kind,
        ("states", "stages")[(i + j + k) % 2],
        None,
    )
    for i, cls in enumerate(SOLVERS)
    for j, controller in enumerate((CONST, PID))
    for k, kind in enumerate(("t1", "ts"))
] + [  # fmt: skip
    # "gmres": matrix-free, tolerances from the root finder (TIGHT).
    (diffrax.Kvaerno5, PID, "t1", "states", "gmres"),
    (diffrax.KenCarp5, PID, "ts", "stages", lx.GMRES(rtol=1e-13, atol=1e-13)),
]


def _id(case):
    cls, controller, kind, checkpoint, ls = case
    extra = "" if ls is None else "-gmres" if ls == "gmres" else "-GMRES(1e-13)"
    return f"{cls.__name__}-{type(controller).__name__}-{kind}-{checkpoint}{extra}"


#: In the default run (each 8-15 s on the CI machine): Kvaerno3 (PID, SaveAt(ts)), KenCarp3
#: (IMEX, ConstantStepSize, t1) and Kvaerno5 (PID, states, GMRES with the root finder's
#: tolerances); the rest of the solver x controller x SaveAt matrix is marked slow
#: (deselected by default). ImplicitEuler on a ConstantStepSize grid against RCA stays in
#: the default run through conformance (``stiff_linear`` / ``implicit_euler``).
DEFAULT = {
    "Kvaerno3-PIDController-ts-stages",
    "KenCarp3-ConstantStepSize-t1-states",
    "Kvaerno5-PIDController-t1-states-gmres",
}
PARAMS = [
    pytest.param(c, id=_id(c), marks=[] if _id(c) in DEFAULT else [pytest.mark.slow]) for c in CASES
]
assert len(DEFAULT & {_id(c) for c in CASES}) == len(DEFAULT)


@pytest.mark.parametrize("case", PARAMS)
def test_implicit_solvers_exact_against_recursive_checkpoint(case):
    cls, controller, kind, checkpoint, linear_solver = case
    field, y0, args = make_problem()
    # Tight root-finder tolerances (ConstantStepSize has none to lend it; with the PID's
    # 1e-6 VeryChord stalls on the IMEX problem and every step is rejected).
    solver = cls(root_finder=TIGHT)
    term = diffrax.ODETerm(field)
    if cls.__name__.startswith("KenCarp"):
        A = -0.5 * jnp.eye(3) + 0.1 * jnp.arange(9.0).reshape(3, 3) / 9
        term = diffrax.MultiTerm(diffrax.ODETerm(Linear(A)), term)
    common = dict(solver=solver, controller=controller, saveat_kind=kind)
    ts = jnp.array(TS)
    adjoint = SymplecticAdjoint(checkpoint=checkpoint, linear_solver=linear_solver)
    (val, (ys, n)), grads = value_and_grad(term, y0, args, ts, adjoint=adjoint, **common)
    (val_ref, (ys_ref, n_ref)), grads_ref = value_and_grad(
        term, y0, args, ts, adjoint=RCA, **common
    )
    assert int(n) == int(n_ref) >= 3
    assert jnp.array_equal(ys, ys_ref, equal_nan=True)
    assert val == val_ref
    for name, g, g_ref in zip(("term", "y0", "args", "ts"), grads, grads_ref, strict=True):
        if name == "ts" and kind == "t1":
            continue  # unused: both zero
        assert relerr(g, g_ref) <= 1e-8, name
        assert any(bool(jnp.any(x != 0)) for x in jtu.tree_leaves(g_ref)), name


def _problem(cls):
    """``(term, y0, args, ts)``: the shared field, as the implicit part of a ``MultiTerm``
    with a linear explicit part for the IMEX (KenCarp) solvers."""
    field, y0, args = make_problem()
    term = diffrax.ODETerm(field)
    if cls.__name__.startswith("KenCarp"):
        A = -0.5 * jnp.eye(3) + 0.1 * jnp.arange(9.0).reshape(3, 3) / 9
        term = diffrax.MultiTerm(diffrax.ODETerm(Linear(A)), term)
    return term, y0, args, jnp.array(TS)


def _assert_exact(ours, ref, names):
    (val, (ys, n)), grads = ours
    (val_ref, (ys_ref, n_ref)), grads_ref = ref
    assert int(n) == int(n_ref) >= 3
    assert jnp.array_equal(ys, ys_ref, equal_nan=True)
    assert val == val_ref
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert any(bool(jnp.any(x != 0)) for x in jtu.tree_leaves(g_ref)), name
        assert relerr(g, g_ref) <= 1e-8, (name, relerr(g, g_ref))


def _name(x) -> str:
    return str(x) if isinstance(x, (str, int)) else getattr(x, "__name__", type(x).__name__)


def _params(cases, default):
    marks = lambda c: [] if c in default else [pytest.mark.slow]  # noqa: E731
    return [pytest.param(*c, id="-".join(map(_name, c)), marks=marks(c)) for c in cases]


BUDGET_CASES = [
    (diffrax.Kvaerno5, CONST, "t1"),
    (diffrax.KenCarp4, PID, "ts"),
    (diffrax.Kvaerno5, PID, "ts"),
    (diffrax.KenCarp4, CONST, "t1"),
]


@pytest.mark.parametrize("cls,controller,kind", _params(BUDGET_CASES, BUDGET_CASES[:2]))
def test_implicit_budgets_exact_against_recursive_checkpoint(cls, controller, kind):
    """A budget of 3 states: the replays are the solver's own steps (root find included),
    so the gradient is RecursiveCheckpointAdjoint's to the root finder's accuracy."""
    term, y0, args, ts = _problem(cls)
    common = dict(solver=cls(root_finder=TIGHT), controller=controller, saveat_kind=kind)
    ours = value_and_grad(term, y0, args, ts, adjoint=SymplecticAdjoint(checkpoint=3), **common)
    ref = value_and_grad(term, y0, args, ts, adjoint=RCA, **common)
    names = ("term", "y0", "args", "ts")
    _assert_exact(ours[:1] + (ours[1][:3],), ref[:1] + (ref[1][:3],), names[:3])
    if kind == "ts":
        assert relerr(ours[1][3], ref[1][3]) <= 1e-8


TIME_CASES = [
    (diffrax.Kvaerno5, CONST, "ts", "states"),
    (diffrax.KenCarp4, PID, "t1", "stages"),
    (diffrax.ImplicitEuler, CONST, "ts", "states"),
    (diffrax.Kvaerno3, PID, "ts", "states"),
    (diffrax.KenCarp4, CONST, "ts", 2),
]


@pytest.mark.parametrize("cls,controller,kind,checkpoint", _params(TIME_CASES, TIME_CASES[:2]))
def test_implicit_time_gradients_exact_against_recursive_checkpoint(
    cls, controller, kind, checkpoint
):
    """``t0``, ``t1``, ``dt0`` (the grid) and the output times: each stage is a function
    of the step's ends through its time ``t_n + c_i h`` and the increment's ``h``, so the
    stage VJPs with the solved multipliers give the ends' cotangents exactly."""
    term, y0, args, ts = _problem(cls)
    common = dict(solver=cls(root_finder=TIGHT), controller=controller, saveat_kind=kind)
    times = (jnp.asarray(0.05), jnp.asarray(1.0), jnp.asarray(0.1))
    adjoint = SymplecticAdjoint(checkpoint=checkpoint)
    ours = value_and_grad(term, y0, args, ts, adjoint=adjoint, times=times, **common)
    ref = value_and_grad(term, y0, args, ts, adjoint=RCA, times=times, **common)
    (_, _), grads = ours
    (_, _), grads_ref = ref
    _assert_exact(
        (ours[0], grads[:3] + (grads[4][:2],)), (ref[0], grads_ref[:3] + (grads_ref[4][:2],)),
        ("term", "y0", "args", "t0/t1"),
    )  # fmt: skip
    # dt0 matters only through the first step of an adaptive solve; for a constant step
    # it sets every step (both nonzero here, checked like the rest).
    assert relerr(grads[4][2], grads_ref[4][2]) <= 1e-8
    if kind == "ts":
        assert relerr(grads[3], grads_ref[3]) <= 1e-8


LOOSE_PID = diffrax.PIDController(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpoint", ["states", 2])
def test_vmapped_rows_with_their_own_step_counts(checkpoint):
    """vmap over initial states with adaptive steps: each row has its own number of steps
    (the reverse loop runs until the longest row is done, the others masked) and its own
    budget schedule; the parameters are shared (their cotangent summed over rows)."""
    field, _, args = make_problem()
    y0s = jnp.array([[0.4, -0.3, 0.8], [2.0, 1.5, -1.8], [0.05, 0.0, 0.1]])
    solver = diffrax.Kvaerno3(root_finder=TIGHT)

    def grads(adjoint):
        def loss(field, y0s, args):
            def row(y0):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(field), solver, 0.0, 1.0, 0.1, y0, args,
                    stepsize_controller=LOOSE_PID, adjoint=adjoint, max_steps=64,
                )  # fmt: skip
                return sol.ys[-1], sol.stats["num_accepted_steps"]

            ys, n = jax.vmap(row)(y0s)
            return jnp.sum(ys**2 + jnp.sin(ys)), n

        return eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))(field, y0s, args)

    (g, n), (g_ref, n_ref) = grads(SymplecticAdjoint(checkpoint=checkpoint)), grads(RCA)
    assert jnp.array_equal(n, n_ref) and len(set(n.tolist())) > 1, n
    assert relerr(g, g_ref) <= 1e-8


def test_gmres_tolerances_from_the_root_finder():
    from symplectic_adjoint.adapters._jax_implicit import resolve_linear_solver

    solver = diffrax.Kvaerno5(root_finder=optx.Newton(rtol=1e-7, atol=1e-9))
    for given in ("gmres", lx.GMRES, lx.GMRES(rtol=None, atol=None)):  # type: ignore[arg-type]
        got = resolve_linear_solver(given, solver)
        assert isinstance(got, lx.GMRES) and (got.rtol, got.atol) == (1e-7, 1e-9)
    got = resolve_linear_solver(lx.GMRES(rtol=1e-3, atol=None), solver)  # type: ignore[arg-type]
    assert (got.rtol, got.atol) == (1e-3, 1e-9)
    assert resolve_linear_solver(lx.GMRES(rtol=1e-3, atol=1e-4), solver).rtol == 1e-3
    assert resolve_linear_solver(None, solver) is None
    with pytest.raises(ValueError, match="root finder.*GMRES"):
        resolve_linear_solver("gmres", diffrax.Kvaerno5())  # tolerances from the controller
    with pytest.raises(ValueError, match="linear_solver"):
        SymplecticAdjoint(linear_solver="cg")


def test_vmapped_per_example_gradients_with_the_grid_time():
    """vmap *of* grad: per-row gradients in ``y0`` and ``t1`` (the grid), each row with its
    own step count and budget schedule; nothing may be summed across rows."""
    field, _, args = make_problem()
    y0s = jnp.array([[0.4, -0.3, 0.8], [2.0, 1.5, -1.8], [0.05, 0.0, 0.1]])
    solver = diffrax.Kvaerno3(root_finder=TIGHT)

    def per_row(adjoint):
        def loss(y0, t1):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field), solver, 0.0, t1, 0.1, y0, args,
                stepsize_controller=LOOSE_PID, adjoint=adjoint, max_steps=64,
            )  # fmt: skip
            return jnp.sum(sol.ys**2 + jnp.sin(sol.ys))

        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jit(jax.vmap(grad, in_axes=(0, None)))(y0s, jnp.asarray(1.0))

    g, g_ref = per_row(SymplecticAdjoint(checkpoint=2)), per_row(RCA)
    assert relerr(g, g_ref) <= 1e-8
    assert bool(jnp.all(g_ref[1] != 0)) and len(set(g_ref[1].tolist())) == 3
