"""Symplectic partner coefficients of an explicit Runge--Kutta method.

The adjoint system ``lambda' = -(df/dy)^T lambda`` integrated by the partner method::

    A_ij = b_j - b_j a_ji / b_i,    B_i = b_i            (stages with b_i != 0)

makes the pair (forward RK, partner RK) a symplectic partitioned RK method, which
satisfies ``b_i A_ij + B_j a_ji - b_i B_j = 0`` for all ``i, j`` (Sanz-Serna 2016) and
hence conserves the bilinear invariant ``<lambda, delta y>``: the discrete adjoint is
exactly the gradient of the discrete forward map.

Stages with ``b_i = 0`` (dopri5's 2nd and 7th, dopri8's 2nd..5th, midpoint's 1st,
tsit5's 7th, bosh3's 4th) have no partner row: the formula divides by ``b_i``. The
kernels never need these rows, because :func:`symplectic_adjoint.core.step.rk_step_vjp`
propagates ``kbar_i = h b_i Lambda_i``, which stays finite (and is often exactly zero)
when ``b_i = 0``. The two forms agree wherever ``b_i != 0``.
"""

from __future__ import annotations

from fractions import Fraction

from .tableau import ButcherTableau

__all__ = ["symplectic_partner", "partner_identity_residual"]


def symplectic_partner(
    tableau: ButcherTableau,
) -> tuple[tuple[tuple[Fraction, ...] | None, ...], tuple[Fraction, ...]]:
    """Return ``(A, B)``: ``A[i]`` is the partner row of stage ``i`` (``None`` where
    ``b_i = 0``), ``B = b``. Exact rationals."""
    b, a, s = tableau.b_exact, tableau.a_exact, tableau.stages
    A = tuple(
        None if b[i] == 0 else tuple(b[j] - b[j] * a[j][i] / b[i] for j in range(s))
        for i in range(s)
    )
    return A, tuple(b)


def partner_identity_residual(tableau: ButcherTableau) -> Fraction:
    """``max |b_i A_ij + B_j a_ji - b_i B_j|`` over the rows that exist (exactly 0)."""
    A, B = symplectic_partner(tableau)
    b, a, s = tableau.b_exact, tableau.a_exact, tableau.stages
    worst = Fraction(0)
    for i in range(s):
        row = A[i]
        if row is None:
            continue
        for j in range(s):
            worst = max(worst, abs(b[i] * row[j] + B[j] * a[j][i] - b[i] * B[j]))
    return worst
