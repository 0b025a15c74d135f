"""Plain-NumPy references: the core kernels with hand-written VJPs, and the linear oracle.

:func:`solve_core` drives :func:`symplectic_adjoint.core.rk_step` forward and
:func:`symplectic_adjoint.core.rk_step_vjp` backward on a constant grid of step ``h``
(every output time is a grid node, so no interpolation is involved). The stage VJPs
are written out by hand for the fields simple enough to do so (:data:`VJPS`); this is
a third implementation, independent of both autodiff systems.

:func:`solve_event_core` is the same for a terminating event: the event time by Newton on
the core interpolant, its gradient by the implicit function theorem.

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
from symplectic_adjoint.core.implicit_methods import get_implicit_tableau, is_diagonally_implicit
from symplectic_adjoint.core.implicit_step import (
    implicit_step,
    implicit_step_vjp,
    newton_coupled_solve,
    newton_stage_solve,
)
from symplectic_adjoint.core.interpolants import diffrax_interpolant, torchdiffeq_interpolant

from ..cases import NEWTON_TOL, Case, EventCase, Solver, event_value
from . import Result

__all__ = ["VJPS", "linear_oracle", "solve_core", "solve_event_core", "stability_coefficients"]

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


def _stiff_tanh_vjp(t: float, y: np.ndarray, p: Params, g: np.ndarray):
    a = np.tanh(y @ p["W"].T + p["b"])
    zb = g * (1 - a * a)
    return zb @ p["W"] - g * p["d"], {"W": zb.T @ y, "b": zb.sum(0), "d": -(g * y).sum(0)}


VJPS: dict[str, VJP] = {
    "linear": _linear_vjp,
    "mlp": _mlp_vjp,
    "tanh_layer": _tanh_layer_vjp,
    "lotka_volterra": _lotka_volterra_vjp,
    "pendulum": _pendulum_vjp,
    "van_der_pol": _van_der_pol_vjp,
    "stiff_tanh": _stiff_tanh_vjp,
}


def _output_nodes(case: Case) -> dict[int, int]:
    """Grid node index -> output index (outputs are grid nodes by construction)."""
    return {int(round((tk - case.t[0]) / case.signed_h)): k for k, tk in enumerate(case.t)}


def _stage_vjp(vjp: VJP, p: Params, c: tuple[float, ...], h: float, tn: float) -> Callable:
    """The core recursions' stage VJP for the step from ``tn``: the hand-written ``vjp`` at
    stage ``i`` (time ``tn + c_i h``), its parameter cotangents added to the carry."""

    def stage_vjp(i: int, X: np.ndarray, kb: np.ndarray, carry: dict):
        yb, pb = vjp(tn + c[i] * h, X, p, kb)
        return yb, None, {k: carry[k] + pb[k] for k in carry}

    return stage_vjp


def _sweep(case: Case, c: tuple[float, ...], step: Callable, step_vjp: Callable) -> Result:
    """Forward over the constant grid ``h``, then the discrete adjoint sweep.

    ``step(tn, y) -> (y1, X)`` takes one step from ``tn`` (``X``: its stage inputs);
    ``step_vjp(tn, lam, X, stage_vjp, pbar) -> StepVJP`` is its adjoint, given the stage
    VJP (hand-written, stage ``i`` at time ``tn + c_i h``) that accumulates ``pbar``.
    """
    vjp, p = VJPS[case.numpy_vjp], case.params  # type: ignore[index]
    h, t0, nodes = case.signed_h, float(case.t[0]), _output_nodes(case)
    y = np.array(case.y0, dtype=np.float64)
    ys: list[np.ndarray] = [y] * len(case.t)
    stages = []
    for n in range(case.n_steps):
        y, X = step(t0 + n * h, y)
        stages.append(X)
        if n + 1 in nodes:
            ys[nodes[n + 1]] = y
    w = case.weights
    lam = np.zeros_like(y)
    pbar = {k: np.zeros_like(v) for k, v in p.items()}
    for n in reversed(range(case.n_steps)):
        if n + 1 in nodes:
            lam = lam + w[nodes[n + 1]]
        tn = t0 + n * h
        back = step_vjp(tn, lam, stages[n], _stage_vjp(vjp, p, c, h, tn), pbar)
        lam, pbar = back.y0_bar, back.carry
    lam = lam + w[0]
    grads = {"y0": lam, **{f"p.{k}": v for k, v in pbar.items()}}
    return Result(ys=(np.stack(ys),), grads=grads)


def solve_core(case: Case, solver: Solver) -> Result:
    """Forward and discrete adjoint with the core kernels on the constant grid ``h``."""
    if case.numpy_vjp is None or not solver.constant_steps:
        raise ValueError(f"no NumPy reference for {case.name} with {solver.name}")
    if solver.implicit:
        return _solve_core_implicit(case, solver)
    tab = get_tableau(solver.tableau)
    f, p, h = case.field, case.params, case.signed_h

    def step(tn: float, y: np.ndarray):
        out = rk_step(tab, lambda i, X: f(tn + tab.c[i] * h, X, p), y, h)
        return out.y1, out.X

    def step_vjp(tn: float, lam: np.ndarray, X: list, stage_vjp: Callable, pbar: dict):
        return rk_step_vjp(tab, stage_vjp, lam, X, h, carry=pbar)

    return _sweep(case, tab.c, step, step_vjp)


def _jacobians(vjp: VJP, t: float, X: np.ndarray, p: Params) -> np.ndarray:
    """Row-wise Jacobians ``J[r] = df/dy`` at each row of ``X`` (the fields act row by row),
    read off the hand-written VJP: the cotangent ``e_j`` on every row gives row ``j``."""
    rows, n = X.shape
    J = np.empty((rows, n, n))
    for j in range(n):
        g = np.zeros_like(X)
        g[:, j] = 1.0
        J[:, j, :] = vjp(t, X, p, g)[0]
    return J


def _block_solve(blocks: np.ndarray, r: list[np.ndarray]) -> list[np.ndarray]:
    """Solve, row by row, the ``(s n) x (s n)`` systems ``blocks[r]`` (shape
    ``(rows, s, n, s, n)``) for the right-hand sides ``r`` (``s`` arrays ``(rows, n)``)."""
    rows, s, n = blocks.shape[:3]
    rhs = np.stack(r, axis=1).reshape(rows, s * n, 1)
    d = np.linalg.solve(blocks.reshape(rows, s * n, s * n), rhs).reshape(rows, s, n)
    return [d[:, i] for i in range(s)]


def _solve_core_implicit(case: Case, solver: Solver) -> Result:
    """The implicit kernels (:func:`implicit_step` / :func:`implicit_step_vjp`) driven by
    the core's reference Newton iterations, with dense row-wise Jacobians from the
    hand-written VJPs for every linear solve (forward Newton and transposed adjoint)."""
    tab = get_implicit_tableau(solver.tableau)
    assert isinstance(tab, ButcherTableau)
    vjp, f, p = VJPS[case.numpy_vjp], case.field, case.params  # type: ignore[index]
    h, s, dirk = case.signed_h, tab.stages, is_diagonally_implicit(tab)
    eye = np.eye(np.shape(case.y0)[-1])

    def kernels(tn: float):
        times = [tn + ci * h for ci in tab.c]

        def fi(i: int, X: np.ndarray) -> np.ndarray:
            return f(times[i], X, p)

        def lin(i: int, X: np.ndarray, gamma: float, r: np.ndarray, T: bool = False):
            """``(I - gamma J)^{(T)} d = r`` row by row."""
            M = eye - gamma * _jacobians(vjp, times[i], X, p)
            return np.linalg.solve(np.swapaxes(M, -1, -2) if T else M, r[..., None])[..., 0]

        def lin_T(i: int, X: np.ndarray, gamma: float, r: np.ndarray) -> np.ndarray:
            return lin(i, X, gamma, r, T=True)

        def blocks(X: list, transpose: bool) -> np.ndarray:
            J = [_jacobians(vjp, times[i], X[i], p) for i in range(s)]
            rows, n = X[0].shape
            B = np.zeros((rows, s, n, s, n))
            for i in range(s):
                for j in range(s):
                    # forward: d_i - h J_i sum_j a_ij d_j; transposed: k_i - h sum_j a_ji J_j^T k_j
                    Jij = (
                        np.swapaxes(J[j], -1, -2) * tab.a[j][i] if transpose else J[i] * tab.a[i][j]
                    )
                    B[:, i, :, j, :] = (eye if i == j else 0.0) - h * Jij
            return B

        def coupled_lin(X, hh, r):
            return _block_solve(blocks(list(X), False), list(r))

        def coupled_lin_T(X, hh, r):
            r = [np.zeros_like(X[0]) if ri is None else ri for ri in r]
            return _block_solve(blocks(list(X), True), r)

        return times, fi, lin, lin_T, coupled_lin, coupled_lin_T

    def step(tn: float, y: np.ndarray):
        _, fi, lin, _, clin, _ = kernels(tn)
        solves = (
            {"stage_solve": newton_stage_solve(fi, lin, tol=NEWTON_TOL)}
            if dirk
            else {"coupled_solve": newton_coupled_solve(tab, fi, clin, tol=NEWTON_TOL)}
        )
        out = implicit_step(tab, fi, y, h, **solves)
        return out.y1, out.X

    def step_vjp(tn: float, lam: np.ndarray, X: list, stage_vjp: Callable, pbar: dict):
        _, _, _, lin_T, _, clin_T = kernels(tn)
        solves_T = {"solve_T": lin_T} if dirk else {"coupled_solve_T": clin_T}
        return implicit_step_vjp(tab, stage_vjp, lam, X, h, carry=pbar, **solves_T)

    return _sweep(case, tab.c, step, step_vjp)


def _implicit_step_map(tab: ButcherTableau, A: np.ndarray, h: float, dA: np.ndarray | None = None):
    """``M = R(hA) = I + h (b^T (x) I)(I - h (a (x) A))^{-1} (1 (x) A)`` or, given ``dA``, its
    exact directional derivative ``dM = h (b^T (x) I) K [h (a (x) dA) K (1 (x) A) + (1 (x) dA)]``
    with ``K = (I - h (a (x) A))^{-1}`` (dense: the oracle of the implicit methods)."""
    n, s = len(A), tab.stages
    a, b, one = np.array(tab.a), np.array(tab.b)[None, :], np.ones((s, 1))
    K = np.linalg.inv(np.eye(s * n) - h * np.kron(a, A))
    B = h * np.kron(b, np.eye(n))
    if dA is None:
        return np.eye(n) + B @ K @ np.kron(one, A)
    return B @ K @ (h * np.kron(a, dA) @ K @ np.kron(one, A) + np.kron(one, dA))


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
    if solver.implicit:
        imp = get_implicit_tableau(solver.tableau)
        assert isinstance(imp, ButcherTableau)
        M = _implicit_step_map(imp, A, h)
    else:
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
    if solver.implicit:  # <G, dM/dA_ij> entry by entry: M is rational in A
        E = np.eye(A.size).reshape(A.size, *A.shape)
        A_bar = np.array([np.sum(G * _implicit_step_map(imp, A, h, e)) for e in E])
        return Result(ys=(ys,), grads={"y0": lam, "p.A": A_bar.reshape(A.shape)})
    At = [P.T for P in powers]
    A_bar = sum(
        rp * h**p * sum(At[q] @ G @ At[p - 1 - q] for q in range(p))
        for p, rp in enumerate(r)
        if p > 0
    )
    return Result(ys=(ys,), grads={"y0": lam, "p.A": A_bar})


# --------------------------------------------------------------------------- events


def solve_event_core(ev: EventCase, solver: Solver, host: str) -> Result:
    """A terminating event with the core kernels: steps of ``h`` until
    :func:`~conformance.cases.event_value` changes sign over a step, the event time ``t*``
    as the root of ``g(t, I(t))`` on the step's interpolant ``I`` (Newton with the exact
    derivative, to rounding), and the discrete adjoint of ``w_t t* + <w_y, I(t*)>``.

    The event time's gradient is the implicit function theorem's, with the slope of the
    state at ``t*`` taken as each host takes it (so there are two references):
    ``host="torch"``: ``f(t*, y*)``, as torchdiffeq 0.2.5's ``odeint_event`` reroutes it
    (``ImplicitFnGradientRerouting``, its ``1e-12`` in the denominator included);
    ``host="jax"``: the interpolant's own slope ``I'(t*)``, what diffrax 0.7.2 (Event with
    a root finder, optimistix's implicit adjoint) differentiates. With ``u = dg/dy``,
    ``s = dg/dt`` and that slope ``v``, the cotangent reaching ``I``'s inputs is ``w_y -
    (w_t + <w_y, v>) / (s + <u, v>) u``; the interpolant is linear in ``(y_n, k)``
    (:class:`~symplectic_adjoint.core.dense.DenseOutput`), so its VJP feeds the event
    step's ``y0_bar``/``k_bar`` and the sweep continues as in :func:`solve_core`.
    """
    case = ev.case
    if case.numpy_vjp is None or solver.grid != "forced" or host not in ("torch", "jax"):
        raise ValueError(f"no NumPy event reference for {case.name}, {solver.name}, {host}")
    tab = get_tableau(solver.tableau)
    dense = (
        torchdiffeq_interpolant(solver.torch_method)
        if host == "torch"
        else diffrax_interpolant(solver.diffrax_solver)
    )
    f, p, h, t0 = case.field, case.params, case.signed_h, float(case.t[0])
    vjp = VJPS[case.numpy_vjp]
    e = ev.event

    def g(t: float, y: np.ndarray) -> float:
        return float(event_value(np.float64(t), y, e))

    # Forward: whole steps until g changes sign over one.
    y = np.array(case.y0, dtype=np.float64)
    ys, stages, slopes = [y], [], []
    n = 0
    while True:
        if n >= ev.max_steps:
            raise AssertionError(f"{ev.name}: no event before t = {ev.t_end}")
        out = rk_step(tab, lambda i, X, tn=t0 + n * h: f(tn + tab.c[i] * h, X, p), y, h)
        stages.append(out.X)
        slopes.append(out.k)
        crossed = np.sign(g(t0 + n * h, y)) != np.sign(g(t0 + (n + 1) * h, out.y1))
        y = out.y1
        ys.append(y)
        if crossed:
            break
        n += 1
    y_n, k, tn = ys[n], slopes[n], t0 + n * h
    u, s = e["u"], float(e["s"])

    def interp(theta: float) -> np.ndarray:
        return dense.evaluate(y_n, k, h, theta)

    def interp_slope(theta: float) -> np.ndarray:  # dI/dt
        return sum(w * ki for w, ki in zip(dense.dweights(theta), k, strict=False))

    # Newton on G(theta) = g(t_n + theta h, I(theta)), from the step's end; G is smooth
    # and monotone near its root here, so it converges quadratically to rounding.
    theta = 1.0
    for _ in range(50):
        G = g(tn + theta * h, interp(theta))
        dG = h * (s + float(np.sum(u * interp_slope(theta))))
        step = G / dG
        theta -= step
        if abs(step) <= 1e-16:
            break
    t_star, y_star = tn + theta * h, interp(theta)

    # The cotangent on the interpolant's inputs (t* held), then its linear VJP.
    # torchdiffeq adds 1e-12 to the denominator; diffrax nothing.
    v, eps = (f(t_star, y_star, p), 1e-12) if host == "torch" else (interp_slope(theta), 0.0)
    lam_star = ev.w_y - (ev.w_t + float(np.sum(ev.w_y * v))) / (s + float(np.sum(u * v)) + eps) * u
    k_bar, _, _ = dense.vjp(lam_star, k, h, theta)

    pbar = {name: np.zeros_like(val) for name, val in p.items()}
    lam: np.ndarray | None = None
    for m in reversed(range(n + 1)):
        extra = dict(k_bar=k_bar, y0_bar=lam_star) if m == n else {}
        stage_vjp = _stage_vjp(vjp, p, tab.c, h, t0 + m * h)
        back = rk_step_vjp(tab, stage_vjp, lam, stages[m], h, carry=pbar, **extra)
        lam, pbar = back.y0_bar, back.carry
    grads = {"y0": lam, **{f"p.{name}": val for name, val in pbar.items()}}
    return Result(ys=(np.array([t_star]), y_star), grads=grads, steps=(h,) * (n + 1))
