"""JAX adapter: :class:`SymplecticAdjoint`, a ``diffrax.AbstractAdjoint`` with exact,
low-memory gradients.

``diffeqsolve(..., adjoint=SymplecticAdjoint())`` runs diffrax's own solver and
step-size controller (forward values are diffrax's, bit for bit) and records the
accepted steps. Its reverse pass is the discrete adjoint of that solve -- the gradient
``RecursiveCheckpointAdjoint`` gives, to rounding -- computed by the reverse stage
recursion of DESIGN.md section 3 with one vector-field VJP alive at a time::

    for each accepted step n = N-1, ..., 0, for each stage i = s, ..., 1:
        kbar_i = b_i lam + sum_{j>i} a_ji Xbar_j  (+ cotangents of SaveAt(ts) outputs)
        Xbar_i, argsbar_i, termsbar_i = VJP of term.vf_prod(t_i, ., args, dt_n) at X_i
    lam_n = lam + sum_i Xbar_i  (+ output cotangents on y_n)

(diffrax's stage increments ``K_i`` already contain the step ``dt_n``, so the
coefficients carry no ``h``.) With ``Lambda_i = kbar_i / b_i`` this is the symplectic
adjoint of Matsubara, Miyatake & Yaguchi (NeurIPS 2021).
"""

from __future__ import annotations

from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._adjoint import (
    _inner_loop,
    _nondiff_solver_controller_state,
    _only_transpose_ys,
    _outer_loop,
)
from diffrax._heuristics import is_sde
from diffrax._saveat import SubSaveAt, save_y

from ._jax_implicit import ImplicitKernel, implicit_core_tableau  # HOOK(stiff)
from ._jax_record import StageKeepingSolver, core_tableau, recording_loops
from ._jax_reverse import Checkpoints, reverse_sweep

__all__ = ["SymplecticAdjoint"]

_ALTERNATIVE = "use `adjoint=diffrax.RecursiveCheckpointAdjoint()` instead"
CHECKPOINT_MODES = ("states", "stages")


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, SubSaveAt)


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
    `AbstractERK`); `ConstantStepSize`, `StepTo` and `PIDController` (with
    `step_ts`/`jump_ts`); `SaveAt(t0=..., t1=..., ts=..., steps=...)` with a single
    `SubSaveAt` and the default `fn`; `jax.jit`, `jax.vmap` on either side of `jax.grad`.

    **Gradients** with respect to `y0`, `args` (any PyTree), the inexact arrays inside
    `terms` (e.g. the parameters of an `eqx.Module` vector field) and the output times
    `SaveAt(ts=...)`. Not with respect to `t0`, `t1`, `dt0` or `StepTo(ts=...)` (the
    step grid): differentiating those raises an error at trace time, as with
    `BacksolveAdjoint`; use `RecursiveCheckpointAdjoint` for them. Values closed over by
    the vector field (rather than passed in `args` or held by the term) cannot be
    differentiated either (JAX raises `CustomVJPException`).

    **Implicit** (`ImplicitEuler`, `Kvaerno3/4/5`) and IMEX (`KenCarp3/4/5`) solvers with
    `checkpoint="states"`/`"stages"`: transposed stage solves by `linear_solver` (a lineax
    solver; dense LU by default), see `adapters/_jax_implicit.py`.

    **Refused** at trace time, naming the alternative: other implicit/IMEX solvers, SDE solvers,
    `HalfSolver` and other wrapped solvers, events, `SaveAt(dense=True)`,
    `SaveAt(fn=...)`, `SaveAt(subs=...)` and `max_steps=None`.

    **Checkpoint modes** (the same values as the PyTorch adapter's `checkpoint`; ``N``
    accepted steps, ``s`` stages, ``|y|`` the state size):

    - `"states"` (default): keeps ``y_n`` of every step (``max_steps |y|``); the stages
      are recomputed from ``y_n`` in the backward pass.
    - `"stages"`: also keeps the ``s`` increments ``K_i`` (``(1 + s) max_steps |y|``);
      nothing is recomputed.
    - an int ``c >= 1``: a budget. The forward pass keeps ``y_0`` and the recorded times
      (``O(max_steps)`` scalars); the backward pass holds at most ``c`` states and
      replays steps from them.

    Under a budget the backward pass rebuilds ``y_n`` by replaying the recorded steps
    ``y_{n+1} = y_n + sum_i b_i K_i`` with the recorded ``t_n, t_{n+1}`` (never the
    step-size controller, so adaptive solves replay exactly their accepted steps), on
    the binomial (revolve) schedule: with ``r`` the least integer with
    ``C(c + r, c) >= N``, each step is replayed at most ``r`` times. The gradient is the
    ``"states"`` one to rounding. The PyTorch adapter stores states during its forward
    pass (an online schedule when the step count is unknown); here the step count ``N``
    is a traced value, unknown until the forward loop has ended, so no schedule can be
    applied inside that loop: the forward pass keeps only ``y_0``, and the backward pass
    replays from ``y_0`` (and from the states it stores on the way), holding at most
    ``c`` stored states of size ``|y|`` besides the working one. The first replay sweep
    thus re-runs the forward steps once more than PyTorch's schedule would.

    **Cost per accepted step**: ``checkpoint="states"`` stores ``y_n`` and recomputes the
    stages (``s`` evaluations) before the ``s`` stage VJPs; ``checkpoint="stages"`` also
    stores the ``s`` increments and skips the recompute (about 20% faster on the
    benchmark MLP). A budget adds ``s`` evaluations per replayed step.

    **Memory of the backward pass**: one network graph at a time. Each stage's VJP (its
    linearisation, pull-back and parameter-cotangent accumulation) runs inside its own
    XLA conditional; otherwise XLA would linearise all ``s`` stages of a step before the
    first pull-back and keep ``s`` graphs alive.
    """

    checkpoint: Literal["states", "stages"] | int = eqx.field(default="states", static=True)
    # HOOK(stiff): lineax solver of the transposed stage systems (None: dense LU).
    linear_solver: Any = eqx.field(default=None, static=True)

    def __check_init__(self):
        if not _valid_checkpoint(self.checkpoint):
            raise ValueError(
                f"SymplecticAdjoint(checkpoint={self.checkpoint!r}): use 'states' (one state "
                "per step, the default), 'stages' (states and stage values: faster, more "
                "memory) or a budget (an int >= 1) of states."
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
            terms=terms, solver=solver, event=event, saveat=saveat, max_steps=max_steps
        )
        _implicit_kernel(self, tableau, solver)  # HOOK(stiff): refuse what it cannot do now
        init_state = _nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        y = init_state.y
        init_state = eqx.tree_at(lambda s: s.y, init_state, object())
        ts = saveat.subs.ts
        if ts is not None:
            # The output times travel in the differentiated argument; the rest of `saveat`
            # is static configuration.
            saveat = eqx.tree_at(lambda s: s.subs.ts, saveat, None)
        final_state, aux_stats = _loop_symplectic(
            (y, args, terms, ts),
            self=self,
            tableau=tableau,
            solver=solver,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
            t0=t0,
            t1=t1,
            dt0=dt0,
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
            event=None,
        )
        return _only_transpose_ys(final_state), aux_stats


SymplecticAdjoint.__init__.__doc__ = """**Arguments:**

- `checkpoint`: what the forward pass keeps for the backward pass (the same option as
    the PyTorch adapter's). `"states"` (default): the state `y_n` at the start of every
    accepted step (`max_steps` states of memory); the stages are recomputed in the
    backward pass. `"stages"`: also the stage increments of every step (`(1 + s)` times
    the memory, no recompute). An int `c >= 1`: a budget of `c` states; the forward pass
    keeps `y_0` only and the backward pass replays the recorded steps on a binomial
    schedule (see the class docstring).
"""


# HOOK(stiff): solvers without stage increments in their dense output.
_NO_K = (diffrax.Euler, diffrax.ImplicitEuler)


def _implicit_kernel(self, tableau, solver):  # HOOK(stiff)
    if not isinstance(solver, diffrax.AbstractImplicitSolver):
        return None
    if not isinstance(self.checkpoint, str):
        raise NotImplementedError(
            "`SymplecticAdjoint`: a checkpoint budget is not supported for implicit solvers "
            "yet; use checkpoint='states' or 'stages'."
        )
    return ImplicitKernel(tableau, solver, self.linear_solver)


def _valid_checkpoint(checkpoint: Any) -> bool:
    if isinstance(checkpoint, str):
        return checkpoint in CHECKPOINT_MODES
    # `bool` is an `int`; True/False are not budgets.
    return isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 1


def _check(*, terms, solver, event, saveat, max_steps):
    """Refuse what the adjoint cannot do, at trace time; return the solver's tableau."""
    if max_steps is None:
        raise ValueError(
            "`SymplecticAdjoint` stores one state per accepted step in buffers sized by "
            "`max_steps`, so `diffeqsolve(..., max_steps=None)` cannot be used: pass a bound "
            "on the number of steps, or use `adjoint=diffrax.RecursiveCheckpointAdjoint("
            "checkpoints=...)`."
        )
    if event is not None:
        raise NotImplementedError(f"`SymplecticAdjoint` does not support events: {_ALTERNATIVE}.")
    if is_sde(terms):
        raise NotImplementedError(
            f"`SymplecticAdjoint` handles ordinary (and controlled) differential equations, "
            f"not SDEs: {_ALTERNATIVE}."
        )
    if saveat.dense:
        raise NotImplementedError(
            "`SymplecticAdjoint` does not support `SaveAt(dense=True)`; save the times you "
            f"need with `SaveAt(ts=...)`, or {_ALTERNATIVE}."
        )
    if jtu.tree_structure(saveat.subs, is_leaf=_is_subsaveat) != jtu.tree_structure(0):
        raise NotImplementedError(
            f"`SymplecticAdjoint` does not support `SaveAt(subs=...)`: {_ALTERNATIVE}, or "
            "one solve per SubSaveAt."
        )
    if saveat.subs.fn is not save_y:
        raise NotImplementedError(
            "`SymplecticAdjoint` does not support `SaveAt(fn=...)`; apply the function to "
            f"`sol.ys` after the solve, or {_ALTERNATIVE}."
        )
    implicit = implicit_core_tableau(solver)  # HOOK(stiff): implicit/IMEX solvers
    return core_tableau(solver) if implicit is None else implicit


# The first argument holds everything differentiated: the initial state, `args`, the
# terms (the parameters of the vector field) and the `SaveAt(ts=...)` output times.
@eqx.filter_custom_vjp
def _loop_symplectic(y__args__terms__ts, *, self, tableau, solver, saveat, init_state, **kwargs):
    final_state, aux_stats, _ = _forward(
        y__args__terms__ts,
        self=self,
        solver=solver,
        saveat=saveat,
        init_state=init_state,
        record=False,
        **kwargs,
    )
    return final_state, aux_stats


def _forward(y__args__terms__ts, *, self, solver, saveat, init_state, record, max_steps, **kwargs):
    y, args, terms, ts = y__args__terms__ts
    init_state = eqx.tree_at(lambda s: s.y, init_state, y)
    if ts is not None:
        saveat = eqx.tree_at(lambda s: s.subs.ts, saveat, ts, is_leaf=lambda x: x is None)
    if not record:
        outer, inner, box = (
            eqx.Partial(_outer_loop, kind="lax"),
            eqx.Partial(_inner_loop, kind="lax"),
            None,
        )
    else:
        k_struct = None
        if self.checkpoint == "stages" and type(solver) not in _NO_K:  # HOOK(stiff)
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
            solver = StageKeepingSolver(solver)
            init_state = eqx.tree_at(
                lambda s: s.solver_state,
                init_state,
                (init_state.solver_state, k0),
                is_leaf=lambda x: x is None,
            )
        keep_states = isinstance(self.checkpoint, str)
        outer, inner, box = recording_loops(max_steps, k_struct, keep_states)
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


@_loop_symplectic.def_fwd
def _loop_symplectic_fwd(perturbed, y__args__terms__ts, **kwargs):
    del perturbed
    kwargs.pop("tableau")
    final_state, aux_stats, record = _forward(y__args__terms__ts, record=True, **kwargs)
    save_state = final_state.save_state
    ys_struct = jax.eval_shape(lambda: save_state.ys)
    residuals = (record, final_state.num_accepted_steps, save_state.save_index, ys_struct)
    return (final_state, aux_stats), residuals


@_loop_symplectic.def_bwd
def _loop_symplectic_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y__args__terms__ts,
    *,
    self,
    tableau,
    solver,
    saveat,
    t0,
    t1,
    **kwargs,
):
    del kwargs
    record, num_steps, final_save_index, ys_struct = residuals
    y, args, terms, ts = y__args__terms__ts
    grad_final_state, _ = grad_final_state__aux_stats
    ybar = grad_final_state.save_state.ys
    sub = saveat.subs
    # Symbolic zeros (undifferentiated outputs) become real zeros: the sweep reads slots.
    if ybar is None:
        ybar = jtu.tree_map(lambda _: None, ys_struct)
    ybar = jtu.tree_map(
        lambda s, b: jnp.zeros(s.shape, s.dtype) if b is None else b, ys_struct, ybar
    )
    steps = sub.steps
    if sub.t1 and steps != 1:
        if steps == 0:
            pred = True
        else:
            pred = (num_steps % steps) != 0
        t1_slot = (final_save_index - 1, pred)
    else:
        t1_slot = None
    y_bar, args_bar, terms_bar, ts_bar = reverse_sweep(
        tableau=tableau,
        interpolation_cls=solver.interpolation_cls,
        has_k=type(solver) not in _NO_K,  # HOOK(stiff)
        terms=terms,
        args=args,
        checkpoints=Checkpoints(
            record, None if isinstance(self.checkpoint, str) else self.checkpoint
        ),
        num_steps=num_steps,
        ybar=ybar,
        t0_slot=bool(sub.t0),
        t1_slot=t1_slot,
        ts=ts,
        need_ts_bar=ts is not None and bool(perturbed[3]),
        steps=steps,
        t0_equals_t1=t0 == t1,
        implicit=_implicit_kernel(self, tableau, solver),  # HOOK(stiff)
    )
    return y_bar, args_bar, terms_bar, ts_bar
