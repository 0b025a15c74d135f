"""Forward half of the diffrax adapter: which solvers it can reverse, and the recorded solve.

The forward pass is diffrax's own loop (``diffrax._integrate.loop``), so the accepted
steps and every saved value are diffrax's. What this module adds is a *recording* outer
while-loop: it wraps diffrax's loop body, and whenever a call of that body accepted a
step (``num_accepted_steps`` went up) it writes into ``max_steps``-sized buffers

* the step's start and end times ``tprev``/``tnext`` (they differ from the neighbours'
  end/start across a ``jump_ts`` entry, where diffrax steps to ``prevbefore`` and
  restarts ``nextafter`` the jump, so both are kept),
* the state ``y_{n+1}`` after the step (slot 0 holds ``y_0``), so that step ``n`` can be
  replayed from ``y_n`` -- unless the adjoint has a budget of ``c`` states
  (``checkpoint=<int>``): then ``c`` slots hold the states at the multiples of a stride
  that doubles whenever they are full (``y_0, y_s, y_2s, ...``; on doubling, the states
  at odd multiples are dropped), and the reverse pass rebuilds the others by replaying
  the recorded steps (:mod:`._jax_reverse`). The step count is a traced value, unknown
  until the loop ends, so a schedule that needs it cannot be applied here; the doubling
  stride needs none and leaves ``y_0`` and at least ``c / 2`` evenly spaced states,
* the save-buffer and ``SaveAt(ts=...)`` indices before and after the step, which say
  which outputs the step wrote,
* with ``checkpoint="stages"`` also the stage increments ``K_i`` of the step, taken from
  the solver's dense-output information (via :class:`StageKeepingSolver`).

Times are recorded as values: the accepted grid is constant data for the adjoint
(README, How it works); nothing here is differentiated.
"""

from __future__ import annotations

import functools as ft
from typing import Any

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree, Shaped

from ..core.tableau import ButcherTableau
from ._diffrax_compat import SaveState, buffer_at_set, while_loop

__all__ = ["Record", "StageKeepingSolver", "core_tableau", "recording_loops", "save_states"]

_ALTERNATIVE = "use `adjoint=diffrax.RecursiveCheckpointAdjoint()` instead"


def core_tableau(solver: Any) -> ButcherTableau:
    """The explicit tableau of ``solver`` as a core :class:`ButcherTableau`.

    The coefficients are diffrax's own floats (read back exactly: a float's shortest
    ``repr`` is what the core's exact rational is built from), so the reverse recursion
    differentiates precisely the map diffrax computes. ``Euler`` is not an
    ``AbstractRungeKutta`` in diffrax; it is the one-stage tableau ``c=0, b=1``.

    Raises:
        NotImplementedError: implicit, IMEX, stochastic or wrapped solvers (naming the
            alternative adjoint).
    """
    name = type(solver).__name__
    if type(solver) is diffrax.Euler:
        return ButcherTableau.from_lower("euler", c=[0], a_lower=[], b=[1], order=1)
    if isinstance(solver, diffrax.HalfSolver) or isinstance(solver, diffrax.AbstractWrappedSolver):
        raise NotImplementedError(
            f"`SymplecticAdjoint` cannot reverse the wrapped solver `{name}` (its step is "
            f"several steps of the inner solver plus an error estimate); {_ALTERNATIVE}, "
            "or an explicit solver with its own error estimate (e.g. `Tsit5()`)."
        )
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        raise NotImplementedError(
            f"`SymplecticAdjoint` handles explicit Runge--Kutta solvers only; `{name}` is "
            f"implicit: {_ALTERNATIVE}."
        )
    tab = getattr(type(solver), "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or not isinstance(tab, diffrax.ButcherTableau):
        raise NotImplementedError(
            f"`SymplecticAdjoint` handles diffrax's explicit Runge--Kutta solvers (Euler, "
            f"Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8, ...); `{name}` is not "
            f"one (SDE, IMEX and multistep solvers are refused): {_ALTERNATIVE}."
        )
    if tab.implicit or tab.c1 != 0:
        raise NotImplementedError(
            f"`SymplecticAdjoint`: the tableau of `{name}` is not explicit: {_ALTERNATIVE}."
        )
    return ButcherTableau.from_lower(
        name.lower(),
        c=[0.0, *(float(x) for x in tab.c)],
        a_lower=[[float(x) for x in row] for row in tab.a_lower],
        b=[float(x) for x in tab.b_sol],
        order=1,  # metadata only; the kernels never read it
        fsal=bool(tab.fsal),
        exact=False,  # decimal coefficients: rows sum to c only to rounding
    )


class StageKeepingSolver(diffrax.AbstractSolver):
    """Wraps an explicit Runge--Kutta solver for the recorded forward pass.

    ``keep_k``: the solver state also carries the stage increments ``K_i``
    (``dense_info["k"]``) of the last accepted step; diffrax's loop keeps or discards
    the solver state with the step, so after every accepted step the recording loop
    finds that step's increments in ``state.solver_state[1]``.

    ``detach``: the step's outputs (state, error, dense information, solver state) are
    stop-gradiented. The forward pass then pushes forward-mode tangents of the *times*
    only (``t0``, ``t1``, ``dt0``, the controller's arrays) through diffrax's loop: a
    state tangent would be dead code that is removed, so the time recurrence of the
    step-size controller is differentiated exactly, at the cost of scalar arithmetic.

    Everything else is delegated unchanged (values are bitwise diffrax's).
    """

    solver: diffrax.AbstractSolver
    keep_k: bool = eqx.field(default=True, static=True)
    detach: bool = eqx.field(default=False, static=True)

    @property
    def term_structure(self):  # type: ignore[override]
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # type: ignore[override]
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):  # type: ignore[override]
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        raise AssertionError("diffeqsolve initialises the wrapped solver")

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner_state = solver_state[0] if self.keep_k else solver_state
        y1, err, dense_info, inner_state, result = self.solver.step(
            terms, t0, t1, y0, args, inner_state, made_jump
        )
        if self.detach:
            y1, err, dense_info, inner_state = lax.stop_gradient((y1, err, dense_info, inner_state))
        if self.keep_k:
            inner_state = (inner_state, dense_info["k"])
        return y1, err, dense_info, inner_state, result


class Record(eqx.Module):
    """What the forward pass keeps per accepted step (buffers sized by ``max_steps``).

    ``ys[n]`` is the state at the start of step ``n`` (``ys[num_steps]`` the final
    state); under a checkpoint budget of ``c`` states ``ys`` has ``c`` slots, slot ``j``
    holding ``y_{pos[j]}`` (``pos[j] = -1``: free; slot 0 is ``y_0``), every multiple of
    ``stride`` up to the last step held and nothing else, and ``pos``/``stride`` are
    ``None`` otherwise;
    ``tprev[n]``/``tnext[n]`` the step's ends; ``save_before``/``save_after`` the
    save-buffer index and ``ts_before``/``ts_after`` the ``SaveAt(ts=...)`` index around
    the step; ``ks`` the stage increments (``checkpoint="stages"`` only, else ``None``).
    """

    # Shapes: S = max_steps + 1 (states kept) or c (a budget); M = max_steps; s stages.
    ys: PyTree[Shaped[Array, "S ..."]]  # noqa: F722
    tprev: Float[Array, " M"]  # noqa: F722
    tnext: Float[Array, " M"]  # noqa: F722
    save_before: Int[Array, "M subs"]  # noqa: F722
    save_after: Int[Array, "M subs"]  # noqa: F722
    ts_before: Int[Array, "M subs"]  # noqa: F722
    ts_after: Int[Array, "M subs"]  # noqa: F722
    ks: PyTree[Shaped[Array, "M s ..."]] | None  # noqa: F722
    pos: Int[Array, " S"] | None = None  # noqa: F722
    stride: Int[Array, ""] | None = None  # noqa: F722


def _save_index(save_state) -> tuple[Any, Any]:
    # One column per SubSaveAt, in the order of `jtu.tree_leaves(saveat.subs)` (diffrax
    # maps its save functions over the subs and the save states together).
    states = save_states(save_state)
    save = [jnp.asarray(s.save_index, jnp.int32) for s in states]
    ts = [jnp.asarray(s.saveat_ts_index, jnp.int32) for s in states]
    if not states:
        empty = jnp.zeros(0, jnp.int32)
        return empty, empty
    return jnp.stack(save), jnp.stack(ts)


def save_states(save_state) -> list:
    """The ``SaveState`` of every ``SubSaveAt``, in ``jtu.tree_leaves(saveat.subs)`` order."""
    is_state = lambda x: isinstance(x, SaveState)  # noqa: E731
    return [x for x in jtu.tree_leaves(save_state, is_leaf=is_state) if is_state(x)]


def _empty_record(init_state, max_steps: int, k_struct, budget: int | None) -> Record:
    y0 = init_state.y
    n_subs = len(save_states(init_state.save_state))
    time_dtype = jnp.result_type(init_state.tprev)
    n_states = max_steps + 1 if budget is None else budget
    ys = jtu.tree_map(
        lambda x: jnp.zeros((n_states, *jnp.shape(x)), jnp.result_type(x)).at[0].set(x), y0
    )
    zeros_t = jnp.zeros(max_steps, time_dtype)
    zeros_i = jnp.zeros((max_steps, n_subs), jnp.int32)
    ks = None
    if k_struct is not None:
        ks = jtu.tree_map(lambda x: jnp.zeros((max_steps, *x.shape), x.dtype), k_struct)
    pos = stride = None
    if budget is not None:
        pos = jnp.full(budget, -1, jnp.int32).at[0].set(0)
        # c = 1 keeps y_0 alone: a stride beyond the last step says so.
        stride = jnp.asarray(1 if budget > 1 else max_steps + 1, jnp.int32)
    return Record(ys, zeros_t, zeros_t, zeros_i, zeros_i, zeros_i, zeros_i, ks, pos, stride)


def _keep_budgeted(rec: Record, m: Any, y: Any, accepted: Any, put: Any) -> Record:
    """``rec`` after offering ``y_m`` (``m >= 1``, kept only if ``accepted``) to the
    budget's slots: a multiple of the stride is stored; when no slot is free, the states
    at odd multiples are dropped and the stride doubles first (``y_m`` is then stored only
    if it is a multiple of the new stride). Slot 0 (``y_0``) is never dropped."""
    pos, stride = rec.pos, rec.stride
    assert pos is not None and stride is not None
    if pos.shape[0] < 2:  # c = 1: y_0 alone
        return rec
    due = accepted & (m % stride == 0)
    full = due & jnp.all(pos >= 0)
    pos = jnp.where(full & (pos % (2 * stride) != 0), -1, pos)
    stride = jnp.where(full, 2 * stride, stride)
    store = due & (m % stride == 0)
    slot = jnp.argmax(pos < 0)  # a free slot exists whenever `store` holds
    ys = jtu.tree_map(lambda x, b: put(b, slot, x, store), y, rec.ys)  # y first: the
    # buffers are not pytrees of arrays
    pos = pos.at[slot].set(jnp.where(store, m, pos[slot]).astype(pos.dtype))
    return eqx.tree_at(lambda r: (r.ys, r.pos, r.stride), rec, (ys, pos, stride))


def _buffers(rec: Record) -> tuple:
    return (rec.ys, rec.tprev, rec.tnext, rec.save_before, rec.save_after, rec.ts_before,
            rec.ts_after, rec.ks)  # fmt: skip


def recording_loops(
    max_steps: int, k_struct: Any, budget: int | None = None
) -> tuple[Any, Any, list]:
    """Outer/inner while-loops to hand to diffrax's ``loop``, and a one-element list that
    receives the :class:`Record` once the outer loop has run (the loop's return value is
    diffrax's final state, whose type the caller cannot extend).

    ``k_struct`` is the shape of one step's stacked increments when stages are kept, else
    ``None``. ``budget=c`` (a checkpoint budget) keeps at most ``c`` states (see
    :class:`Record`): the memory is then ``c |y|`` plus ``O(max_steps)`` scalars.
    """
    box: list = []
    inner = ft.partial(while_loop, kind="lax")

    def outer(cond_fun, body_fun, init_val, *, max_steps: int, buffers):
        record = _empty_record(init_val, max_steps, k_struct, budget)

        def cond(carry):
            return cond_fun(carry[0])

        def body(carry):
            state, rec = carry
            new = body_fun(state)
            n = jnp.asarray(state.num_accepted_steps)
            accepted = jnp.asarray(new.num_accepted_steps) > n

            # Writes at `n` are overwritten until the step is accepted, so rejected
            # attempts leave no trace; the predicate keeps earlier slots intact when
            # `n` is out of range after the last step (clamped writes). The record's
            # arrays are the loop's buffers: under vmap each write then selects one slot
            # per row, not a copy of the whole buffer (equinox's in-place buffers).
            def put(buf, i, x, pred=accepted):
                return buffer_at_set(buf, i, x, pred=pred)

            sb, tb = _save_index(state.save_state)
            sa, ta = _save_index(new.save_state)
            ks = rec.ks
            if ks is not None:
                ks = jtu.tree_map(lambda k, b: put(b, n, k), new.solver_state[1], ks)
            ys = rec.ys
            if budget is None:
                ys = jtu.tree_map(lambda y, b: put(b, n + 1, y), new.y, ys)
            rec = Record(
                ys=ys,
                tprev=put(rec.tprev, n, state.tprev),
                tnext=put(rec.tnext, n, state.tnext),
                save_before=put(rec.save_before, n, sb),
                save_after=put(rec.save_after, n, sa),
                ts_before=put(rec.ts_before, n, tb),
                ts_after=put(rec.ts_after, n, ta),
                ks=ks,
                pos=rec.pos,
                stride=rec.stride,
            )
            if budget is not None:
                rec = _keep_budgeted(rec, n + 1, new.y, accepted, put)
            return new, rec

        final_state, rec = while_loop(
            cond,
            body,
            (init_val, record),
            max_steps=max_steps,
            # The budget's slot bookkeeping (`pos`, `stride`) is rewritten whole, so it
            # is loop state, not an in-place buffer.
            buffers=lambda carry: (buffers(carry[0]), _buffers(carry[1])),
            kind="lax",
        )
        box.append(rec)
        return final_state

    return outer, inner, box
