"""The methods the torch adapter integrates: names, solver classes, tableaux, dense outputs.

:data:`SOLVERS` is this adapter's own name -> solver class table: torchdiffeq's
Runge--Kutta classes under their torchdiffeq names, and :class:`Tsit5Solver` (ours) as
``"tsit5"``. It is a separate dict built from a fixed list of names, so torchdiffeq's
registry is never changed and a later torchdiffeq that registers solvers of its own
(``tsit5``, implicit methods) changes nothing here: ``"tsit5"`` stays ours, and names
outside :data:`ADAPTIVE_METHODS`/:data:`FIXED_METHODS` are not integrated.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

import torch

from ..core import ButcherTableau, DenseOutput, get_tableau
from ..core.interpolants import diffrax_interpolant, torchdiffeq_interpolant
from ._torch_implicit import (
    IMPLICIT_ADAPTIVE_METHODS,
    IMPLICIT_FIXED_METHODS,
    IMPLICIT_METHODS,
    IMPLICIT_SOLVERS,
    implicit_interpolant,
    implicit_tableau,
)
from ._torchdiffeq_compat import (
    TORCHDIFFEQ_SOLVERS,
    RKAdaptiveStepsizeODESolver,
    TorchdiffeqTableau,
)

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "METHODS",
    "OWN_METHODS",
    "REFUSED_METHODS",
    "SOLVERS",
    "MethodSpec",
    "Tsit5Solver",
    "method_spec",
]

#: Explicit adaptive methods (torchdiffeq's and tsit5); the implicit ones are
#: :data:`~._torch_implicit.IMPLICIT_ADAPTIVE_METHODS`.
ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")
#: Explicit fixed-grid methods; the implicit ones are ``IMPLICIT_FIXED_METHODS``.
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
#: Every method this adapter integrates (torchdiffeq's Runge--Kutta methods, tsit5, and the
#: implicit methods of :mod:`._torch_implicit`: torchdiffeq master's names and kvaerno3/4/5).
METHODS = (*ADAPTIVE_METHODS, *FIXED_METHODS, *IMPLICIT_FIXED_METHODS,
           *IMPLICIT_ADAPTIVE_METHODS)  # fmt: skip
REFUSED_METHODS = {
    "explicit_adams": "a linear multistep method (each step reuses earlier slopes)",
    "implicit_adams": "an implicit linear multistep method (solved by fixed-point iteration)",
    "fixed_adams": "an implicit linear multistep method (solved by fixed-point iteration)",
    "scipy_solver": "a wrapper around SciPy's solvers, which torch cannot see into",
}


def _torchdiffeq_tableau(tab: ButcherTableau) -> Any:
    """A core tableau in torchdiffeq's layout (float64 tensors, nodes without c_1)."""
    s = tab.stages
    return TorchdiffeqTableau(
        alpha=torch.tensor(tab.c[1:], dtype=torch.float64),
        beta=[torch.tensor(tab.a[i][:i], dtype=torch.float64) for i in range(1, s)],
        c_sol=torch.tensor(tab.b, dtype=torch.float64),
        c_error=torch.tensor(tab.b_error, dtype=torch.float64),
    )


class Tsit5Solver(RKAdaptiveStepsizeODESolver):
    """Tsitouras' 5(4) pair in torchdiffeq's adaptive machinery (not part of torchdiffeq).

    Steps, error control and options are those of every torchdiffeq adaptive solver;
    output times are interpolated with Tsit5's own degree-4 dense output (the
    polynomials diffrax uses), ``y(t_n + theta h) = y_n + h sum_i w_i(theta) k_i``.
    """

    order = 5
    tableau = _torchdiffeq_tableau(get_tableau("tsit5"))
    mid = torch.zeros(7, dtype=torch.float64)  # unused: _interp_fit is replaced below

    def __init__(self, func: Any, y0: torch.Tensor, rtol: Any, atol: Any, **kwargs: Any) -> None:
        super().__init__(func, y0, rtol, atol, **kwargs)
        # W[i, p]: coefficient of theta**p in w_i; stage coefficients take y's dtype, as
        # torchdiffeq casts its tableaux.
        self._dense_w = torch.tensor(
            diffrax_interpolant("Tsit5").W, dtype=y0.dtype, device=y0.device
        )

    def _interp_fit(self, y0, y1, k, dt):
        # torchdiffeq evaluates sum_p coeff[p] x**p: coeff[0] = y0, coeff[p] = dt W[:, p].k
        coeff = torch.matmul(k, self._dense_w) * dt.type_as(y0)
        return [y0, *(coeff[..., p] for p in range(1, coeff.shape[-1]))]


#: torchdiffeq's Runge--Kutta solvers plus tsit5 (name -> solver class); never the
#: registry torchdiffeq itself uses.
SOLVERS: dict[str, type] = {
    **{name: TORCHDIFFEQ_SOLVERS[name] for name in ADAPTIVE_METHODS if name != "tsit5"},
    "tsit5": Tsit5Solver,
    **{name: TORCHDIFFEQ_SOLVERS[name] for name in FIXED_METHODS},
    **IMPLICIT_SOLVERS,
}
#: Methods whose solver classes are ours (``adjoint="backprop"`` runs them with autograd;
#: ``torchdiffeq.odeint_adjoint`` cannot run them).
OWN_METHODS = ("tsit5", *IMPLICIT_METHODS)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the adjoint needs to know about one method (built once per method/interp).

    Attributes:
        method: the method's name in :data:`SOLVERS`.
        adaptive: an adaptive (error-controlled) solver, else a fixed-grid one.
        tableau: the tableau torchdiffeq steps with (its ``rk4`` is the 3/8 rule),
            validated once here, so the kernels skip the check per step.
        dense: the dense output of outputs inside a step (tsit5: its own; adaptive:
            torchdiffeq's quartic; fixed grid: linear or cubic Hermite).
        cubic: fixed grid with ``interp="cubic"`` (one extra slope ``f(t_{n+1}, y_{n+1})``).
        fsal_at_y1: an adaptive FSAL method whose last stage is evaluated at ``y_{n+1}``
            itself (torchdiffeq then skips recomputing ``y_1``): its carried slope is a
            function of ``y_{n+1}``.
        keep_k1: adaptive but not ``fsal_at_y1`` (fehlberg2, adaptive_heun): the carried
            first slope is not a function of ``y_n`` and is kept with each state.
        implicit: an implicit method (stages by Newton; the adjoint solves transposed
            systems, :mod:`._torch_implicit`).
    """

    method: str
    adaptive: bool
    tableau: ButcherTableau
    dense: DenseOutput
    cubic: bool
    fsal_at_y1: bool
    keep_k1: bool
    implicit: bool = False


@cache
def method_spec(method: str, interp: str = "linear") -> MethodSpec:
    """The :class:`MethodSpec` of ``method`` (``interp`` matters for fixed grids only)."""
    adaptive = method in ADAPTIVE_METHODS or method in IMPLICIT_ADAPTIVE_METHODS
    if method in IMPLICIT_METHODS:  # the carried slope is f(y_n) itself: nothing to keep
        return MethodSpec(
            method=method, adaptive=adaptive, tableau=implicit_tableau(method),
            dense=implicit_interpolant(method, interp), cubic=False, fsal_at_y1=False,
            keep_k1=False, implicit=True,
        )  # fmt: skip
    tab = get_tableau("rk38" if method == "rk4" else method)
    tab.validate()
    cubic = not adaptive and interp == "cubic"
    if method == "tsit5":
        dense = diffrax_interpolant("Tsit5")
    else:
        dense = torchdiffeq_interpolant(method, "cubic" if cubic else "linear")
    s = tab.stages
    fsal_at_y1 = (
        adaptive
        and tab.b_exact[-1] == 0
        and all(tab.a_exact[-1][j] == tab.b_exact[j] for j in range(s - 1))
    )
    return MethodSpec(
        method=method, adaptive=adaptive, tableau=tab, dense=dense, cubic=cubic,
        fsal_at_y1=fsal_at_y1, keep_k1=adaptive and not fsal_at_y1,
    )  # fmt: skip
