"""The symplectic partner: the identity b_i A_ij + B_j a_ji - b_i B_j = 0 holds exactly,
and the k-bar recursion of rk_step_vjp is the partner method applied to the adjoint
system (checked by solving the partner stage equations directly)."""

from __future__ import annotations

import numpy as np
import pytest
from core_support import (
    TABLEAU_NAMES,
    Params,
    asarray,
    field_vjp,
    namespace,
    random_params,
    rel_err,
    stage_fn,
    stage_vjp,
)

from symplectic_adjoint.core import (
    TABLEAUX,
    partner_identity_residual,
    rk_step,
    rk_step_vjp,
    symplectic_partner,
)

NONZERO_WEIGHTS = [n for n in TABLEAU_NAMES if all(b != 0 for b in TABLEAUX[n].b_exact)]


@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_partner_identity_holds_exactly(name):
    tab = TABLEAUX[name]
    A, B = symplectic_partner(tab)
    assert partner_identity_residual(tab) == 0
    assert B == tab.b_exact
    # Rows exist exactly where b_i != 0 (the k-bar form needs none of them).
    assert [row is None for row in A] == [b == 0 for b in tab.b_exact]
    for i, row in enumerate(A):
        for j in range(tab.stages if row is not None else 0):
            assert tab.b_exact[i] * row[j] + B[j] * tab.a_exact[j][i] - tab.b_exact[i] * B[j] == 0


def test_rk4_and_friends_have_all_weights_nonzero():
    assert {"rk4", "rk38", "euler", "heun2", "ralston"} <= set(NONZERO_WEIGHTS)


def _jacobian(p: Params, t: float, y: np.ndarray) -> np.ndarray:
    z = np.tanh(p.W @ y + p.u * t + p.v)
    return (1.0 - z * z)[:, None] * p.W


@pytest.mark.parametrize("name", NONZERO_WEIGHTS)
def test_kbar_recursion_equals_the_partner_method_on_the_adjoint_system(name):
    """Integrate lam' = -J(t, y)^T lam over the step with the partner tableau (A, B):

        Lambda_i = lam_n + h sum_j A_ij l_j,   l_j = -J_j^T Lambda_j,
        lam_{n+1} = lam_n + h sum_j B_j l_j,

    with J_j the Jacobian at the forward stages. Given lam_{n+1}, solve this linear
    system for (lam_n, Lambda) and compare lam_n and the parameter cotangent
    h sum_i B_i (df/dtheta)_i^T Lambda_i with rk_step_vjp."""
    xp, tab = namespace("numpy"), TABLEAUX[name]
    s, d, t0, h = tab.stages, 4, 0.2, 0.35
    p = random_params(xp, d, seed=7)
    rng = np.random.default_rng(8)
    y0, lam1 = rng.standard_normal(d), rng.standard_normal(d)

    step = rk_step(tab, stage_fn(p, tab, t0, h), asarray(xp, y0), h)
    zero = Params(*(x * 0.0 for x in p))
    ours = rk_step_vjp(tab, stage_vjp(p, tab, t0, h), asarray(xp, lam1), step.X, h, carry=zero)

    A, B = symplectic_partner(tab)
    JT = [_jacobian(p, t0 + tab.c[j] * h, np.asarray(step.X[j])).T for j in range(s)]
    n = (s + 1) * d
    M, rhs = np.zeros((n, n)), np.zeros(n)
    blk = lambda i: slice(i * d, (i + 1) * d)  # noqa: E731  block 0: lam_n, i + 1: Lambda_i
    eye = np.eye(d)
    M[blk(0), blk(0)] = eye
    rhs[blk(0)] = lam1
    for j in range(s):
        M[blk(0), blk(j + 1)] = -h * float(B[j]) * JT[j]
    for i in range(s):
        M[blk(i + 1), blk(i + 1)] += eye
        M[blk(i + 1), blk(0)] = -eye
        for j in range(s):
            M[blk(i + 1), blk(j + 1)] += h * float(A[i][j]) * JT[j]
    sol = np.linalg.solve(M, rhs)
    lam0, Lam = sol[blk(0)], [sol[blk(i + 1)] for i in range(s)]

    assert rel_err(ours.y0_bar, lam0) <= 1e-12
    theta_bar = [np.zeros_like(np.asarray(x)) for x in p]
    for i in range(s):
        _, pbar, _ = field_vjp(p, t0 + tab.c[i] * h, step.X[i], h * float(B[i]) * Lam[i])
        theta_bar = [a + np.asarray(b) for a, b in zip(theta_bar, pbar, strict=True)]
    for got, ref in zip(ours.carry, theta_bar, strict=True):
        assert rel_err(got, ref) <= 1e-12
