"""rk_step and rk_step_vjp: the exact linear oracle, finite differences on a nonlinear
field (state, parameters, time and step size), FSAL, and skipped structural zeros."""

from __future__ import annotations

from itertools import zip_longest

import numpy as np
import pytest
from core_support import (
    TABLEAU_NAMES,
    XP_NAMES,
    Params,
    asarray,
    namespace,
    random_params,
    rel_err,
    stage_fn,
    stage_vjp,
    to_numpy,
)

from symplectic_adjoint.core import TABLEAUX, get_tableau, rk_step, rk_step_vjp, vdot
from symplectic_adjoint.core.order import stability_polynomial

D = 4
T0, H = 0.7, 0.3


def _matrix_poly(coeffs, M: np.ndarray) -> np.ndarray:
    """``sum_k coeffs[k] M^k`` by Horner, in float64."""
    out = np.zeros_like(M)
    for c in reversed(coeffs):
        out = out @ M + float(c) * np.eye(len(M))
    return out


@pytest.mark.parametrize("xp_name", XP_NAMES)
@pytest.mark.parametrize("h_is_array", [False, True], ids=["h-float", "h-array"])
@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_linear_ode_step_and_adjoint_are_the_stability_polynomial(name, h_is_array, xp_name):
    """For y' = A y one step is y -> R(hA) y, so the adjoint is lam -> R(hA)^T lam and the
    error estimate is (R - Rhat)(hA) y, with R from the exact tableau."""
    xp, tab = namespace(xp_name), TABLEAUX[name]
    rng = np.random.default_rng(1)
    A = rng.standard_normal((D, D))
    A *= 2.0 / np.linalg.norm(A, 2)
    y, lam = rng.standard_normal(D), rng.standard_normal(D)
    R = _matrix_poly(stability_polynomial(tab), H * A)

    Ax = asarray(xp, A)
    h = asarray(xp, H) if h_is_array else H
    step = rk_step(tab, lambda i, X: Ax @ X, asarray(xp, y), h)
    assert rel_err(step.y1, R @ y) <= 1e-12

    res = rk_step_vjp(tab, lambda i, X, kb, c: (Ax.T @ kb, None, c), asarray(xp, lam), step.X, h)
    assert rel_err(res.y0_bar, R.T @ lam) <= 1e-12
    assert res.t_bar is None and res.h_bar is None

    if tab.is_adaptive:
        # Subtract the exact coefficients, not the matrices (which agree to ~1e-6).
        r, rhat = stability_polynomial(tab), stability_polynomial(tab, embedded=True)
        diff = [x - y for x, y in zip_longest(r, rhat, fillvalue=0)]
        # The estimate is a ~1e-6 difference of O(1) slopes: judge it against |y|.
        err = to_numpy(step.error) - _matrix_poly(diff, H * A) @ y
        assert np.linalg.norm(err) <= 1e-15 * np.linalg.norm(y)
    else:
        assert step.error is None


def _loss_and_grads(tab, xp, *, k1_given: bool):
    """A scalar loss of one step with every kind of cotangent, its VJP and the loss as a
    function of perturbed inputs (for finite differences)."""
    rng = np.random.default_rng(2)
    p = random_params(xp, D)
    y0 = asarray(xp, rng.standard_normal(D))
    K1 = asarray(xp, rng.standard_normal(D)) if k1_given else None
    lam = asarray(xp, rng.standard_normal(D))
    mu = asarray(xp, rng.standard_normal(D))  # direct cotangent on y_n
    s = tab.stages
    # Extra slope cotangents on the first and last stage (interpolated outputs, FSAL).
    kappa = [None] * s
    kappa[0] = asarray(xp, rng.standard_normal(D))
    kappa[-1] = asarray(xp, rng.standard_normal(D))

    def loss(y0, p, t0, h, K1):
        step = rk_step(tab, stage_fn(p, tab, t0, h), y0, h, k1=K1)
        out = vdot(lam, step.y1) + vdot(mu, y0)
        for kap, ki in zip(kappa, step.k, strict=True):
            if kap is not None:
                out = out + vdot(kap, ki)
        return float(to_numpy(out))

    step = rk_step(tab, stage_fn(p, tab, T0, H), y0, H, k1=K1)
    calls: list[int] = []
    zero = Params(*(x * 0.0 for x in p))
    res = rk_step_vjp(
        tab,
        stage_vjp(p, tab, T0, H, calls),
        lam,
        step.X,
        H,
        k=step.k,
        k_bar=kappa,
        y0_bar=mu,
        k1_given=k1_given,
        carry=zero,
        need_h_bar=True,
    )
    return loss, (y0, p, T0, H, K1), res, calls


def _directional(loss, args, which: int, direction, eps: float = 1e-5) -> float:
    """Central difference of ``loss`` along ``direction`` in argument ``which``,
    Richardson-extrapolated (error O(eps^4)) so the tolerance can be tight."""

    def shifted(e):
        a = list(args)
        x = a[which]
        if isinstance(x, Params):
            a[which] = Params(*(xi + e * di for xi, di in zip(x, direction, strict=True)))
        else:
            a[which] = x + e * direction
        return loss(*a)

    def central(e):
        return (shifted(e) - shifted(-e)) / (2 * e)

    return (4 * central(eps) - central(2 * eps)) / 3


def _check_all_cotangents(xp, loss, args, res, *, k1_given: bool):
    rng = np.random.default_rng(3)
    y0, p, _, _, K1 = args
    dy = asarray(xp, rng.standard_normal(D))
    dp = Params(*(asarray(xp, rng.standard_normal(tuple(x.shape))) for x in p))

    def close(analytic, fd, what):
        analytic = 0.0 if analytic is None else float(to_numpy(analytic))  # None: zero
        assert abs(analytic - fd) <= 1e-8 * max(1.0, abs(fd)), (what, analytic, fd)

    close(vdot(res.y0_bar, dy), _directional(loss, args, 0, dy), "y0_bar")
    pbar = sum(float(to_numpy(vdot(g, d))) for g, d in zip(res.carry, dp, strict=True))
    close(pbar, _directional(loss, args, 1, dp), "parameter cotangent (carry)")
    close(res.t_bar, _directional(loss, args, 2, 1.0), "t_bar")
    close(res.h_bar, _directional(loss, args, 3, 1.0), "h_bar")
    if k1_given:
        dk = asarray(xp, rng.standard_normal(D))
        close(vdot(res.k1_bar, dk), _directional(loss, args, 4, dk), "k1_bar")
    else:
        assert res.k1_bar is None


@pytest.mark.parametrize("xp_name", XP_NAMES)
@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_step_vjp_matches_finite_differences(name, xp_name):
    xp, tab = namespace(xp_name), TABLEAUX[name]
    loss, args, res, calls = _loss_and_grads(tab, xp, k1_given=False)
    _check_all_cotangents(xp, loss, args, res, k1_given=False)
    # Every stage carries a cotangent here (the last stage has an extra one).
    assert sorted(calls) == list(range(tab.stages))


@pytest.mark.parametrize("xp_name", XP_NAMES)
@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_given_first_slope_gets_its_own_cotangent_and_no_vjp(name, xp_name):
    """FSAL: with ``k1`` supplied, stage 1 is not differentiated here; its cotangent is
    returned as ``k1_bar`` and y0_bar has no path through f(t_n, y_n)."""
    xp, tab = namespace(xp_name), TABLEAUX[name]
    loss, args, res, calls = _loss_and_grads(tab, xp, k1_given=True)
    _check_all_cotangents(xp, loss, args, res, k1_given=True)
    assert 0 not in calls


@pytest.mark.parametrize("xp_name", XP_NAMES)
@pytest.mark.parametrize("name", [n for n in TABLEAU_NAMES if TABLEAUX[n].fsal])
def test_fsal_slope_cotangent_carries_across_the_step_boundary(name, xp_name):
    """Two FSAL steps (the second reuses the first one's last slope, which for fehlberg2
    and adaptive_heun is not f(t_1, y_1)): chaining k1_bar into the first step's last
    slope gives the gradient of the two-step map."""
    xp, tab = namespace(xp_name), TABLEAUX[name]
    rng = np.random.default_rng(4)
    p = random_params(xp, D)
    y0 = asarray(xp, rng.standard_normal(D))
    lam = asarray(xp, rng.standard_normal(D))

    def two_steps(y0):
        a = rk_step(tab, stage_fn(p, tab, T0, H), y0, H)
        b = rk_step(tab, stage_fn(p, tab, T0 + H, H), a.y1, H, k1=a.k[-1])
        return a, b

    a, b = two_steps(y0)
    rb = rk_step_vjp(tab, stage_vjp(p, tab, T0 + H, H), lam, b.X, H, k1_given=True)
    carried = [None] * (tab.stages - 1) + [rb.k1_bar]
    ra = rk_step_vjp(tab, stage_vjp(p, tab, T0, H), rb.y0_bar, a.X, H, k_bar=carried)

    dy = asarray(xp, rng.standard_normal(D))
    fd = _directional(lambda y: float(to_numpy(vdot(lam, two_steps(y)[1].y1))), (y0,), 0, dy)
    analytic = float(to_numpy(vdot(ra.y0_bar, dy)))
    assert abs(analytic - fd) <= 1e-8 * max(1.0, abs(fd))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("dopri5", 6), ("tsit5", 6), ("bosh3", 3), ("dopri8", 13), ("midpoint", 2), ("rk4", 4)],
)
def test_structurally_zero_stages_are_not_differentiated(name, expected):
    """With only a cotangent on y_{n+1}, the FSAL stage (b_s = 0, read by no later stage)
    gets no VJP call; an extra cotangent on it brings the call back. Stages with b_i = 0
    that later stages read (dopri5's 2nd, midpoint's 1st) are still differentiated."""
    xp, tab = namespace("numpy"), TABLEAUX[name]
    p = random_params(xp, D)
    y0 = asarray(xp, np.ones(D))
    step = rk_step(tab, stage_fn(p, tab, T0, H), y0, H)
    lam = asarray(xp, np.ones(D))

    calls: list[int] = []
    rk_step_vjp(tab, stage_vjp(p, tab, T0, H, calls), lam, step.X, H)
    assert len(calls) == expected
    assert calls == sorted(calls, reverse=True)  # reverse stage order, one graph at a time

    calls.clear()
    extra = [None] * (tab.stages - 1) + [lam]
    rk_step_vjp(tab, stage_vjp(p, tab, T0, H, calls), lam, step.X, H, k_bar=extra)
    assert len(calls) == tab.stages

    calls.clear()
    res = rk_step_vjp(tab, stage_vjp(p, tab, T0, H, calls), None, step.X, H)
    assert calls == [] and np.all(to_numpy(res.y0_bar) == 0.0)


@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_time_cotangent_survives_a_field_that_ignores_the_state(name):
    """f(t, y) = sin(t) * ones: every Xbar_i is structurally zero (None) but the stage
    times still carry tau_i, so hbar must keep its sum_i c_i tau_i term. Reference: the
    exact derivatives of y_{n+1} = y_n + h sum_i b_i sin(t_n + c_i h) ones."""
    tab = get_tableau(name)
    t0, h = 0.3, 0.7
    y0 = np.array([1.0, -2.0])
    lam = np.array([0.5, 2.0])

    def f(i, X):
        return np.sin(t0 + tab.c[i] * h) * np.ones_like(X)

    def vjp(i, X, kb, carry):
        return None, np.cos(t0 + tab.c[i] * h) * float(np.sum(kb)), carry

    step = rk_step(tab, f, y0, h)
    res = rk_step_vjp(tab, vjp, lam, step.X, h, k=step.k, need_h_bar=True)
    b, c = tab.b, tab.c
    s_lam = float(np.sum(lam))
    dt0 = h * sum(b[i] * np.cos(t0 + c[i] * h) for i in range(tab.stages)) * s_lam
    dh = (
        sum(
            b[i] * (np.sin(t0 + c[i] * h) + h * c[i] * np.cos(t0 + c[i] * h))
            for i in range(tab.stages)
        )
        * s_lam
    )
    assert np.allclose(res.y0_bar, lam, rtol=0, atol=0)
    assert abs(float(res.t_bar) - dt0) <= 1e-13 * max(1.0, abs(dt0))
    assert abs(float(res.h_bar) - dh) <= 1e-13 * max(1.0, abs(dh)), (res.h_bar, dh)


def test_none_aware_sums_never_drop_a_term():
    """add/sub treat None as a structural zero and nothing else."""
    from symplectic_adjoint.core import add, sub

    assert add(None, None) is None and sub(None, None) is None
    assert add(2.0, None) == 2.0 and add(None, 3.0) == 3.0 and add(2.0, 3.0) == 5.0
    assert sub(2.0, None) == 2.0 and sub(None, 3.0) == -3.0 and sub(2.0, 3.0) == -1.0
    zero = np.zeros(2)
    assert add(zero, None) is zero  # a real zero array is a value, not a structural zero
