"""Checkpoint budgets (``checkpoint=<int>``) give the store-every-step gradients.

The budgeted backward pass replays recorded steps from the nearest kept state, so its
gradient must equal the ``"states"`` gradient to rounding (1e-12 relative, float64) —
also for adaptive solves, whose replays use the recorded step sizes, never the
controller — and a budget of one state must still work.
"""

from __future__ import annotations

import pytest
from torch_support import FIXED, Field, SolveStats, odeint, relerr, solve_and_grad, torch

T = torch.tensor([0.0, 0.3, 0.7, 1.5], dtype=torch.float64)
Y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _grads(method, checkpoint):
    options = {"step_size": 0.05} if method in FIXED else {}
    stats = SolveStats()
    sol, grads = solve_and_grad(odeint, Field(), Y0, T, method=method, rtol=1e-6, atol=1e-8,
                                options=options, checkpoint=checkpoint, stats=stats)  # fmt: skip
    return sol, grads, stats


@pytest.mark.parametrize("budget", [1, 2, 5])
@pytest.mark.parametrize("method", ["rk4", "euler", "dopri5", "bosh3", "fehlberg2", "tsit5"])
def test_budget_gradient_equals_store_all(method, budget):
    sol_all, g_all, stats_all = _grads(method, "states")
    sol_c, g_c, stats_c = _grads(method, budget)
    assert stats_all.n_steps > budget, "the case must need replays"
    assert torch.equal(sol_c, sol_all)  # the forward solve is the same solve
    errs = [relerr(a, b) for a, b in zip(g_c, g_all, strict=True)]
    assert max(errs) <= 1e-12, errs
    assert stats_c.n_replayed_steps > 0 and stats_all.n_replayed_steps == 0
    assert stats_c.checkpoint_bytes < stats_all.checkpoint_bytes
