"""Bad input is refused with a TableauError that names the problem."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

from symplectic_adjoint.core import (
    TABLEAUX,
    ButcherTableau,
    TableauError,
    check_order,
    get_tableau,
    rk_step,
    rk_step_vjp,
)

# Implicit midpoint: a_11 = 1/2 on the diagonal.
IMPLICIT = ButcherTableau(
    name="implicit_midpoint",
    a_exact=((Fraction(1, 2),),),
    b_exact=(Fraction(1),),
    c_exact=(Fraction(1, 2),),
    order=2,
)
# Rows of a sum to 1/2, but the node claims 1/3.
INCONSISTENT = ButcherTableau.from_lower(
    "inconsistent", c=[0, "1/3"], a_lower=[["1/2"]], b=[0, 1], order=2
)


def _f(i, X):
    return -X


def _vjp(i, X, kbar, carry):
    return -kbar, None, carry


@pytest.mark.parametrize(
    ("tableau", "message"),
    [
        (IMPLICIT, r"implicit_midpoint: tableau is implicit .* explicit Runge-Kutta methods only"),
        (INCONSISTENT, r"inconsistent: row 2 of a sums to 0\.5 but c_2 = 0\.333"),
    ],
    ids=["implicit", "rows-do-not-sum-to-c"],
)
def test_kernels_refuse_unusable_tableaux(tableau, message):
    y = np.ones(2)
    with pytest.raises(TableauError, match=message):
        rk_step(tableau, _f, y, 0.1)
    with pytest.raises(TableauError, match=message):
        rk_step_vjp(tableau, _vjp, y, [y] * tableau.stages, 0.1)


def test_unknown_method_name_lists_the_known_ones():
    with pytest.raises(TableauError, match=r"unknown Runge-Kutta method 'dopri9'.*dopri5"):
        get_tableau("dopri9")


def test_method_names_are_found_by_alias_and_case():
    assert get_tableau("Tsit5") is TABLEAUX["tsit5"]
    assert get_tableau("DOPRI5") is TABLEAUX["dopri5"]
    assert get_tableau("Heun") is TABLEAUX["heun2"]


def test_claimed_order_that_does_not_hold_is_refused():
    wrong = dataclasses.replace(TABLEAUX["rk4"], order=5)
    with pytest.raises(TableauError, match=r"rk4: method claims order 5 but violates .* tree "):
        check_order(wrong)


def test_malformed_shapes_are_refused():
    with pytest.raises(TableauError, match="short: 2 weights need 1 rows of a, got 0"):
        ButcherTableau.from_lower("short", c=[0, 1], a_lower=[], b=[0, 1], order=1)
    with pytest.raises(TableauError, match="embedded weights must have 2 entries"):
        ButcherTableau.from_lower(
            "emb", c=[0, 1], a_lower=[[1]], b=["1/2", "1/2"], bhat=[1], order=2
        )
