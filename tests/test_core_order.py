"""Rooted trees, order conditions and stability polynomials, all in exact arithmetic."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from math import factorial

import pytest
from core_support import TABLEAU_NAMES

from symplectic_adjoint.core import TABLEAUX, ButcherTableau, TableauError
from symplectic_adjoint.core.order import (
    check_order,
    density,
    elementary_weight,
    measured_order,
    order_conditions_residual,
    stability_polynomial,
    tree_name,
    tree_order,
    trees,
    trees_up_to,
)

LEAF = ()
BUSHY3 = (LEAF, LEAF)  # [τ,τ]: sum b_i c_i^2 = 1/3
TALL3 = ((LEAF,),)  # [[τ]]: sum b_i a_ij c_j = 1/6


def test_tree_counts_per_order_are_the_rooted_tree_numbers():
    assert [len(trees(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]
    assert len(trees_up_to(8)) == 200


@pytest.mark.parametrize("n", range(1, 9))
def test_generated_trees_are_distinct_canonical_and_of_their_order(n):
    ts = trees(n)
    assert len(set(ts)) == len(ts)
    for t in ts:
        assert tree_order(t) == n
        assert list(t) == sorted(t, key=lambda c: (tree_order(c), trees(tree_order(c)).index(c)))


def test_density_and_names_of_small_trees():
    assert density(LEAF) == 1 and tree_name(LEAF) == "τ"
    assert density(BUSHY3) == 3 and tree_name(BUSHY3) == "[τ,τ]"
    assert density(TALL3) == 6 and tree_name(TALL3) == "[[τ]]"
    assert density((LEAF, LEAF, LEAF)) == 4  # sum b_i c_i^3 = 1/4
    assert density((((LEAF,),),)) == 24  # sum b_i a_ij a_jk c_k = 1/24


def test_elementary_weights_are_the_classical_sums_for_rk4():
    rk4 = TABLEAUX["rk4"]
    b, a, c = rk4.b_exact, rk4.a_exact, rk4.c_exact
    assert elementary_weight(rk4, BUSHY3) == sum(bi * ci**2 for bi, ci in zip(b, c, strict=True))
    tall = sum(b[i] * a[i][j] * c[j] for i in range(4) for j in range(4))
    assert elementary_weight(rk4, TALL3) == tall == Fraction(1, 6)


@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_every_tableau_satisfies_its_order_conditions(name):
    """Exactly zero residual for exact tableaux; <= 1e-12 for the decimal ones."""
    tab = TABLEAUX[name]
    tol = 0 if tab.exact else Fraction(1, 10**12)
    assert order_conditions_residual(tab, tab.order) <= tol
    if tab.is_adaptive:
        assert order_conditions_residual(tab, tab.embedded_order, embedded=True) <= tol
    check_order(tab)


@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_measured_order_is_the_stated_order_and_no_more(name):
    tab = TABLEAUX[name]
    assert measured_order(tab) == tab.order
    assert order_conditions_residual(tab, tab.order + 1) > Fraction(1, 10**6)
    if tab.is_adaptive:
        assert measured_order(tab, embedded=True) == tab.embedded_order


def test_inexact_tableaux_have_tiny_nonzero_residuals():
    for name in ("tsit5", "dopri8"):
        tab = TABLEAUX[name]
        assert not tab.exact
        assert 0 < order_conditions_residual(tab, tab.order) <= Fraction(1, 10**12)


def test_claiming_a_wrong_order_names_the_first_violated_tree():
    wrong = dataclasses.replace(TABLEAUX["heun3"], order=4)
    with pytest.raises(TableauError, match=r"heun3: method claims order 4 .* tree \[τ,τ,τ\]"):
        check_order(wrong)
    wrong = dataclasses.replace(TABLEAUX["dopri5"], embedded_order=5)
    with pytest.raises(TableauError, match=r"dopri5: embedded method claims order 5 .*order 5\)"):
        check_order(wrong)
    # c_i = sum_j a_ij holds but sum b_i c_i = 1/2 does not.
    bad = ButcherTableau.from_lower("bad", c=[0, 1], a_lower=[[1]], b=["1/4", "3/4"], order=2)
    with pytest.raises(TableauError, match=r"bad: method claims order 2 .* tree \[τ\]"):
        check_order(bad)


@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_stability_polynomial_matches_exp_up_to_the_order(name):
    """R(z) = exp(z) + O(z^{p+1}); the coefficient of z^{p+1} differs from 1/(p+1)!
    (none of these methods is accidentally of higher linear order), and the degree is at
    most the number of stages."""
    tab = TABLEAUX[name]
    R = stability_polynomial(tab)
    p = tab.order
    tol = 0 if tab.exact else Fraction(1, 10**12)
    assert all(abs(R[k] - Fraction(1, factorial(k))) <= tol for k in range(p + 1))
    assert len(R) - 1 <= tab.stages and R[-1] != 0
    if len(R) > p + 1:
        assert R[p + 1] != Fraction(1, factorial(p + 1))
    if tab.is_adaptive:
        Rhat = stability_polynomial(tab, embedded=True)
        q = tab.embedded_order
        assert all(abs(Rhat[k] - Fraction(1, factorial(k))) <= tol for k in range(q + 1))


def test_stability_polynomials_of_known_methods():
    assert stability_polynomial(TABLEAUX["euler"]) == [1, 1]
    rk4 = [Fraction(1), Fraction(1), Fraction(1, 2), Fraction(1, 6), Fraction(1, 24)]
    assert stability_polynomial(TABLEAUX["rk4"]) == rk4
    assert stability_polynomial(TABLEAUX["rk38"]) == rk4
    # dopri5's seventh stage has b_7 = 0: degree 6, last coefficient 1/600.
    assert stability_polynomial(TABLEAUX["dopri5"])[-1] == Fraction(1, 600)
    assert len(stability_polynomial(TABLEAUX["dopri5"])) == 7
