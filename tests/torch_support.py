"""Shared helpers for the torch adapter tests (no tests here).

The reference for every gradient is plain backprop through ``torchdiffeq.odeint`` on
the same problem with ``options["first_step"]`` pinned to the step size our solve
recorded (README, How it works: torchdiffeq's initial step selection is otherwise differentiated).
For tsit5, which torchdiffeq lacks, the reference is backprop through the same solver
class (``adjoint="backprop"``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchdiffeq = pytest.importorskip("torchdiffeq")

from symplectic_adjoint.adapters.torchdiffeq import (  # noqa: E402
    ADAPTIVE_METHODS,
    FIXED_METHODS,
    SolveStats,
    odeint,
)

__all__ = ["DEVICES", "Field", "relerr", "solve_and_grad", "compare", "ADAPTIVE", "FIXED"]

ADAPTIVE = ADAPTIVE_METHODS
FIXED = FIXED_METHODS
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


class Field(torch.nn.Module):
    """A small time-dependent MLP vector field with one parameter it never uses."""

    def __init__(self, dim: int = 3, width: int = 8, *, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(dim, width, generator=g, dtype=dtype) / dim**0.5)
        self.b1 = torch.nn.Parameter(torch.randn(width, generator=g, dtype=dtype) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(width, dim, generator=g, dtype=dtype) / width**0.5)
        self.unused = torch.nn.Parameter(torch.ones(2, dtype=dtype))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + self.b1) @ self.w2 * (1 + 0.5 * torch.sin(2 * t))


class TupleField(torch.nn.Module):
    """``Field`` on a state split as ``(y[..., :1], y[..., 1:])``."""

    def __init__(self, field: Field):
        super().__init__()
        self.field = field

    def forward(self, t, y):
        out = self.field(t, torch.cat(y, dim=-1))
        return out[..., :1], out[..., 1:]


def relerr(a, b) -> float:
    """``||a - b|| / ||b||`` (``||a||`` when ``b`` is zero)."""
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float(a.norm())


def solve_and_grad(odeint_fn, field, y0, t, *, tuple_state=False, seed=1, **kwargs):
    """Solve, form ``L = sum_j <W_j, y(t_j)>`` with fixed random ``W``, and return the
    solution (as one tensor) and the gradients w.r.t. ``y0``, ``t`` and the parameters."""
    y0 = y0.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    func = TupleField(field) if tuple_state else field
    state = (y0[..., :1], y0[..., 1:]) if tuple_state else y0
    out = odeint_fn(func, state, t, **kwargs)
    sol = torch.cat(out, dim=-1) if tuple_state else out
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(sol.shape, generator=g, dtype=torch.float64).to(sol)
    loss = (w * sol).sum() + 0.1 * (sol**2).sum()
    grads = torch.autograd.grad(loss, (y0, t, *field.parameters()), allow_unused=True)
    grads = [torch.zeros_like(x) if gx is None else gx
             for gx, x in zip(grads, (y0, t, *field.parameters()), strict=True)]  # fmt: skip
    return sol.detach(), grads


def compare(
    method,
    *,
    dtype=torch.float64,
    device="cpu",
    tuple_state=False,
    decreasing=False,
    checkpoint="states",
    options=None,
    rtol=1e-5,
    atol=1e-7,
    t=None,
    field=None,
    y0=None,
):
    """Our symplectic solve against pinned backprop; returns (forward error, gradient
    errors [y0, t, params...], stats, our gradients)."""
    field = (field or Field(dtype=dtype)).to(device)
    if t is None:
        t = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=dtype)
    if decreasing:
        t = 0.5 - t
    t = t.to(device)
    if y0 is None:
        y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y0 = y0.to(device=device, dtype=dtype)
    options = dict(options or {})
    stats = SolveStats()
    kw = dict(method=method, rtol=rtol, atol=atol, tuple_state=tuple_state)
    sol, grads = solve_and_grad(odeint, field, y0, t, options=options, checkpoint=checkpoint,
                                stats=stats, **kw)  # fmt: skip
    ref_options = dict(options)
    if method in ADAPTIVE and "first_step" not in ref_options:
        ref_options["first_step"] = stats.first_step
    if method == "tsit5":
        ref_sol, ref_grads = solve_and_grad(odeint, field, y0, t, options=ref_options,
                                            adjoint="backprop", **kw)  # fmt: skip
    else:
        ref_sol, ref_grads = solve_and_grad(torchdiffeq.odeint, field, y0, t,
                                            options=ref_options, **kw)  # fmt: skip
    fwd = relerr(sol, ref_sol)
    errs = [relerr(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    return fwd, errs, stats, grads
