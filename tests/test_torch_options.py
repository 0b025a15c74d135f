"""Every torchdiffeq option: same forward values, exact gradients (incl. t), float64.

Discontinuous vector fields make the perturbation semantics observable: with
``jump_t`` (adaptive) or ``perturb=True`` (fixed grid) a stage evaluated one ulp on the
wrong side of the jump would change the gradient at O(1).
"""

from __future__ import annotations

import pytest
from torch_support import ADAPTIVE, FIXED, Field, compare, relerr, torch, torchdiffeq

from symplectic_adjoint.adapters.torchdiffeq import SolveStats, odeint, odeint_event


class JumpField(Field):
    """``Field`` whose scale jumps from 1 to -0.7 at ``t = 0.5``."""

    def forward(self, t, y):
        return super().forward(t, y) * torch.where(t < 0.5, 1.0, -0.7).to(y)


def _check(method, *, fwd_tol=1e-12, grad_tol=1e-10, **kwargs):
    fwd, errs, stats, _ = compare(method, **kwargs)
    assert fwd <= fwd_tol, f"forward differs by {fwd:.2e}"
    assert max(errs) <= grad_tol, [f"{e:.1e}" for e in errs]
    return stats


ADAPTIVE_OPTIONS = {
    "step_t": dict(step_t=torch.tensor([0.33, 0.5], dtype=torch.float64)),
    "step_t+jump_t": dict(
        step_t=torch.tensor([0.33], dtype=torch.float64),
        jump_t=torch.tensor([0.5], dtype=torch.float64),
    ),
    "max_step": dict(max_step=0.07),
    "min_step": dict(min_step=0.2),
    "controller": dict(safety=0.7, ifactor=3.0, dfactor=0.4),
    "first_step": dict(first_step=0.01),
    "max_norm": dict(norm=lambda x: x.abs().max()),
}


@pytest.mark.parametrize("name", list(ADAPTIVE_OPTIONS))
@pytest.mark.parametrize("method", ["dopri5", "fehlberg2", "tsit5"])
def test_adaptive_options(method, name):
    _check(method, options=ADAPTIVE_OPTIONS[name], field=JumpField())


@pytest.mark.parametrize("decreasing", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_jump_t_discontinuous_field(method, decreasing):
    # In user time the jump sits at 0.5 - 0.5 = 0 for decreasing t (t = 0.5 - tau).
    where = 0.0 if decreasing else 0.5
    field = JumpField() if not decreasing else _ShiftedJump()
    stats = _check(method, options=dict(jump_t=torch.tensor([where])), field=field,
                   decreasing=decreasing)  # fmt: skip
    assert stats.n_steps > 1


class _ShiftedJump(Field):
    def forward(self, t, y):
        return super().forward(t, y) * torch.where(t > 0.0, 1.0, -0.7).to(y)


def test_jump_t_matters():
    """Without jump_t the same field gives a different (but still exact) solve."""
    f = JumpField()
    a = compare("dopri5", field=f, options=dict(jump_t=torch.tensor([0.5])))[3]
    b = compare("dopri5", field=f)[3]
    assert relerr(a[0], b[0]) > 1e-6


def test_float32_time_dtype_option():
    _check("dopri5", dtype=torch.float32, options=dict(dtype=torch.float32),
           fwd_tol=1e-6, grad_tol=2e-5)  # fmt: skip


def test_per_component_tolerances_on_tuple_state():
    _check("bosh3", tuple_state=True, rtol=(1e-5, 1e-6), atol=(1e-7, 1e-8))
    _check("dopri5", rtol=torch.full((2, 3), 1e-5, dtype=torch.float64), atol=1e-7)


def test_max_num_steps_is_torchdiffeqs_error():
    with pytest.raises(AssertionError, match="max_num_steps"):
        compare("dopri5", options=dict(max_num_steps=2), rtol=1e-10, atol=1e-12)


FIXED_OPTIONS = {
    "t-grid": {},  # no step_size: the grid is t itself (every output is a node)
    "step_size": dict(step_size=0.1),  # outputs fall inside steps
    "grid_constructor": dict(
        grid_constructor=lambda f, y0, t: (
            t[0] + (t[-1] - t[0]) * torch.linspace(0, 1, 9, dtype=t.dtype) ** 1.5
        )
    ),
    "cubic": dict(step_size=0.1, interp="cubic"),
    "perturb": dict(step_size=0.125, perturb=True),  # 0.5 is a grid node: the jump
    "perturb+cubic": dict(step_size=0.125, perturb=True, interp="cubic"),
}


@pytest.mark.parametrize("decreasing", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("name", list(FIXED_OPTIONS))
@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_options(method, name, decreasing):
    field = JumpField() if not decreasing else _ShiftedJump()
    t = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)
    _check(method, options=FIXED_OPTIONS[name], field=field, t=t, decreasing=decreasing)


def test_float32_grid_from_constructor():
    """A float32 linspace makes the whole grid float32 (0-d float64 * float32 vector):
    torchdiffeq then compares and interpolates output times in float64 against float32
    nodes. Values and y0/parameter gradients stay exact; node cotangents are rounded to
    float32 on both sides (at different places), so t is checked at float32 level."""
    grid = dict(grid_constructor=lambda f, y0, t: t[0] + (t[-1] - t[0]) * torch.linspace(0, 1, 9))
    fwd, errs, _, _ = compare("rk4", options=grid, field=JumpField())
    assert fwd <= 1e-12 and max(errs[:1] + errs[2:]) <= 1e-10 and errs[1] <= 1e-6, errs


def test_perturb_matters_on_fixed_grid():
    f = JumpField()
    a = compare("rk4", field=f, options=dict(step_size=0.125, perturb=True))[3]
    b = compare("rk4", field=f, options=dict(step_size=0.125))[3]
    assert relerr(a[0], b[0]) > 1e-3


class GrowField(Field):
    def forward(self, t, y):
        return super().forward(t, y) + 0.8 * y


def _event_case(interface, method, options, **kwargs):
    field = GrowField()
    y0 = torch.tensor([[0.5, -0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def event_fn(t, y):
        return (y**2).sum() - 1.0

    event_t, sol = odeint_event(field, y0, t0, event_fn=event_fn, odeint_interface=interface,
                                method=method, options=options, rtol=1e-6, atol=1e-8,
                                **kwargs)  # fmt: skip
    loss = event_t * 1.3 + (sol[-1] * torch.tensor([1.0, -2.0, 0.5])).sum()
    grads = torch.autograd.grad(loss, (y0, t0, *field.parameters()), allow_unused=True)
    return event_t.detach(), sol.detach(), grads


@pytest.mark.parametrize(
    ("method", "options"),
    [("dopri5", {}), ("bosh3", {}), ("rk4", dict(step_size=0.05)),
     ("midpoint", dict(step_size=0.05, interp="cubic"))],
)  # fmt: skip
def test_odeint_event_matches_torchdiffeq(method, options):
    stats = SolveStats()
    ours = _event_case(odeint, method, options, stats=stats)
    ref_options = dict(options)
    if method in ADAPTIVE:
        ref_options["first_step"] = stats.first_step
    ref = _event_case(torchdiffeq.odeint, method, ref_options)
    assert relerr(ours[0], ref[0]) <= 1e-12 and relerr(ours[1], ref[1]) <= 1e-12
    for a, b in zip(ours[2], ref[2], strict=True):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            assert relerr(a, b) <= 1e-10
    assert stats.n_steps > 1


def test_event_fn_in_odeint_returns_event_time_without_gradient():
    field = GrowField()
    y0 = torch.tensor([[0.5, -0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    event_t, sol = odeint(field, y0, t, event_fn=lambda t, y: (y**2).sum() - 1.0)
    ref_t, ref_sol = torchdiffeq.odeint(field, y0, t, event_fn=lambda t, y: (y**2).sum() - 1.0)
    assert not event_t.requires_grad and sol.requires_grad
    assert relerr(event_t, ref_t) <= 1e-12 and relerr(sol, ref_sol) <= 1e-12
