"""Dense output (interpolation inside a step) as a linear map of ``(y_n, k)``.

Every interpolant the host libraries use inside an accepted step has the form::

    y(t_n + theta h) = y_n + h * sum_i w_i(theta) k_i,   w_i(theta) = sum_p W[i][p] theta^p,

because ``y_{n+1}`` and the "mid" point are themselves ``y_n`` plus combinations of the
slopes. Its VJP is therefore linear too and needs no network call::

    ybar_n += ybar,   kbar_i += h w_i(theta) ybar,
    thetabar = h sum_i w_i'(theta) <ybar, k_i>,   hbar_direct = sum_i w_i(theta) <ybar, k_i>.

Constructors cover torchdiffeq's and diffrax's fourth-order fit through a "mid" point
(:func:`quartic_from_mid`), linear interpolation (:func:`linear`), the cubic Hermite
fit through the first and last slope (:func:`hermite`), and explicit polynomial weights
(:func:`from_polynomials`, used for Tsit5 and Dopri8).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from functools import cached_property
from typing import Any

from .step import lincomb, vdot
from .tableau import ButcherTableau, frac

__all__ = ["DenseOutput", "quartic_from_mid", "linear", "hermite", "from_polynomials"]

Array = Any


def _horner(coeffs: Sequence[float], theta: Any) -> Any:
    acc: Any = 0.0
    for cp in reversed(coeffs):
        acc = acc * theta + cp
    return acc


@dataclasses.dataclass(frozen=True, eq=False)
class DenseOutput:
    """Interpolation weights ``W[i][p]`` (stage ``i``, power ``theta**p``), exact rationals.

    Arguments:
        name: where the interpolant comes from (``"torchdiffeq:dopri5"``).
        W_exact: ``s`` rows of polynomial coefficients in increasing powers of theta.
    """

    name: str
    W_exact: tuple[tuple[Fraction, ...], ...]

    @cached_property
    def W(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(float(x) for x in row) for row in self.W_exact)

    @cached_property
    def dW(self) -> tuple[tuple[float, ...], ...]:
        """Coefficients of ``w_i'(theta)``."""
        return tuple(
            tuple(float(p * x) for p, x in enumerate(row) if p > 0) for row in self.W_exact
        )

    def weights(self, theta: Any) -> list[Any]:
        """``[w_1(theta), ..., w_s(theta)]``; ``theta`` a float or a 0-d array."""
        return [_horner(row, theta) for row in self.W]

    def dweights(self, theta: Any) -> list[Any]:
        return [_horner(row, theta) for row in self.dW]

    def evaluate(self, y0: Array, k: Sequence[Array], h: Any, theta: Any) -> Array:
        """``y_n + h sum_i w_i(theta) k_i``."""
        if isinstance(theta, (int, float)):
            return lincomb(y0, h, self.weights(theta), k)
        acc = y0
        for wi, ki in zip(self.weights(theta), k, strict=False):
            acc = acc + (h * wi) * ki
        return acc

    def vjp(
        self,
        y_bar: Array,
        k: Sequence[Array] | None,
        h: Any,
        theta: Any,
        *,
        need_time: bool = False,
    ) -> tuple[list[Array | None], Any, Any]:
        """Cotangents of :meth:`evaluate` (the ``y_n`` cotangent is ``y_bar`` itself).

        Returns ``(k_bar, theta_bar, h_bar)``; ``k_bar[i]`` is ``None`` where ``w_i`` is
        identically zero. ``theta_bar`` and ``h_bar`` (the direct dependence on ``h`` at
        fixed ``theta``) are ``None`` unless ``need_time`` (which needs ``k``).
        """
        ws = self.weights(theta)
        k_bar: list[Array | None] = []
        for row, wi in zip(self.W_exact, ws, strict=False):
            k_bar.append(None if all(x == 0 for x in row) else y_bar * (h * wi))
        theta_bar = h_bar = None
        if need_time:
            if k is None:
                raise ValueError("DenseOutput.vjp: need_time=True requires the slopes k")
            for row, wi, dwi, ki in zip(self.W_exact, ws, self.dweights(theta), k, strict=False):
                if all(x == 0 for x in row):
                    continue
                d = vdot(y_bar, ki)
                theta_bar = d * (h * dwi) if theta_bar is None else theta_bar + d * (h * dwi)
                h_bar = d * wi if h_bar is None else h_bar + d * wi
        return k_bar, theta_bar, h_bar


def _rows(tableau: ButcherTableau, powers: int) -> list[list[Fraction]]:
    return [[Fraction(0)] * (powers + 1) for _ in range(tableau.stages)]


def quartic_from_mid(
    tableau: ButcherTableau, mid: Sequence[Any], *, name: str | None = None
) -> DenseOutput:
    """The fourth-order fit of torchdiffeq (``_interp_fit``) and diffrax
    (``FourthOrderPolynomialInterpolation``) through ``y_n``, ``y_{n+1}``,
    ``y_mid = y_n + h sum_i mid_i k_i``, ``f_0 = k_1`` and ``f_1 = k_s``.

    With ``y_n`` removed the polynomial coefficients are (highest power first)::

        x^4: 2(f1 - f0) - 8 y1 + 16 ymid,  x^3: 5 f0 - 3 f1 + 14 y1 - 32 ymid,
        x^2: f1 - 4 f0 - 5 y1 + 16 ymid,   x^1: f0.
    """
    s = tableau.stages
    m = [frac(x) for x in mid]
    if len(m) != s:
        raise ValueError(f"{tableau.name}: mid weights need {s} entries, got {len(m)}")
    W = _rows(tableau, 4)
    for i in range(s):
        first, last = Fraction(int(i == 0)), Fraction(int(i == s - 1))
        bi = tableau.b_exact[i]
        W[i][1] = first
        W[i][2] = last - 4 * first - 5 * bi + 16 * m[i]
        W[i][3] = 5 * first - 3 * last + 14 * bi - 32 * m[i]
        W[i][4] = 2 * (last - first) - 8 * bi + 16 * m[i]
    return DenseOutput(name or f"quartic:{tableau.name}", tuple(map(tuple, W)))


def linear(tableau: ButcherTableau) -> DenseOutput:
    """Linear interpolation between ``y_n`` and ``y_{n+1}``: ``w_i(theta) = theta b_i``."""
    W = _rows(tableau, 1)
    for i, bi in enumerate(tableau.b_exact):
        W[i][1] = bi
    return DenseOutput(f"linear:{tableau.name}", tuple(map(tuple, W)))


def hermite(tableau: ButcherTableau) -> DenseOutput:
    """Cubic Hermite through ``(y_n, k_1)`` and ``(y_{n+1}, k_s)``.

    ``y(theta) = y_n + h[(theta^3 - 2theta^2 + theta) k_1 + (3theta^2 - 2theta^3) sum b_i k_i
    + (theta^3 - theta^2) k_s]``: diffrax's ``ThirdOrderHermitePolynomialInterpolation``
    built ``from_k``.
    """
    s = tableau.stages
    W = _rows(tableau, 3)
    for i, bi in enumerate(tableau.b_exact):
        W[i][2] += 3 * bi
        W[i][3] += -2 * bi
    W[0][1] += 1
    W[0][2] += -2
    W[0][3] += 1
    W[s - 1][2] += -1
    W[s - 1][3] += 1
    return DenseOutput(f"hermite:{tableau.name}", tuple(map(tuple, W)))


def from_polynomials(
    name: str, polys: Sequence[Sequence[Any]], *, stages: int | None = None
) -> DenseOutput:
    """Weights given directly as coefficient rows (increasing powers of theta)."""
    rows = [tuple(frac(x) for x in row) for row in polys]
    width = max(len(r) for r in rows)
    rows = [r + (Fraction(0),) * (width - len(r)) for r in rows]
    if stages is not None and len(rows) != stages:
        raise ValueError(f"{name}: need {stages} weight polynomials, got {len(rows)}")
    return DenseOutput(name, tuple(rows))
