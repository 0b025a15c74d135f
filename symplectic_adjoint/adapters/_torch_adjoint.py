"""The symplectic adjoint as a ``torch.autograd.Function`` over a recorded torchdiffeq solve.

Forward: :func:`solve` runs torchdiffeq's solver without a graph
(:func:`~._torch_record.record_solve`) *before* the function is applied, watching what
``func`` reads (:mod:`._torch_inputs`): the tensors requiring grad it reads become inputs
of the function besides ``y0``, ``t`` and the listed parameters (README, What func may do). The
function's forward then returns that solution and moves the checkpoints into
``ctx.save_for_backward``.

Backward: a :class:`~._torch_reverse.ReverseSweep` over the recording and the saved
checkpoints, with a :class:`~._torch_reverse.StageEvaluator` for every evaluation of
the vector field (see :mod:`._torch_reverse` for the recursion), inside the forward's
surroundings (:class:`~._torch_inputs.Replay`). With ``create_graph=True`` the sweep is
recorded by autograd, so the first derivative is differentiable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._torch_inputs import FuncObserver, Inputs, Replay, autocast_state
from ._torch_record import Checkpoints, Problem, Recording, record_solve
from ._torch_reverse import ReverseSweep, StageEvaluator

__all__ = ["SolveStats", "SymplecticFunction", "Solved", "solve"]


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
        n_newton_iters: Newton iterations of the implicit methods' stage solves, forward
            and reverse-pass recomputations.
        n_jacobians: Jacobians built for Newton matrices and transposed stage solves,
            forward and backward (implicit methods, dense and per-sample solvers).
        n_refine_fallbacks: transposed stage solves whose iterative refinement did not
            contract fast enough and were finished from a fresh Jacobian (time only: the
            gradient is exact either way).

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
    n_newton_iters: int = 0
    n_jacobians: int = 0
    n_refine_fallbacks: int = 0

    def _newton(self, newton: Any) -> None:
        """Copy an implicit method's Newton counts (cumulative over the solve's passes)."""
        if newton is not None:
            self.n_newton_iters = newton.iterations
            self.n_jacobians = newton.n_jacobians
            self.n_refine_fallbacks = newton.n_refine_fallbacks


@dataclasses.dataclass(eq=False)
class Solved:
    """A forward solve done before :class:`SymplecticFunction` is applied.

    Attributes:
        problem: the solve.
        out: the solution (``(event_t, solution)`` with an event function); handed over
            to the function's forward, which clears it.
        rec, checkpoints: as :func:`~._torch_record.record_solve` returns them
            (``checkpoints`` cleared once packed into ``ctx``).
        inputs: the tensors to differentiate besides ``y0`` and ``t``
            (``inputs.tensors``, the function's remaining inputs).
        replay: what the backward re-enters (autocast, generators, module state).
        refusal: why the backward cannot be exact, raised when it runs (else ``None``).
    """

    problem: Problem
    out: Any
    rec: Recording
    checkpoints: Checkpoints | None
    inputs: Inputs
    replay: Replay
    refusal: str | None


def solve(
    problem: Problem, y0: torch.Tensor, t: torch.Tensor, *, need_t: bool, listed: tuple
) -> Solved:
    """Run and record the solve without a graph, watching what ``func`` reads.

    ``listed``: the parameters to differentiate in any case (requiring grad, each once).
    Raises ``ValueError`` when ``func`` reads a tensor and one computed from it outside
    ``func`` (see :class:`~._torch_inputs.Inputs`).
    """
    observer = FuncObserver(y0.device)
    autocast = autocast_state(y0.device)
    cached = _parametrize_cache_keys()
    with torch.no_grad():
        out, rec, checkpoints = record_solve(problem, y0, t, need_t=need_t, observer=observer)
    _check_parametrize_cache(cached)
    reads = observer.reads
    inputs = Inputs(listed, reads)
    inputs.record_versions()
    random = reads is not None and reads.random
    mutated = reads.mutated if reads is not None else []
    replay = Replay(autocast, observer.tape if random else None, mutated)
    refusal = None
    if observer.drew_later():
        refusal = (
            "func drew random numbers in later evaluations but not in its first, so the "
            "backward pass cannot replay them; draw them in every evaluation, or use "
            "adjoint='backprop'"
        )
    elif random and rec.spec.cubic:
        refusal = (
            "func draws random numbers and options['interp'] is 'cubic', whose extra "
            "evaluations the backward pass cannot replay; use interp='linear' or "
            "adjoint='backprop'"
        )
    return Solved(problem, out, rec, checkpoints, inputs, replay, refusal)


def _parametrize_cache_keys() -> set | None:
    """The keys of ``torch.nn.utils.parametrize``'s cache when ``cached()`` is active."""
    from torch.nn.utils import parametrize

    return (
        set(parametrize._cache) if parametrize._cache_enabled and torch.is_grad_enabled() else None
    )


def _check_parametrize_cache(before: set | None) -> None:
    """Refuse parametrized weights first computed (and cached) by the graph-free forward
    solve inside ``parametrize.cached()``: the cached value has no graph, so its
    parameters would silently get no gradient."""
    if before is None:
        return
    from torch.nn.utils import parametrize

    new = [k for k in parametrize._cache if k not in before]
    if not new:
        return
    for k in new:  # computed without a graph: do not leave them for the caller's forward
        parametrize._cache.pop(k, None)
    raise ValueError(
        f"func reads parametrized tensors ({', '.join(repr(k[1]) for k in new)}) inside "
        "torch.nn.utils.parametrize.cached() that were first computed during odeint's "
        "forward solve, which runs without a graph: the cache would keep a value without "
        "a graph and the parametrization's parameters would get no gradient. Compute them "
        "before calling odeint inside cached() (e.g. read module.weight once), call odeint "
        "outside cached(), or use adjoint='backprop'."
    )


class SymplecticFunction(torch.autograd.Function):
    """``apply(solved, stats, y0, t, *params)`` -> solution, or ``(event_t, solution)``.

    ``solved`` is :func:`solve`'s result for ``y0`` (torchdiffeq's flat state) and ``t``
    (its possibly negated time); ``params`` are ``solved.inputs.tensors``, the tensors
    whose gradients are wanted besides ``y0`` and ``t``; ``stats`` a :class:`SolveStats`.

    Backward with ``create_graph=True`` (grad mode on in the backward) records the
    reverse sweep itself: the trajectory is replayed from ``y0`` with a graph and every
    VJP keeps its graph, so the first derivative is differentiable (gradient penalties,
    Hessian-vector products, exact to rounding) at backprop's memory cost.
    """

    @staticmethod
    def forward(ctx, solved: Solved, stats: SolveStats, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor):  # fmt: skip
        out, rec, checkpoints = solved.out, solved.rec, solved.checkpoints
        assert checkpoints is not None, "a Solved is applied once"
        solved.out = solved.checkpoints = None  # the checkpoints live in ctx only
        tensors, layout = checkpoints.pack()
        stats.n_checkpoints = len(tensors)
        stats.checkpoint_bytes = sum(x.numel() * x.element_size() for x in tensors)
        # y0 (for a create_graph backward) is usually a checkpoint already.
        ctx.y0_index = next((i for i, x in enumerate(tensors) if x is y0), len(tensors))
        ctx.save_for_backward(*tensors, *([y0] if ctx.y0_index == len(tensors) else []))
        ctx.solved, ctx.rec, ctx.layout, ctx.stats = solved, rec, layout, stats
        ctx.t_input, ctx.params = t.detach(), params
        stats.n_steps, stats.n_rejected = len(rec.steps), rec.n_rejected
        stats.first_step, stats.nfe_forward = rec.first_step, rec.nfe
        stats._newton(rec.newton)
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(out[0])
        return out

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        solved: Solved = ctx.solved
        rec: Recording = ctx.rec
        if solved.refusal is not None:
            raise RuntimeError(solved.refusal)
        solved.inputs.check_versions()
        graph = torch.is_grad_enabled()  # create_graph=True
        if graph and rec.spec.implicit:
            raise ValueError(
                "create_graph=True with an implicit method: adjoint='symplectic' gives no "
                "second derivatives through Newton-solved stages yet; use adjoint='backprop' "
                "for gradient penalties or Hessian-vector products with implicit methods"
            )
        if graph and rec.need_t:
            raise ValueError(
                "create_graph=True with t requiring grad: adjoint='symplectic' gives no "
                "second derivatives through t; detach t, or use adjoint='backprop'"
            )
        everything = ctx.saved_tensors
        y0 = everything[ctx.y0_index] if graph else None
        saved = Checkpoints.unpack(everything, ctx.layout)
        replay = solved.replay
        evaluator = StageEvaluator(
            solved.problem.wfunc.base_func, ctx.params, need_t=rec.need_t,
            replay=replay if replay.needed() else None, inputs=solved.inputs, graph=graph,
        )  # fmt: skip
        sweep = ReverseSweep(rec, saved, evaluator, grads[-1], y0)
        with replay.backward(), torch.set_grad_enabled(graph):
            ybar, tbar, pbar = sweep.run(ctx.t_input, need_y0=ctx.needs_input_grad[2])
        stats: SolveStats = ctx.stats
        stats.nfe_backward += evaluator.nfe
        stats.n_vjp += evaluator.n_vjp
        stats.n_replayed_steps += sweep.replays
        stats._newton(rec.newton)
        return (None, None, ybar, tbar, *pbar)
