"""Plain-NumPy references: the core kernels with hand-written VJPs, and the linear oracle.

:func:`solve_core` drives :func:`symplectic_adjoint.core.rk_step` forward and
:func:`symplectic_adjoint.core.rk_step_vjp` backward on a constant grid of step ``h``
(every output time is a grid node, so no interpolation is involved). The stage VJPs
are written out by hand for the fields simple enough to do so (:data:`VJPS`); this is
a third implementation, independent of both autodiff systems.

:func:`linear_oracle` is the exact discrete gradient of ``y' = A y``: one step of any
explicit RK method is ``y -> M y`` with ``M = R(hA)``, ``R`` the stability polynomial
``R(z) = sum_p r_p z^p`` (``r_0 = 1``, ``r_p = b^T a^{p-1} 1``). With ``lam`` the
adjoint after each step, ``dL/dM = sum_n lam_{n+1}^T y_n`` and
``dL/dA = sum_p r_p h^p sum_{q<p} (A^T)^q (dL/dM) (A^T)^{p-1-q}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from symplectic_adjoint.core import ButcherTableau, get_tableau, rk_step, rk_step_vjp

from ..cases import Case, Solver
from . import Result

__all__ = ["VJPS", "linear_oracle", "solve_core", "stability_coefficients"]

Params = Mapping[str, np.ndarray]
#: ``vjp(t, y, p, ybar) -> (y_bar, {name: p_bar})`` of ``f(t, y, p)``.
VJP = Callable[[float, np.ndarray, Params, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]


def _linear_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    return g @ p["A"], {"A": g.T @ y}


def _mlp_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    a = np.tanh(y @ p["W1"].T + t * p["u"] + p["b1"])
    zb = (g @ p["W2"]) * (1 - a * a)
    pb = {
        "W1": zb.T @ y,
        "u": t * zb.sum(0),
        "b1": zb.sum(0),
        "W2": g.T @ a,
        "b2": g.sum(0),
    }
    return zb @ p["W1"], pb


def _tanh_layer_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    a = np.tanh(y @ p["W"].T + p["b"])
    zb = g * (1 - a * a)
    return zb @ p["W"] - g, {"W": zb.T @ y, "b": zb.sum(0)}


def _lotka_volterra_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    a, b, d, c = p["theta"]
    x, z = y[..., 0], y[..., 1]
    gx, gz = g[..., 0], g[..., 1]
    yb = np.stack([gx * (a - b * z) + gz * d * z, -gx * b * x + gz * (d * x - c)], axis=-1)
    theta = np.array([(gx * x).sum(), -(gx * x * z).sum(), (gz * x * z).sum(), -(gz * z).sum()])
    return yb, {"theta": theta}


def _pendulum_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    k0, k1 = p["k"]
    th, om = y[..., 0], y[..., 1]
    g0, g1 = g[..., 0], g[..., 1]
    yb = np.stack([-g1 * k0 * np.cos(th), g0 - g1 * k1], axis=-1)
    return yb, {"k": np.array([-(g1 * np.sin(th)).sum(), -(g1 * om).sum()])}


def _van_der_pol_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    mu = p["mu"][0]
    x, v = y[..., 0], y[..., 1]
    g0, g1 = g[..., 0], g[..., 1]
    yb = np.stack([g1 * (-2 * mu * x * v - 1), g0 + g1 * mu * (1 - x * x)], axis=-1)
    return yb, {"mu": np.array([(g1 * (1 - x * x) * v).sum()])}


VJPS: dict[str, VJP] = {
    "linear": _linear_vjp,
    "mlp": _mlp_vjp,
    "tanh_layer": _tanh_layer_vjp,
    "lotka_volterra": _lotka_volterra_vjp,
    "pendulum": _pendulum_vjp,
    "van_der_pol": _van_der_pol_vjp,
}


def _output_nodes(case: Case) -> dict[int, int]:
    """Grid node index -> output index (outputs are grid nodes by construction)."""
    return {int(round((tk - case.t[0]) / case.signed_h)): k for k, tk in enumerate(case.t)}


def solve_core(case: Case, solver: Solver) -> Result:
    """Forward and discrete adjoint with the core kernels on the constant grid ``h``."""
    if case.numpy_vjp is None or not solver.constant_steps:
        raise ValueError(f"no NumPy reference for {case.name} with {solver.name}")
    tab = get_tableau(solver.tableau)
    vjp, f, p = VJPS[case.numpy_vjp], case.field, case.params
    h, t0, nodes = case.signed_h, float(case.t[0]), _output_nodes(case)
    y = np.array(case.y0, dtype=np.float64)
    ys: list[np.ndarray] = [y] * len(case.t)
    stages = []
    for n in range(case.n_steps):
        tn = t0 + n * h
        step = rk_step(tab, lambda i, X, tn=tn: f(tn + tab.c[i] * h, X, p), y, h)
        stages.append(step.X)
        y = step.y1
        if n + 1 in nodes:
            ys[nodes[n + 1]] = y
    w = case.weights
    lam = np.zeros_like(y)
    pbar = {k: np.zeros_like(v) for k, v in p.items()}
    for n in reversed(range(case.n_steps)):
        if n + 1 in nodes:
            lam = lam + w[nodes[n + 1]]
        tn = t0 + n * h

        def stage_vjp(i: int, X: np.ndarray, kb: np.ndarray, carry: dict, tn: float = tn):
            yb, pb = vjp(tn + tab.c[i] * h, X, p, kb)
            return yb, None, {k: carry[k] + pb[k] for k in carry}

        back = rk_step_vjp(tab, stage_vjp, lam, stages[n], h, carry=pbar)
        lam, pbar = back.y0_bar, back.carry
    lam = lam + w[0]
    grads = {"y0": lam, **{f"p.{k}": v for k, v in pbar.items()}}
    return Result(ys=(np.stack(ys),), grads=grads)


def stability_coefficients(tab: ButcherTableau) -> list[float]:
    """``[r_0, r_1, ...]`` of ``R(z)``: from the core when it has them, else ``b^T a^{p-1} 1``."""
    try:
        from symplectic_adjoint.core.order import stability_polynomial
    except ImportError:
        a, b = np.array(tab.a), np.array(tab.b)
        v, coeffs = np.ones(tab.stages), [1.0]
        for _ in range(tab.stages):
            coeffs.append(float(b @ v))
            v = a @ v
        return coeffs
    return [float(r) for r in stability_polynomial(tab)]


def linear_oracle(case: Case, solver: Solver) -> Result:
    """Exact discrete forward values and gradients of ``y' = A y`` on the grid ``h``."""
    if not case.oracle or not solver.constant_steps:
        raise ValueError(f"no oracle for {case.name} with {solver.name}")
    A, h, nodes = case.params["A"], case.signed_h, _output_nodes(case)
    r = stability_coefficients(get_tableau(solver.tableau))
    powers = [np.eye(len(A))]
    for _ in range(len(r)):
        powers.append(powers[-1] @ A)
    M = sum(rp * h**p * powers[p] for p, rp in enumerate(r))
    y = np.array(case.y0, dtype=np.float64)
    traj = [y]
    for _ in range(case.n_steps):
        traj.append(traj[-1] @ M.T)
    ys = np.stack([traj[n] for n in sorted(nodes, key=nodes.__getitem__)])
    w = case.weights
    lam = np.zeros_like(y)
    G = np.zeros_like(A)
    for n in reversed(range(case.n_steps)):
        if n + 1 in nodes:
            lam = lam + w[nodes[n + 1]]
        G += lam.T @ traj[n]  # y_{n+1} = y_n M^T (rows)
        lam = lam @ M
    lam = lam + w[0]
    At = [P.T for P in powers]
    A_bar = sum(
        rp * h**p * sum(At[q] @ G @ At[p - 1 - q] for q in range(p))
        for p, rp in enumerate(r)
        if p > 0
    )
    return Result(ys=(ys,), grads={"y0": lam, "p.A": A_bar})
