"""Public surface: delegation, callables, stats, tsit5, an exact oracle, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch_support import Field, relerr, solve_and_grad, torch, torchdiffeq

import symplectic_adjoint
from symplectic_adjoint.adapters.torchdiffeq import METHODS, SolveStats, odeint
from symplectic_adjoint.core import get_tableau, rk_step

T = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)
Y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_lazy_package_exports():
    assert symplectic_adjoint.odeint is odeint
    assert symplectic_adjoint.SolveStats is SolveStats
    assert callable(symplectic_adjoint.odeint_event)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_backprop_and_adjoint_delegate_to_torchdiffeq(method):
    field = Field()
    opts = dict(step_size=0.125) if method == "rk4" else None
    kw = dict(method=method, rtol=1e-5, atol=1e-7, options=opts)
    ours = solve_and_grad(odeint, field, Y0, T, adjoint="backprop", **kw)
    ref = solve_and_grad(torchdiffeq.odeint, field, Y0, T, **kw)
    assert _identical(ours, ref)
    akw = dict(adjoint_rtol=1e-4, adjoint_atol=1e-6)
    ours = solve_and_grad(odeint, field, Y0, T, adjoint="adjoint", **kw, **akw)
    ref = solve_and_grad(torchdiffeq.odeint_adjoint, field, Y0, T, **kw, **akw)
    assert _identical(ours, ref)


def _identical(ours, ref):
    pairs = zip([ours[0], *ours[1]], [ref[0], *ref[1]], strict=True)
    return all(torch.equal(a, b) for a, b in pairs)


def test_plain_callable_with_and_without_adjoint_params():
    w = torch.tensor([[-0.5, 0.2, 0.0], [0.1, -0.3, 0.2], [0.0, 0.4, -0.2]],
                     dtype=torch.float64, requires_grad=True)  # fmt: skip

    def func(t, y):
        return torch.tanh(y @ w)

    y0 = Y0.clone().requires_grad_(True)
    for interface, extra in ((odeint, dict(adjoint_params=(w,))), (torchdiffeq.odeint, {})):
        ys = interface(func, y0, T, method="rk4", options=dict(step_size=0.1), **extra)
        g = torch.autograd.grad(ys.sum(), (y0, w))
        if interface is odeint:
            ours = g
    assert max(relerr(a, b) for a, b in zip(ours, g, strict=True)) <= 1e-12
    ys = odeint(func, y0, T, method="rk4", options=dict(step_size=0.1))  # y0 only
    (gy,) = torch.autograd.grad(ys.sum(), y0)
    assert relerr(gy, g[0]) <= 1e-12


def _grad_y0_stats(method, checkpoint, **options):
    """Stats of a gradient w.r.t. y0 and the parameters (no time gradient: with one the
    last slope of each step is also needed, for hbar)."""
    st = SolveStats()
    field = Field()
    y0 = Y0.clone().requires_grad_(True)
    ys = odeint(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method,
                options=options, checkpoint=checkpoint, stats=st, rtol=1e-5, atol=1e-7)  # fmt: skip
    torch.autograd.grad(ys.sum(), (y0, *field.parameters()))
    return st


def test_stats_count_evaluations_forward_and_backward():
    """rk4, 8 steps, one output at the end: forward 4 per step (as torchdiffeq); backward
    one VJP per stage, plus (states) the 3 slopes later stages read, recomputed."""
    counts = {mode: _grad_y0_stats("rk4", mode, step_size=0.125) for mode in ("states", "stages")}
    for st in counts.values():
        assert (st.n_steps, st.nfe_forward, st.n_vjp) == (8, 32, 32)
    assert counts["states"].nfe_backward == 32 + 3 * 8
    assert counts["stages"].nfe_backward == 32
    assert counts["states"].checkpoint_bytes == 9 * Y0.numel() * 8  # y_0..y_8


def test_stats_dopri5_fsal_vjp_count():
    """dopri5: each step's k_1 is the previous last stage, so one VJP per stage plus one
    for the very first slope; states mode recomputes k_1..k_6 per step."""
    st = _grad_y0_stats("dopri5", "states")
    n = st.n_steps
    assert st.n_vjp == 6 * n + 1 and st.nfe_backward == st.n_vjp + 6 * n


def test_stats_forward_count_matches_torchdiffeq():
    calls = {"n": 0}
    field = Field()

    def counted(t, y):
        calls["n"] += 1
        return field(t, y)

    st = SolveStats()
    odeint(field, Y0, T, stats=st, rtol=1e-6, atol=1e-8)
    torchdiffeq.odeint(counted, Y0, T, rtol=1e-6, atol=1e-8)
    assert st.nfe_forward == calls["n"] and st.n_steps > 0
    st_bp = SolveStats()
    odeint(field, Y0, T, stats=st_bp, rtol=1e-6, atol=1e-8, adjoint="backprop")
    assert st_bp.nfe_forward == calls["n"]


def test_linear_ode_oracle():
    """y' = A y, rk4 (any 4-stage order-4 method): y_{n+1} = R(hA) y_n with
    R(z) = 1 + z + z^2/2 + z^3/6 + z^4/24, so dL/dy0 = (R(hA)^T)^N w exactly."""
    A = torch.tensor([[-0.4, 1.0, 0.0], [-1.0, -0.4, 0.3], [0.0, -0.3, -0.1]], dtype=torch.float64)
    h, N = 0.125, 8
    t = torch.tensor([0.0, h * N], dtype=torch.float64)
    w = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64, requires_grad=True)
    ys = odeint(lambda t, y: y @ A.T, y0, t, method="rk4", options=dict(step_size=h))
    (g,) = torch.autograd.grad((ys[-1] * w).sum(), y0)
    Z = h * A
    R = torch.eye(3, dtype=torch.float64)
    term = torch.eye(3, dtype=torch.float64)
    for p in range(1, 5):
        term = term @ Z / p
        R = R + term
    oracle = torch.linalg.matrix_power(R.T, N) @ w
    assert relerr(g, oracle) <= 1e-13


def test_tsit5_forward_against_core_step_and_exact_solution():
    A = np.array([[-0.4, 1.0, 0.0], [-1.0, -0.4, 0.3], [0.0, -0.3, -0.1]])
    y0 = np.array([1.0, 0.5, -0.25])
    h = 0.05
    # One accepted step of size h (first_step pinned, loose tolerances): y(t0 + h) = y_1.
    ys = odeint(lambda t, y: y @ torch.from_numpy(A).T, torch.from_numpy(y0),
                torch.tensor([0.0, h], dtype=torch.float64), method="tsit5", rtol=1.0,
                atol=1.0, options=dict(first_step=h))  # fmt: skip
    ref = rk_step(get_tableau("tsit5"), lambda i, x: A @ x, y0, h).y1
    assert np.abs(ys[-1].numpy() - ref).max() <= 1e-14 * np.abs(ref).max()
    # Accuracy of the solution and of the dense output between steps.
    t = torch.linspace(0, 2, 7, dtype=torch.float64)
    st = SolveStats()
    ys = odeint(lambda t, y: y @ torch.from_numpy(A).T, torch.from_numpy(y0), t,
                method="tsit5", rtol=1e-9, atol=1e-11, stats=st)  # fmt: skip
    exact = [torch.linalg.matrix_exp(torch.from_numpy(A) * float(s)) @ torch.from_numpy(y0)
             for s in t]  # fmt: skip
    assert max(float((a - b).abs().max()) for a, b in zip(ys, exact, strict=True)) <= 1e-8
    assert st.n_steps > len(t)  # outputs fall inside steps: the interpolant is exercised


def test_every_listed_method_runs():
    assert set(METHODS) == {"dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "tsit5",
                            "euler", "midpoint", "heun2", "heun3", "rk4",
                            # implicit (issue 14; tested in test_torch_implicit.py)
                            "implicit_euler", "implicit_midpoint", "trapezoid", "sdirk2",
                            "trbdf2", "gl4", "gl6", "radauIIA3", "radauIIA5", "kvaerno3",
                            "kvaerno4", "kvaerno5"}  # fmt: skip


# ------------------------------------------------------------------ bad input


def _solve(**kw):
    base = dict(func=Field(), y0=Y0, t=T)
    base.update(kw)
    return odeint(base.pop("func"), base.pop("y0"), base.pop("t"), **base)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(method="explicit_adams"), ValueError, "not a Runge-Kutta method.*dopri5"),
        (dict(method="scipy_solver"), ValueError, "SciPy"),
        (dict(method="rk45"), ValueError, "unknown method"),
        (dict(adjoint="reverse"), ValueError, "'symplectic', 'backprop', 'adjoint'"),
        (dict(method="tsit5", adjoint="adjoint"), ValueError, "not a torchdiffeq solver"),
        (dict(t=T[None]), ValueError, "1-D"),
        (dict(t=torch.tensor([0.0, 0.5, 0.4], dtype=torch.float64)), ValueError, "strictly"),
        (dict(t=torch.tensor([0, 1])), ValueError, "floating point"),
        (dict(t=torch.tensor([0.0, math.nan], dtype=torch.float64)), ValueError, "inf or nan"),
        (dict(rtol=torch.tensor(1e-6, requires_grad=True)), ValueError, "rtol must not"),
        (dict(atol=(1e-6, torch.tensor(1e-6, requires_grad=True))), ValueError, "atol must"),
        (dict(y0=(Y0, Y0.float())), ValueError, "different dtypes"),
        (dict(y0=Y0.to(torch.complex128)), ValueError, "real floating"),
        (dict(y0=Y0 * math.inf), ValueError, "y0 contains inf"),
        (dict(t=torch.zeros(3, device="meta")), ValueError, "move t"),
        (dict(adjoint_params=[torch.zeros(2, device="meta", requires_grad=True)]), ValueError,
         "parameter is on meta"),
        (dict(checkpoint="all"), ValueError, "checkpoint='all'"),
        (dict(checkpoint=0), ValueError, "budget"),
        (dict(checkpoint=True), ValueError, "budget"),
        (dict(adjoint_method="dopri5", adjiont_rtol=1.0), TypeError, "adjiont_rtol"),
        (dict(method="rk4", options=dict(step_size=0.1, interp="quintic")), ValueError, "interp"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        _solve(**kwargs)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_non_finite_state_reports_the_time(method, sign):
    def blowup(t, y):
        return torch.where(t * sign > 0.5, math.inf, 1.0) * y

    t = sign * T
    with pytest.raises(
        FloatingPointError, match=r"during the step from t=-?0\.\d+ to t=-?0\.[5-9]"
    ):
        _solve(func=blowup, t=t, method=method, options=dict(step_size=0.1) if method == "rk4"
               else None)  # fmt: skip


def test_unused_parameter_listed_explicitly_gets_zero_gradient():
    field = Field()
    stray = torch.ones(4, dtype=torch.float64, requires_grad=True)
    ys = odeint(field, Y0, T, adjoint_params=(*field.parameters(), stray, stray))
    (g,) = torch.autograd.grad(ys.sum(), (stray,))
    assert torch.equal(g, torch.zeros(4, dtype=torch.float64))


def test_user_step_callbacks_still_fire():
    class Watched(Field):
        def __init__(self):
            super().__init__()
            self.accepted: list[float] = []

        def callback_accept_step(self, t0, y0, dt):
            self.accepted.append(float(t0))

    field = Watched()
    st = SolveStats()
    odeint(field, Y0, -T, stats=st, rtol=1e-6, atol=1e-8)  # decreasing: user-time callbacks
    assert len(field.accepted) == st.n_steps > 0
    assert field.accepted[0] == 0.0
    assert all(a > b for a, b in zip(field.accepted, field.accepted[1:], strict=False))
