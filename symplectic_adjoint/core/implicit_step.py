"""One implicit (or IMEX) Runge--Kutta step and its exact discrete adjoint, array-API generic.

Forward (README, How it works: implicit steps)::

    X_i = y_n + h sum_j a_ij k_j,   k_i = f(i, X_i),   y_{n+1} = y_n + h sum_i b_i k_i

with ``j <= i`` for a diagonally implicit tableau (each stage is one nonlinear solve
``k_i = f(i, base_i + h a_ii k_i)``) and all ``j`` for Gauss/Radau (one coupled solve). The
nonlinear solves are injected (:data:`StageSolve`, :data:`CoupledSolve`): the adapters use
their host's root finder so that forward values are the host's; :func:`newton_stage_solve`
and :func:`newton_coupled_solve` are array-API reference Newton iterations (with an injected
linear solve) for tests and NumPy users.

Reverse. Treat the converged stages as the exact solution of ``G(k, y) = 0`` with
``G_i = k_i - f(i, y + h sum_j a_ij k_j)`` (implicit function theorem). The Lagrange
multipliers ``kbar`` of ``G`` solve ``(dG/dk)^T kbar = dL/dk``, i.e. with ``J_i = df/dy``
at ``X_i`` and ``Xbar_i = J_i^T kbar_i`` (one VJP)::

    kbar_i = h b_i lam + h sum_j a_ji Xbar_j (+ extra cotangent on k_i),
    y0_bar = lam + sum_i Xbar_i,    theta_bar = sum_i (VJP of f in theta with kbar_i).

For a diagonally implicit tableau the sum over ``j`` runs over ``j >= i``; moving the
``j = i`` term to the left gives the stage recursion, for ``i = s..1``::

    c_i = h b_i lam + h sum_{j>i} a_ji Xbar_j;   solve (I - h a_ii J_i)^T kbar_i = c_i;
    (Xbar_i, theta_bar_i, tau_i) = VJP of f at stage i with kbar_i

(no solve when ``a_ii = 0``). Fully implicit tableaux solve all stages at once with
``(I - h blockdiag(J)(a (x) I))^T``. The solves are injected (:data:`SolveT`,
:data:`CoupledSolveT`): ``J^T v`` is one VJP, so a Krylov method needs no Jacobian; the
adapters use lineax / torch solvers. Time cotangents are as in the explicit kernel:
``tbar_n = sum_i tau_i`` and ``hbar = sum_i b_i <lam, k_i> + sum_i <Xbar_i, sum_j a_ij k_j>
+ sum_i c_i tau_i`` (with the full rows of ``a``).

IMEX (additive pairs, :class:`~symplectic_adjoint.core.implicit_methods.AdditiveTableau`):
``X_i = y_n + h sum_j (aE_ij kE_j + aI_ij kI_j)``, ``kE_i = f_E(X_i)``, ``kI_i = f_I(X_i)``.
Stationarity of the Lagrangian in ``X_i``, ``kE_i`` and ``kI_i`` gives, for ``i = s..1``::

    kEbar_i = h bE_i lam + h sum_{j>i} aE_ji Xbar_j            (explicit: nothing to solve)
    XE_i    = JE_i^T kEbar_i                                    (VJP of f_E)
    solve (I - h aI_ii JI_i)^T kIbar_i = h bI_i lam + h sum_{j>i} aI_ji Xbar_j + h aI_ii XE_i
    Xbar_i  = XE_i + JI_i^T kIbar_i                              (VJP of f_I)

Structural zeros are ``None`` (never array values), as in :mod:`.step`: a stage whose
right-hand side is structurally zero gets neither a solve nor a VJP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import reduce
from typing import Any, NamedTuple

from .implicit_methods import AdditiveTableau, is_diagonally_implicit
from .step import StageVJP, StepVJP, add, lincomb, vdot
from .tableau import ButcherTableau, TableauError

__all__ = [
    "ImplicitStep",
    "implicit_step",
    "implicit_step_vjp",
    "newton_coupled_solve",
    "newton_stage_solve",
    "validate_implicit",
]

Array = Any
StageFn = Callable[[int, Array], Array]
#: ``stage_solve(i, base_i, gamma_i) -> k_i`` with ``k_i = f(i, base_i + gamma_i k_i)``,
#: ``gamma_i = h a_ii`` (only asked for stages with ``a_ii != 0``).
StageSolve = Callable[[int, Array, Any], Array]
#: ``coupled_solve(y0, h) -> [k_1, ..., k_s]`` solving all stage equations at once.
CoupledSolve = Callable[[Array, Any], list]
#: ``solve_T(i, X_i, gamma_i, rhs) -> kbar_i`` solving ``(I - gamma_i J_i)^T kbar_i = rhs``
#: with ``J_i`` the Jacobian in ``y`` of the (implicit) field at stage ``i``.
SolveT = Callable[[int, Array, Any, Array], Array]
#: ``coupled_solve_T(X, h, rhs) -> kbar`` (lists over stages) solving
#: ``kbar_i - h sum_j a_ji J_j^T kbar_j = rhs_i`` for all ``i`` at once (``rhs_i`` may be
#: ``None`` for zero).
CoupledSolveT = Callable[[Sequence[Array], Any, Sequence[Array | None]], list]
#: ``solve_and_vjp(i, X_i, gamma_i, rhs, carry) -> (Xbar_i, tau_i, carry)``: the transposed
#: solve of :data:`SolveT` followed by the stage VJP with its solution, in one call, so that
#: an adapter linearises the field once per stage for both (replaces ``solve_T`` + ``vjp``
#: on stages with ``a_ii != 0``).
SolveAndVJP = Callable[[int, Array, Any, Array, Any], tuple[Array, Any, Any]]

_INEXACT_ROW_TOLERANCE = Fraction(1, 10**11)  # kencarp5's published rows: ~2e-12


class ImplicitStep(NamedTuple):
    """Result of :func:`implicit_step`."""

    y1: Array
    error: Array | None  # None for methods without an embedded pair
    X: list[Array]  # stage inputs X_1..X_s
    k: Any  # slopes k_1..k_s; for an additive pair the tuple (kE, kI)


def validate_implicit(tableau: ButcherTableau | AdditiveTableau) -> None:
    """Raise :class:`TableauError` unless the tableau can drive the implicit kernels.

    Explicit tableaux are accepted too (every ``a_ii = 0``: no solve is ever asked for).
    Row sums must equal the nodes (to 1e-11 for tableaux stored as approximations).
    """
    parts = (
        (tableau.explicit, tableau.implicit) if isinstance(tableau, AdditiveTableau) else (tableau,)
    )
    for part in parts:
        tol = Fraction(0) if part.exact else _INEXACT_ROW_TOLERANCE
        for i, (row, ci) in enumerate(zip(part.a_exact, part.c_exact, strict=True)):
            if abs(sum(row, Fraction(0)) - ci) > tol:
                raise TableauError(
                    f"{part.name}: row {i + 1} of a sums to {float(sum(row))!r} but "
                    f"c_{i + 1} = {float(ci)!r}"
                )


def _prepare(
    tableau: ButcherTableau | AdditiveTableau, check: bool, explicit_fn: Any, what: str
) -> tuple[ButcherTableau | None, ButcherTableau]:
    """``(explicit part or None, implicit part)``, validated; an additive pair must come
    with its explicit field (``what`` names the argument)."""
    if check:
        validate_implicit(tableau)
    if not isinstance(tableau, AdditiveTableau):
        return None, tableau
    if explicit_fn is None:
        raise TableauError(f"{tableau.name}: an additive pair needs {what}")
    return tableau.explicit, tableau.implicit


def _scaled(x: Array, h: Any, coeff: float) -> Array:
    """``x * (h coeff)`` with one rounding of the scalar when ``h`` is a Python number."""
    return x * (h * coeff) if isinstance(h, (int, float)) else x * coeff * h


def implicit_step(
    tableau: ButcherTableau | AdditiveTableau,
    f: StageFn,
    y0: Array,
    h: Any,
    *,
    stage_solve: StageSolve | None = None,
    coupled_solve: CoupledSolve | None = None,
    f_explicit: StageFn | None = None,
    k1: Array | None = None,
    check: bool = True,
) -> ImplicitStep:
    """Take one implicit (or IMEX) Runge--Kutta step with injected nonlinear solves.

    Arguments:
        tableau: a diagonally implicit or fully implicit :class:`ButcherTableau`, or an
            :class:`AdditiveTableau` (then ``f`` is the implicit field and ``f_explicit``
            the explicit one).
        f: ``f(i, X_i) -> k_i`` (0-based ``i``), the field at stage ``i``'s time.
        y0, h: state and step size.
        stage_solve: per-stage nonlinear solve (diagonally implicit tableaux).
        coupled_solve: all-stage nonlinear solve (fully implicit tableaux).
        k1: first slope if known (FSAL, explicit first stage only).
        check: validate the tableau first.
    """
    tab_e, tab_i = _prepare(tableau, check, f_explicit, "f_explicit")
    s = tab_i.stages
    if not is_diagonally_implicit(tab_i):
        if coupled_solve is None:
            raise TableauError(f"{tab_i.name}: a fully implicit tableau needs coupled_solve")
        k = list(coupled_solve(y0, h))
        X = [lincomb(y0, h, tab_i.a[i], k) for i in range(s)]
        kE: list = []
    else:
        k, kE, X = [], [], []
        for i in range(s):
            base = lincomb(y0, h, tab_i.a[i][:i], k)
            if tab_e is not None:
                base = lincomb(base, h, tab_e.a[i][:i], kE)
            gamma = tab_i.a[i][i]
            if gamma == 0:
                Xi = base
                ki = k1 if (i == 0 and k1 is not None) else f(i, Xi)
            else:
                if stage_solve is None:
                    raise TableauError(f"{tab_i.name}: an implicit stage needs stage_solve")
                ki = stage_solve(i, base, h * gamma)
                Xi = base + _scaled(ki, h, gamma)
            X.append(Xi)
            k.append(ki)
            if tab_e is not None:
                kE.append(f_explicit(i, Xi))  # type: ignore[misc]
    y1 = lincomb(y0, h, tab_i.b, k)
    if tab_e is not None:
        y1 = lincomb(y1, h, tab_e.b, kE)
    err = None
    if tab_i.b_error is not None:
        err = lincomb(None, h, tab_i.b_error, k)
        if tab_e is not None and tab_e.b_error is not None:
            err = lincomb(err, h, tab_e.b_error, kE)
        if err is None:
            err = y0 * 0
    return ImplicitStep(y1=y1, error=err, X=X, k=(kE, k) if tab_e is not None else k)


def implicit_step_vjp(
    tableau: ButcherTableau | AdditiveTableau,
    vjp: StageVJP,
    y1_bar: Array | None,
    X: Sequence[Array],
    h: Any,
    *,
    solve_T: SolveT | None = None,
    coupled_solve_T: CoupledSolveT | None = None,
    solve_and_vjp: SolveAndVJP | None = None,
    vjp_explicit: StageVJP | None = None,
    k: Any = None,
    k_bar: Any = None,
    y0_bar: Array | None = None,
    k1_given: bool = False,
    carry: Any = None,
    need_h_bar: bool = False,
    check: bool = True,
) -> StepVJP:
    """Discrete adjoint of :func:`implicit_step` (see the module docstring).

    Arguments:
        tableau: as for :func:`implicit_step`.
        vjp: ``vjp(i, X_i, kbar_i, carry) -> (Xbar_i, tau_i, carry)`` of the (implicit)
            field, as for :func:`~symplectic_adjoint.core.step.rk_step_vjp`.
        y1_bar: cotangent on ``y_{n+1}`` (``None`` for zero).
        X: the converged stage inputs (recomputed by the same root find, or stored).
        h: the step size.
        solve_T: ``solve_T(i, X_i, h a_ii, rhs) -> kbar_i`` (diagonally implicit stages).
        coupled_solve_T: ``coupled_solve_T(X, h, rhs) -> kbar`` (fully implicit tableaux).
        solve_and_vjp: the solve and the stage VJP in one call (instead of ``solve_T``).
        vjp_explicit: the VJP of the explicit field (additive pairs).
        k: stage slopes (``(kE, kI)`` for a pair); needed only for ``need_h_bar``.
        k_bar: extra cotangents on the slopes (``(kE_bar, kI_bar)`` for a pair).
        y0_bar: extra cotangent on ``y_n``.
        k1_given: the first slope was supplied to the forward (FSAL; explicit first stage
            only); its cotangent is returned as ``k1_bar`` and stage 1 is not differentiated.
        carry, need_h_bar, check: as for ``rk_step_vjp``.
    """
    tab_e, tab_i = _prepare(tableau, check, vjp_explicit, "vjp_explicit")
    s = tab_i.stages
    kE_extra, kI_extra = (k_bar if k_bar is not None else (None, None)) if tab_e else (None, k_bar)
    a, b = tab_i.a, tab_i.b
    Xbar: list[Array | None] = [None] * s
    tau: list[Any] = [None] * s
    k1_bar = None

    def lam_term(weight: float) -> Array | None:
        if y1_bar is None or weight == 0:
            return None
        return _scaled(y1_bar, h, weight)

    if not is_diagonally_implicit(tab_i):
        if coupled_solve_T is None:
            raise TableauError(f"{tab_i.name}: a fully implicit tableau needs coupled_solve_T")
        rhs = [add(lam_term(b[i]), None if kI_extra is None else kI_extra[i]) for i in range(s)]
        if any(r is not None for r in rhs):
            kbars = coupled_solve_T(X, h, rhs)
            for i in range(s):
                Xbar[i], tau[i], carry = vjp(i, X[i], kbars[i], carry)
    else:
        for i in reversed(range(s)):
            xe = te = None
            if tab_e is not None:
                ke = lincomb(None, h, [tab_e.a[j][i] for j in range(i + 1, s)], Xbar[i + 1 :])
                ke = add(ke, lam_term(tab_e.b[i]))
                ke = add(ke, None if kE_extra is None else kE_extra[i])
                if ke is not None:
                    xe, te, carry = vjp_explicit(i, X[i], ke, carry)  # type: ignore[misc]
            # h (sum_{j>i} a_ji Xbar_j + b_i y1_bar): one sum (lincomb skips the zeros)
            rhs = lincomb(None, h, [*(a[j][i] for j in range(i + 1, s)), b[i]],
                          [*Xbar[i + 1 :], y1_bar])  # fmt: skip
            rhs = add(rhs, None if kI_extra is None else kI_extra[i])
            gamma = a[i][i]
            if gamma != 0 and xe is not None:
                rhs = add(rhs, _scaled(xe, h, gamma))
            xi = ti = None
            if rhs is not None:
                if i == 0 and k1_given:
                    if gamma != 0:
                        raise TableauError(f"{tab_i.name}: k1 can only be given for a_11 = 0")
                    k1_bar = rhs
                elif gamma != 0 and solve_and_vjp is not None:
                    xi, ti, carry = solve_and_vjp(i, X[i], h * gamma, rhs, carry)
                else:
                    if gamma != 0:
                        if solve_T is None:
                            raise TableauError(f"{tab_i.name}: an implicit stage needs solve_T")
                        rhs = solve_T(i, X[i], h * gamma, rhs)
                    xi, ti, carry = vjp(i, X[i], rhs, carry)
            Xbar[i] = add(xe, xi)
            tau[i] = add(te, ti)

    lam = reduce(add, [*Xbar, y0_bar], y1_bar)
    if lam is None:
        lam = next(x for x in X if x is not None) * 0  # (a stored-stages y_n may be dropped)
    t_bar = reduce(add, tau, None)

    h_bar = None
    if need_h_bar:
        if k is None:
            raise ValueError("implicit_step_vjp: need_h_bar=True requires the stage slopes k")
        parts = [(tab_i, k if tab_e is None else k[1])]
        if tab_e is not None:
            parts.append((tab_e, k[0]))
        for part, kp in parts:
            if y1_bar is not None:
                for i in range(s):
                    if part.b[i] != 0:
                        h_bar = add(h_bar, vdot(y1_bar, kp[i]) * part.b[i])
            for i in range(s):
                if Xbar[i] is not None:
                    inc = lincomb(None, 1.0, part.a[i], kp)
                    if inc is not None:
                        h_bar = add(h_bar, vdot(Xbar[i], inc))
        c = tab_i.c
        for i in range(s):
            if tau[i] is not None and c[i] != 0:
                h_bar = add(h_bar, tau[i] * c[i])
    return StepVJP(y0_bar=lam, k1_bar=k1_bar, t_bar=t_bar, h_bar=h_bar, carry=carry)


# ------------------------------------------------------------------ reference Newton solves
def _max_abs(x: Array) -> float:
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    return float(xp.max(xp.abs(x)))


#: ``linear_solve(i, X, gamma, r) -> d`` solving ``(I - gamma J(X)) d = r`` at stage ``i``.
LinearSolve = Callable[[int, Array, Any, Array], Array]


def newton_stage_solve(
    f: StageFn, linear_solve: LinearSolve, *, tol: float = 1e-14, max_iter: int = 50
) -> StageSolve:
    """A reference :data:`StageSolve`: Newton on ``k - f(i, base + gamma k) = 0`` from
    ``k = f(i, base)``, stopping when the update's max-norm is below ``tol`` times
    ``1 + max|k|``. For tests and NumPy use (it reads values, so it synchronises)."""

    def solve(i: int, base: Array, gamma: Any) -> Array:
        ki = f(i, base)
        for _ in range(max_iter):
            Xi = base + ki * gamma
            d = linear_solve(i, Xi, gamma, f(i, Xi) - ki)
            ki = ki + d
            if _max_abs(d) <= tol * (1.0 + _max_abs(ki)):
                return ki
        raise RuntimeError(f"newton_stage_solve: stage {i} did not converge in {max_iter}")

    return solve


#: ``coupled_linear_solve(X, h, r) -> d`` solving ``d_i - h J(X_i) sum_j a_ij d_j = r_i``.
CoupledLinearSolve = Callable[[Sequence[Array], Any, Sequence[Array]], list]


def newton_coupled_solve(
    tableau: ButcherTableau,
    f: StageFn,
    linear_solve: CoupledLinearSolve,
    *,
    tol: float = 1e-14,
    max_iter: int = 50,
) -> CoupledSolve:
    """A reference :data:`CoupledSolve` for fully implicit tableaux: Newton on
    ``k_i - f(i, y0 + h sum_j a_ij k_j) = 0`` for all stages, from ``k_i = f(i, y0)``."""
    s = tableau.stages

    def solve(y0: Array, h: Any) -> list:
        k = [f(i, y0) for i in range(s)]
        for _ in range(max_iter):
            X = [lincomb(y0, h, tableau.a[i], k) for i in range(s)]
            d = linear_solve(X, h, [f(i, X[i]) - k[i] for i in range(s)])
            k = [ki + di for ki, di in zip(k, d, strict=True)]
            size = max(_max_abs(di) for di in d)
            if size <= tol * (1.0 + max(_max_abs(ki) for ki in k)):
                return k
        raise RuntimeError(f"newton_coupled_solve: no convergence in {max_iter} iterations")

    return solve
