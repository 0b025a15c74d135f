"""Implicit Runge--Kutta tableaux (DIRK, ESDIRK, Gauss, Radau) and additive IMEX pairs.

A separate registry from :mod:`symplectic_adjoint.core.methods`: the explicit kernels
(:func:`~symplectic_adjoint.core.step.rk_step`) keep refusing every tableau here through
``ButcherTableau.validate()``; these drive :mod:`symplectic_adjoint.core.implicit_step`.

Sources (coefficients are public mathematics, re-derived or transcribed here):

- diffrax 0.7.2: ``ImplicitEuler`` (implicit Euler with a trapezoidal error estimate, as a
  two-stage tableau whose first stage ``f(t_n, y_n)`` only feeds the error), ``Kvaerno3/4/5``
  (ESDIRK; Kvaerno 2004; the 3/4 coefficients are her formulas in gamma, evaluated here in
  exact rational arithmetic from diffrax's decimal gamma) and ``KenCarp3/4/5`` (Kennedy &
  Carpenter 2003 additive ERK/ESDIRK pairs, published as ratios of integers).
- torchdiffeq master (``fixed_grid_implicit.py``): implicit_euler, implicit_midpoint,
  trapezoid, sdirk2, trbdf2 (diagonally implicit) and gl4, gl6, radauIIA3, radauIIA5 (fully
  implicit). torchdiffeq's gl4 lists the nodes as ``(1/2 - sqrt3/6, 1/2 - sqrt3/6)``; the
  second node of the Gauss method (and the row sum of its ``a``) is ``1/2 + sqrt3/6``, which
  is what is stored here -- an adapter reproducing torchdiffeq's stage times must note it.

Tableaux whose coefficients are algebraic (square roots, Kvaerno's gamma) or published as
decimals are stored as rationals of 60-digit (or the published) decimals and marked
``exact=False``, like tsit5: their order conditions hold to rounding, not identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import cached_property

from .tableau import ButcherTableau, Number, TableauError, frac

__all__ = [
    "AdditiveTableau",
    "IMPLICIT_TABLEAUX",
    "ADDITIVE_TABLEAUX",
    "get_implicit_tableau",
    "is_diagonally_implicit",
    "is_fully_implicit",
]


def _sqrt(n: int) -> Fraction:
    """``sqrt(n)`` as the rational of its 60-digit decimal."""
    with localcontext() as ctx:
        ctx.prec = 60
        return Fraction(Decimal(n).sqrt())


def is_diagonally_implicit(tableau: ButcherTableau) -> bool:
    """``a`` is lower triangular (diagonal included): stages can be solved one at a time."""
    # The float entries: a nonzero rational is a nonzero float (no tableau underflows),
    # and the reverse pass asks once per step (Fraction comparisons cost ~20 us).
    a = tableau.a
    return not any(any(row[i + 1 :]) for i, row in enumerate(a))


def is_fully_implicit(tableau: ButcherTableau) -> bool:
    """``a`` has a nonzero entry above the diagonal: all stages form one coupled system."""
    return not is_diagonally_implicit(tableau)


def _tableau(
    name: str,
    rows: Sequence[Sequence[Number]],
    b: Sequence[Number],
    order: int,
    *,
    c: Sequence[Number] | None = None,
    bhat: Sequence[Number] | None = None,
    embedded_order: int | None = None,
    exact: bool = True,
    aliases: Sequence[str] = (),
) -> ButcherTableau:
    """A tableau from its rows (short rows are padded with zeros on the right, so a DIRK is
    written as its lower triangle with the diagonal). ``c`` defaults to the row sums."""
    s = len(b)
    if len(rows) != s:
        raise TableauError(f"{name}: {s} weights need {s} rows of a, got {len(rows)}")
    a = tuple(tuple(frac(x) for x in row) + (Fraction(0),) * (s - len(row)) for row in rows)
    cc = tuple(sum(row, Fraction(0)) for row in a) if c is None else tuple(frac(x) for x in c)
    return ButcherTableau(
        name=name,
        a_exact=a,
        b_exact=tuple(frac(x) for x in b),
        c_exact=cc,
        order=order,
        bhat_exact=None if bhat is None else tuple(frac(x) for x in bhat),
        embedded_order=embedded_order,
        exact=exact,
        aliases=tuple(aliases),
    )


# --------------------------------------------------------------- torchdiffeq (fixed grid)
_S2, _S3, _S6, _S15 = _sqrt(2), _sqrt(3), _sqrt(6), _sqrt(15)
_H = Fraction(1, 2)

IMPLICIT_EULER = _tableau("implicit_euler", [[1]], [1], 1)

IMPLICIT_MIDPOINT = _tableau("implicit_midpoint", [[_H]], [1], 2, aliases=("ImplicitMidpoint",))

TRAPEZOID = _tableau("trapezoid", [[0], [_H, _H]], [_H, _H], 2, aliases=("Trapezoid",))

_G2 = 1 - _S2 / 2  # sdirk2's and trbdf2's gamma, (2 - sqrt2)/2
SDIRK2 = _tableau("sdirk2", [[_G2], [1 - _G2, _G2]], [1 - _G2, _G2], 2, exact=False)

_B2 = _S2 / 4
TRBDF2 = _tableau("trbdf2", [[0], [_G2, _G2], [_B2, _B2, _G2]], [_B2, _B2, _G2], 2, exact=False)

GL4 = _tableau(
    "gl4",
    [[Fraction(1, 4), Fraction(1, 4) - _S3 / 6], [Fraction(1, 4) + _S3 / 6, Fraction(1, 4)]],
    [_H, _H],
    4,
    exact=False,
    aliases=("gauss_legendre4",),
)

_F36, _T9 = Fraction(5, 36), Fraction(2, 9)
GL6 = _tableau(
    "gl6",
    [
        [_F36, _T9 - _S15 / 15, _F36 - _S15 / 30],
        [_F36 + _S15 / 24, _T9, _F36 - _S15 / 24],
        [_F36 + _S15 / 30, _T9 + _S15 / 15, _F36],
    ],
    [Fraction(5, 18), Fraction(4, 9), Fraction(5, 18)],
    6,
    exact=False,
    aliases=("gauss_legendre6",),
)

RADAUIIA3 = _tableau(
    "radauIIA3", [["5/12", "-1/12"], ["3/4", "1/4"]], ["3/4", "1/4"], 3, aliases=("radau3",)
)

_R5_LAST = [Fraction(4, 9) - _S6 / 36, Fraction(4, 9) + _S6 / 36, Fraction(1, 9)]
RADAUIIA5 = _tableau(
    "radauIIA5",
    [
        [
            Fraction(11, 45) - 7 * _S6 / 360,
            Fraction(37, 225) - 169 * _S6 / 1800,
            Fraction(-2, 225) + _S6 / 75,
        ],
        [
            Fraction(37, 225) + 169 * _S6 / 1800,
            Fraction(11, 45) + 7 * _S6 / 360,
            Fraction(-2, 225) - _S6 / 75,
        ],
        _R5_LAST,
    ],
    _R5_LAST,
    5,
    exact=False,
    aliases=("radau5",),
)

# ------------------------------------------------------------------------ diffrax 0.7.2
# ImplicitEuler: y1 = y0 + k1 with k1 = h f(t1, y0 + k1); error 0.5 (k1 - k0), k0 = h f(t0, y0).
# As a tableau: an explicit first stage feeding only the error (trapezoidal embedded rule).
IMPLICIT_EULER_DIFFRAX = _tableau(
    "implicit_euler_trapezoid",
    [[0], [0, 1]],
    [0, 1],
    1,
    bhat=[_H, _H],
    embedded_order=2,
    aliases=("ImplicitEuler",),
)


def _kvaerno3() -> ButcherTableau:
    g = frac("0.43586652150")
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    return _tableau(
        "kvaerno3",
        [[0], [g, g], [a31, a32, g], [a41, a42, a43, g]],
        [a41, a42, a43, g],
        3,
        bhat=[a31, a32, g, 0],
        embedded_order=2,
        exact=False,
        aliases=("Kvaerno3",),
    )


def _kvaerno4() -> ButcherTableau:
    g = frac("0.5728160625")

    def p(*coeffs: int) -> Fraction:  # polynomial in gamma, highest power first
        out = Fraction(0)
        for ck in coeffs:
            out = out * g + ck
        return out

    q = p(12, -6, 1) ** 2
    a31 = p(144, -180, 81, -15, 1) * g / q
    a32 = p(-36, 39, -15, 2) * g / q
    a41 = p(-144, 396, -330, 117, -18, 1) / (12 * g**2 * p(12, -9, 2))
    a42 = p(72, -126, 69, -15, 1) / (12 * g**2 * p(3, -1))
    a43 = p(-6, 6, -1) * q / (12 * g**2 * p(12, -9, 2) * p(3, -1))
    a51 = p(288, -312, 120, -18, 1) / (48 * g**2 * p(12, -9, 2))
    a52 = p(24, -12, 1) / (48 * g**2 * p(3, -1))
    a53 = -(p(12, -6, 1) ** 3) / (48 * g**2 * p(3, -1) * p(12, -9, 2) * p(6, -6, 1))
    a54 = p(-24, 36, -12, 1) / p(24, -24, 4)
    b = [a51, a52, a53, a54, g]
    return _tableau(
        "kvaerno4",
        [[0], [g, g], [a31, a32, g], [a41, a42, a43, g], b],
        b,
        4,
        bhat=[a41, a42, a43, g, 0],
        embedded_order=3,
        exact=False,
        aliases=("Kvaerno4",),
    )


_KV5_ROWS: list[list[Number]] = [
    [0],
    ["0.26", "0.26"],
    ["0.13", "0.84033320996790809", "0.26"],
    ["0.22371961478320505", "0.47675532319799699", "-0.06470895363112615", "0.26"],
    ["0.16648564323248321", "0.10450018841591720", "0.03631482272098715",
     "-0.13090704451073998", "0.26"],
    ["0.13855640231268224", 0, "-0.04245337201752043", "0.02446657898003141",
     "0.61943039072480676", "0.26"],
    ["0.13659751177640291", 0, "-0.05496908796538376", "-0.04118626728321046",
     "0.62993304899016403", "0.06962479448202728", "0.26"],
]  # fmt: skip
KVAERNO5 = _tableau(
    "kvaerno5",
    _KV5_ROWS,
    _KV5_ROWS[-1],
    5,
    bhat=[*_KV5_ROWS[-2][:-1], "0.26", 0],
    embedded_order=4,
    exact=False,
    aliases=("Kvaerno5",),
)
KVAERNO3 = _kvaerno3()
KVAERNO4 = _kvaerno4()


# ----------------------------------------------------------------- additive (IMEX) pairs
@dataclasses.dataclass(frozen=True, eq=False)
class AdditiveTableau:
    """An additive Runge--Kutta pair for ``y' = f_E(t, y) + f_I(t, y)``::

        X_i = y_n + h sum_j (aE_ij kE_j + aI_ij kI_j),  kE_i = f_E(t_n + c_i h, X_i),
                                                        kI_i = f_I(t_n + c_i h, X_i),
        y_{n+1} = y_n + h sum_i (bE_i kE_i + bI_i kI_i).

    ``explicit`` is strictly lower triangular, ``implicit`` diagonally implicit; both have
    the same stages and nodes. The order conditions are those of every two-colouring of
    the rooted trees (:func:`~symplectic_adjoint.core.order.additive_order_residual`).
    """

    name: str
    explicit: ButcherTableau
    implicit: ButcherTableau
    order: int
    embedded_order: int | None = None
    exact: bool = True
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.explicit.stages != self.implicit.stages:
            raise TableauError(f"{self.name}: explicit and implicit parts differ in stages")
        if not self.explicit.is_explicit:
            raise TableauError(f"{self.name}: the explicit part must be strictly lower triangular")
        if not is_diagonally_implicit(self.implicit):
            raise TableauError(f"{self.name}: the implicit part must be diagonally implicit")
        if (self.explicit.bhat_exact is None) != (self.implicit.bhat_exact is None):
            raise TableauError(f"{self.name}: both parts need embedded weights, or neither")

    @property
    def stages(self) -> int:
        return self.implicit.stages

    @property
    def is_adaptive(self) -> bool:
        return self.implicit.bhat_exact is not None

    @cached_property
    def c(self) -> tuple[float, ...]:
        return self.implicit.c

    def __repr__(self) -> str:
        kind = f"{self.order}({self.embedded_order})" if self.is_adaptive else f"{self.order}"
        return f"AdditiveTableau({self.name!r}, stages={self.stages}, order={kind})"


def _kencarp(
    name: str,
    gamma: Number,
    c: Sequence[Number],
    explicit_lower: Sequence[Sequence[Number]],
    implicit_lower: Sequence[Sequence[Number]],
    b: Sequence[Number],
    bhat: Sequence[Number],
    order: int,
) -> AdditiveTableau:
    """A Kennedy--Carpenter pair: ``implicit_lower`` rows 2..s-1 without the diagonal (the
    diagonal is gamma, the last row is ``b``: stiffly accurate), ``explicit_lower`` rows
    2..s. Nodes are the published ``c`` (the rows sum to them to ~1e-13 only)."""
    g = frac(gamma)
    cc = [0, *c]
    s = len(b)
    rows_e = [[0] * s] + [list(r) for r in explicit_lower]
    rows_i = [[0]] + [[*r, g] for r in implicit_lower] + [[*b[:-1], g]]
    tab_e = _tableau(f"{name}_explicit", rows_e, b, order, c=cc, bhat=bhat,
                     embedded_order=order - 1, exact=False)  # fmt: skip
    tab_i = _tableau(f"{name}_implicit", rows_i, b, order, c=cc, bhat=bhat,
                     embedded_order=order - 1, exact=False)  # fmt: skip
    return AdditiveTableau(
        name,
        tab_e,
        tab_i,
        order,
        order - 1,
        exact=False,
        aliases=(name.replace("kencarp", "KenCarp"),),
    )


_KC3_G = Fraction(1767732205903, 4055673282236)
KENCARP3 = _kencarp(
    "kencarp3",
    _KC3_G,
    [2 * _KC3_G, "3/5", 1],
    [
        [2 * _KC3_G],
        ["5535828885825/10492691773637", "788022342437/10882634858940"],
        ["6485989280629/16251701735622", "-4246266847089/9704473918619",
         "10755448449292/10357097424841"],
    ],
    [[_KC3_G], ["2746238789719/10658868560708", "-640167445237/6845629431997"]],
    ["1471266399579/7840856788654", "-4482444167858/7529755066697",
     "11266239266428/11593286722821", _KC3_G],
    ["2756255671327/12835298489170", "-10771552573575/22201958757719",
     "9247589265047/10645013368117", "2193209047091/5459859503100"],
    3,
)  # fmt: skip

KENCARP4 = _kencarp(
    "kencarp4",
    "1/4",
    ["1/2", "83/250", "31/50", "17/20", 1],
    [
        ["1/2"],
        ["13861/62500", "6889/62500"],
        ["-116923316275/2393684061468", "-2731218467317/15368042101831",
         "9408046702089/11113171139209"],
        ["-451086348788/2902428689909", "-2682348792572/7519795681897",
         "12662868775082/11960479115383", "3355817975965/11060851509271"],
        ["647845179188/3216320057751", "73281519250/8382639484533",
         "552539513391/3454668386233", "3354512671639/8306763924573", "4040/17871"],
    ],
    [
        ["1/4"],
        ["8611/62500", "-1743/31250"],
        ["5012029/34652500", "-654441/2922500", "174375/388108"],
        ["15267082809/155376265600", "-71443401/120774400", "730878875/902184768",
         "2285395/8070912"],
    ],
    ["82889/524892", 0, "15625/83664", "69875/102672", "-2260/8211", "1/4"],
    ["4586570599/29645900160", 0, "178811875/945068544", "814220225/1159782912",
     "-3700637/11593932", "61727/225920"],
    4,
)  # fmt: skip

KENCARP5 = _kencarp(
    "kencarp5",
    "41/200",
    ["41/100", "2935347310677/11292855782101", "1426016391358/7196633302097", "92/100",
     "24/100", "3/5", 1],
    [
        ["41/100"],
        ["367902744464/2072280473677", "677623207551/8224143866563"],
        ["1268023523408/10340822734521", 0, "1029933939417/13636558850479"],
        ["14463281900351/6315353703477", 0, "66114435211212/5879490589093",
         "-54053170152839/4284798021562"],
        ["14090043504691/34967701212078", 0, "15191511035443/11219624916014",
         "-18461159152457/12425892160975", "-281667163811/9011619295870"],
        ["19230459214898/13134317526959", 0, "21275331358303/2942455364971",
         "-38145345988419/4862620318723", "-1/8", "-1/8"],
        ["-19977161125411/11928030595625", 0, "-40795976796054/6384907823539",
         "177454434618887/12078138498510", "782672205425/8267701900261",
         "-69563011059811/9646580694205", "7356628210526/4942186776405"],
    ],
    [
        ["41/200"],
        ["41/400", "-567603406766/11931857230679"],
        ["683785636431/9252920307686", 0, "-110385047103/1367015193373"],
        ["3016520224154/10081342136671", 0, "30586259806659/12414158314087",
         "-22760509404356/11113319521817"],
        ["218866479029/1489978393911", 0, "638256894668/5436446318841",
         "-1179710474555/5321154724896", "-60928119172/8023461067671"],
        ["1020004230633/5715676835656", 0, "25762820946817/25263940353407",
         "-2161375909145/9755907335909", "-211217309593/5846859502534",
         "-4269925059573/7827059040719"],
    ],
    ["-872700587467/9133579230613", 0, 0, "22348218063261/9555858737531",
     "-1143369518992/8141816002931", "-39379526789629/19018526304540",
     "32727382324388/42900044865799", "41/200"],
    ["-975461918565/9796059967033", 0, 0, "78070527104295/32432590147079",
     "-548382580838/3424219808633", "-33438840321285/15594753105479",
     "3629800801594/4656183773603", "4035322873751/18575991585200"],
    5,
)  # fmt: skip

IMPLICIT_TABLEAUX: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, SDIRK2, TRBDF2, GL4, GL6, RADAUIIA3,
        RADAUIIA5, IMPLICIT_EULER_DIFFRAX, KVAERNO3, KVAERNO4, KVAERNO5,
    )
}  # fmt: skip

ADDITIVE_TABLEAUX: dict[str, AdditiveTableau] = {t.name: t for t in (KENCARP3, KENCARP4, KENCARP5)}

_ALL: list[ButcherTableau | AdditiveTableau] = [
    *IMPLICIT_TABLEAUX.values(),
    *ADDITIVE_TABLEAUX.values(),
]
_ALIASES: dict[str, str] = {alias.lower(): t.name for t in _ALL for alias in (t.name, *t.aliases)}


def get_implicit_tableau(name: str) -> ButcherTableau | AdditiveTableau:
    """Look an implicit method or IMEX pair up by torchdiffeq name or diffrax class name."""
    try:
        key = _ALIASES[name.lower()]
    except (KeyError, AttributeError):
        known = ", ".join(sorted([*IMPLICIT_TABLEAUX, *ADDITIVE_TABLEAUX]))
        raise TableauError(f"unknown implicit method {name!r}; known methods: {known}") from None
    return IMPLICIT_TABLEAUX.get(key) or ADDITIVE_TABLEAUX[key]
