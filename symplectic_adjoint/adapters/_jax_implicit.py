"""Implicit and IMEX solvers in the diffrax adapter: ``ImplicitEuler``, ``Kvaerno3/4/5``
(ESDIRK) and ``KenCarp3/4/5`` (ERK/ESDIRK pairs on ``MultiTerm(explicit, implicit)``).

The forward pass is diffrax's own solver step (root finder included), recorded like the
explicit solvers. The reverse sweep of :mod:`._jax_reverse` calls the two hooks of
:class:`ImplicitKernel` per step:

* :meth:`ImplicitKernel.stages`: the increments ``K_i`` of step ``n`` -- read back
  (``checkpoint="stages"``) or recomputed from ``y_n`` by the same solver step, i.e. the
  same root find (``"states"``) -- and the stage values ``X_i = y_n + sum_j a_ij K_j``
  (full lower rows, diagonal included; diffrax's increments contain the step, so the
  kernels run with ``h = 1``);
* :meth:`ImplicitKernel.step_vjp`: the core's exact adjoint of the implicit step
  (:func:`symplectic_adjoint.core.implicit_step.implicit_step_vjp`): per stage, from the
  last, the transposed solve ``(I - a_ii J_i)^T kbar_i = rhs_i`` with ``J_i^T v`` one VJP
  of the implicit term's ``vf_prod`` (a lineax ``FunctionLinearOperator``: dense LU by
  default, or any lineax solver such as ``lineax.GMRES`` matrix-free), then the stage VJP
  with ``kbar_i``; the term is linearised once per stage for both.

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
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from diffrax import ButcherTableau as DiffraxTableau
from diffrax import MultiButcherTableau

from ..core.implicit_methods import IMPLICIT_EULER_DIFFRAX, AdditiveTableau, _tableau
from ..core.implicit_step import implicit_step_vjp
from ..core.step import lincomb
from ..core.tableau import ButcherTableau
from ._diffrax_compat import ω

__all__ = ["ImplicitKernel", "implicit_core_tableau"]

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


def _tree_add(a: Any, b: Any) -> Any:
    return jtu.tree_map(jnp.add, a, b)


class ImplicitKernel(eqx.Module):
    """The two per-step hooks the reverse sweep calls for an implicit/IMEX solver."""

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

    def stages(self, terms, args, tprev, tnext, y_n, ks):
        """``(K, X)``: the increments (stored ``ks`` or recomputed by the solver's own step)
        and the stage values ``X_i = y_n + sum_j a_ij K_j``."""
        s = self.tableau.stages
        if ks is None:
            state = self.solver.init(terms, tprev, tnext, y_n, args)
            y1, _, info, _, _ = self.solver.step(
                terms, tprev, tnext, y_n, args, state, jnp.asarray(False)
            )
            if type(self.solver) is diffrax.ImplicitEuler:
                ks = [jtu.tree_map(jnp.zeros_like, y_n), (y1**ω - y_n**ω).ω]
                return ks, [y_n, y1]
            ks = [jtu.tree_map(lambda b, i=i: b[i], info["k"]) for i in range(s)]
        X = []
        for i in range(s):
            x = ω(y_n)
            for tab, part in self._rows():
                kk = [ω(k if part is None else k[part]) for k in ks]
                x = lincomb(x, 1, tab.a[i][: i + 1], kk[: i + 1])
            X.append(x.ω)
        return ks, X

    def step_vjp(self, terms, args, n, times, control, X, lam, k_extra, y0_extra, acc):
        """``(y0_bar, acc)`` of one step: the core's implicit adjoint with lineax solves."""
        diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
        diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)
        linear_solver = lx.LU() if self.linear_solver is None else self.linear_solver

        def part_fn(i, part):
            def f(_X, _dargs, _dterms):
                _terms, _control = eqx.combine(_dterms, static_terms), control
                if part is not None:  # one term of the MultiTerm, with its own control
                    _terms, _control = _multi(_terms).terms[part], control[part]
                return _terms.vf_prod(times[i], _X, eqx.combine(_dargs, static_args), _control)

            return f

        def stage_vjp(part):
            def vjp(i, Xi, kbar, carry):
                def run(ops):
                    _X, _kbar, _dargs, _dterms, _acc = ops
                    _, pull = jax.vjp(part_fn(i, part), _X, _dargs, _dterms)
                    _Xbar, ab, tb = pull(_kbar)
                    return _Xbar, _tree_add(_acc, (ab, tb))

                Xbar, carry = lax.cond(
                    n >= 0, run, _skip, (Xi.ω, kbar.ω, diff_args, diff_terms, carry)
                )
                return ω(Xbar), None, carry

            return vjp

        implicit_part = 1 if self.additive else None

        def solve_and_vjp(i, Xi, gamma, rhs, carry):
            def run(ops):
                _X, _rhs, _dargs, _dterms, _acc = ops
                _, pull = jax.vjp(part_fn(i, implicit_part), _X, _dargs, _dterms)

                def op_T(v):  # (I - gamma J_i)^T v
                    return (v**ω - gamma * pull(v)[0] ** ω).ω

                operator = lx.FunctionLinearOperator(op_T, jax.eval_shape(lambda: _rhs))
                kbar = lx.linear_solve(operator, _rhs, linear_solver).value
                _Xbar, ab, tb = pull(kbar)
                return _Xbar, _tree_add(_acc, (ab, tb))

            Xbar, carry = lax.cond(n >= 0, run, _skip, (Xi.ω, rhs.ω, diff_args, diff_terms, carry))
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


def _skip(ops):  # never taken; the same structure as the VJP's result
    _X, _, _, _, _acc = ops
    return jtu.tree_map(jnp.zeros_like, _X), _acc


def _multi(terms: Any) -> Any:
    """The ``MultiTerm`` inside ``terms`` (diffrax may wrap it)."""
    while not isinstance(terms, diffrax.MultiTerm):
        terms = terms.term
    return terms
