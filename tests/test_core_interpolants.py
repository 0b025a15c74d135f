"""The interpolant registry reproduces torchdiffeq's and diffrax's own dense output
(evaluated by the libraries' code on one step's slopes), and its VJP is right."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from core_support import XP_NAMES, asarray, namespace, rel_err, to_numpy

from symplectic_adjoint.core import TableauError, get_tableau, vdot
from symplectic_adjoint.core.interpolants import (
    DIFFRAX_SOLVERS,
    TORCHDIFFEQ_METHODS,
    diffrax_interpolant,
    hermite_basis,
    torchdiffeq_interpolant,
)

THETAS = [0.0, 0.13, 0.5, 0.77, 1.0]
FIXED_GRID = ["euler", "midpoint", "heun2", "heun3", "rk4"]
D = 3


def _one_step_slopes(stages: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(D), rng.standard_normal((stages, D)), 0.37


def _ours(interp, y0, k, h, theta) -> np.ndarray:
    return to_numpy(interp.evaluate(y0, list(k), h, theta))


# ------------------------------------------------------------------ torchdiffeq


def _torchdiffeq_solver(method: str):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    from torchdiffeq._impl.odeint import SOLVERS

    return torch, SOLVERS[method]


def _tableau_for(method: str):
    return get_tableau("rk38" if method == "rk4" else method)


@pytest.mark.parametrize("method", [m for m in TORCHDIFFEQ_METHODS if m not in FIXED_GRID])
def test_torchdiffeq_adaptive_quartic_matches_interp_fit(method):
    """The quartic through y_mid = y_n + h sum mid_i k_i, as torchdiffeq fits it."""
    torch, solver = _torchdiffeq_solver(method)
    from torchdiffeq._impl.interp import _interp_evaluate

    tab = _tableau_for(method)
    y0, k, h = _one_step_slopes(tab.stages)
    y1 = y0 + h * np.asarray(tab.b) @ k
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # torchdiffeq stacks the slopes on the last axis and reads self.mid only.
    coeffs = solver._interp_fit(SimpleNamespace(mid=solver.mid), t(y0), t(y1), t(k.T), t(h))
    interp = torchdiffeq_interpolant(method)
    for theta in THETAS:
        ref = _interp_evaluate(coeffs, t(0.0), t(h), t(theta * h)).numpy()
        assert rel_err(_ours(interp, y0, k, h, theta), ref) <= 1e-13, theta


@pytest.mark.parametrize("method", FIXED_GRID)
def test_torchdiffeq_fixed_grid_linear_and_cubic_match(method):
    """Linear between y_n and y_{n+1}; the cubic Hermite needs f(t_{n+1}, y_{n+1}) as an
    extra slope, appended after the stages."""
    torch, solver = _torchdiffeq_solver(method)
    tab = _tableau_for(method)
    y0, k, h = _one_step_slopes(tab.stages + 1)
    k, f1 = k[:-1], k[-1]
    y1 = y0 + h * np.asarray(tab.b) @ k
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    linear = torchdiffeq_interpolant(method, "linear")
    cubic = torchdiffeq_interpolant(method, "cubic")
    assert len(linear.W) == tab.stages and len(cubic.W) == tab.stages + 1
    for theta in THETAS:
        ref = solver._linear_interp(None, t(0.0), t(h), t(y0), t(y1), t(theta * h)).numpy()
        assert rel_err(_ours(linear, y0, k, h, theta), ref) <= 1e-13, theta
        ref = solver._cubic_hermite_interp(
            None, t(0.0), t(y0), t(k[0]), t(h), t(y1), t(f1), t(theta * h)
        ).numpy()
        assert rel_err(_ours(cubic, y0, [*k, f1], h, theta), ref) <= 1e-13, theta


def test_torchdiffeq_dopri8_mid_is_its_dense_polynomials_at_one_half():
    """torchdiffeq's dopri8 C_mid, rebuilt from the same decimal polynomials exactly."""
    _, solver = _torchdiffeq_solver("dopri8")
    interp = torchdiffeq_interpolant("dopri8")
    dense8 = diffrax_interpolant("Dopri8")
    half = [float(sum(c * Fraction(1, 2) ** p for p, c in enumerate(r))) for r in dense8.W_exact]
    assert np.max(np.abs(np.asarray(half) - solver.mid.numpy())) <= 1e-15
    assert interp.name == "torchdiffeq:dopri8"


def test_hermite_basis_interpolates_values_and_slopes():
    basis = hermite_basis()

    def at(p, x):
        return sum(c * Fraction(x) ** n for n, c in enumerate(p))

    def slope(p, x):
        return sum(n * c * Fraction(x) ** (n - 1) for n, c in enumerate(p) if n)

    values = {k: (at(p, 0), at(p, 1), slope(p, 0), slope(p, 1)) for k, p in basis.items()}
    assert values == {"h00": (1, 0, 0, 0), "h01": (0, 1, 0, 0), "h10": (0, 0, 1, 0),
                      "h11": (0, 0, 0, 1)}  # fmt: skip


# ------------------------------------------------------------------ diffrax


@pytest.mark.parametrize("solver_name", DIFFRAX_SOLVERS)
def test_diffrax_interpolation_class_matches(solver_name):
    """Built from increments K_i = h k_i as diffrax's solver hands them to its
    ``interpolation_cls``, evaluated by diffrax at several times."""
    pytest.importorskip("jax")
    diffrax = pytest.importorskip("diffrax")
    import jax.numpy as jnp

    solver = getattr(diffrax, solver_name)
    tab = get_tableau(solver_name)
    y0, k, h = _one_step_slopes(tab.stages)
    y1 = y0 + h * np.asarray(tab.b) @ k
    t0 = 0.25
    args = dict(t0=t0, t1=t0 + h, y0=jnp.asarray(y0), y1=jnp.asarray(y1))
    if solver_name != "Euler":  # LocalLinearInterpolation takes no slopes
        args["k"] = jnp.asarray(h * k)
    theirs = solver.interpolation_cls(**args)
    interp = diffrax_interpolant(solver_name)
    for theta in THETAS:
        ref = np.asarray(theirs.evaluate(t0 + theta * h))
        assert rel_err(_ours(interp, y0, k, h, theta), ref) <= 1e-13, theta


def test_diffrax_dopri8_dense_output_misses_y1_by_its_printed_digits():
    """Recorded fact: diffrax's Dopri8 interpolant at theta = 1 is not exactly y_{n+1}
    (its decimals are not consistent with the rational b to more than ~1e-12)."""
    interp, tab = diffrax_interpolant("Dopri8"), get_tableau("dopri8")
    gap = max(abs(sum(r) - b) for r, b in zip(interp.W_exact, tab.b_exact, strict=True))
    assert 0 < gap < Fraction(1, 10**11)


def test_interpolants_pass_through_step_end_where_the_libraries_do():
    for interp in [torchdiffeq_interpolant(m) for m in TORCHDIFFEQ_METHODS] + [
        diffrax_interpolant(s) for s in DIFFRAX_SOLVERS if s != "Dopri8"
    ]:
        name = interp.name.split(":")[1]
        tab = _tableau_for(name) if interp.name.startswith("torchdiffeq") else get_tableau(name)
        at_one = [sum(r) for r in interp.W_exact]
        tol = 0 if tab.exact else Fraction(1, 10**15)
        assert all(abs(w - b) <= tol for w, b in zip(at_one, tab.b_exact, strict=True)), name
        assert all(r[0] == 0 for r in interp.W_exact), name  # y(t_n) = y_n


def test_unknown_interpolants_are_refused_by_name():
    with pytest.raises(TableauError, match="'explicit_adams'"):
        torchdiffeq_interpolant("explicit_adams")
    with pytest.raises(TableauError, match="'Kvaerno5'"):
        diffrax_interpolant("Kvaerno5")
    with pytest.raises(ValueError, match="'quintic'"):
        torchdiffeq_interpolant("rk4", "quintic")


# ------------------------------------------------------------------ VJP

ALL_INTERPOLANTS = [("torchdiffeq", m) for m in TORCHDIFFEQ_METHODS] + [
    ("diffrax", s) for s in DIFFRAX_SOLVERS
]


def _interpolant(lib, name):
    return torchdiffeq_interpolant(name) if lib == "torchdiffeq" else diffrax_interpolant(name)


@pytest.mark.parametrize("xp_name", XP_NAMES)
@pytest.mark.parametrize(("lib", "name"), ALL_INTERPOLANTS, ids=lambda x: str(x))
def test_dense_output_vjp_matches_finite_differences(lib, name, xp_name):
    """k_bar_i = h w_i(theta) ybar exactly (the map is linear in k); theta_bar and h_bar
    against Richardson-extrapolated central differences."""
    xp = namespace(xp_name)
    interp = _interpolant(lib, name)
    s = len(interp.W)
    rng = np.random.default_rng(5)
    y0 = asarray(xp, rng.standard_normal(D))
    k = [asarray(xp, row) for row in rng.standard_normal((s, D))]
    ybar = asarray(xp, rng.standard_normal(D))
    h, theta = 0.41, 0.63

    def loss(h, theta, k=k):
        return float(to_numpy(vdot(ybar, interp.evaluate(y0, k, h, theta))))

    def derivative(fn, eps=1e-5):
        central = lambda e: (fn(e) - fn(-e)) / (2 * e)  # noqa: E731
        return (4 * central(eps) - central(2 * eps)) / 3

    k_bar, theta_bar, h_bar = interp.vjp(ybar, k, h, theta, need_time=True)
    for i in range(s):
        dk = asarray(xp, rng.standard_normal(D))
        shifted = [ki + dk if j == i else ki for j, ki in enumerate(k)]
        exact = loss(h, theta, shifted) - loss(h, theta)  # linear in k: no truncation
        got = 0.0 if k_bar[i] is None else float(to_numpy(vdot(k_bar[i], dk)))
        assert abs(got - exact) <= 1e-12 * max(1.0, abs(exact)), i
        assert (k_bar[i] is None) == all(x == 0 for x in interp.W_exact[i])
    fd_theta = derivative(lambda e: loss(h, theta + e))
    fd_h = derivative(lambda e: loss(h + e, theta))
    assert abs(float(to_numpy(theta_bar)) - fd_theta) <= 1e-9 * max(1.0, abs(fd_theta))
    assert abs(float(to_numpy(h_bar)) - fd_h) <= 1e-9 * max(1.0, abs(fd_h))

    k_bar_only, none_t, none_h = interp.vjp(ybar, None, h, theta)
    assert none_t is None and none_h is None
    for a, b in zip(k_bar_only, k_bar, strict=True):
        assert (a is None and b is None) or rel_err(a, b) == 0.0


@pytest.mark.parametrize("xp_name", XP_NAMES)
def test_dense_output_accepts_array_theta_and_h(xp_name):
    """Adapters pass theta and h as 0-d arrays (traced under jit); same numbers."""
    xp = namespace(xp_name)
    interp = diffrax_interpolant("Tsit5")
    rng = np.random.default_rng(6)
    y0 = asarray(xp, rng.standard_normal(D))
    k = [asarray(xp, row) for row in rng.standard_normal((7, D))]
    ref = interp.evaluate(y0, k, 0.3, 0.4)
    got = interp.evaluate(y0, k, asarray(xp, 0.3), asarray(xp, 0.4))
    assert rel_err(got, ref) <= 1e-15
