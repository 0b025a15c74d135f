"""Measured order of convergence of every tableau (and of its embedded method) on a
nonlinear, time-dependent ODE with a known solution, with fixed steps.

``python tests/test_core_convergence.py`` prints the table of measured slopes.

The problem is ``y' = W tanh(y) - W tanh(y*(t)) + y*'(t)``: nonlinear in ``y`` and
explicitly time-dependent (so the nodes ``c`` matter), with exact solution ``y*``. Step
counts are chosen per order so that the errors lie in the asymptotic regime but well
above the float64 rounding floor (~1e-15): for dopri8, 12..32 steps give errors from
~1e-10 down to ~1e-14.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from core_support import TABLEAU_NAMES

from symplectic_adjoint.core import TABLEAUX, ButcherTableau, rk_step

W = np.array([[0.5, -1.0, 0.3], [0.8, 0.2, -0.6], [-0.4, 0.9, 0.1]])
OMEGA = (5.0, 7.0, 2.0)
T_END = 1.0

#: Step counts per order: asymptotic, above rounding (see the module docstring).
STEPS = {
    1: [128, 192, 256, 384, 512, 768, 1024],
    2: [64, 96, 128, 192, 256, 384, 512],
    3: [64, 96, 128, 192, 256, 384, 512],
    4: [64, 96, 128, 192, 256, 384, 512],
    5: [24, 32, 48, 64, 96, 128],
    7: [16, 24, 32, 48],
    8: [12, 16, 24, 32],
}


def exact(t: float) -> np.ndarray:
    w1, w2, w3 = OMEGA
    return np.array([np.sin(w1 * t), np.cos(w2 * t), np.exp(-w3 * t)])


def exact_dot(t: float) -> np.ndarray:
    w1, w2, w3 = OMEGA
    return np.array([w1 * np.cos(w1 * t), -w2 * np.sin(w2 * t), -w3 * np.exp(-w3 * t)])


def field(t: float, y: np.ndarray) -> np.ndarray:
    return W @ np.tanh(y) - W @ np.tanh(exact(t)) + exact_dot(t)


def global_error(tableau: ButcherTableau, steps: int) -> float:
    h = T_END / steps
    y = exact(0.0)
    for n in range(steps):
        t0 = n * h
        y = rk_step(tableau, lambda i, X, t0=t0: field(t0 + tableau.c[i] * h, X), y, h).y1
    return float(np.linalg.norm(y - exact(T_END)))


def embedded_method(tableau: ButcherTableau) -> ButcherTableau:
    """The embedded method as a method of its own (same stages, weights bhat)."""
    return dataclasses.replace(
        tableau,
        name=f"{tableau.name}-embedded",
        b_exact=tableau.bhat_exact,
        order=tableau.embedded_order,
        bhat_exact=None,
        embedded_order=None,
    )


def measured_slope(tableau: ButcherTableau) -> float:
    """Least-squares slope of log(error) against log(h)."""
    steps = STEPS[tableau.order]
    errors = [global_error(tableau, n) for n in steps]
    h = T_END / np.asarray(steps, dtype=float)
    return float(np.polyfit(np.log(h), np.log(errors), 1)[0])


@pytest.mark.parametrize("name", TABLEAU_NAMES)
def test_measured_convergence_order_is_the_stated_order(name):
    tab = TABLEAUX[name]
    slope = measured_slope(tab)
    print(f"{name}: measured order {slope:.2f} (stated {tab.order})")
    assert abs(slope - tab.order) <= 0.3


@pytest.mark.parametrize("name", [n for n in TABLEAU_NAMES if TABLEAUX[n].is_adaptive])
def test_measured_convergence_order_of_the_embedded_method(name):
    tab = embedded_method(TABLEAUX[name])
    slope = measured_slope(tab)
    print(f"{tab.name}: measured order {slope:.2f} (stated {tab.order})")
    assert abs(slope - tab.order) <= 0.3


def main() -> None:
    print(f"{'tableau':16} {'stated':>6} {'measured':>8}   embedded: stated measured")
    for name in TABLEAU_NAMES:
        tab = TABLEAUX[name]
        line = f"{name:16} {tab.order:6d} {measured_slope(tab):8.2f}"
        if tab.is_adaptive:
            emb = embedded_method(tab)
            line += f"   {emb.order:14d} {measured_slope(emb):8.2f}"
        print(line)


if __name__ == "__main__":
    main()
