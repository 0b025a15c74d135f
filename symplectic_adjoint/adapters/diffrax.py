"""JAX adapter: :class:`SymplecticAdjoint`, a ``diffrax.AbstractAdjoint`` with exact,
low-memory gradients.

``diffeqsolve(..., adjoint=SymplecticAdjoint())`` runs diffrax's own solver and
step-size controller (forward values are diffrax's, bit for bit) and records the
accepted steps. Its reverse pass is the discrete adjoint of that solve -- the gradient
``RecursiveCheckpointAdjoint`` gives, to rounding -- computed by the reverse stage
recursion (README, "How it works"; Matsubara, Miyatake & Yaguchi, NeurIPS 2021) with
one vector-field VJP alive at a time::

    for each accepted step n = N-1, ..., 0, for each stage i = s, ..., 1:
        kbar_i = b_i lam + sum_{j>i} a_ji Xbar_j  (+ cotangents of SaveAt(ts) outputs)
        Xbar_i, argsbar_i, termsbar_i = VJP of term.vf_prod(t_i, ., args, dt_n) at X_i
    lam_n = lam + sum_i Xbar_i  (+ output cotangents on y_n)

(diffrax's stage increments ``K_i`` already contain the step ``dt_n``, so the
coefficients carry no ``h``.) With ``Lambda_i = kbar_i / b_i`` this is the symplectic
adjoint of Matsubara, Miyatake & Yaguchi (NeurIPS 2021).
"""

from __future__ import annotations

from math import isqrt
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ..core.checkpointing import validate_checkpoint
from ._diffrax_compat import (
    WrapTerm,
    inner_loop,
    is_sde,
    nondiff_solver_controller_state,
    only_transpose_ys,
    outer_loop,
    save_y,
)
from ._jax_implicit import ImplicitKernel, implicit_core_tableau, resolve_linear_solver
from ._jax_record import StageKeepingSolver, core_tableau, recording_loops, save_states
from ._jax_reverse import Checkpoints, Output, reverse_sweep

__all__ = ["SymplecticAdjoint"]

_ALTERNATIVE = "use `adjoint=diffrax.RecursiveCheckpointAdjoint()` instead"


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _subs(saveat) -> list:
    """Every ``SubSaveAt`` of ``saveat``, in ``jtu.tree_leaves`` order (diffrax's)."""
    return [x for x in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat) if _is_subsaveat(x)]


def _with_fns(saveat, fns: list):
    """``saveat`` with the save functions of its SubSaveAts replaced by ``fns``."""
    if not fns:
        return saveat
    return eqx.tree_at(lambda s: [x.fn for x in _subs(s)], saveat, fns)


def _with_ts(saveat, ts: list):
    """``saveat`` with the output times of its SubSaveAts replaced by ``ts``."""
    if not ts:
        return saveat
    return eqx.tree_at(lambda s: [x.ts for x in _subs(s)], saveat, ts, is_leaf=_is_none)


def _checkpoint_mode(checkpoint: Any) -> str | int:
    return validate_checkpoint(checkpoint, where="SymplecticAdjoint(checkpoint=...)")


class SymplecticAdjoint(diffrax.AbstractAdjoint):
    """Backpropagate through [`diffrax.diffeqsolve`][] exactly, at the memory of one
    stored state per step, by the symplectic adjoint method.

    The gradient is that of the discrete solve diffrax computes (the same accepted
    steps, the same interpolation at `SaveAt(ts=...)`), as `RecursiveCheckpointAdjoint`
    gives it, to rounding; unlike `BacksolveAdjoint` it does not integrate a continuous
    adjoint equation, so it has no discretisation error of its own. The accepted step
    sizes are constants for the gradient (no derivative through the step-size
    controller; `PIDController` stop-gradients them as well).

    **Supported:** every explicit Runge--Kutta solver of diffrax (`Euler`, `Heun`,
    `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`, `Dopri5`, `Dopri8`, and user subclasses of
    `AbstractERK`); every term diffrax solves as an ODE or CDE: `ODETerm`, `ControlTerm`
    over any `AbstractPath` (e.g. `CubicInterpolation`, `LinearInterpolation`, with a
    `lineax` operator such as `DiagonalLinearOperator`), `MultiTerm` of them;
    `ConstantStepSize`, `StepTo` and `PIDController` (with `step_ts`/`jump_ts`, with or
    without `dt0`); `SaveAt(t0=..., t1=..., ts=..., steps=..., fn=...)`, any PyTree of
    `SubSaveAt` (`SaveAt(subs=...)`, each with its own times and `fn`), and
    `SaveAt(dense=True)` (`sol.evaluate(t)`, `sol.derivative(t)`); terminating
    `diffrax.Event(cond_fn)` (boolean or real-valued): without a root finder the solve
    stops at the end of the step where it fired (a discrete decision); with one (e.g.
    `optimistix.Newton`; a single `cond_fn`, no `steps`/`dense` saves, explicit solvers,
    `checkpoint="states"`/`"stages"`) at the root `t*` inside that step, the final value
    being the interpolant at `t*` and `t*`'s gradient the implicit-function-theorem one
    that `RecursiveCheckpointAdjoint` gets through optimistix; `jax.jit`, `jax.vmap` on
    either side of `jax.grad`. `sol.ts` is differentiated: a `ts` slot is `ts[j]`, the
    `t0` slot `t0`, the `t1` slot the final time (`t1`, the end of the step where an event
    fired, or a root finder's event time `t*`), a `steps` slot the end of its step.

    **Gradients** with respect to `y0`, `args` (any PyTree), the inexact arrays inside
    `terms` (the parameters of an `eqx.Module` vector field, and a control path's data:
    each stage's VJP differentiates `term.contr`), the output times `SaveAt(ts=...)`,
    and the times the step grid is built from: `t0`, `t1`, `dt0`, `StepTo(ts=...)` and
    the controller's arrays (e.g. `jump_ts`), exactly as `RecursiveCheckpointAdjoint`
    gives them for the same accepted steps. For those, the forward pass pushes one
    forward-mode tangent per differentiated time scalar through diffrax's own
    controller, clipping and jump logic (scalar arithmetic; the solver's outputs are
    detached so no state tangent is computed) and records each step's
    `d(t_n, t_{n+1})/d(times)`; the reverse pass takes each step's end-time cotangents
    from the stage VJPs (stage times and control) and the output interpolants. A plain
    function vector field (``ODETerm(lambda t, y, args: ...)``, a ``ControlTerm``'s, in
    a ``MultiTerm`` too) that closes over arrays traced by an enclosing
    `jit`/`vmap`/`grad` is closure-converted (``eqx.filter_closure_convert``), so those
    arrays are differentiated like `args`, exactly as `RecursiveCheckpointAdjoint` does.
    Not differentiated: a closure hidden inside another callable (e.g. inside an
    ``eqx.Module`` vector field, or the `WeaklyDiagonalControlTerm` shim of diffrax 0.7:
    JAX's `CustomVJPException`), and a `solver_state`/`controller_state` passed to
    `diffeqsolve`. An event ``cond_fn`` closing over such arrays raises `TypeError` at
    trace time naming `args` (which it receives, and which are differentiated).

    A save function `fn(t, y, args)` is differentiated at each saved `(t, y, args)` (for
    `ts`, at the interpolated state), including the arrays it closes over (it is
    closure-converted). Dense output's buffers (each step's `y0`, `y1` and stage
    increments, and the step times) take their cotangents into that step's reverse
    recursion with no extra vector-field call, so `sol.evaluate(t)` and
    `sol.derivative(t)` are differentiable in `y0`, `args`, the terms, the grid times and
    the query time `t`.

    **Implicit** (`ImplicitEuler`, `Kvaerno3/4/5`) and IMEX (`KenCarp3/4/5` on
    `MultiTerm(explicit, implicit)` of `ODETerm`s) solvers, in every checkpoint mode
    (budgets replay the solver's own step, root find included): the exact adjoint of the
    stage equations as solved (implicit function theorem), one transposed solve
    ``(I - gamma J_i)^T kbar_i = rhs`` per implicit stage. Each stage is a function of its
    value, the parameters and the step's ends, so the grid times (`t0`, `t1`, `dt0`,
    `StepTo(ts=...)`, the controller's arrays) are differentiated as for explicit solvers.
    `linear_solver`: `None` (default) materialises ``J_i`` by forward mode and solves
    densely; a lineax solver is used matrix-free on ``v -> v - gamma J_i^T v`` (one VJP
    per product); `"gmres"`, `lineax.GMRES` (the class) or a `lineax.GMRES` with a `None`
    tolerance take the missing `rtol`/`atol` from the solver's root finder (the stages are
    converged to those).

    **Refused** at trace time, naming the alternative (`RecursiveCheckpointAdjoint`):
    other implicit/IMEX solvers, SDE solvers, `HalfSolver` and other wrapped solvers,
    root-finder events outside the combination above and `max_steps=None`.
    Only diffrax 0.7.2 is supported (its internals are used): another version raises
    `ImportError` at import.

    **Checkpoint modes** (the same values as the PyTorch adapter's `checkpoint`; ``N``
    accepted steps, ``s`` stages, ``|y|`` the state size):

    - `"states"` (default): keeps ``y_n`` of every step (``max_steps |y|``); the stages
      are recomputed from ``y_n`` in the backward pass.
    - `"stages"`: also keeps the ``s`` increments ``K_i`` (``(1 + s) max_steps |y|``);
      nothing is recomputed.
    - an int ``c >= 1``: a budget. The forward pass keeps at most ``c`` states and the
      recorded times (``O(max_steps)`` scalars); the backward pass holds at most ``c``
      states and replays steps from them. (``c > max_steps + 1`` holds ``max_steps + 1``:
      every state, the memory of `"states"`.) The schedule runs in int32 inside the
      traced program: ``max_steps * (c + sqrt(2 max_steps) + 2) < 2^31`` is required
      (about ``max_steps <= 10^6`` for small ``c``), a `ValueError` at trace time otherwise.

    Under a budget the backward pass rebuilds ``y_n`` by replaying the recorded steps
    ``y_{n+1} = y_n + sum_i b_i K_i`` with the recorded ``t_n, t_{n+1}`` (never the
    step-size controller, so adaptive solves replay exactly their accepted steps), on
    the binomial (revolve) schedule: with ``r`` the least integer with
    ``C(c + r, c) >= N``, each step is replayed at most ``r`` times. The gradient is the
    ``"states"`` one to rounding. The step count ``N`` is a traced value, unknown until
    the forward loop has ended, so the forward pass keeps states by a rule that needs
    no ``N``: ``y_0`` and every multiple of a stride that doubles whenever the ``c``
    slots are full (the odd multiples are then dropped), i.e. ``y_0`` and at least
    ``c / 2`` evenly spaced states. The backward pass then takes whichever plan replays
    fewer steps: the segments between those states, the last first, each with the
    slots the earlier ones leave free; or the binomial schedule from ``y_0`` alone
    (better when ``N`` is long against ``c``: few slots, a long stride). It holds at
    most ``c`` stored states of size ``|y|`` besides the working one. (Measured on the
    stiff benchmark, Kvaerno5 with N = 200 and ``c = 60``: 150 replays of the segment
    plan against 338 from ``y_0``; the gradient took 0.95x the time of
    ``RecursiveCheckpointAdjoint(checkpoints=N)`` instead of 1.19x, at the same memory.)
    The PyTorch adapter's online schedule (:class:`~symplectic_adjoint.core.checkpointing.
    OnlineCheckpointer`) chooses its states more carefully; it needs integer arithmetic
    per step that a traced loop would pay for at every step.

    **Cost per accepted step**: ``checkpoint="states"`` stores ``y_n`` and recomputes the
    stages (``s`` evaluations) before the ``s`` stage VJPs; ``checkpoint="stages"`` also
    stores the ``s`` increments and skips the recompute (about 20% faster on the
    benchmark MLP). A budget adds ``s`` evaluations per replayed step.

    **Memory of the backward pass**: one network graph at a time. Each stage's VJP (its
    linearisation, pull-back and parameter-cotangent accumulation) runs inside its own
    XLA conditional; otherwise XLA would linearise all ``s`` stages of a step before the
    first pull-back and keep ``s`` graphs alive. Under `jax.vmap` (each row its own
    solve) the conditionals' and the reverse loop's predicates are reduced over the batch,
    so that JAX keeps them conditionals with unbatched parameters; the parameter
    cotangents are per row (as for any custom VJP under vmap) and are updated in place.
    """

    # Normalised on construction (a NumPy integer budget becomes a Python int): the budget
    # sizes static buffers and enters the traced schedule arithmetic, where a NumPy
    # int64 would promote the int32 counters under x64.
    checkpoint: Literal["states", "stages"] | int = eqx.field(
        default="states", static=True, converter=_checkpoint_mode
    )
    # The transposed stage systems of implicit solvers: None (dense LU), "gmres" or a lineax
    # solver (see the class docstring).
    linear_solver: Any = eqx.field(default=None, static=True)

    def __check_init__(self):
        if isinstance(self.linear_solver, str) and self.linear_solver != "gmres":
            raise ValueError(
                "`SymplecticAdjoint(linear_solver=...)` takes None (dense), 'gmres', "
                f"`lineax.GMRES` or a lineax solver, not {self.linear_solver!r}."
            )

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ):
        tableau = _check(
            terms=terms,
            solver=solver,
            event=event,
            saveat=saveat,
            max_steps=max_steps,
            checkpoint=self.checkpoint,
        )
        _implicit_kernel(self, tableau, solver, terms)  # refuses what it cannot do
        controller_state = init_state.controller_state
        init_state = nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        if not passed_controller_state:
            # Built by diffeqsolve from t0, t1, dt0 (e.g. ConstantStepSize keeps t0, t1):
            # differentiated like RecursiveCheckpointAdjoint does.
            init_state = eqx.tree_at(
                lambda s: s.controller_state, init_state, controller_state, is_leaf=_is_none
            )
        if event is not None:
            # The event's bookkeeping (previous values, last step) only decides where the
            # solve stops (no root finder: a discrete decision); it is not differentiated.
            init_state = eqx.tree_at(
                _event_fields, init_state, jax.lax.stop_gradient(_event_fields(init_state))
            )
        # Everything the step grid is computed from travels in the differentiated argument.
        times = _Times(
            t0=t0,
            t1=t1,
            dt0=dt0,
            tprev=init_state.tprev,
            tnext=init_state.tnext,
            controller_state=init_state.controller_state,
            controller=stepsize_controller,
        )
        y = init_state.y
        init_state = eqx.tree_at(
            lambda s: (s.y, s.tprev, s.tnext, s.controller_state),
            init_state,
            (_HOLE, _HOLE, _HOLE, _HOLE),
            is_leaf=_is_none,
        )
        # The output times of every SubSaveAt travel in the differentiated argument; the
        # rest of `saveat` is static configuration.
        ts = [sub.ts for sub in _subs(saveat)]
        saveat = _with_ts(saveat, [None] * len(ts))
        # So are the save functions, closure-converted: diffeqsolve wraps them in a
        # closure over the (traced) time direction, and a user's function may close over
        # differentiated arrays; their arrays are differentiated like `args`.
        fns = [
            sub.fn if sub.fn is save_y else eqx.filter_closure_convert(sub.fn, t0, y, args)
            for sub in _subs(saveat)
        ]
        saveat = _with_fns(saveat, [save_y] * len(fns))
        terms = _closure_converted(terms, t0, y, args)
        _refuse_event_closures(
            event,
            (t0, y, args),
            _cond_kwargs(terms, solver, t0, t1, dt0, saveat, stepsize_controller, max_steps),
        )
        final_state, aux_stats = _loop_symplectic(
            (y, args, terms, ts, times, fns),
            self=self,
            tableau=tableau,
            solver=solver,
            saveat=saveat,
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
            event=event,  # without a root finder: a discrete stop, nothing to differentiate
        )
        out = only_transpose_ys(final_state)
        # The save times (`sol.ts`) are differentiated too: a `ts` slot is `ts[j]`, the
        # t0 slot `t0`, the t1 slot the final time (or event time), a `steps` slot the
        # end of its step; the backward pass routes their cotangents to those inputs.
        out = eqx.tree_at(
            lambda s: [st.ts for st in save_states(s.save_state)],
            out,
            [st.ts for st in save_states(final_state.save_state)],
        )
        if saveat.dense:
            # Dense output is differentiated (its buffers' cotangents go to the steps).
            out = eqx.tree_at(
                lambda s: (s.dense_ts, s.dense_infos),
                out,
                (final_state.dense_ts, final_state.dense_infos),
            )
        return out, aux_stats


class _Times(eqx.Module):
    """What diffrax computes the step grid from: ``t0``, ``t1``, ``dt0``, the first
    step's ends, the controller's state (e.g. ``ConstantStepSize`` keeps ``t0``, ``t1``)
    and the controller itself (e.g. ``StepTo(ts=...)``)."""

    t0: Any
    t1: Any
    dt0: Any
    tprev: Any
    tnext: Any
    controller_state: Any
    controller: Any


_HOLE = object()  # placeholder for a field of the initial state passed separately


def _event_fields(state) -> tuple:
    return (state.event_tprev, state.event_tnext, state.event_dense_info, state.event_values)


def _is_none(x: Any) -> bool:
    return x is None


SymplecticAdjoint.__init__.__doc__ = """**Arguments:**

- `checkpoint`: what the forward pass keeps for the backward pass (the same option as
    the PyTorch adapter's). `"states"` (default): the state `y_n` at the start of every
    accepted step (`max_steps` states of memory); the stages are recomputed in the
    backward pass. `"stages"`: also the stage increments of every step (`(1 + s)` times
    the memory, no recompute). An int `c >= 1`: a budget of `c` states; the forward pass
    keeps `y_0` and evenly spaced states in `c` slots, and the backward pass replays the
    recorded steps from them (see the class docstring).
"""


# Solvers without stage increments in their dense output.
_NO_K = (diffrax.Euler, diffrax.ImplicitEuler)


def _implicit_kernel(self, tableau, solver, terms=None):
    """The implicit adjoint's kernel for an implicit/IMEX solver (``None`` for explicit
    ones); refuses at trace time what it cannot differentiate exactly."""
    if not isinstance(solver, diffrax.AbstractImplicitSolver):
        return None
    if terms is not None and not _ode_terms_only(terms):
        # The implicit kernel evaluates `contr` outside the differentiated stage function,
        # so a control path's data would get no gradient: refuse rather than drop it.
        raise NotImplementedError(
            "`SymplecticAdjoint` supports implicit/IMEX solvers on `ODETerm`s (or a "
            f"`MultiTerm` of them) only, not on control terms: {_ALTERNATIVE}."
        )
    return ImplicitKernel(tableau, solver, resolve_linear_solver(self.linear_solver, solver))


def _vector_fields(terms: Any) -> list:
    """The plain-function vector fields inside ``terms`` (through diffrax's wrappers)."""
    if isinstance(terms, WrapTerm):
        return _vector_fields(terms.term)
    if isinstance(terms, diffrax.MultiTerm):
        return [vf for t in terms.terms for vf in _vector_fields(t)]
    vf = getattr(terms, "vector_field", None)
    return [vf] if callable(vf) and not isinstance(vf, eqx.Module) else []


def _closure_converted(terms: Any, t0: Any, y: Any, args: Any) -> Any:
    """``terms`` with each plain-function vector field that closes over a value traced by
    an enclosing ``jit``/``vmap``/``grad`` replaced by its closure conversion
    (``eqx.filter_closure_convert``): the closed-over arrays become leaves of the term,
    so they enter the custom VJP as inputs and are differentiated like ``args`` (a
    custom VJP cannot carry a closed-over tracer: JAX would refuse it, or fail at
    lowering with "No constant handler for type: ...Tracer"). Functions closing over
    constants only are left as they are (their constants would otherwise get
    cotangents at every stage)."""
    converted: dict[int, Any] = {}
    for vf in _vector_fields(terms):
        conv = _closes_over_tracer(vf, t0, y, args)
        if conv is not None:
            converted[id(vf)] = conv
    if not converted:
        return terms
    return jtu.tree_map(lambda x: converted.get(id(x), x), terms)


def _closes_over_tracer(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn``'s closure conversion at the example arguments if it closes over a value
    traced by an enclosing ``jit``/``vmap``/``grad``, else ``None`` (also when it cannot
    be traced here)."""
    try:
        conv = eqx.filter_closure_convert(fn, *args, **kwargs)
    except Exception:  # noqa: BLE001 - a function it cannot trace here stays as it is
        return None
    traced = any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(conv))
    return conv if traced else None


def _refuse_event_closures(event: Any, example: tuple, cond_kwargs: dict) -> None:
    """Refuse, at trace time, an event ``cond_fn`` closing over a traced value: the event
    travels outside the custom VJP's inputs, where JAX would fail with
    ``CustomVJPException`` or, at lowering, "No constant handler for type: ...Tracer"."""
    if event is None:
        return
    for fn in jtu.tree_leaves(event.cond_fn):
        if callable(fn) and _closes_over_tracer(fn, *example, **cond_kwargs) is not None:
            raise TypeError(
                "`SymplecticAdjoint`: the event's `cond_fn` closes over a JAX array traced "
                "by an enclosing `jax.jit`/`jax.vmap`/`jax.grad`. Pass such arrays through "
                "`diffeqsolve(..., args=...)` (`cond_fn(t, y, args, ...)` receives them; a "
                "root-finder event time is then differentiated with respect to them), or "
                f"{_ALTERNATIVE}."
            )


def _ode_terms_only(terms: Any) -> bool:
    if isinstance(terms, WrapTerm):  # diffeqsolve's time-direction wrapper
        return _ode_terms_only(terms.term)
    if isinstance(terms, diffrax.MultiTerm):
        return all(_ode_terms_only(t) for t in terms.terms)
    return isinstance(terms, diffrax.ODETerm)


def _check(*, terms, solver, event, saveat, max_steps, checkpoint="states"):
    """Refuse what the adjoint cannot do, at trace time; return the solver's tableau."""
    if max_steps is None:
        raise ValueError(
            "`SymplecticAdjoint` stores one state per accepted step in buffers sized by "
            "`max_steps`, so `diffeqsolve(..., max_steps=None)` cannot be used: pass a bound "
            "on the number of steps, or use `adjoint=diffrax.RecursiveCheckpointAdjoint("
            "checkpoints=...)`."
        )
    if event is not None and event.root_finder is not None:
        if (
            not callable(event.cond_fn)
            or saveat.dense
            or any(sub.steps for sub in _subs(saveat))
            or not isinstance(checkpoint, str)
            or isinstance(solver, diffrax.AbstractImplicitSolver)
        ):
            raise NotImplementedError(
                "`SymplecticAdjoint` supports `Event(cond_fn, root_finder=...)` with a single "
                "`cond_fn`, explicit solvers, `checkpoint='states'`/'stages' and "
                "`SaveAt(t0/t1/ts/fn/subs)` (no `steps`, no `dense`); for this combination "
                f"{_ALTERNATIVE}, or an event without a root finder."
            )
    if is_sde(terms):
        raise NotImplementedError(
            f"`SymplecticAdjoint` handles ordinary (and controlled) differential equations, "
            f"not SDEs: {_ALTERNATIVE}."
        )
    implicit = implicit_core_tableau(solver)  # implicit/IMEX solvers
    return core_tableau(solver) if implicit is None else implicit


# The first argument holds everything differentiated: the initial state, `args`, the
# terms (the parameters of the vector field and the control's data), the `SaveAt(ts=...)`
# output times and the times the step grid is built from (`_Times`).
@eqx.filter_custom_vjp
def _loop_symplectic(diff, *, self, tableau, solver, saveat, init_state, **kwargs):
    final_state, aux_stats, _ = _forward(
        diff,
        self=self,
        solver=solver,
        saveat=saveat,
        init_state=init_state,
        record=False,
        **kwargs,
    )
    return final_state, aux_stats


def _budget(self: SymplecticAdjoint, max_steps: int) -> int | None:
    """The states a budget holds (``None``: not a budget): ``c``, but at most the
    ``max_steps + 1`` states a solve has. More slots would never fill (the forward pass
    keeps every state once ``c > N``) yet be allocated, each of size ``|y|``."""
    if isinstance(self.checkpoint, str):
        return None
    c = min(self.checkpoint, max_steps + 1)
    # The traced schedule's int32 products stay below length * (s + r) (the core's
    # `binomial_split`), at most max_steps * (c + sqrt(2 max_steps) + 2); past 2^31 they
    # would wrap and the backward pass's split loop might never end.
    if max_steps * (c + isqrt(2 * max_steps) + 2) >= 2**31:
        raise ValueError(
            f"`SymplecticAdjoint(checkpoint={self.checkpoint})` with max_steps={max_steps}: "
            "the budget's schedule is computed in int32 inside the traced program and "
            "needs max_steps * (c + sqrt(2 max_steps) + 2) < 2^31 (c = the budget, at most "
            'max_steps + 1). Use a smaller `max_steps` or budget, `checkpoint="states"`, '
            "or `adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    return c


def _forward(diff, *, self, solver, saveat, init_state, record, max_steps, detach=False, **kwargs):
    y, args, terms, ts, times, fns = diff
    saveat = _with_fns(saveat, fns)
    init_state = eqx.tree_at(
        lambda s: (s.y, s.tprev, s.tnext, s.controller_state),
        init_state,
        (y, times.tprev, times.tnext, times.controller_state),
        is_leaf=lambda x: x is _HOLE,
    )
    kwargs.update(t0=times.t0, t1=times.t1, dt0=times.dt0, stepsize_controller=times.controller)
    saveat = _with_ts(saveat, ts)
    if not record:
        outer, inner, box = (
            eqx.Partial(outer_loop, kind="lax"),
            eqx.Partial(inner_loop, kind="lax"),
            None,
        )
    else:
        k_struct = None
        keep_k = self.checkpoint == "stages" and type(solver) not in _NO_K
        if keep_k:
            # Carry the last accepted step's increments in the solver state.
            _, _, info, _, _ = eqx.filter_eval_shape(
                solver.step,
                terms,
                init_state.tprev,
                init_state.tnext,
                y,
                args,
                init_state.solver_state,
                init_state.made_jump,
            )
            k_struct = info["k"]
            k0 = jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), k_struct)
            init_state = eqx.tree_at(
                lambda s: s.solver_state,
                init_state,
                (init_state.solver_state, k0),
                is_leaf=lambda x: x is None,
            )
        if detach and isinstance(solver, diffrax.AbstractRungeKutta):
            # The stage loop's default kind ("checkpointed") is a custom VJP, which cannot
            # carry forward-mode tangents; "lax" runs the same stage loop.
            solver = eqx.tree_at(lambda s: s.scan_kind, solver, "lax", is_leaf=_is_none)
        if keep_k or detach:
            solver = StageKeepingSolver(solver, keep_k=keep_k, detach=detach)
        outer, inner, box = recording_loops(max_steps, k_struct, _budget(self, max_steps))
    final_state, aux_stats = self._loop(
        args=args,
        terms=terms,
        solver=solver,
        saveat=saveat,
        init_state=init_state,
        max_steps=max_steps,
        inner_while_loop=inner,
        outer_while_loop=outer,
        **kwargs,
    )
    if record and k_struct is not None:
        # Hand back the solver state diffrax would have (without the increments).
        final_state = eqx.tree_at(
            lambda s: s.solver_state,
            final_state,
            final_state.solver_state[0],
            is_leaf=lambda x: x is None,
        )
    return final_state, aux_stats, (None if box is None else box[0])


def _perturbed_times(times: _Times, perturbed: Any) -> tuple[list, Any, list[int]]:
    """The leaves of ``times``, their treedef, and the indices of the perturbed ones."""
    leaves, treedef = jtu.tree_flatten(times)
    flags = jtu.tree_leaves(perturbed)  # the same structure: one bool per leaf
    assert len(flags) == len(leaves)
    return leaves, treedef, [i for i, p in enumerate(flags) if p]


@_loop_symplectic.def_fwd
def _loop_symplectic_fwd(perturbed, diff, **kwargs):
    kwargs.pop("tableau")
    y, args, terms, ts, times, fns = diff
    leaves, treedef, which = _perturbed_times(times, perturbed[4])
    if not which:
        final_state, aux_stats, record = _forward(diff, record=True, **kwargs)
        dtimes = None
    else:
        # Forward-mode tangents of the recorded step ends with respect to every perturbed
        # time input (one direction per scalar), through diffrax's own controller, clipping
        # and jump handling: exactly the map RecursiveCheckpointAdjoint differentiates.
        # The solver's outputs are detached, so no state tangent is computed.
        static_box: list = []

        def run(values):
            new = list(leaves)
            for i, v in zip(which, values, strict=True):
                new[i] = v
            out = _forward(
                (y, args, terms, ts, jtu.tree_unflatten(treedef, new), fns),
                record=True,
                detach=True,
                **kwargs,
            )
            arrays, static = eqx.partition(out, eqx.is_array)
            static_box.append(static)
            return arrays

        values = [leaves[i] for i in which]
        sizes = [int(jnp.size(v)) for v in values]
        num_dirs = sum(sizes)
        eye = jnp.eye(num_dirs, dtype=jnp.result_type(*values))
        basis, offset = [], 0
        for v, size in zip(values, sizes, strict=True):
            basis.append(eye[:, offset : offset + size].reshape(num_dirs, *jnp.shape(v)))
            offset += size

        def push(direction):
            out, tangent = jax.jvp(run, (values,), (direction,))
            rec = tangent[2]
            return out, jnp.stack([rec.tprev, rec.tnext])

        out, dtimes = jax.vmap(push, in_axes=(0,), out_axes=(None, 0))(basis)
        final_state, aux_stats, record = eqx.combine(out, static_box[0])
    states = save_states(final_state.save_state)
    ys_struct = jax.eval_shape(lambda: [st.ys for st in states])
    dense_struct = jax.eval_shape(lambda: (final_state.dense_infos, final_state.dense_ts))
    residuals = (
        record,
        final_state.num_accepted_steps,
        [st.save_index for st in states],
        ys_struct,
        dense_struct,
        final_state.y,
        dtimes,
        final_state.event_mask,
        [st.ts for st in states],
    )
    return (final_state, aux_stats), residuals


@_loop_symplectic.def_bwd
def _loop_symplectic_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    diff,
    *,
    self,
    tableau,
    solver,
    saveat,
    **kwargs,
):
    (
        record,
        num_steps,
        final_save_index,
        ys_struct,
        dense_struct,
        y_final,
        dtimes,
        event_mask,
        saved_ts,
    ) = residuals
    y, args, terms, ts, times, fns = diff
    grad_final_state, _ = grad_final_state__aux_stats
    subs = _subs(saveat)
    grad_states = save_states(grad_final_state.save_state)
    ybars = [st.ys for st in grad_states] if grad_states else [None] * len(subs)
    # The cotangents of the save times (`sol.ts`); None where a symbolic zero.
    tsbars = [st.ts for st in grad_states] if grad_states else [None] * len(subs)
    outputs = []
    for q, sub in enumerate(subs):
        # Symbolic zeros (undifferentiated outputs) become real zeros: the sweep reads slots.
        ybar = _materialise(ys_struct[q], ybars[q])
        steps = sub.steps
        t1_slot = None
        if sub.t1 and steps != 1:
            pred = True if steps == 0 else (num_steps % steps) != 0
            t1_slot = (final_save_index[q] - 1, pred)
        outputs.append(
            Output(
                fn=fns[q],
                t0=bool(sub.t0),
                t1_slot=t1_slot,
                ts=ts[q],
                steps=steps,
                ybar=ybar,
                need_ts_bar=ts[q] is not None and bool(perturbed[3][q]),
                tsbar=tsbars[q],
            )
        )
    dense_bar = None
    if saveat.dense:
        dense_bar = _materialise(
            dense_struct, (grad_final_state.dense_infos, grad_final_state.dense_ts)
        )
    y_bar, args_bar, terms_bar, ts_bars, dir_bar, t0_bar, fn_bars = reverse_sweep(
        tableau=tableau,
        interpolation_cls=solver.interpolation_cls,
        has_k=type(solver) not in _NO_K,
        terms=terms,
        args=args,
        checkpoints=Checkpoints(record, _budget(self, kwargs["max_steps"])),
        num_steps=num_steps,
        outputs=outputs,
        dense_bar=dense_bar,
        y_final=y_final,
        t0=times.t0,
        t0_equals_t1=times.t0 == times.t1,
        dtimes=dtimes,
        implicit=_implicit_kernel(self, tableau, solver),
        save_y=save_y,
        event=_root_event(kwargs, event_mask, saved_ts, terms, solver, saveat, times),
    )
    # Cotangents of the perturbed time inputs, from those of the directions.
    leaves, treedef, which = _perturbed_times(times, perturbed[4])
    bars: list = [None] * len(leaves)
    offset = 0
    for i in which:
        size = int(jnp.size(leaves[i]))
        bars[i] = dir_bar[offset : offset + size].reshape(jnp.shape(leaves[i]))
        offset += size
    if leaves and leaves[0] is times.t0 and bars[0] is not None:
        # Values saved at t0 itself (fn(t0, y0, args), the dense grid's first time).
        bars[0] = bars[0] + t0_bar.astype(bars[0].dtype)
    times_bar = jtu.tree_unflatten(treedef, bars)
    return y_bar, args_bar, terms_bar, ts_bars, times_bar, fn_bars


def _root_event(kwargs, event_mask, saved_ts, terms, solver, saveat, times):
    """What the reverse sweep needs of a terminating event with a root finder."""
    event = kwargs.get("event")
    if event is None or event.root_finder is None:
        return None
    cond_kwargs = _cond_kwargs(terms, solver, times.t0, times.t1, times.dt0, saveat,
                               times.controller, kwargs["max_steps"])  # fmt: skip
    return event.cond_fn, jnp.asarray(event_mask), saved_ts, cond_kwargs


def _cond_kwargs(terms, solver, t0, t1, dt0, saveat, controller, max_steps) -> dict:
    """The keyword arguments diffrax 0.7.2 passes to an event's ``cond_fn``."""
    return dict(terms=terms, solver=solver, t0=t0, t1=t1, dt0=dt0, saveat=saveat,
                stepsize_controller=controller, max_steps=max_steps)  # fmt: skip


def _materialise(struct: Any, bar: Any) -> Any:
    """``bar`` with symbolic zeros (``None``, at any level) replaced by zeros of the
    shapes in ``struct``."""

    def fill(b, st):
        if b is None:
            return jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), st)
        return b

    return jtu.tree_map(fill, bar, struct, is_leaf=_is_none)
