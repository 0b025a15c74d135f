"""Forward values equal torchdiffeq's and gradients are exact for the discrete solve.

Every Runge--Kutta method x dtype x tuple/tensor state x increasing/decreasing t x
checkpoint mode, against backprop through ``torchdiffeq.odeint`` with ``first_step``
pinned; then a case where the continuous adjoint misses, so the bound discriminates.
"""

from __future__ import annotations

import pytest
from torch_support import ADAPTIVE, DEVICES, FIXED, compare, relerr, torch

METHODS = [*ADAPTIVE, *FIXED]
FIXED_OPTIONS = {"step_size": 0.125}

# float64: exact to rounding. float32: the two sides round differently. The t-gradient
# of torchdiffeq's backprop differentiates its interpolation polynomial, whose
# coefficients (e.g. 16 y_mid - 8 (y0 + y1) + ...) are O(h f) formed from O(|y|) terms:
# in float32 that costs ~eps |y| / (h |f|), which grows to 1e-3 for the ~200 short
# steps of adaptive_heun; ours uses y_n + h sum w_i k_i. Hence a looser t bound there.
GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-2)}  # (others, t)
FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def _options(method):
    return dict(FIXED_OPTIONS) if method in FIXED else {}


@pytest.mark.parametrize("checkpoint", ["states", "stages"])
@pytest.mark.parametrize("decreasing", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", METHODS)
def test_matches_torchdiffeq_backprop(method, dtype, tuple_state, decreasing, checkpoint):
    fwd, errs, stats, grads = compare(
        method, dtype=dtype, tuple_state=tuple_state, decreasing=decreasing,
        checkpoint=checkpoint, options=_options(method),
    )  # fmt: skip
    assert fwd <= FWD_TOL[dtype], f"forward differs from torchdiffeq by {fwd:.2e}"
    names = ["y0", "t", "w1", "b1", "w2", "unused"]
    tol, tol_t = GRAD_TOL[dtype]
    bad = {
        n: f"{e:.2e}" for n, e in zip(names, errs, strict=True) if e > (tol_t if n == "t" else tol)
    }
    assert not bad, f"gradient errors above {GRAD_TOL[dtype]}: {bad}"
    assert torch.equal(grads[-1], torch.zeros_like(grads[-1]))  # unused parameter
    assert stats.n_steps > 2 and stats.nfe_forward > 0 and stats.n_vjp > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_matches_on_device(method, device):
    fwd, errs, _, _ = compare(method, device=device, options=_options(method))
    assert fwd <= 1e-12 and max(errs) <= 1e-10, (fwd, errs)


@pytest.mark.parametrize("method", ["dopri5", "fehlberg2", "rk4", "tsit5"])
@pytest.mark.parametrize("budget", [1, 2, 4])
def test_checkpoint_budget_replays_steps_exactly(method, budget):
    fwd, errs, stats, _ = compare(method, checkpoint=budget, options=_options(method))
    assert fwd <= 1e-12 and max(errs) <= 1e-10, (fwd, errs)
    assert (stats.n_replayed_steps > 0) == (stats.n_steps > budget)
    per_state = 2 if method == "fehlberg2" else 1  # fehlberg2 also keeps its carried slope
    assert stats.n_checkpoints <= per_state * budget + 1  # + the final state


def test_continuous_adjoint_is_not_exact_on_the_same_case():
    """The 1e-10 bound discriminates: torchdiffeq's continuous adjoint misses it."""
    from torch_support import Field, solve_and_grad, torchdiffeq

    field = Field()
    y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)
    fwd, errs, stats, ours = compare("dopri5", field=field, y0=y0, t=t)
    kw = dict(method="dopri5", rtol=1e-5, atol=1e-7)
    _, ref = solve_and_grad(torchdiffeq.odeint, field, y0, t,
                            options=dict(first_step=stats.first_step), **kw)  # fmt: skip
    _, cont = solve_and_grad(
        torchdiffeq.odeint_adjoint, field, y0, t, options=dict(first_step=stats.first_step),
        adjoint_options=dict(first_step=stats.first_step), **kw,
    )  # fmt: skip
    cont_err = max(relerr(a, b) for a, b in zip(cont[:1] + cont[2:-1], ref[:1] + ref[2:-1],
                                                strict=True))  # fmt: skip
    ours_err = max(relerr(a, b) for a, b in zip(ours, ref, strict=True))
    assert ours_err <= 1e-10
    assert cont_err > 1e-8, f"continuous adjoint unexpectedly exact ({cont_err:.1e})"
