"""A checkpoint budget on a fixed grid follows the optimal offline (binomial) schedule.

torchdiffeq's fixed grid is known before the solve, so ``checkpoint=c`` must replay
exactly the Griewank--Walther minimum ``r N - C(c + r, c + 1) - (N - 1)`` steps (the
formula counts the forward sweep's ``N - 1`` steps too) and give the ``"states"``
gradient; an adaptive solve (step count unknown) stays within 1.5x of it.
"""

from __future__ import annotations

import pytest
from torch_support import SolveStats, odeint, relerr, torch

from symplectic_adjoint.core.checkpointing import binomial_forward_steps


def _linear(t, y):
    return -0.5 * y


@pytest.mark.parametrize("n, c", [(63, 3), (100, 10), (257, 4)])
def test_fixed_grid_budget_replays_the_binomial_minimum(n, c):
    y0 = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = {}
    for checkpoint in ("states", c):
        stats = SolveStats()
        ys = odeint(_linear, y0, t, method="rk4", options=dict(step_size=1.0 / n),
                    checkpoint=checkpoint, stats=stats)  # fmt: skip
        (grads[checkpoint],) = torch.autograd.grad(ys[-1].square().sum(), y0)
        assert stats.n_steps == n
    assert stats.n_replayed_steps == binomial_forward_steps(n, c) - (n - 1)
    assert relerr(grads[c], grads["states"]) <= 1e-13


def test_adaptive_budget_replays_within_one_and_a_half_of_the_minimum():
    y0 = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([0.0, 40.0], dtype=torch.float64)
    stats = SolveStats()
    ys = odeint(lambda t, y: -torch.sin(y) * (1 + 0.5 * torch.cos(t)), y0, t, method="bosh3",
                rtol=1e-8, atol=1e-10, checkpoint=3, stats=stats)  # fmt: skip
    ys[-1].sum().backward()
    n = stats.n_steps
    optimum = binomial_forward_steps(n, 3) - (n - 1)
    assert n > 20
    assert optimum <= stats.n_replayed_steps <= 1.5 * optimum
