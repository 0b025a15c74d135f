"""Implicit and IMEX solvers in the diffrax adapter: ``ImplicitEuler``, ``Kvaerno3/4/5``
(ESDIRK) and ``KenCarp3/4/5`` (ERK/ESDIRK pairs on ``MultiTerm(explicit, implicit)``).

The forward pass is diffrax's own solver step (root finder included), recorded like the
explicit solvers. The reverse sweep of :mod:`._jax_reverse` calls the hooks of
:class:`ImplicitKernel` per step:

* :meth:`ImplicitKernel.stages`: the increments ``K_i`` of step ``n`` -- read back
  (``checkpoint="stages"``) or recomputed from ``y_n`` by the same solver step, i.e. the
  same root find (``"states"``, and the replays of a budget: :meth:`ImplicitKernel.step`)
  -- and the stage values ``X_i = y_n + sum_j a_ij K_j`` (full lower rows, diagonal
  included; diffrax's increments contain the step, so the kernels run with ``h = 1``);
* :meth:`ImplicitKernel.step_vjp`: the core's exact adjoint of the implicit step
  (:func:`symplectic_adjoint.core.implicit_step.implicit_step_vjp`): per stage, from the
  last, the transposed solve ``(I - a_ii J_i)^T kbar_i = rhs_i`` (by default ``J_i``
  materialised by forward mode and a dense LU; or any lineax solver on ``v -> v - a_ii
  J_i^T v``, one VJP per product, e.g. ``lineax.GMRES`` matrix-free), then the stage VJP
  with ``kbar_i``. The stage is the function ``K_i(X_i, args, terms, t_n, t_{n+1})``
  (its time ``t_n + c_i h`` and its increment's ``h`` come from the step's ends), so the
  same VJP gives the parameters' and the step ends' cotangents: grid-time gradients
  need nothing else. Each stage runs in its own conditional (:mod:`._jax_branch`).

The converged stages are treated as the exact solution of their equations (implicit
function theorem), which is how optimistix differentiates diffrax's root find under
``RecursiveCheckpointAdjoint``: the two gradients agree to the linear solver's accuracy.
FSAL (the first increment of an ESDIRK step is the previous step's last vector field)
needs no special treatment: that stage is ``f(t_n, y_n)`` as a function, since the
stiffly accurate last stage *is* ``y_{n+1}``.
"""

from __future__ import annotations

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from diffrax import ButcherTableau as DiffraxTableau
from diffrax import MultiButcherTableau
from jax.flatten_util import ravel_pytree

from ..core.implicit_methods import IMPLICIT_EULER_DIFFRAX, AdditiveTableau, _tableau
from ..core.implicit_step import implicit_step_vjp
from ..core.step import lincomb
from ..core.tableau import ButcherTableau
from ._diffrax_compat import ω
from ._jax_branch import add_contribution, branch

__all__ = ["ImplicitKernel", "implicit_core_tableau", "resolve_linear_solver"]

_ALTERNATIVE = "use `adjoint=diffrax.RecursiveCheckpointAdjoint()` instead"
SUPPORTED = (
    diffrax.ImplicitEuler,
    diffrax.Kvaerno3,
    diffrax.Kvaerno4,
    diffrax.Kvaerno5,
    diffrax.KenCarp3,
    diffrax.KenCarp4,
    diffrax.KenCarp5,
)


def _from_diffrax(name: str, tab: DiffraxTableau) -> ButcherTableau:
    """A core tableau from diffrax's floats (diagonal included; nodes as diffrax has them)."""
    s = len(tab.b_sol)
    diag = [0.0] * s if tab.a_diagonal is None else [float(x) for x in tab.a_diagonal]
    rows = [[diag[0]]] + [
        [*(float(x) for x in row), diag[i + 1]] for i, row in enumerate(tab.a_lower)
    ]
    return _tableau(
        name, rows, [float(x) for x in tab.b_sol], 1, c=[0.0, *(float(x) for x in tab.c)],
        exact=False,
    )  # fmt: skip


def implicit_core_tableau(solver: Any) -> ButcherTableau | AdditiveTableau | None:
    """The core tableau of a supported implicit/IMEX diffrax solver, ``None`` for a solver
    that is not implicit (the explicit path decides), or raise for other implicit ones."""
    if not isinstance(solver, diffrax.AbstractImplicitSolver):
        return None
    name = type(solver).__name__
    if type(solver) not in SUPPORTED:
        raise NotImplementedError(
            f"`SymplecticAdjoint` handles the implicit solvers ImplicitEuler, Kvaerno3/4/5 "
            f"and KenCarp3/4/5; `{name}` is not one of them: {_ALTERNATIVE}."
        )
    if type(solver) is diffrax.ImplicitEuler:
        # y1 = y0 + K_2, K_2 = h f(t1, y1); K_1 = h f(t0, y0) only feeds the error.
        return IMPLICIT_EULER_DIFFRAX
    tab = type(solver).tableau  # type: ignore[attr-defined]  # every SUPPORTED ESDIRK has one
    if isinstance(tab, MultiButcherTableau):
        explicit, implicit = tab.tableaus
        return AdditiveTableau(
            name.lower(),
            _from_diffrax(f"{name.lower()}_explicit", explicit),
            _from_diffrax(f"{name.lower()}_implicit", implicit),
            order=1,
            exact=False,
        )
    return _from_diffrax(name.lower(), tab)


class ImplicitKernel(eqx.Module):
    """The per-step hooks the reverse sweep calls for an implicit/IMEX solver."""

    tableau: Any = eqx.field(static=True)
    solver: Any
    linear_solver: Any = eqx.field(static=True, default=None)

    @property
    def additive(self) -> bool:
        return isinstance(self.tableau, AdditiveTableau)

    def _rows(self):
        if self.additive:
            return [(self.tableau.explicit, 0), (self.tableau.implicit, 1)]
        return [(self.tableau, None)]

    def step(self, terms, args, tprev, tnext, y_n):
        """``(y_{n+1}, [K_1..K_s])`` by the solver's own step from ``y_n`` (its root find,
        from a fresh solver state: the FSAL value is recomputed, not carried)."""
        state = self.solver.init(terms, tprev, tnext, y_n, args)
        y1, _, info, _, _ = self.solver.step(
            terms, tprev, tnext, y_n, args, state, jnp.asarray(False)
        )
        if type(self.solver) is diffrax.ImplicitEuler:
            # y1 = y0 + K_2 (K_2 = h f(t1, y1)); K_1 only feeds the error estimate.
            return y1, [jtu.tree_map(jnp.zeros_like, y_n), (y1**ω - y_n**ω).ω]
        stages = range(self.tableau.stages)
        return y1, [jtu.tree_map(lambda b, i=i: b[i], info["k"]) for i in stages]

    def advance(self, y_n, ks):
        """``y_n + sum_i b_i K_i`` (both parts' weights for an IMEX pair)."""
        y = ω(y_n)
        for tab, part in self._rows():
            y = lincomb(y, 1, tab.b, [ω(k if part is None else k[part]) for k in ks])
        return y.ω

    def stages(self, terms, args, tprev, tnext, y_n, ks):
        """``(K, X)``: the increments (stored ``ks`` or recomputed by the solver's own step)
        and the stage values ``X_i = y_n + sum_j a_ij K_j``."""
        if ks is None:
            _, ks = self.step(terms, args, tprev, tnext, y_n)
        X = []
        for i in range(self.tableau.stages):
            x = ω(y_n)
            for tab, part in self._rows():
                kk = [ω(k if part is None else k[part]) for k in ks]
                x = lincomb(x, 1, tab.a[i][: i + 1], kk[: i + 1])
            X.append(x.ω)
        return ks, X

    def step_vjp(
        self, terms, args, active, tprev, tnext, stage_time, X, lam, k_extra, y0_extra, acc
    ):
        """``(y0_bar, acc)`` of one step, ``acc = ((args_bar, terms_bar), (tprev_bar,
        tnext_bar))`` accumulated where ``active``: the core's implicit adjoint with lineax
        solves.

        Each stage is the function ``K_i = vf_prod(stage_time(i, tprev, tnext), X_i, args,
        contr(tprev, tnext))`` of ``X_i``, the parameters and the step's ends; with the
        multipliers ``kbar_i`` of the stage equations (implicit function theorem), every
        input's cotangent is that function's VJP with ``kbar_i`` -- the ends' included, so
        the step's time cotangents need nothing else. Each stage runs in a conditional
        (:func:`._jax_branch.branch`: one network graph and one Jacobian alive at a time)."""
        diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
        diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)
        linear_solve = _transposed_solver(self.linear_solver, self.solver)

        def stage_fn(i, part):
            def f(_X, _dargs, _dterms, _tp, _tn):
                _terms = eqx.combine(_dterms, static_terms)
                if part is not None:  # one term of the MultiTerm, with its own control
                    _terms = _multi(_terms).terms[part]
                out = _terms.vf_prod(
                    stage_time(i, _tp, _tn), _X, eqx.combine(_dargs, static_args),
                    _terms.contr(_tp, _tn),
                )  # fmt: skip
                # In the state's dtype, as diffrax stores its increments.
                return jtu.tree_map(lambda o, x: o.astype(jnp.result_type(x)), out, _X)

            return f

        def linearise(i, part, Xi):
            return jax.vjp(stage_fn(i, part), Xi, diff_args, diff_terms, tprev, tnext)[1]

        def pull_into(pull, kbar, carry):
            # Pull back and add into the carry inside the branch: the adds then happen in
            # stage order (outside, XLA fuses them into one late sum over s contributions).
            _Xbar, ab, tb, tpb, tnb = pull(kbar)
            params_bar, pair = carry
            pair = pair + jnp.stack([tpb, tnb]).astype(pair.dtype)
            return _Xbar, (add_contribution(params_bar, (ab, tb), active), pair)

        def stage_vjp(part):
            def vjp(i, Xi, kbar, carry):
                def run(ops):
                    _X, _kbar, _carry = ops
                    _Xbar, _carry = pull_into(linearise(i, part, _X), _kbar, _carry)
                    return _Xbar, _kbar, _carry

                Xbar, _, carry = branch(active, run, (Xi.ω, kbar.ω, carry))
                return ω(Xbar), None, carry

            return vjp

        implicit_part = 1 if self.additive else None

        def solve_and_vjp(i, Xi, gamma, rhs, carry):
            def run(ops):
                _X, _rhs, _carry = ops
                pull = linearise(i, implicit_part, _X)

                def field_X(x):
                    return stage_fn(i, implicit_part)(x, diff_args, diff_terms, tprev, tnext)

                kbar = linear_solve(lambda v: pull(v)[0], field_X, _X, gamma, _rhs)
                _Xbar, _carry = pull_into(pull, kbar, _carry)
                return _Xbar, _rhs, _carry

            Xbar, _, carry = branch(active, run, (Xi.ω, rhs.ω, carry))
            return ω(Xbar), None, carry

        k_bar = None
        if k_extra is not None:
            if self.additive:
                k_bar = ([ω(k.ω[0]) for k in k_extra], [ω(k.ω[1]) for k in k_extra])
            else:
                k_bar = k_extra
        result = implicit_step_vjp(
            self.tableau,
            stage_vjp(implicit_part),
            ω(lam),
            [ω(x) for x in X],
            1,
            solve_and_vjp=solve_and_vjp,
            vjp_explicit=stage_vjp(0) if self.additive else None,
            k_bar=k_bar,
            y0_bar=None if y0_extra is None else ω(y0_extra),
            carry=acc,
            check=False,
        )
        return result.y0_bar.ω, result.carry


def _transposed_solver(linear_solver: Any, solver: Any) -> Any:
    """``solve(pull_X, field_X, X, gamma, rhs) -> kbar`` with ``(I - gamma J)^T kbar = rhs``,
    ``J`` the Jacobian of ``field_X`` at ``X`` and ``pull_X(v) = J^T v`` (one VJP).

    Default (``linear_solver=None``): ``J`` materialised by forward mode (one JVP per state
    component, batched) and lineax's dense LU solve of the transposed system. Measured on the
    stiff benchmark this holds a third of the workspace of materialising ``J^T`` by
    batched VJPs (what lineax does for a function operator), at the same speed. Any lineax
    solver given instead gets the matrix-free operator ``v -> v - gamma J^T v``.
    """
    if linear_solver is None:

        def dense(pull_X, field_X, X, gamma, rhs):
            flat, unravel = ravel_pytree(X)
            jac = jax.jacfwd(lambda x: ravel_pytree(field_X(unravel(x)))[0])(flat)
            matrix = jnp.eye(flat.size, dtype=jac.dtype) - gamma * jac
            operator = lx.MatrixLinearOperator(matrix.T)
            return unravel(lx.linear_solve(operator, ravel_pytree(rhs)[0], lx.LU()).value)

        return dense

    def matrix_free(pull_X, field_X, X, gamma, rhs):
        def op_T(v):
            return (v**ω - gamma * pull_X(v) ** ω).ω

        operator = lx.FunctionLinearOperator(op_T, jax.eval_shape(lambda: rhs))
        return lx.linear_solve(operator, rhs, linear_solver).value

    return matrix_free


def resolve_linear_solver(linear_solver: Any, solver: Any) -> Any:
    """The lineax solver of the transposed stage systems for ``SymplecticAdjoint(
    linear_solver=...)`` (``None``: dense, see :func:`_transposed_solver`).

    ``"gmres"``, the class ``lineax.GMRES`` or ``lineax.GMRES(rtol=None, atol=None)`` (or
    either tolerance ``None``) ask for matrix-free GMRES with the tolerances of the
    forward root finder (``solver.root_finder.rtol``/``atol``): the stages are converged
    to those, so a tighter transposed solve buys no accuracy and a looser one would lose
    some. Any other lineax solver is used as given.

    Raises:
        ValueError: GMRES tolerances to derive from a root finder that has none.
    """
    if linear_solver is None:
        return None
    if isinstance(linear_solver, str) and linear_solver == "gmres" or linear_solver is lx.GMRES:
        linear_solver = lx.GMRES(rtol=None, atol=None)  # type: ignore[arg-type]
    if not isinstance(linear_solver, lx.GMRES):
        return linear_solver
    if linear_solver.rtol is not None and linear_solver.atol is not None:
        return linear_solver
    root = getattr(solver, "root_finder", None)
    tols = {}
    for name in ("rtol", "atol"):
        value = getattr(linear_solver, name)
        if value is None:
            value = getattr(root, name, None)
            if not isinstance(value, (int, float)):  # e.g. diffrax's "from the controller"
                raise ValueError(
                    f"`SymplecticAdjoint(linear_solver=GMRES)` takes its `{name}` from the "
                    f"solver's root finder, but `{type(root).__name__}` has none; pass "
                    f"`lineax.GMRES(rtol=..., atol=...)` explicitly."
                )
        tols[name] = value
    return eqx.tree_at(
        lambda g: (g.rtol, g.atol), linear_solver, (tols["rtol"], tols["atol"]),
        is_leaf=lambda x: x is None,
    )  # fmt: skip


def _multi(terms: Any) -> Any:
    """The ``MultiTerm`` inside ``terms`` (diffrax may wrap it)."""
    while not isinstance(terms, diffrax.MultiTerm):
        terms = terms.term
    return terms
