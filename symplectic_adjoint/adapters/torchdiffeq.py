"""PyTorch adapter: a drop-in ``odeint`` for torchdiffeq 0.2.5 with exact, low-memory gradients.

``odeint(func, y0, t, ..., adjoint="symplectic")`` returns exactly what
``torchdiffeq.odeint`` returns (it runs torchdiffeq's own solver, so the accepted steps
and the interpolated outputs are torchdiffeq's), and its gradients are the exact
gradients of that discrete solve, computed by the symplectic adjoint (the reverse stage
recursion; README, "How it works"; Matsubara, Miyatake & Yaguchi, NeurIPS 2021)
with one network graph alive at a time:

    for each accepted step n = N-1, ..., 0, for each stage i = s, ..., 1:
        kbar_i = h b_i lam + h sum_{j>i} a_ji Xbar_j  (+ output interpolation terms)
        Xbar_i, thetabar_i, tau_i = VJP of f at (t_n + c_i h, X_i) with kbar_i
    lam_n = lam + sum_i Xbar_i   (+ cotangents of outputs in the step)

``adjoint="backprop"`` and ``adjoint="adjoint"`` hand the call to ``torchdiffeq.odeint``
and ``torchdiffeq.odeint_adjoint`` so that one keyword switches between the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torchdiffeq

from ._torch_adjoint import SolveStats, SymplecticFunction, solve
from ._torch_implicit import IMPLICIT_METHODS
from ._torch_inputs import check_no_transform, check_time_options
from ._torch_methods import ADAPTIVE_METHODS as ADAPTIVE_METHODS  # re-exported for tests
from ._torch_methods import FIXED_METHODS, METHODS, OWN_METHODS, REFUSED_METHODS, SOLVERS
from ._torch_record import Problem
from ._torchdiffeq_compat import (
    ADJOINT_CALLBACK_NAMES,
    CALLBACK_NAMES,
    check_inputs,
    flat_to_shape,
)

__all__ = ["odeint", "odeint_event", "SolveStats", "METHODS"]

_ADJOINTS = ("symplectic", "backprop", "adjoint")
_ADJOINT_KWARGS = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options")


def odeint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict | None = None,
    event_fn: Callable | None = None,
    adjoint: str = "symplectic",
    adjoint_params: Iterable[torch.Tensor] | None = None,
    checkpoint: str | int = "states",
    stats: SolveStats | None = None,
    **adjoint_kwargs: Any,
) -> Any:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` as ``torchdiffeq.odeint`` does.

    Arguments (as torchdiffeq 0.2.5 unless stated):
        func: ``func(t, y)``; an ``nn.Module`` or any callable. ``y`` may be a tuple.
        y0: initial state, a tensor or a tuple of tensors (same dtype and device).
        t: 1-D, strictly increasing or decreasing output times; ``t[0]`` is the start.
        rtol, atol: tolerances (floats, tensors, or tuples per component of a tuple
            state); they must not require grad.
        method: ``"dopri5"`` (default), ``"dopri8"``, ``"bosh3"``, ``"fehlberg2"``,
            ``"adaptive_heun"``, ``"tsit5"`` (ours: Tsitouras 5(4) with its own dense
            output), or the fixed-grid ``"euler"``, ``"midpoint"``, ``"heun2"``,
            ``"heun3"``, ``"rk4"`` (Kutta's 3/8 rule, as in torchdiffeq). Implicit (stiff)
            methods, with torchdiffeq's master-branch names: the fixed-grid
            ``"implicit_euler"``, ``"implicit_midpoint"``, ``"trapezoid"``, ``"sdirk2"``,
            ``"trbdf2"`` (DIRK), ``"gl4"``, ``"gl6"``, ``"radauIIA3"``, ``"radauIIA5"``
            (fully implicit), and the adaptive ESDIRK ``"kvaerno3"``, ``"kvaerno4"``,
            ``"kvaerno5"`` (diffrax's tableaux; cubic Hermite dense output). Their stage
            equations are solved by Newton's method; the gradient is exact for the
            converged stages (implicit function theorem), with one transposed linear
            solve per implicit stage in the backward pass.
        options: the solver options: ``first_step``, ``step_t``, ``jump_t``,
            ``min_step``, ``max_step``, ``safety``, ``ifactor``, ``dfactor``,
            ``max_num_steps``, ``dtype``, ``norm`` (adaptive); ``step_size``,
            ``grid_constructor``, ``perturb``, ``interp="linear"|"cubic"`` (fixed grid;
            implicit methods: ``"linear"`` only, ``"cubic"`` raises ``ValueError``, since
            torchdiffeq's cubic fit needs ``f(t_n, y_n)``, which is no stage of them).
            Implicit methods also take ``newton_rtol``/``newton_atol`` (default
            ``rtol/100``, ``atol/100``, the relative one at least 10 machine epsilons of
            the dtype; tighten both when ``adjoint="backprop"`` serves as a reference: its
            gradient differentiates the Newton iterations actually run, so it is exact
            only as far as they converged, while the symplectic one solves the converged
            stage equations' adjoint), ``max_newton_iters`` (default 20; alias
            ``max_iters``), ``linear_solver="auto"|"dense"|"gmres"`` (dense Newton matrix
            from batched VJPs, as ``torch.func.jacrev``, up to 1024 unknowns, else
            matrix-free GMRES on Jacobian-vector products) and ``per_sample=True``
            (``func`` acts on each row of the leading batch dimension: block-diagonal
            Jacobians, never one of the whole batch), ``jacobian="step"|"stage"|"iterate"``
            (the Newton matrix built and factorised once per step, the default, once per
            stage, or at every iterate, GMRES's default); a step whose Newton iteration
            does not converge raises ``NewtonConvergenceError`` naming the step and the
            time (adaptive methods first retry smaller steps).
            ``adjoint_solve="refine"|"fresh"``: the backward's
            transposed stage solves ``(I - h a_ii J(X_i))^T kbar = c`` by iterative
            refinement from one factorisation per step (with ``checkpoint="stages"``
            one carried from step to step), each correction one exact VJP at the
            converged stage, until it is at rounding level (falling back to a fresh
            Jacobian for a stage where it converges slowly; the default), or with a
            fresh Jacobian and factorisation per implicit stage; the same exact
            gradient either way, to rounding. ``jacobian_chunk_size``: basis vectors
            per batched VJP when a Jacobian is built (``None``, the default: all at
            once; smaller bounds the workspace, as ``torch.func.jacrev``'s).
        event_fn: ``event_fn(t, y)``; integrate until it crosses zero and return
            ``(event_t, solution)`` with ``solution = [y0, y(event_t)]``. ``event_t``
            carries no gradient here; use :func:`odeint_event` for that.
        adjoint: ``"symplectic"`` (exact gradients, memory ``N|y|`` plus one network
            graph), ``"backprop"`` (``torchdiffeq.odeint``; for tsit5 the same solver
            class, differentiated by autograd) or ``"adjoint"`` (``torchdiffeq.odeint_adjoint``
            with ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method``,
            ``adjoint_options``, ``adjoint_params``; continuous adjoint, not exact).
        adjoint_params: tensors to differentiate besides ``y0`` and ``t``; default the
            parameters of ``func`` when it is an ``nn.Module``. With ``"symplectic"`` the
            tensors requiring grad that ``func`` reads are found by watching its first
            evaluation (closures, plain attributes, ``functional_call`` weights, non-leaf
            tensors of an upstream graph) and differentiated too, as backprop would; list
            here what ``func`` reads only at later evaluations. A listed parameter
            ``func`` does not use gets a zero gradient.
        checkpoint: what the forward pass keeps for the backward pass (symplectic):
            ``"states"`` keeps ``y_n`` for every accepted step (``N|y|``; the stages are
            recomputed without a graph, ``s-1`` evaluations per step); ``"stages"``
            also keeps the stage inputs ``X_i`` (``N s |y|``; nothing is recomputed);
            an int ``c >= 1`` keeps at most ``c`` checkpoints besides the working state
            (the latest one) and the final state, and replays the recorded steps from
            the nearest checkpoint (binomial checkpointing, Griewank--Walther revolve; the
            same meaning as ``SymplecticAdjoint(checkpoint=c)``): on a fixed grid the
            optimal offline schedule (``r N - C(c + r, c + 1) - (N - 1)`` replays, ``r``
            the least integer with ``C(c + r, c) >= N``), for adaptive steps an online
            one within 1.5x of it.
            ``fehlberg2``/``adaptive_heun`` also keep their carried first slope.
        stats: a :class:`SolveStats` to fill in: accepted/rejected steps and the number
            of evaluations of ``func`` in the forward pass (``nfe_forward``) and, once a
            gradient has been computed, in the backward pass (``nfe_backward``,
            ``n_vjp``, ``n_replayed_steps``), plus the checkpoint count and bytes;
            implicit methods add ``n_newton_iters``, ``n_jacobians`` and
            ``n_refine_fallbacks``.
        adjoint_kwargs: ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method``,
            ``adjoint_options``: used by ``adjoint="adjoint"``, ignored otherwise.

    Returns:
        The solution at ``t`` (a tensor with a leading time axis, or a tuple of them),
        or ``(event_t, solution)`` with ``event_fn``.

    Gradients (symplectic) are exact for the discrete solve torchdiffeq performs:
    accepted step sizes are constants (no derivative through the error controller or
    the initial step selection, README, How it works); ``t[0]`` shifts the step grid, each output
    time enters through its interpolant, and on a fixed grid the node cotangents are
    pulled back through the grid constructor. At a fixed-grid node, linear
    interpolation returns the node's state itself, so (like torchdiffeq) no derivative
    of the interpolant is taken there.

    What func may do (symplectic; README, "What func may do"): the backward re-evaluates
    ``func`` with the random numbers, autocast state and module state of the forward
    pass (BatchNorm
    statistics end as after the forward alone). A ``func`` that draws random numbers
    costs one generator state per stage and step (5 KiB each for the CPU generator);
    a deterministic one costs nothing of the kind. With ``create_graph=True`` the first
    derivative is differentiable (gradient penalties, Hessian-vector products); that
    backward replays the trajectory with a graph and keeps the graphs of its VJPs, so it
    needs memory like backprop's.

    Raises:
        ValueError: unknown ``adjoint``/``checkpoint``/``method``, non-Runge--Kutta
            methods, ``t`` not 1-D and strictly monotone, tolerances or ``step_t``/``jump_t``
            requiring grad, mismatched dtypes or devices, non-finite ``y0``; ``func``
            reading a tensor and one computed from it outside ``func``; inside
            ``torch.func`` transforms (use ``adjoint="backprop"``); an implicit method
            under ``torch.inference_mode()`` (use ``torch.no_grad()``).
        RuntimeError (in the backward): a tensor ``func`` reads was changed in place after
            the forward pass; ``func`` read a tensor requiring grad that its first
            evaluation did not (list it in ``adjoint_params``); random draws that cannot
            be replayed.
        FloatingPointError: the state became inf/nan during the solve (with the time).
    """
    if adjoint not in _ADJOINTS:
        raise ValueError(f"adjoint={adjoint!r} is not one of {', '.join(map(repr, _ADJOINTS))}")
    unknown = sorted(set(adjoint_kwargs) - set(_ADJOINT_KWARGS))
    if unknown:
        raise TypeError(f"odeint() got unexpected keyword arguments {unknown}")
    method = _check_method(method, adjoint)
    _check_state_and_time(y0, t, rtol, atol)
    _check_per_sample(y0, options)
    params = _collect_params(func, adjoint_params, y0, adjoint)
    if stats is not None:
        stats.method, stats.adjoint = method, adjoint
        stats.checkpoint = checkpoint if adjoint == "symplectic" else ""

    if adjoint != "symplectic":
        return _delegate(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
            event_fn=event_fn, adjoint=adjoint, params=params, stats=stats,
            adjoint_kwargs=adjoint_kwargs,
        )  # fmt: skip

    _check_checkpoint(checkpoint)
    check_time_options(options)
    check_no_transform()
    if not torch.is_floating_point(_first(y0)):
        raise ValueError(f"y0 must be real floating point, got {_first(y0).dtype}")
    shapes, wfunc, y0_flat, t_solver, rtol, atol, method, options, event_fn, reverse = check_inputs(
        func, y0, t, rtol, atol, method, options, event_fn, SOLVERS
    )
    _check_options(method, options)
    problem = Problem(
        wfunc=wfunc, method=method, options=options, rtol=rtol, atol=atol,
        event_fn=event_fn, checkpoint=checkpoint, sign=-1.0 if reverse else 1.0,
    )  # fmt: skip
    stats = stats if stats is not None else SolveStats()
    # Solved before the function is applied: what func reads becomes an input too.
    need_t = torch.is_grad_enabled() and t_solver.requires_grad
    solved = solve(problem, y0_flat, t_solver, need_t=need_t, listed=params)
    out = SymplecticFunction.apply(solved, stats, y0_flat, t_solver, *solved.inputs.tensors)
    return _user_output(out, event=event_fn is not None, t=t_solver, reverse=reverse,
                        shapes=shapes)  # fmt: skip


def _user_output(out: Any, *, event: bool, t: torch.Tensor, reverse: bool, shapes: Any) -> Any:
    """torchdiffeq's post-processing: event time in t's dtype and user time, tuple shapes."""
    solution = out[1] if event else out
    if shapes is not None:
        solution = flat_to_shape(solution, (len(t),), shapes)
    if not event:
        return solution
    event_t = out[0].to(t)
    return (-event_t if reverse else event_t), solution


def odeint_event(
    func: Callable,
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t0: torch.Tensor,
    *,
    event_fn: Callable,
    reverse_time: bool = False,
    odeint_interface: Callable = odeint,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """``torchdiffeq.odeint_event`` with this module's :func:`odeint` as the default solver.

    Integrates from ``t0`` until ``event_fn(t, y)`` crosses zero and returns
    ``(event_t, solution)``; the gradient of ``event_t`` comes from the implicit
    function theorem (torchdiffeq's rerouting), the rest from ``odeint_interface``.
    ``kwargs`` go to ``odeint_interface`` (``method``, ``options``, ``adjoint``, ...).
    """
    return torchdiffeq.odeint_event(
        func, y0, t0, event_fn=event_fn, reverse_time=reverse_time,
        odeint_interface=odeint_interface, **kwargs,
    )  # fmt: skip


# ------------------------------------------------------------------ validation


def _first(y0: Any) -> torch.Tensor:
    return y0 if isinstance(y0, torch.Tensor) else y0[0]


def _check_method(method: str | None, adjoint: str) -> str:
    method = "dopri5" if method is None else method
    if method in REFUSED_METHODS:
        raise ValueError(
            f"method {method!r} is {REFUSED_METHODS[method]}, not a Runge-Kutta method: the "
            "symplectic adjoint differentiates Runge-Kutta steps only. Use one of "
            f"{', '.join(METHODS)}, or adjoint='backprop'/'adjoint' with torchdiffeq directly."
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in IMPLICIT_METHODS and torch.is_inference_mode_enabled():
        # Newton's Jacobian is computed by autograd, which records nothing in inference
        # mode: a zero Jacobian would make Newton a slow fixed-point iteration (silently
        # looser stages, or a NewtonConvergenceError blaming the step size).
        raise ValueError(
            f"method {method!r} builds its Newton Jacobian with autograd, which "
            "torch.inference_mode() disables; call odeint under torch.no_grad() instead"
        )
    if method in OWN_METHODS and adjoint == "adjoint":
        raise ValueError(
            f"method {method!r} is not a torchdiffeq solver (0.2.5), so torchdiffeq.odeint_adjoint "
            "cannot run it; use adjoint='symplectic' or 'backprop'"
        )
    return method


def _check_state_and_time(y0: Any, t: Any, rtol: Any, atol: Any) -> None:
    parts = (y0,) if isinstance(y0, torch.Tensor) else y0
    if (
        not isinstance(parts, tuple)
        or not parts
        or not all(isinstance(p, torch.Tensor) for p in parts)
    ):
        raise ValueError("y0 must be a tensor or a non-empty tuple of tensors")
    dtypes = {p.dtype for p in parts}
    devices = {p.device for p in parts}
    if len(dtypes) > 1:
        raise ValueError(f"the parts of y0 have different dtypes {sorted(map(str, dtypes))}")
    if len(devices) > 1:
        raise ValueError(f"the parts of y0 are on different devices {sorted(map(str, devices))}")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t must be a 1-D torch.Tensor, got {type(t).__name__}")
    if not torch.is_floating_point(t):
        raise ValueError(f"t must be floating point, got {t.dtype}")
    if t.ndim != 1 or len(t) == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if t.device != parts[0].device:
        raise ValueError(f"t is on {t.device} but y0 on {parts[0].device}; move t to y0's device")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("t contains inf or nan")
    if len(t) > 1:
        d = t[1:] - t[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("t must be strictly increasing or strictly decreasing")
    for p in parts:
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"y0 contains inf or nan (at t={float(t[0])!r})")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        for x in tol if isinstance(tol, (tuple, list)) else (tol,):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                raise ValueError(
                    f"{name} must not require grad (tolerances are not differentiated)"
                )


def _check_per_sample(y0: Any, options: dict | None) -> None:
    """``per_sample=True`` needs one tensor whose leading axis is the batch: a tuple state
    is solved as one concatenated vector, whose block-diagonal Jacobian would be wrong
    (a silently wrong gradient, not an error, since Newton still converges)."""
    if not (options or {}).get("per_sample", False):
        return
    if not isinstance(y0, torch.Tensor):
        raise ValueError(
            "options['per_sample']=True needs y0 to be one tensor with a leading batch "
            "dimension; a tuple state is solved as one concatenated vector, so its rows are "
            "not samples. Concatenate the parts into one (batch, n) tensor, or drop per_sample"
        )
    if y0.ndim == 0:
        raise ValueError("options['per_sample']=True needs y0 with a leading batch dimension")


def _check_checkpoint(checkpoint: Any) -> None:
    if checkpoint in ("states", "stages"):
        return
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 1:
        return
    raise ValueError(
        f"checkpoint={checkpoint!r}: use 'states', 'stages' or a budget (an int >= 1) of states"
    )


def _check_options(method: str, options: dict) -> None:
    interp = options.get("interp", "linear")
    if method in FIXED_METHODS and interp not in ("linear", "cubic"):
        raise ValueError(f"options['interp']={interp!r}: torchdiffeq knows 'linear' and 'cubic'")


def _collect_params(
    func: Any, adjoint_params: Iterable[torch.Tensor] | None, y0: Any, adjoint: str
) -> tuple[torch.Tensor, ...]:
    params: tuple[torch.Tensor, ...]
    if adjoint_params is None:
        if isinstance(func, torch.nn.Module):
            params = tuple(func.parameters())
        elif adjoint == "adjoint":
            raise ValueError(
                "func is not an nn.Module: pass adjoint_params (the tensors to differentiate; "
                "() if there are none), as torchdiffeq.odeint_adjoint requires"
            )
        else:
            params = ()
    else:
        params = tuple(adjoint_params)
    device = _first(y0).device
    unique: dict[int, torch.Tensor] = {}
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"adjoint_params must be tensors, got {type(p).__name__}")
        if p.device != device:
            raise ValueError(f"a parameter is on {p.device} but y0 on {device}")
        if p.requires_grad:
            unique.setdefault(id(p), p)  # a tensor listed twice must not count twice
    return tuple(unique.values())


# ------------------------------------------------------------------ delegation


class _CountingFunc(torch.nn.Module):
    """``func`` with its evaluations counted into a :class:`SolveStats`."""

    def __init__(self, func: Any, stats: SolveStats) -> None:
        super().__init__()
        self.func = func
        self.stats = stats
        self.backward_phase = False
        for name in (*CALLBACK_NAMES, *ADJOINT_CALLBACK_NAMES):
            if hasattr(func, name):
                setattr(self, name, getattr(func, name))

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        if self.backward_phase:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        return self.func(t, y)


def _delegate(func, y0, t, *, rtol, atol, method, options, event_fn, adjoint, params, stats,
              adjoint_kwargs):  # fmt: skip
    counted = _CountingFunc(func, stats) if stats is not None else func
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn)
    if adjoint == "adjoint":
        out = torchdiffeq.odeint_adjoint(counted, y0, t, adjoint_params=params, **kwargs,
                                         **adjoint_kwargs)  # fmt: skip
    elif method in OWN_METHODS:
        out = _odeint_own(counted, y0, t, **kwargs)
    else:
        out = torchdiffeq.odeint(counted, y0, t, **kwargs)
    if stats is not None:
        counted.backward_phase = True
    return out


def _odeint_own(func, y0, t, *, rtol, atol, method, options, event_fn):
    """``torchdiffeq.odeint``'s own steps with our solver class (tsit5, implicit methods),
    differentiated by plain autograd (through the Newton iterations for implicit ones)."""
    shapes, func, y0, t, rtol, atol, method, options, event_fn, reverse = check_inputs(
        func, y0, t, rtol, atol, method, options, event_fn, SOLVERS
    )
    solver = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
    if event_fn is None:
        out = solver.integrate(t)
    else:
        out = solver.integrate_until_event(t[0], event_fn)
    return _user_output(out, event=event_fn is not None, t=t, reverse=reverse, shapes=shapes)
