"""Backend-neutral conformance cases: each problem is defined once, as NumPy data.

A :class:`Case` holds everything a backend needs to pose the same problem: the vector
field (written once against the array API, so the same function runs on NumPy, torch
and JAX arrays), the initial state, the learnable parameters, the output times, the
step size for fixed grids, the tolerances for adaptive solves, and the cotangent
weights of the scalar loss ``L = sum_k <w_k, y(t_k)>``. The backends
(:mod:`conformance.backends`) only translate this data into their own arrays.

All output times are multiples of the fixed step ``h`` away from ``t[0]`` and ``h`` is a
power of two, so a fixed grid lands on every output time exactly in both host
libraries (torchdiffeq interpolates outputs, diffrax steps onto ``t1``): the step
sequences are then identical and gradients can be compared across libraries at
rounding level.

:data:`SOLVERS` lists the methods; :func:`jax_plan` and :func:`torch_plan` say which
(case, solver, dtype) triples each backend runs. Torch is eager and cheap, so it runs
every method on every case it suits (explicit methods on the non-stiff cases, implicit
ones on the stiff cases); every JAX configuration costs a trace and an XLA compile
(about 3 s on the CI machine, 10-20 s for an implicit solver), so JAX runs a rotating
selection that still covers each method and each case, part of it marked ``slow``
(:data:`JAX_SLOW`). :data:`TIME_PLAN` adds gradients with respect to ``t0`` and ``t1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from array_api_compat import array_namespace

__all__ = [
    "CASES",
    "EVENT_CASES",
    "EVENT_CASES_BY_NAME",
    "EVENT_PLAN",
    "EVENT_ROOT_TOL",
    "EventCase",
    "CASES_BY_NAME",
    "Case",
    "DTYPES",
    "JAX_SLOW",
    "TIME_GRIDS",
    "TIME_PLAN",
    "JAX_NEWTON_TOL",
    "NEWTON_TOL",
    "SOLVERS",
    "SOLVERS_BY_NAME",
    "Solver",
    "jax_plan",
    "torch_plan",
]

Array = Any
State = Any  # one array, or a tuple of arrays (a PyTree state)
Params = Mapping[str, Array]
Field = Callable[[Any, State, Params], State]

DTYPES = ("float64", "float32")
#: Newton's relative and absolute tolerance for implicit stages in every backend (diffrax
#: ``optimistix.Newton(rtol, atol)``, torch ``newton_rtol``/``newton_atol``, the NumPy
#: reference's update size): tight enough that the converged stages agree across backends
#: far below the 1e-10 comparison tolerance (Newton converges quadratically).
NEWTON_TOL = 1e-13
#: diffrax's (optimistix) Newton: its Cauchy termination cannot meet 1e-12 on
#: ``stiff_linear`` with Kvaerno5 (the update stalls at rounding level, ~cond(A) eps, and
#: the root find hits its step limit); 1e-11 still leaves the stages converged to rounding
#: (Newton is exact in one iteration on a linear field, quadratic otherwise).
JAX_NEWTON_TOL = 1e-11


# --------------------------------------------------------------------- vector fields
# Each field is f(t, y, p) with t a 0-d array of y's dtype (the builders cast it), y the
# state and p a mapping of parameter arrays. Only array-API operations are used.


def linear_field(t: Array, y: Array, p: Params) -> Array:
    """``y' = A y`` for a batch of row vectors: the case with an exact discrete oracle."""
    return y @ p["A"].T


def mlp_field(t: Array, y: Array, p: Params) -> Array:
    """Time-dependent two-layer tanh network ``W2 tanh(W1 y + t u + b1) + b2``, row-wise."""
    xp = array_namespace(y)
    return xp.tanh(y @ p["W1"].T + t * p["u"] + p["b1"]) @ p["W2"].T + p["b2"]


def tanh_layer_field(t: Array, y: Array, p: Params) -> Array:
    """Autonomous one-layer field ``tanh(W y + b) - y``: contracting, smooth."""
    xp = array_namespace(y)
    return xp.tanh(y @ p["W"].T + p["b"]) - y


def lotka_volterra_field(t: Array, y: Array, p: Params) -> Array:
    """Predator-prey ``x' = a x - b x y, y' = d x y - g y`` with ``theta = (a, b, d, g)``."""
    xp = array_namespace(y)
    a, b, d, g = (p["theta"][i] for i in range(4))
    x, z = y[..., 0], y[..., 1]
    return xp.stack([a * x - b * x * z, d * x * z - g * z], axis=-1)


def pendulum_field(t: Array, y: Array, p: Params) -> Array:
    """Damped pendulum ``theta' = omega, omega' = -k0 sin(theta) - k1 omega``."""
    xp = array_namespace(y)
    th, om = y[..., 0], y[..., 1]
    return xp.stack([om, -p["k"][0] * xp.sin(th) - p["k"][1] * om], axis=-1)


def van_der_pol_field(t: Array, y: Array, p: Params) -> Array:
    """Van der Pol oscillator ``x' = v, v' = mu (1 - x^2) v - x`` with learnable ``mu``."""
    xp = array_namespace(y)
    x, v = y[..., 0], y[..., 1]
    return xp.stack([v, p["mu"][0] * (1 - x * x) * v - x], axis=-1)


def stiff_tanh_field(t: Array, y: Array, p: Params) -> Array:
    """Stiff tanh layer ``tanh(W y + b) - d * y`` with learnable decay rates ``d`` spread over
    three orders of magnitude (row-wise): explicit methods are unstable at the case's step."""
    xp = array_namespace(y)
    return xp.tanh(y @ p["W"].T + p["b"]) - p["d"] * y


def coupled_tuple_field(t: Array, y: tuple[Array, Array], p: Params) -> tuple[Array, Array]:
    """Second-order system held as a tuple state ``(q, v)``:
    ``q' = v, v' = -K q - U^T tanh(U q)`` (row-wise; a PyTree state in JAX)."""
    xp = array_namespace(y[0])
    q, v = y
    return v, -(q @ p["K"].T) - xp.tanh(q @ p["U"].T) @ p["U"]


def cnf2d_field(t: Array, y: tuple[Array, Array], p: Params) -> tuple[Array, Array]:
    """2-D continuous normalising flow ``(z, log p)``: ``z' = W2 tanh(W1 z + t u + b1)``,
    ``(log p)' = -tr(dz'/dz)``, the trace in closed form (exact, no estimator):
    ``tr(W2 diag(1 - a^2) W1) = sum_j (1 - a_j^2) sum_i W1[j, i] W2[i, j]``."""
    xp = array_namespace(y[0])
    z, _ = y
    a = xp.tanh(z @ p["W1"].T + t * p["u"] + p["b1"])
    diag = xp.sum(p["W1"] * p["W2"].T, axis=-1)
    return a @ p["W2"].T, -((1 - a * a) @ diag)


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One conformance problem, as NumPy data.

    Arguments:
        name: identifier used in test ids.
        why: what the case exercises (shown in failure messages).
        field: the vector field ``f(t, y, p)``.
        y0: initial state (array, or tuple of arrays for a PyTree state).
        params: learnable parameters by name.
        t: output times; ``t[0]`` is the initial time (may decrease).
        h: fixed step size (a power of two; every output time is on the grid).
        rtol, atol: tolerances of the adaptive solves.
        weights: loss cotangents, same structure as the stacked outputs.
        oracle: the exact discrete gradient is available (linear ODE).
        numpy_vjp: name of the hand-written VJP in the NumPy reference, if any.
        stiff: explicit methods are unstable at ``h``: only implicit solvers run it (and
            implicit solvers run only the stiff cases).
    """

    name: str
    why: str
    field: Field
    y0: np.ndarray | tuple[np.ndarray, ...]
    params: dict[str, np.ndarray]
    t: np.ndarray
    h: float
    rtol: float = 1e-7
    atol: float = 1e-9
    weights: np.ndarray | tuple[np.ndarray, ...] = ()
    oracle: bool = False
    numpy_vjp: str | None = None
    stiff: bool = False

    @property
    def is_tuple(self) -> bool:
        return isinstance(self.y0, tuple)

    @property
    def y0_leaves(self) -> tuple[np.ndarray, ...]:
        return self.y0 if isinstance(self.y0, tuple) else (self.y0,)

    @property
    def weight_leaves(self) -> tuple[np.ndarray, ...]:
        return self.weights if isinstance(self.weights, tuple) else (self.weights,)

    @property
    def n_steps(self) -> int:
        n = (self.t[-1] - self.t[0]) / self.h
        return int(round(abs(n)))

    def tolerances(self, dtype: str, loosen: float = 1.0) -> tuple[float, float]:
        """(rtol, atol) of adaptive solves; float32 cannot resolve float64 tolerances."""
        rtol, atol = self.rtol * loosen, self.atol * loosen
        if dtype == "float32":
            return max(rtol, 1e-5), max(atol, 1e-6)
        return rtol, atol

    @property
    def signed_h(self) -> float:
        return self.h if self.t[-1] >= self.t[0] else -self.h

    def __repr__(self) -> str:
        return f"Case({self.name})"


def _case(
    name: str, why: str, field: Field, y0: Any, params: dict, t: list, h: float, **kw
) -> Case:
    """Build a case; loss weights are drawn from a generator seeded by the case name."""
    rng = np.random.default_rng(sum(map(ord, name)))
    t_arr = np.asarray(t, dtype=np.float64)
    leaves = y0 if isinstance(y0, tuple) else (y0,)
    w = tuple(rng.normal(size=(len(t_arr), *np.shape(leaf))) for leaf in leaves)
    for ti in t_arr:  # every output time is on the fixed grid
        assert float((ti - t_arr[0]) / h).is_integer(), (name, ti)
    return Case(
        name=name,
        why=why,
        field=field,
        y0=y0,
        params={k: np.asarray(v, dtype=np.float64) for k, v in params.items()},
        t=t_arr,
        h=h,
        weights=w if isinstance(y0, tuple) else w[0],
        **kw,
    )


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _mlp_params(seed: int, dim: int, hidden: int) -> dict[str, np.ndarray]:
    r = _rng(seed)
    return {
        "W1": r.normal(size=(hidden, dim)) / np.sqrt(dim),
        "u": r.normal(size=hidden),
        "b1": 0.1 * r.normal(size=hidden),
        "W2": r.normal(size=(dim, hidden)) / np.sqrt(hidden),
        "b2": 0.1 * r.normal(size=dim),
    }


def _stiff_matrix(seed: int, eigenvalues: list[float]) -> np.ndarray:
    """``Q diag(eigenvalues) Q^{-1}`` with a well-conditioned, non-orthogonal ``Q``: a
    non-normal matrix whose spectrum is exactly the given real values."""
    n = len(eigenvalues)
    Q = np.eye(n) + 0.3 * _rng(seed).normal(size=(n, n))
    return Q @ np.diag(eigenvalues) @ np.linalg.inv(Q)


CASES: tuple[Case, ...] = (
    _case(
        "linear",
        "y' = A y: one RK step is y -> R(hA) y, so the exact discrete gradient is known "
        "in closed form (the oracle); catches any wrong tableau coefficient or adjoint term.",
        linear_field,
        _rng(1).normal(size=(2, 3)),
        {"A": [[-0.5, 1.0, 0.2], [-1.0, -0.3, 0.1], [0.3, -0.2, -0.4]]},
        [0.0, 0.5, 1.0],
        1 / 8,
        oracle=True,
        numpy_vjp="linear",
    ),
    _case(
        "mlp",
        "Time-dependent batched MLP, the typical neural ODE: exercises stage times "
        "(t enters the network) and parameter cotangents summed over a batch.",
        mlp_field,
        _rng(2).normal(size=(4, 3)),
        _mlp_params(3, 3, 8),
        [0.0, 1.0],
        1 / 8,
        numpy_vjp="mlp",
    ),
    _case(
        "lotka_volterra",
        "Lotka-Volterra with learnable rates: a nonlinear, non-network field whose "
        "parameters are a single vector indexed inside f.",
        lotka_volterra_field,
        np.array([[1.0, 1.0], [2.0, 0.5]]),
        {"theta": [1.5, 1.0, 1.0, 3.0]},
        [0.0, 1.0],
        1 / 8,
        numpy_vjp="lotka_volterra",
    ),
    _case(
        "pendulum",
        "Damped pendulum with learnable stiffness and damping: trigonometric field, "
        "scalar-like parameters.",
        pendulum_field,
        np.array([[1.0, 0.0], [-0.5, 2.0], [2.5, -1.0]]),
        {"k": [9.81 / 4, 0.3]},
        [0.0, 1.0],
        1 / 16,
        numpy_vjp="pendulum",
    ),
    _case(
        "van_der_pol",
        "Van der Pol on a short horizon (mu = 2): stiffening polynomial nonlinearity; "
        "the adaptive solvers take uneven steps.",
        van_der_pol_field,
        np.array([[2.0, 0.0], [0.5, -1.0]]),
        {"mu": [2.0]},
        [0.0, 0.5],
        1 / 16,
        numpy_vjp="van_der_pol",
    ),
    _case(
        "tuple_state",
        "State is a tuple (q, v) (a PyTree in JAX, a tuple of tensors in torchdiffeq): "
        "cotangents must be split and joined per leaf.",
        coupled_tuple_field,
        (_rng(5).normal(size=(2, 2)), _rng(6).normal(size=(2, 2))),
        {"K": [[2.0, 0.3], [0.3, 1.0]], "U": _rng(7).normal(size=(3, 2))},
        [0.0, 1.0],
        1 / 8,
    ),
    _case(
        "many_outputs",
        "Five output times inside the interval: every output adds a cotangent in the "
        "middle of the reverse sweep (and, for adaptive solvers, an interpolant VJP).",
        tanh_layer_field,
        _rng(8).normal(size=(3, 2)),
        {"W": _rng(9).normal(size=(2, 2)), "b": _rng(10).normal(size=2)},
        [0.0, 0.25, 0.5, 0.75, 1.0],
        1 / 8,
        numpy_vjp="tanh_layer",
    ),
    _case(
        "decreasing_time",
        "Time runs backwards (t = 1 -> 0.5 -> 0): negative steps, reversed stage times.",
        mlp_field,
        _rng(11).normal(size=(2, 3)),
        _mlp_params(12, 3, 6),
        [1.0, 0.5, 0.0],
        1 / 8,
        numpy_vjp="mlp",
    ),
    _case(
        "cnf2d",
        "One step of a 2-D continuous normalising flow: state (z, log p) with the exact "
        "divergence; log p never feeds back into f, so part of the state is a pure output.",
        cnf2d_field,
        (_rng(13).normal(size=(5, 2)), np.zeros(5)),
        {k: v for k, v in _mlp_params(14, 2, 6).items() if k != "b2"},
        [0.0, 1.0],
        1 / 8,
    ),
    _case(
        "stiff_linear",
        "Stiff y' = A y, eigenvalues -1, -10, -100, -1000 (h lambda down to -62.5): one "
        "implicit step is y -> R(hA) y with R rational, the exact oracle of the implicit "
        "adjoint; explicit methods would blow up, so only implicit solvers run it.",
        linear_field,
        _rng(15).normal(size=(2, 4)),
        {"A": _stiff_matrix(16, [-1.0, -10.0, -100.0, -1000.0])},
        [0.0, 0.5, 1.0],
        1 / 16,
        oracle=True,
        numpy_vjp="linear",
        stiff=True,
    ),
    _case(
        "stiff_tanh",
        "Nonlinear stiff field tanh(W y + b) - d * y with learnable decay rates d = "
        "(1, 30, 1000): Newton on every stage, Jacobians that change along the solution.",
        stiff_tanh_field,
        _rng(17).normal(size=(2, 3)),
        {"W": _rng(18).normal(size=(3, 3)), "b": _rng(19).normal(size=3), "d": [1.0, 30.0, 1e3]},
        [0.0, 0.5],
        1 / 32,
        numpy_vjp="stiff_tanh",
        stiff=True,
    ),
)

CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


# ------------------------------------------------------------------------- solvers


@dataclasses.dataclass(frozen=True)
class Solver:
    """A solver configuration, named as in test ids.

    Arguments:
        name: id (``"dopri5@h"`` is dopri5 forced onto the constant grid of step ``h``).
        tableau: core tableau name (for the NumPy reference and the oracle).
        torch_method: torchdiffeq method name (``None``: not in torchdiffeq).
        diffrax_solver: diffrax solver class name (``None``: not in diffrax).
        grid: ``"fixed"`` (torchdiffeq fixed-grid solver with ``step_size=h``),
            ``"forced"`` (adaptive solver held at constant ``h``; diffrax
            ``ConstantStepSize``) or ``"adaptive"`` (error control at the case tolerances).
        loosen: factor on the case tolerances for adaptive solves (low-order methods
            would need thousands of steps at the tolerances that suit dopri5).
        implicit: an implicit tableau (core :func:`get_implicit_tableau`): stages solved by
            Newton at :data:`NEWTON_TOL` in both hosts; runs the stiff cases only.
    """

    name: str
    tableau: str
    torch_method: str | None
    diffrax_solver: str | None
    grid: str
    loosen: float = 1.0
    implicit: bool = False

    @property
    def constant_steps(self) -> bool:
        """Both libraries take the same constant steps of size ``h``."""
        return self.grid in ("fixed", "forced")


SOLVERS: tuple[Solver, ...] = (
    Solver("euler", "euler", "euler", "Euler", "fixed"),
    Solver("midpoint", "midpoint", "midpoint", "Midpoint", "fixed"),
    Solver("heun2", "heun2", "heun2", "Heun", "fixed"),
    Solver("rk4", "rk38", "rk4", None, "fixed"),  # torchdiffeq's rk4 is the 3/8 rule
    Solver("heun3", "heun3", "heun3", None, "fixed"),
    Solver("bosh3@h", "bosh3", "bosh3", "Bosh3", "forced"),
    Solver("dopri5@h", "dopri5", "dopri5", "Dopri5", "forced"),
    Solver("dopri8@h", "dopri8", "dopri8", "Dopri8", "forced"),
    Solver("dopri5", "dopri5", "dopri5", "Dopri5", "adaptive"),
    Solver("bosh3", "bosh3", "bosh3", None, "adaptive", loosen=1e3),
    Solver("dopri8", "dopri8", "dopri8", None, "adaptive"),
    Solver("fehlberg2", "fehlberg2", "fehlberg2", None, "adaptive", loosen=1e4),
    Solver("adaptive_heun", "adaptive_heun", "adaptive_heun", None, "adaptive", loosen=1e4),
    Solver("tsit5", "tsit5", None, "Tsit5", "adaptive"),
    # Implicit tableaux. In both hosts: implicit Euler (diffrax's ImplicitEuler propagates
    # the implicit Euler step; its trapezoid error estimate is unused on a constant grid)
    # and Kvaerno 3/4/5 held at h. Torch only: the other fixed-grid tableaux.
    Solver(
        "implicit_euler",
        "implicit_euler",
        "implicit_euler",
        "ImplicitEuler",
        "fixed",
        implicit=True,
    ),  # fmt: skip
    Solver("kvaerno3@h", "kvaerno3", "kvaerno3", "Kvaerno3", "forced", implicit=True),
    Solver("kvaerno4@h", "kvaerno4", "kvaerno4", "Kvaerno4", "forced", implicit=True),
    Solver("kvaerno5@h", "kvaerno5", "kvaerno5", "Kvaerno5", "forced", implicit=True),
    *(
        Solver(name, name, name, None, "fixed", implicit=True)
        for name in (
            "implicit_midpoint",
            "trapezoid",
            "sdirk2",
            "trbdf2",
            "gl4",
            "gl6",
            "radauIIA3",
            "radauIIA5",
        )  # fmt: skip
    ),
)
SOLVERS_BY_NAME: dict[str, Solver] = {s.name: s for s in SOLVERS}

# JAX selection: (case, solvers in float64, solvers in float32). Each constant-step
# diffrax method appears on at least one case, dopri5@h on several; adaptive solves
# (not comparable across libraries: the controllers differ) on cases that stress
# interpolation, PyTrees and reversed time.
_JAX_PLAN: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("dopri5@h", "heun2"), ()),
    "mlp": (("dopri8@h",), ("dopri5@h",)),
    "lotka_volterra": (("bosh3@h",), ()),
    "pendulum": (("midpoint",), ()),
    "van_der_pol": (("euler",), ()),
    "tuple_state": (("dopri5@h", "tsit5"), ()),
    "many_outputs": (("bosh3@h", "dopri5"), ()),
    "decreasing_time": (("dopri5@h", "tsit5"), ()),
    "cnf2d": (("heun2",), ("tsit5",)),
    "stiff_linear": (("implicit_euler", "kvaerno5@h", "kvaerno3@h"), ()),
    "stiff_tanh": (("kvaerno3@h", "kvaerno4@h", "implicit_euler"), ()),
}
#: JAX configurations that also run the stage-checkpointing mode.
JAX_STAGES = {
    ("linear", "dopri5@h"),
    ("tuple_state", "dopri5@h"),
    ("cnf2d", "heun2"),
    ("stiff_linear", "kvaerno5@h"),
}
#: (case, solver) pairs whose JAX checks (and the cross-backend and NumPy comparisons
#: that need the JAX solve) are marked ``slow``: deselected by default, run by
#: ``pytest -m slow`` / ``--runslow`` / ``tox -e slow``. An implicit JAX solve costs
#: 10-20 s of tracing and compiling per mode on the 2-core CI machine. The default run
#: keeps one linear (oracle) and one nonlinear implicit configuration in JAX:
#: ``stiff_linear`` with implicit Euler, ``stiff_tanh`` with Kvaerno3 held at ``h``.
JAX_SLOW = {
    ("stiff_linear", "kvaerno5@h"),
    ("stiff_linear", "kvaerno3@h"),
    ("stiff_tanh", "kvaerno4@h"),
    ("stiff_tanh", "implicit_euler"),
}

#: Time-gradient configurations ``(case, solver, slow)``: the loss also depends on ``t0``
#: and ``t1`` through a fixed grid; outputs ``y(t0) = y0`` and ``y(t1)`` (a node: no
#: interpolation). The hosts' own constant grids are *different functions of t0, t1*:
#:
#: * torchdiffeq's ``step_size=h``: nodes ``t0 + n h`` with the last replaced by ``t1``
#:   (``grid[-1] = t[-1]``): ``t0`` moves every node but the last, ``t1`` only the last;
#: * diffrax 0.7's ``ConstantStepSize``: node 1 is ``t0 + dt0``, node ``n >= 2`` is
#:   ``t0 + (t1 - t0) n / N`` (a fraction of the span, against accumulated rounding):
#:   ``t1`` moves every node from the second on.
#:
#: Same values, different d/dt0 and d/dt1 (measured ~1e-3 apart on ``mlp``/midpoint), so
#: each host's own grid is checked against that host's backprop only (``grid="step"``).
#: For the comparison *across* hosts both build the uniform grid ``t0 + (t1 - t0) n / N``:
#: torch through ``grid_constructor``, diffrax with ``dt0 = (t1 - t0) / N`` traced
#: (``grid="uniform"``). Adaptive methods held at ``h`` are not comparable either:
#: torchdiffeq steps past ``t1`` and interpolates, so its d/dt1 is an interpolant slope.
TIME_GRIDS = ("step", "uniform")
TIME_PLAN: tuple[tuple[str, str, bool], ...] = (
    ("mlp", "midpoint", False),
    ("stiff_tanh", "implicit_euler", False),
    ("mlp", "heun2", True),
)


# -------------------------------------------------------------------- event cases

#: Root-finding tolerance of the event time in both hosts: torchdiffeq bisects its
#: interpolant down to ``atol`` (so its forced-constant solves use ``atol`` = this and a
#: huge ``rtol`` to keep accepting every step), diffrax's ``optimistix.Newton`` stops at
#: ``rtol = atol`` = this. Both then locate the root to ~1e-13, far below 1e-10.
EVENT_ROOT_TOL = 1e-13


def event_value(t: Array, y: Array, e: Params) -> Array:
    """The event function ``g(t, y) = sum(u * y) + s t + c`` (a scalar; the solve stops
    where it first crosses zero). ``e`` holds ``u`` (y's shape), ``s`` and ``c``."""
    xp = array_namespace(y)
    return xp.sum(e["u"] * y) + e["s"] * t + e["c"]


@dataclasses.dataclass(frozen=True, eq=False)
class EventCase:
    """A terminating event on a :class:`Case`: integrate from ``t[0]`` until
    :func:`event_value` crosses zero; the loss is ``w_t t* + <w_y, y(t*)>``.

    Arguments:
        name: identifier used in test ids.
        why: what the case exercises.
        case: the underlying :class:`Case` (field, ``y0``, parameters, step ``h``).
        event: ``u``, ``s``, ``c`` of :func:`event_value` (NumPy arrays).
        t_end: an upper bound on the event time on the grid of ``h`` (diffrax's ``t1``;
            the solve must stop before it).
        w_t, w_y: loss weights of the event time and of the state at the event.
    """

    name: str
    why: str
    case: Case
    event: dict[str, np.ndarray]
    t_end: float
    w_t: float
    w_y: np.ndarray

    @property
    def max_steps(self) -> int:
        return int(round((self.t_end - self.case.t[0]) / self.case.h))

    def __repr__(self) -> str:
        return f"EventCase({self.name})"


def _event_case(name: str, why: str, case: str, event: dict, t_end: float) -> EventCase:
    base = CASES_BY_NAME[case]
    rng = np.random.default_rng(sum(map(ord, name)))
    return EventCase(
        name=name,
        why=why,
        case=base,
        event={k: np.asarray(v, dtype=np.float64) for k, v in event.items()},
        t_end=t_end,
        w_t=float(rng.normal()),
        w_y=rng.normal(size=np.shape(base.y0)),
    )


EVENT_CASES: tuple[EventCase, ...] = (
    _event_case(
        "pendulum_event",
        "Damped pendulums until a weighted angle/velocity sum with a time trend crosses "
        "zero (t* ~ 0.82, inside step 14 of h = 1/16): the event time is a root of the "
        "interpolant, its gradient comes from the implicit function theorem, and the loss "
        "reads both t* and the interpolated state at t*.",
        "pendulum",
        {"u": [[1.0, 0.25], [0.0, 0.0], [0.1, 0.0]], "s": 0.1, "c": -0.3},
        2.0,
    ),
)
EVENT_CASES_BY_NAME: dict[str, EventCase] = {c.name: c for c in EVENT_CASES}

#: ``(event case, solver, slow)``. Across hosts only dopri5 held at ``h`` has the same
#: interpolant in both (the quartic fit through the midpoint), so the same event time;
#: bosh3 interpolates differently in each host (torchdiffeq: the quartic fit; diffrax:
#: the cubic Hermite) and is checked per host only.
EVENT_PLAN: tuple[tuple[str, str, bool], ...] = (
    ("pendulum_event", "dopri5@h", False),
    ("pendulum_event", "bosh3@h", True),
)


def _runs(case: Case, solver: Solver) -> bool:
    """Explicit solvers on the non-stiff cases, implicit ones on the stiff cases."""
    return case.stiff == solver.implicit


def torch_plan() -> list[tuple[Case, Solver, str]]:
    """Every case with every torch method that suits it (:func:`_runs`), in both dtypes
    (the stiff cases in float64 only: Newton is held at :data:`NEWTON_TOL`)."""
    return [
        (c, s, d)
        for c in CASES
        for s in SOLVERS
        if s.torch_method is not None and _runs(c, s)
        for d in (("float64",) if c.stiff else DTYPES)
    ]


def jax_plan() -> list[tuple[Case, Solver, str]]:
    """The JAX selection above, as (case, solver, dtype) triples."""
    out = []
    for c in CASES:
        f64, f32 = _JAX_PLAN[c.name]
        out += [(c, SOLVERS_BY_NAME[s], "float64") for s in f64]
        out += [(c, SOLVERS_BY_NAME[s], "float32") for s in f32]
    return out
