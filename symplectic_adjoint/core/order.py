"""Order conditions of explicit Runge--Kutta methods, checked exactly with rooted trees.

A Runge--Kutta method ``(a, b)`` has order ``p`` iff for every rooted tree ``t`` with at
most ``p`` vertices (Butcher 1963)::

    Phi(t) = 1 / gamma(t),

where, for ``t = [t_1, ..., t_m]`` (a root whose children are the subtrees ``t_k``)::

    gamma(t) = |t| * prod_k gamma(t_k),            gamma(leaf) = 1,
    g_i(t)   = prod_k (a g(t_k))_i,               g_i(leaf) = 1,
    Phi(t)   = sum_i b_i g_i(t).

So ``Phi`` of the leaf is ``sum b_i``, of ``[leaf]`` is ``sum b_i c_i`` (with ``c = a 1``),
and so on. Trees are generated, not listed: a tree is the sorted tuple of its children,
and the trees with ``n`` vertices are the multisets of smaller trees with ``n - 1``
vertices in all, which yields 1, 1, 2, 4, 9, 20, 48, 115, ... (OEIS A000081).

The stability polynomial of the method, ``R(z) = 1 + sum_k z^k b^T a^{k-1} 1``, is the
one-step map of ``y' = lambda y``; for ``y' = A y`` one step is ``y -> R(hA) y``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from functools import cache

from .tableau import ButcherTableau, TableauError

__all__ = [
    "Tree",
    "trees",
    "trees_up_to",
    "tree_order",
    "density",
    "tree_name",
    "elementary_weight",
    "order_conditions_residual",
    "measured_order",
    "check_order",
    "stability_polynomial",
    "additive_order_residual",
    "additive_measured_order",
]

#: A rooted tree: the sorted tuple of its children (the leaf is ``()``).
Tree = tuple

#: Residual accepted for tableaux stored as decimal/rational approximations.
INEXACT_TOLERANCE = Fraction(1, 10**12)


@cache
def trees(n: int) -> tuple[Tree, ...]:
    """All rooted trees with exactly ``n`` vertices, each once, in a fixed order."""
    if n < 1:
        return ()
    if n == 1:
        return ((),)
    # Children of the root form a multiset of smaller trees with n - 1 vertices in all.
    # Drawing them in non-decreasing position of one fixed list makes each multiset
    # appear exactly once.
    pool = [t for m in range(1, n) for t in trees(m)]
    out: list[Tree] = []

    def extend(children: list[Tree], start: int, left: int) -> None:
        if left == 0:
            out.append(tuple(children))
            return
        for pos in range(start, len(pool)):
            size = tree_order(pool[pos])
            if size <= left:
                extend([*children, pool[pos]], pos, left - size)

    extend([], 0, n - 1)
    return tuple(out)


def trees_up_to(order: int) -> list[Tree]:
    """All rooted trees with at most ``order`` vertices, smallest first."""
    return [t for n in range(1, order + 1) for t in trees(n)]


@cache
def tree_order(t: Tree) -> int:
    """Number of vertices ``|t|``."""
    return 1 + sum(tree_order(child) for child in t)


@cache
def density(t: Tree) -> int:
    """``gamma(t) = |t| prod gamma(children)``; the order condition is ``Phi = 1/gamma``."""
    out = tree_order(t)
    for child in t:
        out *= density(child)
    return out


def tree_name(t: Tree) -> str:
    """Butcher's bracket notation: ``τ`` is the leaf, ``[τ,[τ]]`` a root with two children."""
    if not t:
        return "τ"
    return "[" + ",".join(tree_name(child) for child in t) + "]"


def _dot(u: Sequence[Fraction], v: Sequence[Fraction]) -> Fraction:
    return sum((x * y for x, y in zip(u, v, strict=True) if x), Fraction(0))


def _stage_products(a: Sequence[Sequence[Fraction]], t: Tree, memo: dict) -> list[Fraction]:
    """``g(t)``: the vector whose weighted sum is the elementary weight (see module doc)."""
    if t in memo:
        return memo[t]
    s = len(a)
    g = [Fraction(1)] * s
    for child in t:
        gc = _stage_products(a, child, memo)
        g = [x * _dot(row, gc) for x, row in zip(g, a, strict=True)]
    memo[t] = g
    return g


def _weights(tableau: ButcherTableau, embedded: bool) -> tuple[Fraction, ...]:
    if not embedded:
        return tableau.b_exact
    if tableau.bhat_exact is None:
        raise TableauError(f"{tableau.name}: has no embedded method")
    return tableau.bhat_exact


def elementary_weight(tableau: ButcherTableau, t: Tree, *, embedded: bool = False) -> Fraction:
    """``Phi(t) = sum_i b_i g_i(t)`` (with ``bhat`` when ``embedded``), exactly."""
    return _dot(_weights(tableau, embedded), _stage_products(tableau.a_exact, t, {}))


def _residuals(tableau: ButcherTableau, order: int, embedded: bool):
    """Yield ``(tree, Phi(t) - 1/gamma(t))`` for every tree up to ``order`` vertices."""
    weights = _weights(tableau, embedded)
    memo: dict = {}  # g(t) is shared by every tree that contains t: compute it once
    for t in trees_up_to(order):
        yield t, _dot(weights, _stage_products(tableau.a_exact, t, memo)) - Fraction(1, density(t))


def order_conditions_residual(
    tableau: ButcherTableau, order: int, *, embedded: bool = False
) -> Fraction:
    """``max |Phi(t) - 1/gamma(t)|`` over all trees with at most ``order`` vertices.

    Exactly zero for an exact tableau of at least that order; tiny (<= 1e-12) for the
    decimal approximations of Tsit5 and Dopri8 (``tableau.exact`` is ``False``).
    """
    return max((abs(r) for _, r in _residuals(tableau, order, embedded)), default=Fraction(0))


def _first_violation(
    tableau: ButcherTableau, order: int, embedded: bool
) -> tuple[Tree, Fraction] | None:
    """The smallest tree whose condition fails (beyond rounding for inexact tableaux)."""
    tol = Fraction(0) if tableau.exact else INEXACT_TOLERANCE
    for t, r in _residuals(tableau, order, embedded):
        if abs(r) > tol:
            return t, r
    return None


def measured_order(
    tableau: ButcherTableau, *, embedded: bool = False, max_order: int | None = None
) -> int:
    """The largest ``p <= max_order`` such that every tree up to ``p`` vertices holds.

    ``max_order`` defaults to one more than the claimed order, which is enough to tell
    a method that has exactly its claimed order from one that has more.
    """
    claimed = tableau.embedded_order if embedded else tableau.order
    limit = max_order if max_order is not None else (claimed or 0) + 1
    failed = _first_violation(tableau, limit, embedded)
    return limit if failed is None else tree_order(failed[0]) - 1


def _check(tableau: ButcherTableau, order: int, embedded: bool) -> None:
    failed = _first_violation(tableau, order, embedded)
    if failed is not None:
        t, r = failed
        which = "embedded method" if embedded else "method"
        raise TableauError(
            f"{tableau.name}: {which} claims order {order} but violates the order "
            f"condition of tree {tree_name(t)} (order {tree_order(t)}): "
            f"Phi = {float(r + Fraction(1, density(t)))!r}, 1/gamma = 1/{density(t)}"
        )


def check_order(tableau: ButcherTableau) -> None:
    """Raise :class:`TableauError` naming the first violated tree if the tableau (or
    its embedded method) does not have the order it claims."""
    _check(tableau, tableau.order, embedded=False)
    if tableau.bhat_exact is not None and tableau.embedded_order is not None:
        _check(tableau, tableau.embedded_order, embedded=True)


def stability_polynomial(tableau: ButcherTableau, *, embedded: bool = False) -> list[Fraction]:
    """Coefficients ``[1, b^T 1, b^T a 1, b^T a^2 1, ...]`` of ``R(z)``, lowest first.

    Trailing zero coefficients are dropped (dopri5's 7th stage has ``b_7 = 0``, so its
    ``R`` has degree 6, not 7).
    """
    weights = _weights(tableau, embedded)
    a, s = tableau.a_exact, tableau.stages
    coeffs = [Fraction(1)]
    v = [Fraction(1)] * s  # a^{k-1} 1
    for _ in range(s):
        coeffs.append(_dot(weights, v))
        v = [_dot(row, v) for row in a]
    while len(coeffs) > 1 and coeffs[-1] == 0:
        coeffs.pop()
    return coeffs


# ------------------------------------------------------------------ additive (IMEX) pairs
def _coloured_products(
    mats: Sequence[Sequence[Sequence[Fraction]]], t: Tree, memo: dict
) -> list[list[Fraction]]:
    """``g(t)`` for every colouring of the non-root vertices of ``t``.

    For an additive method each vertex of a tree carries one of the fields ``f_E``,
    ``f_I``; the edge into a child of colour ``nu`` contributes ``a^nu``. The root's
    colour only selects the weights ``b^nu`` (see :func:`additive_order_residual`).
    """
    if t in memo:
        return memo[t]
    s = len(mats[0])
    out: list[list[Fraction]] = [[Fraction(1)] * s]
    for child in t:
        linked = [
            [_dot(row, gc) for row in a]
            for gc in _coloured_products(mats, child, memo)
            for a in mats
        ]
        out = [[x * y for x, y in zip(g, v, strict=True)] for g in out for v in linked]
    memo[t] = out
    return out


def additive_order_residual(
    weights: Sequence[Sequence[Fraction]],
    mats: Sequence[Sequence[Sequence[Fraction]]],
    order: int,
) -> Fraction:
    """``max |Phi(t) - 1/gamma(t)|`` over all trees up to ``order`` vertices and all
    colourings of their vertices by the parts of an additive Runge--Kutta method.

    ``weights[nu]`` and ``mats[nu]`` are ``b^nu`` and ``a^nu`` of part ``nu`` (e.g.
    explicit and implicit of an IMEX pair). With one part this is
    :func:`order_conditions_residual`. A pair has order ``p`` iff this is zero for ``p``.
    """
    memo: dict = {}
    worst = Fraction(0)
    for t in trees_up_to(order):
        target = Fraction(1, density(t))
        for g in _coloured_products(mats, t, memo):
            for b in weights:
                worst = max(worst, abs(_dot(b, g) - target))
    return worst


def additive_measured_order(
    weights: Sequence[Sequence[Fraction]],
    mats: Sequence[Sequence[Sequence[Fraction]]],
    *,
    max_order: int,
    tol: Fraction = Fraction(0),
) -> int:
    """The largest ``p <= max_order`` whose coloured order conditions hold within ``tol``."""
    for p in range(1, max_order + 1):
        if additive_order_residual(weights, mats, p) > tol:
            return p - 1
    return max_order
