"""The symplectic adjoint as a ``torch.autograd.Function`` over a recorded torchdiffeq solve.

Forward: :func:`~._torch_record.record_solve` runs torchdiffeq's solver without a graph
and returns the solution, a :class:`~._torch_record.Recording` of the accepted steps and
the checkpoints, which go through ``ctx.save_for_backward``.

Backward: a :class:`~._torch_reverse.ReverseSweep` over the recording and the saved
checkpoints, with a :class:`~._torch_reverse.StageEvaluator` for every evaluation of
the vector field (see :mod:`._torch_reverse` for the recursion).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from ._torch_record import Checkpoints, Problem, Recording, record_solve
from ._torch_reverse import ReverseSweep, StageEvaluator

__all__ = ["SolveStats", "SymplecticFunction"]


@dataclasses.dataclass(eq=False)
class SolveStats:
    """Counts of one solve, filled in by :func:`symplectic_adjoint.odeint` (``stats=``).

    Attributes:
        method: the integration method.
        adjoint: ``"symplectic"``, ``"backprop"`` or ``"adjoint"``.
        checkpoint: the checkpoint mode (``"states"``, ``"stages"`` or a budget).
        n_steps: accepted steps of the forward solve.
        n_rejected: rejected step attempts (adaptive methods).
        first_step: the initial step size of an adaptive solve (selected by
            torchdiffeq's ``_select_initial_step`` unless given); passing it as
            ``options["first_step"]`` reproduces the same steps.
        nfe_forward: evaluations of ``func`` in the forward solve (initial step
            selection, rejected attempts, interpolation slopes included).
        nfe_backward: evaluations of ``func`` in the backward pass, all kinds.
        n_vjp: of those, evaluations with a graph followed by a vector-Jacobian product.
        n_replayed_steps: steps recomputed from an earlier checkpoint (budgets only).
        n_checkpoints: tensors kept for the backward pass.
        checkpoint_bytes: their total size in bytes.

    The backward fields stay 0 until a gradient is computed; each backward adds to them.
    For ``adjoint="backprop"``/``"adjoint"`` only the evaluation counts are filled
    (counted by wrapping ``func``; evaluations after the forward returns count as
    backward).
    """

    method: str = ""
    adjoint: str = ""
    checkpoint: str | int = ""
    n_steps: int = 0
    n_rejected: int = 0
    first_step: float | None = None
    nfe_forward: int = 0
    nfe_backward: int = 0
    n_vjp: int = 0
    n_replayed_steps: int = 0
    n_checkpoints: int = 0
    checkpoint_bytes: int = 0


class SymplecticFunction(torch.autograd.Function):
    """``apply(problem, stats, y0, t, *params)`` -> solution, or ``(event_t, solution)``.

    ``y0`` is torchdiffeq's flat state, ``t`` its (possibly negated) time; ``params`` are
    the tensors whose gradients are wanted (each once); ``stats`` a :class:`SolveStats`.
    """

    @staticmethod
    def forward(ctx, problem: Problem, stats: SolveStats, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor):  # fmt: skip
        out, rec, checkpoints = record_solve(problem, y0, t, need_t=ctx.needs_input_grad[3])
        tensors, layout = checkpoints.pack()
        ctx.save_for_backward(*tensors)
        ctx.problem, ctx.rec, ctx.layout, ctx.stats = problem, rec, layout, stats
        ctx.t_input, ctx.params = t.detach(), params
        stats.n_steps, stats.n_rejected = len(rec.steps), rec.n_rejected
        stats.first_step, stats.nfe_forward = rec.first_step, rec.nfe
        stats.n_checkpoints = len(tensors)
        stats.checkpoint_bytes = sum(x.numel() * x.element_size() for x in tensors)
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(out[0])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        rec: Recording = ctx.rec
        saved = Checkpoints.unpack(ctx.saved_tensors, ctx.layout)
        evaluator = StageEvaluator(ctx.problem.wfunc.base_func, ctx.params, need_t=rec.need_t)
        sweep = ReverseSweep(rec, saved, evaluator, grads[-1])
        with torch.no_grad():
            ybar, tbar, pbar = sweep.run(ctx.t_input, need_y0=ctx.needs_input_grad[2])
        stats: SolveStats = ctx.stats
        stats.nfe_backward += evaluator.nfe
        stats.n_vjp += evaluator.n_vjp
        stats.n_replayed_steps += sweep.replays
        return (None, None, ybar, tbar, *pbar)
