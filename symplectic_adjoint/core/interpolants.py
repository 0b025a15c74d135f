"""The host libraries' dense outputs, as :class:`~symplectic_adjoint.core.dense.DenseOutput`.

Each interpolant below reproduces what torchdiffeq 0.2.5 or diffrax 0.7.2 evaluates at
an output time inside an accepted step, written in the core's convention::

    y(t_n + theta h) = y_n + h sum_i w_i(theta) k_i        (k_i = f(t_i, X_i)).

diffrax stores increments ``K_i = h k_i`` and writes ``y_n + sum_i w_i(theta) K_i``: the
weights are the same numbers. Coefficients are exact rationals where the source has
rationals, and the exact rationals of the printed decimals where it has decimals
(Tsit5's factored polynomials, Dopri8's Bogacki--Shampine coefficients), expanded
exactly; they agree with the libraries' float evaluation to rounding.

torchdiffeq (``torchdiffeq_interpolant``):

* adaptive solvers (dopri5, dopri8, bosh3, fehlberg2, adaptive_heun): the quartic fit
  through ``y_n``, ``y_{n+1}``, ``y_mid = y_n + h sum mid_i k_i``, ``k_1`` and ``k_s``
  with each solver's ``mid`` weights; dopri8's are its dense polynomials at ``1/2``;
* fixed-grid solvers (euler, midpoint, heun2, heun3, rk4 = Kutta's 3/8 rule):
  ``interp="linear"`` (the default) is linear between ``y_n`` and ``y_{n+1}``;
  ``interp="cubic"`` is the cubic Hermite fit through ``(y_n, k_1)`` and
  ``(y_{n+1}, f(t_{n+1}, y_{n+1}))``. That last slope is an extra evaluation of ``f``
  (``FixedGridODESolver.integrate`` calls ``func(t1, y1)``), not a stage: the returned
  interpolant has ``s + 1`` weight rows and the caller appends that slope to ``k``
  (and differentiates it through ``f``, at ``(t_{n+1}, y_{n+1})``, in the adjoint).

diffrax (``diffrax_interpolant``): ``Euler`` uses ``LocalLinearInterpolation``;
``Heun``, ``Midpoint``, ``Ralston`` and ``Bosh3`` use
``ThirdOrderHermitePolynomialInterpolation.from_k``, which takes ``k[0]`` and ``k[-1]``
(the last *stage*: ``f(t_{n+1}, y_{n+1})`` only for the FSAL ``Bosh3``); ``Dopri5`` the
quartic with the same ``c_mid`` as torchdiffeq; ``Tsit5`` seven degree-4 polynomials;
``Dopri8`` fourteen degree-6 polynomials (``eval_coeffs``). Those printed decimals are
consistent with the rational ``b`` only to ~1e-12: diffrax's Dopri8 interpolant at the
step end misses ``y_{n+1}`` by that much, and so does this one (it is the library's value).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from functools import cache

from . import dense
from .dense import DenseOutput
from .methods import get_tableau
from .tableau import Number, TableauError, frac

__all__ = [
    "TORCHDIFFEQ_METHODS",
    "DIFFRAX_SOLVERS",
    "torchdiffeq_interpolant",
    "diffrax_interpolant",
    "hermite_basis",
    "polymul",
]

Poly = list[Fraction]  # coefficients, lowest power first


def polymul(*factors: Sequence[Number]) -> Poly:
    """Exact product of polynomials given as coefficient lists (lowest power first)."""
    out: Poly = [Fraction(1)]
    for factor in factors:
        f = [frac(x) for x in factor]
        prod = [Fraction(0)] * (len(out) + len(f) - 1)
        for i, x in enumerate(out):
            for j, y in enumerate(f):
                prod[i + j] += x * y
        out = prod
    return out


def hermite_basis() -> dict[str, Poly]:
    """The cubic Hermite basis on ``[0, 1]`` (torchdiffeq's ``_cubic_hermite_interp``)::

    p(theta) = h00 y0 + h10 h f0 + h01 y1 + h11 h f1,
    h00 = (1 + 2theta)(1 - theta)^2,  h10 = theta (1 - theta)^2,
    h01 = theta^2 (3 - 2theta),       h11 = theta^2 (theta - 1).

    Since ``h00 + h01 = 1`` the fit is ``y0 + h01 (y1 - y0) + h h10 f0 + h h11 f1``.
    """
    return {
        "h00": polymul([1, 2], [1, -1], [1, -1]),
        "h10": polymul([0, 1], [1, -1], [1, -1]),
        "h01": polymul([0, 0, 1], [3, -2]),
        "h11": polymul([0, 0, 1], [-1, 1]),
    }


# ------------------------------------------------------------------ torchdiffeq 0.2.5

# Dopri5 (Shampine's dense output), as torchdiffeq's DPS_C_MID and diffrax's c_mid.
_DOPRI5_MID = [
    Fraction(6025192743, 30085553152) / 2,
    0,
    Fraction(51252292925, 65400821598) / 2,
    Fraction(-2691868925, 45128329728) / 2,
    Fraction(187940372067, 1594534317056) / 2,
    Fraction(-1776094331, 19743644256) / 2,
    Fraction(11237099, 235043384) / 2,
]

# Dopri8 dense output (Bogacki & Shampine 1990) as printed in both libraries: row i holds
# the coefficients of w_i(theta) / theta, highest power first (diffrax's eval_coeffs;
# torchdiffeq evaluates the same polynomials at theta = 1/2 for its C_mid). Rows 2..5
# (all zero) are left out.
_DOPRI8_DENSE = {
    0: ["-6.3448349392860401388", "22.1396504998094068976", "-30.0610568289666450593",
        "19.9990069333683970610", "-6.6910181737837595697", "1"],
    5: ["-39.6107919852202505218", "116.4422149550342161651", "-121.4999627731334642623",
        "52.2273532792945524050", "-7.6142658045872677172", "0"],
    6: ["20.3761213808791436958", "-67.1451318825957197185", "83.1721004639847717481",
        "-46.8919164181093621583", "10.7281392630428866124", "0"],
    7: ["7.3347098826795362023", "-16.5672243527496524646", "9.5724507555993664382",
        "-0.1890893225010595467", "0.5526637063753648783", "0"],
    8: ["32.8801774352459155182", "-89.9916014847245016028", "87.8406057677205645007",
        "-35.7075975946222072821", "4.2186562625665153803", "0"],
    9: ["-10.1588990526426760954", "22.6237489648532849093", "-17.4152107770762969005",
        "6.2736448083240352160", "-0.6627209125361597559", "0"],
    10: ["-12.5401268098782561200", "32.2362340167355370113", "-28.5903289514790976966",
         "10.3160881272450748458", "-1.2636789001135462218", "0"],
    11: ["29.5553001484516038033", "-82.1020315488359848644", "81.6630950584341412934",
         "-34.7650769866611817349", "5.4106037898590422230", "0"],
    12: ["-41.7923486424390588923", "116.2662185791119533462", "-114.9375291377009418170",
         "47.7457971078225540396", "-7.0321379067945741781", "0"],
    13: ["20.3006925822100825485", "-53.9020777466385396792", "50.2558364226176017553",
         "-19.0082099341608028453", "2.3537586759714983486", "0"],
}  # fmt: skip
_DOPRI8_STAGES = 14


def _dopri8_polys() -> list[Poly]:
    """``w_i(theta) = theta * p_i(theta)``, lowest power first."""
    rows: list[Poly] = []
    for i in range(_DOPRI8_STAGES):
        high_first = _DOPRI8_DENSE.get(i, ["0"])
        rows.append([Fraction(0), *(frac(x) for x in reversed(high_first))])
    return rows


def _eval(poly: Sequence[Fraction], x: Fraction) -> Fraction:
    acc = Fraction(0)
    for coeff in reversed(poly):
        acc = acc * x + coeff
    return acc


#: torchdiffeq's adaptive solvers and the ``mid`` weights of their quartic fit.
_TORCHDIFFEQ_MID: dict[str, Sequence[object]] = {
    "dopri5": _DOPRI5_MID,
    "bosh3": [0, "1/2", 0, 0],
    "fehlberg2": [0, "1/2", 0],
    "adaptive_heun": ["1/2", 0],
}
#: torchdiffeq's fixed-grid solvers and the tableau each step function implements.
_TORCHDIFFEQ_FIXED = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun2": "heun2",
    "heun3": "heun3",
    "rk4": "rk38",  # torchdiffeq's rk4 step is rk4_alt_step_func: Kutta's 3/8 rule
}
TORCHDIFFEQ_METHODS = (*_TORCHDIFFEQ_MID, "dopri8", *_TORCHDIFFEQ_FIXED)


def _dopri8_mid() -> list[Fraction]:
    half = Fraction(1, 2)
    return [_eval(p, half) for p in _dopri8_polys()]


@cache
def torchdiffeq_interpolant(method: str, interp: str = "linear") -> DenseOutput:
    """The dense output torchdiffeq 0.2.5 uses inside a step of ``method``.

    ``interp`` ("linear" or "cubic") applies to the fixed-grid solvers only, as
    torchdiffeq's ``options=dict(interp=...)``; "cubic" has an extra last row for the
    slope ``f(t_{n+1}, y_{n+1})`` (see the module docstring).
    """
    name = f"torchdiffeq:{method}"
    if method in _TORCHDIFFEQ_MID or method == "dopri8":
        mid = _dopri8_mid() if method == "dopri8" else _TORCHDIFFEQ_MID[method]
        return dense.quartic_from_mid(get_tableau(method), mid, name=name)
    if method not in _TORCHDIFFEQ_FIXED:
        raise TableauError(
            f"torchdiffeq method {method!r} has no Runge-Kutta dense output here; known: "
            + ", ".join(TORCHDIFFEQ_METHODS)
        )
    tableau = get_tableau(_TORCHDIFFEQ_FIXED[method])
    if interp == "linear":
        return dataclasses.replace(dense.linear(tableau), name=f"{name}:linear")
    if interp != "cubic":
        raise ValueError(f"unknown torchdiffeq interpolation {interp!r} (linear or cubic)")
    basis = hermite_basis()
    rows = [[bi * x for x in basis["h01"]] for bi in tableau.b_exact]
    rows[0] = [x + y for x, y in zip(rows[0], basis["h10"], strict=True)]
    rows.append(basis["h11"])  # weight of the extra slope f(t_{n+1}, y_{n+1})
    return dense.from_polynomials(f"{name}:cubic", rows, stages=tableau.stages + 1)


# ------------------------------------------------------------------ diffrax 0.7.2

# Tsit5's interpolation weights as diffrax prints them: scale * product of factors
# (factors lowest power first).
_TSIT5_FACTORED: list[tuple[str, list[list[str]]]] = [
    ("-1.0530884977290216",
     [["0", "1"], ["-1.3299890189751412", "1"],
      ["0.7139816917074209", "-1.4364028541716351", "1"]]),
    ("0.1017", [["0", "0", "1"], ["1.2949852507374631", "-2.1966568338249754", "1"]]),
    ("2.490627285651252793",
     [["0", "0", "1"], ["1.57803468208092486", "-2.38535645472061657", "1"]]),
    ("-16.54810288924490272",
     [["-1.21712927295533244", "1"], ["-0.61620406037800089", "1"], ["0", "0", "1"]]),
    ("47.37952196281928122",
     [["-1.203071208372362603", "1"], ["-0.658047292653547382", "1"], ["0", "0", "1"]]),
    ("-34.87065786149660974", [["-1.2", "1"], ["-0.666666666666666667", "1"], ["0", "0", "1"]]),
    ("2.5", [["-1", "1"], ["-0.6", "1"], ["0", "0", "1"]]),
]  # fmt: skip

#: diffrax solver class name -> (tableau name, kind of interpolation).
_DIFFRAX: dict[str, tuple[str, str]] = {
    "Euler": ("euler", "linear"),
    "Heun": ("heun2", "hermite"),
    "Midpoint": ("midpoint", "hermite"),
    "Ralston": ("ralston", "hermite"),
    "Bosh3": ("bosh3", "hermite"),
    "Dopri5": ("dopri5", "quartic"),
    "Tsit5": ("tsit5", "tsit5"),
    "Dopri8": ("dopri8", "dopri8"),
}
DIFFRAX_SOLVERS = tuple(_DIFFRAX)


@cache
def diffrax_interpolant(solver: str) -> DenseOutput:
    """The dense output of diffrax 0.7.2's ``solver`` (class name, case-insensitive)."""
    lookup = {key.lower(): key for key in _DIFFRAX}
    key = lookup.get(solver.lower())
    if key is None:
        raise TableauError(
            f"diffrax solver {solver!r} has no Runge-Kutta dense output here; known: "
            + ", ".join(DIFFRAX_SOLVERS)
        )
    tableau_name, kind = _DIFFRAX[key]
    tableau = get_tableau(tableau_name)
    name = f"diffrax:{key}"
    if kind in ("linear", "hermite"):
        build = dense.linear if kind == "linear" else dense.hermite
        return dataclasses.replace(build(tableau), name=name)
    if kind == "quartic":
        return dense.quartic_from_mid(tableau, _DOPRI5_MID, name=name)
    if kind == "tsit5":
        polys = [[frac(scale) * x for x in polymul(*fs)] for scale, fs in _TSIT5_FACTORED]
        return dense.from_polynomials(name, polys, stages=tableau.stages)
    return dense.from_polynomials(name, _dopri8_polys(), stages=tableau.stages)
