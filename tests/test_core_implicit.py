"""Implicit and IMEX Runge--Kutta: tableaux and their order conditions, the forward step and
its exact discrete adjoint against the linear oracle (y' = A y: one step is a rational map
M(A) y), the exact A-derivative of that map, and finite differences on a nonlinear field."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from core_support import (
    Params,
    asarray,
    field,
    field_vjp,
    namespace,
    random_params,
    rel_err,
    to_numpy,
)

from symplectic_adjoint.core import TABLEAUX, TableauError, get_tableau, rk_step, vdot
from symplectic_adjoint.core.implicit_methods import (
    ADDITIVE_TABLEAUX,
    IMPLICIT_TABLEAUX,
    get_implicit_tableau,
    is_diagonally_implicit,
)
from symplectic_adjoint.core.implicit_step import (
    implicit_step,
    implicit_step_vjp,
    newton_coupled_solve,
    newton_stage_solve,
    validate_implicit,
)
from symplectic_adjoint.core.order import (
    additive_measured_order,
    additive_order_residual,
    check_order,
    measured_order,
    order_conditions_residual,
)

D = 4
T0, H = 0.7, 0.3
XPS = ["numpy", "array_api_strict"]
IMPLICIT = sorted(IMPLICIT_TABLEAUX)
ADDITIVE = sorted(ADDITIVE_TABLEAUX)
FULLY = [n for n in IMPLICIT if not is_diagonally_implicit(IMPLICIT_TABLEAUX[n])]

# ---------------------------------------------------------------------------- tableaux
#: Order conditions hold to this for tableaux stored as approximations; kencarp5's published
#: rationals agree with each other to ~2e-12 only (diffrax uses the same numbers).
TOL = {"kencarp5": Fraction(1, 10**11)}


def _tol(name: str, exact: bool) -> Fraction:
    return Fraction(0) if exact else TOL.get(name, Fraction(1, 10**12))


def test_registry_lookups_and_the_explicit_kernels_refuse_implicit_tableaux():
    assert get_implicit_tableau("Kvaerno5") is IMPLICIT_TABLEAUX["kvaerno5"]
    assert get_implicit_tableau("KenCarp4") is ADDITIVE_TABLEAUX["kencarp4"]
    assert get_implicit_tableau("ImplicitEuler").name == "implicit_euler_trapezoid"
    assert get_implicit_tableau("radauiia5").name == "radauIIA5"
    with pytest.raises(TableauError, match="unknown implicit method"):
        get_implicit_tableau("dopri5")
    assert not set(IMPLICIT_TABLEAUX) & set(TABLEAUX)
    with pytest.raises(TableauError):
        get_tableau("kvaerno5")
    for tab in IMPLICIT_TABLEAUX.values():
        assert not tab.is_explicit
        with pytest.raises(TableauError, match="implicit"):
            tab.validate()
        with pytest.raises(TableauError, match="implicit"):
            rk_step(tab, lambda i, X: X, np.ones(2), 0.1)


@pytest.mark.parametrize("name", IMPLICIT)
def test_implicit_tableaux_have_their_order_and_embedded_order(name):
    tab = IMPLICIT_TABLEAUX[name]
    assert order_conditions_residual(tab, tab.order) <= _tol(name, tab.exact)
    assert measured_order(tab) == tab.order
    assert order_conditions_residual(tab, tab.order + 1) > Fraction(1, 10**6)
    if tab.is_adaptive:
        assert measured_order(tab, embedded=True) == tab.embedded_order
    check_order(tab)
    validate_implicit(tab)


@pytest.mark.parametrize("name", ADDITIVE)
def test_additive_pairs_satisfy_every_coloured_order_condition(name):
    pair = ADDITIVE_TABLEAUX[name]
    mats = [pair.explicit.a_exact, pair.implicit.a_exact]
    tol = _tol(name, pair.exact)
    for embedded, p in ((False, pair.order), (True, pair.embedded_order)):
        w = [
            pair.explicit.bhat_exact if embedded else pair.explicit.b_exact,
            pair.implicit.bhat_exact if embedded else pair.implicit.b_exact,
        ]
        assert additive_order_residual(w, mats, p) <= tol
        assert additive_order_residual(w, mats, p + 1) > Fraction(1, 10**6)
        assert additive_measured_order(w, mats, max_order=p + 1, tol=tol) == p
    # One part alone is an ordinary tableau: the coloured residual reduces to the plain one.
    tab = pair.implicit
    assert additive_order_residual([tab.b_exact], [tab.a_exact], 3) == order_conditions_residual(
        tab, 3
    )
    validate_implicit(pair)


# ------------------------------------------------------------------------- the oracle
def _kron_pieces(parts, h: float):
    """For an (additive) RK method on y' = sum_nu A_nu y with ``parts`` = [(a, b, A)]:
    S = I - h sum_nu a_nu (x) A_nu, B = h sum_nu b_nu^T (x) A_nu and Z = S^{-1} (1 (x) I);
    one step is y -> M y with M = I + B Z."""
    s, d = len(parts[0][1]), parts[0][2].shape[0]
    S, B = np.eye(s * d), np.zeros((d, s * d))
    for a, b, A in parts:
        S -= h * np.kron(np.array(a, dtype=float), A)
        B += h * np.kron(np.array([b], dtype=float), A)
    return S, B, np.linalg.solve(S, np.kron(np.ones((s, 1)), np.eye(d)))


def _kron_oracle(parts, h: float) -> np.ndarray:
    _, B, Z = _kron_pieces(parts, h)
    return np.eye(B.shape[0]) + B @ Z


def _oracle_derivative(parts, h: float, which: int) -> np.ndarray:
    """``dM/dA_which`` as a (d, d, d, d) array: [p, q] is dM along the unit matrix E_pq
    (dM = dB Z - B S^{-1} dS Z)."""
    S, B, Z = _kron_pieces(parts, h)
    d = B.shape[0]
    a_w, b_w, _ = parts[which]
    out = np.zeros((d, d, d, d))
    for p in range(d):
        for q in range(d):
            E = np.zeros((d, d))
            E[p, q] = 1.0
            dB = h * np.kron(np.array([b_w], dtype=float), E)
            dS = -h * np.kron(np.array(a_w, dtype=float), E)
            out[p, q] = dB @ Z - B @ np.linalg.solve(S, dS @ Z)
    return out


def _random_matrix(rng, scale: float) -> np.ndarray:
    A = rng.standard_normal((D, D))
    return A * (scale / np.linalg.norm(A, 2))


def _dense_solvers(xp, jac):
    """The injected solves of an adapter, done densely in NumPy: ``jac(i, X)`` is the
    Jacobian of the (implicit) field at stage i."""

    def lin(i, X, gamma, r):
        J = jac(i, X)
        g = float(to_numpy(gamma))
        return asarray(xp, np.linalg.solve(np.eye(len(J)) - g * J, to_numpy(r)))

    def solve_T(i, X, gamma, rhs):
        J = jac(i, X)
        g = float(to_numpy(gamma))
        return asarray(xp, np.linalg.solve((np.eye(len(J)) - g * J).T, to_numpy(rhs)))

    return lin, solve_T


def _coupled_solvers(xp, tab, jac):
    s = tab.stages
    a = np.array(tab.a)

    def big(X, h):
        Js = [jac(i, X[i]) for i in range(s)]
        d = Js[0].shape[0]
        K = np.eye(s * d)
        for i in range(s):
            for j in range(s):
                K[i * d : (i + 1) * d, j * d : (j + 1) * d] -= float(to_numpy(h)) * a[i, j] * Js[i]
        return K, d

    def lin(X, h, r):
        K, d = big(X, h)
        out = np.linalg.solve(K, np.concatenate([to_numpy(v) for v in r]))
        return [asarray(xp, out[i * d : (i + 1) * d]) for i in range(s)]

    def solve_T(X, h, rhs):
        K, d = big(X, h)
        r = np.concatenate([np.zeros(d) if v is None else to_numpy(v) for v in rhs])
        out = np.linalg.solve(K.T, r)
        return [asarray(xp, out[i * d : (i + 1) * d]) for i in range(s)]

    return lin, solve_T


def _solver_kwargs(xp, tab, f, jac):
    """Forward and reverse keyword arguments for ``tab`` with field ``f`` and Jacobian."""
    if is_diagonally_implicit(tab):
        lin, solve_T = _dense_solvers(xp, jac)
        return {"stage_solve": newton_stage_solve(f, lin)}, {"solve_T": solve_T}
    lin, solve_T = _coupled_solvers(xp, tab, jac)
    return {"coupled_solve": newton_coupled_solve(tab, f, lin)}, {"coupled_solve_T": solve_T}


def _linear_vjp(Ax):
    """VJP of X -> A X: Xbar = A^T kbar, carry += kbar X^T (the A-cotangent)."""

    def vjp(i, X, kb, carry):
        Abar = to_numpy(kb)[:, None] * to_numpy(X)[None, :]
        return Ax.T @ kb, None, (Abar if carry is None else carry + Abar)

    return vjp


@pytest.mark.parametrize("xp_name", XPS)
@pytest.mark.parametrize("name", IMPLICIT)
def test_linear_ode_step_and_adjoint_are_the_rational_map(name, xp_name):
    """Forward y1 = M y, reverse y0_bar = M^T lam, A_bar = the exact derivative of
    <lam, M(A) y> (analytic, from the Kronecker form), error estimate (M - Mhat) y."""
    xp, tab = namespace(xp_name), IMPLICIT_TABLEAUX[name]
    rng = np.random.default_rng(1)
    A = _random_matrix(rng, 3.0)
    y, lam = rng.standard_normal(D), rng.standard_normal(D)
    M = _kron_oracle([(tab.a_exact, tab.b_exact, A)], H)
    Ax = asarray(xp, A)
    fwd, rev = _solver_kwargs(xp, tab, lambda i, X: Ax @ X, lambda i, X: A)

    step = implicit_step(tab, lambda i, X: Ax @ X, asarray(xp, y), H, **fwd)
    assert rel_err(step.y1, M @ y) <= 1e-12
    res = implicit_step_vjp(tab, _linear_vjp(Ax), asarray(xp, lam), step.X, H, **rev)
    assert rel_err(res.y0_bar, M.T @ lam) <= 1e-12
    dM = _oracle_derivative([(tab.a_exact, tab.b_exact, A)], H, 0)
    assert rel_err(res.carry, np.einsum("i,pqij,j->pq", lam, dM, y)) <= 1e-12
    if tab.is_adaptive:
        Mhat = _kron_oracle([(tab.a_exact, tab.bhat_exact, A)], H)
        assert np.linalg.norm(to_numpy(step.error) - (M - Mhat) @ y) <= 1e-14 * np.linalg.norm(y)
    else:
        assert step.error is None


@pytest.mark.parametrize("xp_name", XPS)
@pytest.mark.parametrize("name", ADDITIVE)
def test_imex_linear_oracle_forward_adjoint_and_both_matrix_gradients(name, xp_name):
    """y' = A_E y + A_I y with f_E explicit and f_I implicit: the step is the additive
    rational map; the adjoint, A_E- and A_I-gradients are exact."""
    xp, pair = namespace(xp_name), ADDITIVE_TABLEAUX[name]
    rng = np.random.default_rng(5)
    AE, AI = _random_matrix(rng, 1.0), _random_matrix(rng, 4.0)
    y, lam = rng.standard_normal(D), rng.standard_normal(D)
    parts = [
        (pair.explicit.a_exact, pair.explicit.b_exact, AE),
        (pair.implicit.a_exact, pair.implicit.b_exact, AI),
    ]
    M = _kron_oracle(parts, H)
    AEx, AIx = asarray(xp, AE), asarray(xp, AI)
    lin, solve_T = _dense_solvers(xp, lambda i, X: AI)
    step = implicit_step(
        pair,
        lambda i, X: AIx @ X,
        asarray(xp, y),
        H,
        stage_solve=newton_stage_solve(lambda i, X: AIx @ X, lin),
        f_explicit=lambda i, X: AEx @ X,
    )
    assert rel_err(step.y1, M @ y) <= 1e-12

    def tagged(Ax, key):
        base = _linear_vjp(Ax)

        def vjp(i, X, kb, carry):
            Xb, tau, Abar = base(i, X, kb, None)
            return Xb, tau, {**carry, key: carry[key] + Abar}

        return vjp

    zero = {"E": np.zeros((D, D)), "I": np.zeros((D, D))}
    res = implicit_step_vjp(
        pair,
        tagged(AIx, "I"),
        asarray(xp, lam),
        step.X,
        H,
        solve_T=solve_T,
        vjp_explicit=tagged(AEx, "E"),
        carry=zero,
    )
    assert rel_err(res.y0_bar, M.T @ lam) <= 1e-12
    # The fused solve-and-VJP hook (one linearisation per stage) gives the same.
    vjpI = tagged(AIx, "I")
    fused = implicit_step_vjp(
        pair, vjpI, asarray(xp, lam), step.X, H, vjp_explicit=tagged(AEx, "E"), carry=zero,
        solve_and_vjp=lambda i, X, g, rhs, carry: vjpI(i, X, solve_T(i, X, g, rhs), carry),
    )  # fmt: skip
    assert rel_err(fused.y0_bar, res.y0_bar) <= 1e-15
    for key, which in (("E", 0), ("I", 1)):
        ref = np.einsum("i,pqij,j->pq", lam, _oracle_derivative(parts, H, which), y)
        assert rel_err(res.carry[key], ref) <= 1e-11, key
    bhat = [
        (pair.explicit.a_exact, pair.explicit.bhat_exact, AE),
        (pair.implicit.a_exact, pair.implicit.bhat_exact, AI),
    ]
    err = to_numpy(step.error) - (M - _kron_oracle(bhat, H)) @ y
    assert np.linalg.norm(err) <= 1e-14 * np.linalg.norm(y)


# ------------------------------------------------------------ nonlinear field vs FD
def _field_jac(p: Params, t: float, X: Any) -> np.ndarray:
    W, u, v = (to_numpy(x) for x in p)
    z = np.tanh(W @ to_numpy(X) + u * t + v)
    return (1.0 - z * z)[:, None] * W


def _fields(p: Params, tab, t0, h):
    c = tab.c
    f = lambda i, X: field(p, t0 + c[i] * h, X)  # noqa: E731
    jac = lambda i, X: _field_jac(p, t0 + c[i] * h, X)  # noqa: E731

    def vjp(i, X, kb, carry, key=None):
        Xb, pb, tau = field_vjp(p, t0 + c[i] * h, X, kb)
        if key is None:
            return Xb, tau, Params(*(a + b for a, b in zip(carry, pb, strict=True)))
        new = Params(*(a + b for a, b in zip(carry[key], pb, strict=True)))
        return Xb, tau, {**carry, key: new}

    return f, jac, vjp


def _shift(x, e: float, d):
    """``x + e d`` through (nested) tuples and Params."""
    if isinstance(x, tuple):
        return (
            type(x)(*(_shift(xi, e, di) for xi, di in zip(x, d, strict=True)))
            if isinstance(x, Params)
            else tuple(_shift(xi, e, di) for xi, di in zip(x, d, strict=True))
        )
    return x + e * d


def _directional(loss, args, which: int, direction, eps: float = 1e-5) -> float:
    """Richardson-extrapolated central difference of ``loss`` along ``direction`` in
    argument ``which`` (error O(eps^4))."""
    diffs = []
    for e in (eps, 2 * eps):
        plus, minus = list(args), list(args)
        plus[which] = _shift(args[which], e, direction)
        minus[which] = _shift(args[which], -e, direction)
        diffs.append((loss(*plus) - loss(*minus)) / (2 * e))
    return (4 * diffs[0] - diffs[1]) / 3


def _close(analytic, fd, what):
    analytic = 0.0 if analytic is None else float(to_numpy(analytic))
    assert abs(analytic - fd) <= 1e-8 * max(1.0, abs(fd)), (what, analytic, fd)


@pytest.mark.parametrize("xp_name", XPS)
@pytest.mark.parametrize("name", IMPLICIT)
def test_nonlinear_step_vjp_matches_finite_differences(name, xp_name):
    """State, parameter, t_n and h cotangents with cotangents on y1, y0 and two slopes."""
    xp, tab = namespace(xp_name), IMPLICIT_TABLEAUX[name]
    rng = np.random.default_rng(2)
    p = random_params(xp, D)
    y0 = asarray(xp, rng.standard_normal(D))
    lam, mu = asarray(xp, rng.standard_normal(D)), asarray(xp, rng.standard_normal(D))
    kappa: list = [None] * tab.stages
    kappa[0] = asarray(xp, rng.standard_normal(D))
    kappa[-1] = asarray(xp, rng.standard_normal(D))

    def run(y0, p, t0, h):
        f, jac, _ = _fields(p, tab, t0, h)
        fwd, _ = _solver_kwargs(xp, tab, f, jac)
        return implicit_step(tab, f, y0, h, **fwd)

    def loss(y0, p, t0, h):
        step = run(y0, p, t0, h)
        out = vdot(lam, step.y1) + vdot(mu, y0)
        for kap, ki in zip(kappa, step.k, strict=True):
            if kap is not None:
                out = out + vdot(kap, ki)
        return float(to_numpy(out))

    step = run(y0, p, T0, H)
    f, jac, vjp = _fields(p, tab, T0, H)
    _, rev = _solver_kwargs(xp, tab, f, jac)
    zero = Params(*(x * 0.0 for x in p))
    res = implicit_step_vjp(
        tab, vjp, lam, step.X, H, k=step.k, k_bar=kappa, y0_bar=mu, carry=zero,
        need_h_bar=True, **rev,
    )  # fmt: skip
    args = (y0, p, T0, H)
    dy = asarray(xp, rng.standard_normal(D))
    dp = Params(*(asarray(xp, rng.standard_normal(tuple(x.shape))) for x in p))
    _close(vdot(res.y0_bar, dy), _directional(loss, args, 0, dy), "y0_bar")
    pbar = sum(float(to_numpy(vdot(g, d))) for g, d in zip(res.carry, dp, strict=True))
    _close(pbar, _directional(loss, args, 1, dp), "parameters")
    _close(res.t_bar, _directional(loss, args, 2, 1.0), "t_bar")
    _close(res.h_bar, _directional(loss, args, 3, 1.0), "h_bar")


@pytest.mark.parametrize("xp_name", XPS)
@pytest.mark.parametrize("name", ADDITIVE)
def test_imex_nonlinear_step_vjp_matches_finite_differences(name, xp_name):
    xp, pair = namespace(xp_name), ADDITIVE_TABLEAUX[name]
    rng = np.random.default_rng(6)
    pE, pI = random_params(xp, D, seed=7), random_params(xp, D, seed=8)
    y0 = asarray(xp, rng.standard_normal(D))
    lam = asarray(xp, rng.standard_normal(D))
    kapE: list = [None] * pair.stages
    kapI: list = [None] * pair.stages
    kapE[-1] = asarray(xp, rng.standard_normal(D))
    kapI[0] = asarray(xp, rng.standard_normal(D))
    kapI[-1] = asarray(xp, rng.standard_normal(D))

    def run(y0, ps, t0, h):
        fE, _, _ = _fields(ps[0], pair.explicit, t0, h)
        fI, jac, _ = _fields(ps[1], pair.implicit, t0, h)
        lin, _ = _dense_solvers(xp, jac)
        return implicit_step(
            pair, fI, y0, h, stage_solve=newton_stage_solve(fI, lin), f_explicit=fE
        )

    def loss(y0, ps, t0, h):
        step = run(y0, ps, t0, h)
        out = vdot(lam, step.y1)
        for kaps, ks in zip((kapE, kapI), step.k, strict=True):
            for kap, ki in zip(kaps, ks, strict=True):
                if kap is not None:
                    out = out + vdot(kap, ki)
        return float(to_numpy(out))

    step = run(y0, (pE, pI), T0, H)
    _, _, vjpE = _fields(pE, pair.explicit, T0, H)
    _, jacI, vjpI = _fields(pI, pair.implicit, T0, H)
    _, solve_T = _dense_solvers(xp, jacI)
    zero = {k: Params(*(x * 0.0 for x in p)) for k, p in (("E", pE), ("I", pI))}
    res = implicit_step_vjp(
        pair,
        lambda *a: vjpI(*a, key="I"),
        lam,
        step.X,
        H,
        solve_T=solve_T,
        vjp_explicit=lambda *a: vjpE(*a, key="E"),
        k=step.k,
        k_bar=(kapE, kapI),
        carry=zero,
        need_h_bar=True,
    )
    args = (y0, (pE, pI), T0, H)
    dy = asarray(xp, rng.standard_normal(D))
    dps = tuple(
        Params(*(asarray(xp, rng.standard_normal(tuple(x.shape))) for x in p)) for p in (pE, pI)
    )
    _close(vdot(res.y0_bar, dy), _directional(loss, args, 0, dy), "y0_bar")
    pbar = sum(
        float(to_numpy(vdot(g, d)))
        for key, dp in zip("EI", dps, strict=True)
        for g, d in zip(res.carry[key], dp, strict=True)
    )
    _close(pbar, _directional(loss, args, 1, dps), "parameters")
    _close(res.t_bar, _directional(loss, args, 2, 1.0), "t_bar")
    _close(res.h_bar, _directional(loss, args, 3, 1.0), "h_bar")


@pytest.mark.parametrize("name", ["kvaerno5", "implicit_euler_trapezoid", "trbdf2"])
def test_structural_zeros_and_fsal_first_slope(name):
    """A stage whose cotangent is structurally zero gets no solve and no VJP (diffrax's
    ImplicitEuler: the first stage only feeds the error); with k1 given (ESDIRK FSAL),
    stage 1 is returned as k1_bar, and the chain through f(y0) reproduces the gradient."""
    xp, tab = namespace("numpy"), IMPLICIT_TABLEAUX[name]
    p = random_params(xp, D)
    f, jac, vjp = _fields(p, tab, T0, H)
    fwd, rev = _solver_kwargs(xp, tab, f, jac)
    y0, lam = np.linspace(-1, 1, D), np.ones(D)
    step = implicit_step(tab, f, y0, H, **fwd)
    calls: list[int] = []

    def counted(i, X, kb, carry):
        calls.append(i)
        return vjp(i, X, kb, carry)

    zero = Params(*(x * 0.0 for x in p))
    full = implicit_step_vjp(tab, counted, lam, step.X, H, carry=zero, **rev)
    expect_first = any(tab.a_exact[j][0] for j in range(tab.stages)) or tab.b_exact[0] != 0
    assert (0 in calls) == bool(expect_first)
    assert calls == sorted(calls, reverse=True)
    calls.clear()
    none = implicit_step_vjp(tab, counted, None, step.X, H, **rev)
    assert calls == [] and np.all(none.y0_bar == 0.0)
    # FSAL: k1 = f(t_n, y_n) given; chaining k1_bar through stage 1's VJP gives the same.
    res = implicit_step_vjp(tab, vjp, lam, step.X, H, k1_given=True, carry=zero, **rev)
    if res.k1_bar is None:
        assert not expect_first
        return
    Xb, _, pb = vjp(0, step.X[0], res.k1_bar, res.carry)
    assert rel_err(res.y0_bar + Xb, full.y0_bar) <= 1e-14
    for g, r in zip(pb, full.carry, strict=True):
        assert rel_err(g, r) <= 1e-14


def test_missing_solvers_are_refused_clearly():
    tab = IMPLICIT_TABLEAUX["kvaerno3"]
    with pytest.raises(TableauError, match="stage_solve"):
        implicit_step(tab, lambda i, X: X, np.ones(2), 0.1)
    with pytest.raises(TableauError, match="coupled_solve"):
        implicit_step(IMPLICIT_TABLEAUX["gl4"], lambda i, X: X, np.ones(2), 0.1)
    with pytest.raises(TableauError, match="f_explicit"):
        implicit_step(ADDITIVE_TABLEAUX["kencarp3"], lambda i, X: X, np.ones(2), 0.1)


def test_fully_implicit_tableaux_are_the_coupled_ones():
    assert FULLY == ["gl4", "gl6", "radauIIA3", "radauIIA5"]
