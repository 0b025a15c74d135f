"""Backward half of the diffrax adapter: the reverse sweep over the recorded steps.

For the accepted steps ``n = N-1, ..., 0`` (a ``lax.while_loop``), with
``lam = dL/dy_{n+1}``:

1. Outputs written during step ``n`` add their cotangents: a ``SaveAt(steps=...)``
   value is ``y_{n+1}`` (adds to ``lam``); a ``SaveAt(ts=...)`` value is diffrax's
   interpolant ``I(t; y_n, y_{n+1}, K)``, linear in ``(y_n, y_{n+1}, K)``, so its VJP
   adds to ``lam``, to the cotangent of ``y_n`` and to each ``kbar_i``, and gives
   ``dL/dt`` for the output time -- no vector-field call. A save function
   ``fn(t, y, args)`` (``SaveAt(fn=...)``, per ``SubSaveAt``) is differentiated at the
   saved ``(t, y)``; dense output's per-step ``(y0, y1, k)`` cotangents add to the same
   three places, and its times' to the step's ends.
2. The stage increments ``K_i = term.vf_prod(t_i, X_i, args, term.contr(t_n, t_{n+1}))``
   are recomputed from ``y_n`` (``checkpoint="states"``) or read back
   (``checkpoint="stages"``). diffrax's increments already contain the step, so the
   core kernels run with ``h = 1``: ``X_i = y_n + sum_j a_ij K_j``.
3. The core's reverse stage recursion (:func:`symplectic_adjoint.core.step.rk_step_vjp`)
   runs one stage VJP at a time: ``kbar_i = b_i lam + sum_{j>i} a_ji Xbar_j (+ output
   terms)``, then ``(Xbar_i, argsbar_i, termsbar_i) = VJP of vf_prod at stage i``.
   Stages whose cotangent is structurally zero (``b_i = 0`` and read by no later stage,
   e.g. the FSAL stage of Tsit5/Dopri5) are skipped.

The state ``y_n`` a step starts from is read from the record (``"states"``,
``"stages"``) or, under a budget of ``c`` states (``checkpoint=<int>``), rebuilt by
replaying the recorded steps (:func:`_budget_sweep`). Each replay is the forward step
``y_{n+1} = y_n + sum_i b_i K_i`` with the recorded ``t_n, t_{n+1}`` (never the
controller; for implicit solvers the solver's own step, root find included), i.e. the
same recomputation the reverse step does, so the gradient equals the ``"states"`` one to
rounding.

**Under vmap** every row has its own step count (and budget schedule). The loops run
while *any* row has work left and the per-stage conditionals are taken when any row
needs them (:mod:`._jax_branch`): a batched predicate would make JAX select the whole
carry -- the per-row parameter cotangents -- each iteration and turn the conditionals
into selects over per-row copies of the parameters. A row without work is *inactive*:
its parameter contributions are masked where they are added, its other carried values
kept (``step_adjoint``'s ``active``).

**Budget schedule.** The number of steps ``N`` is a traced value (an adaptive solve's
is known only when its forward pass ends), so the schedule is computed inside the
``lax.while_loop`` from an explicit task stack rather than planned ahead on the host
(:mod:`symplectic_adjoint.core.checkpointing` does that for PyTorch). A task
``(a, b, f)`` means "reverse steps ``b-1, ..., a``; ``y_a`` is in a slot and ``f``
further slots are free". With ``l = b - a``:

* ``l = 1``: reverse step ``a`` from the slot's ``y_a`` and free the slot;
* ``f = 0``: replay ``y_a -> y_{b-1}``, reverse step ``b-1``, push ``(a, b-1, 0)``;
* else split at ``m``: replay ``y_a -> y_m``, store ``y_m`` in a free slot, push
  ``(a, m, f)`` and then ``(m, b, f-1)``, so the right part is reversed first.

The stack therefore reverses the steps in the order ``N-1, ..., 0`` (as the
``"states"`` sweep does), and it holds at most ``c`` tasks (each owns the slot of its
``y_a``). It starts either with one task ``(0, N, c - 1)`` or, when that replays more,
with one task per segment between the states the forward pass kept (``_jax_record``),
``(p_k, p_{k+1}, c - 1 - k)`` with the last segment on top (:func:`_budget_sweep`).
With ``s = f + 1`` stored states including ``y_a``, ``beta(s, r) = C(s + r, s)`` and
``r`` the least integer with ``beta(s, r) >= l``, the split ``m = min(beta(s, r-1),
l - beta(s-1, r-1))`` is the binomial (Griewank--Walther
revolve) choice: it attains the minimal number of replayed steps ``T(l, f) = min_m [m +
T(m, f) + T(l-m, f-1)]`` (the core's ``binomial_split``, checked against that recursion
exhaustively for ``l < 200``, ``f <= 6``). Any ``m`` in ``(a, b)`` gives the same
gradient; only the replay count depends on it.
"""

from __future__ import annotations

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ..core.checkpointing import binomial_split, segment_replays_traced
from ..core.step import lincomb, rk_step, rk_step_vjp, stage_input
from ..core.tableau import ButcherTableau
from ._diffrax_compat import ω
from ._jax_branch import add_contribution, any_true, branch
from ._jax_record import Record

__all__ = ["Checkpoints", "Output", "reverse_sweep"]


def _tree_add(a: Any, b: Any) -> Any:
    return jtu.tree_map(jnp.add, a, b)


def _tree_where(pred: Any, a: Any, b: Any) -> Any:
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _mask(pred: Any, tree: Any) -> Any:
    return jtu.tree_map(lambda x: jnp.where(pred, x, jnp.zeros_like(x)), tree)


def _at(tree: Any, i: Any) -> Any:
    return jtu.tree_map(lambda b: b[i], tree)


class Checkpoints(eqx.Module):
    """Access to what the forward pass stored, step by step.

    ``budget`` is ``None`` when every state was stored, else the number ``c`` of states
    the reverse pass may hold (the record then has ``y_0`` only).
    """

    record: Record
    budget: int | None = eqx.field(default=None, static=True)

    def state(self, n: Any) -> Any:
        """``y_n``, the state at the start of step ``n`` (only ``n = 0`` under a budget)."""
        return _at(self.record.ys, n)

    def next_state(self, n: Any) -> Any:
        """``y_{n+1}``, the state diffrax computed at the end of step ``n``."""
        return _at(self.record.ys, n + 1)

    def increments(self, n: Any, stages: int) -> list | None:
        """The stored ``K_1..K_s`` of step ``n`` (``None`` unless stages were kept)."""
        if self.record.ks is None:
            return None
        ks = _at(self.record.ks, n)
        return [_at(ks, i) for i in range(stages)]


class Output(eqx.Module):
    """One ``SubSaveAt``'s outputs and their cotangents, for the reverse sweep.

    ``fn`` is its save function (``save_y`` for the state itself); ``t0``: slot 0 holds
    ``fn(t0, y0, args)``; ``t1_slot``: ``(index, pred)``, the slot ``_save_t1`` wrote and
    whether it holds the final value, or ``None``; ``ts``: the output times (or
    ``None``); ``steps``: ``SaveAt(steps=...)``; ``ybar``: the cotangent of the save
    buffer (materialised); ``need_ts_bar``: whether ``ts`` is differentiated;
    ``tsbar``: the cotangent of the buffer of save times (``sol.ts``), or ``None``.
    """

    fn: Any
    t0: bool = eqx.field(static=True)
    t1_slot: Any
    ts: Any
    steps: int = eqx.field(static=True)
    ybar: Any
    need_ts_bar: bool = eqx.field(static=True)
    tsbar: Any = None


def _tsbar_at(out: Output, slot: Any, pred: Any = True) -> Any:
    """The cotangent of save time ``slot`` of ``out`` (zero where ``pred`` is false)."""
    if out.tsbar is None:
        return 0.0
    return jnp.where(pred, out.tsbar[slot], 0.0)


def reverse_sweep(
    *,
    tableau: ButcherTableau,
    interpolation_cls: Any,
    has_k: bool,
    terms: Any,
    args: Any,
    checkpoints: Checkpoints,
    num_steps: Any,
    outputs: list[Output],
    dense_bar: Any,
    y_final: Any,
    t0: Any,
    t0_equals_t1: Any,
    dtimes: Any = None,
    implicit: Any = None,
    save_y: Any = None,
    event: Any = None,
) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """Cotangents of ``(y0, args, terms, saveat ts)`` from those of the saved outputs.

    Arguments:
        tableau: the solver's explicit tableau (diffrax's floats).
        interpolation_cls: the solver's local interpolation (``SaveAt(ts=...)``).
        has_k: whether the solver's dense information has ``k`` (all but ``Euler``).
        terms, args: the forward pass's terms and args (primal values).
        checkpoints: access to the recorded steps.
        num_steps: number of accepted steps ``N``.
        outputs: one :class:`Output` per ``SubSaveAt``.
        dense_bar: ``(infos_bar, ts_bar)``, the cotangents of ``SaveAt(dense=True)``'s
            buffers (``dense_infos[n]`` is step ``n``'s ``y0, y1, k``; ``dense_ts[n+1]``
            the time after step ``n``), or ``None``.
        y_final: the final state ``y_N`` (read by save functions at ``t1``).
        t0: the loop's ``t0`` (read by save functions at ``t0``).
        t0_equals_t1: a solve of zero length (outputs are copies of ``y_0``).
        dtimes: ``(D, 2, max_steps)`` forward-mode tangents of the recorded step ends
            ``(tprev_n, tnext_n)`` in ``D`` directions (the perturbed time inputs), or
            ``None`` when no time input is differentiated.
        save_y: diffrax's default save function (``fn`` is skipped for it).
        event: ``(cond_fn, happened, saved_ts, cond_kwargs)`` for a terminating event
            with a root finder (else ``None``): the event time ``t*`` solves
            ``g(t*) = 0`` inside the last step (``g`` = ``cond_fn`` of the interpolated
            state, or ``t_{N} - t`` for a boolean ``cond_fn``); the final value is the
            interpolant at ``t*``, and ``t*``'s cotangent goes by the implicit function
            theorem to everything ``g`` reads. ``saved_ts`` (the final save times per
            output) tells which slots were deleted after the event time.

    Returns:
        ``(y0_bar, args_bar, terms_bar, ts_bars, dir_bar, t0_bar, fn_bars)``; ``args_bar`` and
        ``terms_bar`` have the structure of ``eqx.filter(., eqx.is_inexact_array)``,
        ``ts_bars`` is one entry per output (``None`` where ``ts`` is not differentiated);
        ``dir_bar`` (``(D,)``, or ``None``) is the cotangent of the ``D`` tangent
        directions of ``dtimes``; ``t0_bar`` the cotangent on the loop's ``t0`` where a
        value is saved at ``t0`` itself (``fn(t0, y0, args)``, ``dense_ts[0]``);
        ``fn_bars`` the cotangents of the save functions' own arrays (one per output).
    """
    s = tableau.stages
    c = tableau.c
    diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
    diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)
    y_struct = checkpoints.state(0)
    num_steps = jnp.asarray(num_steps)
    time_dtype = jnp.result_type(checkpoints.record.tprev)
    zero_t = jnp.zeros((), time_dtype)

    # Whether any output is interpolated inside a step (or stored as dense output): only
    # then do the increments K_i and y_n get output cotangents.
    reads_k = dense_bar is not None or event is not None or any(o.ts is not None for o in outputs)

    # The save functions' own arrays (closure-converted: what they close over) are
    # differentiated like `args`.
    fn_parts = [eqx.partition(o.fn, eqx.is_inexact_array) for o in outputs]

    def call_fn(q, t, y, dargs, dfn):
        fn = eqx.combine(dfn, fn_parts[q][1])
        return fn(t, y, eqx.combine(dargs, static_args))

    def fn_vjp(q, t, y, out_bar):
        """``(t_bar, y_bar, (args_bar, fn_bar))`` of save function ``q`` at ``(t, y)``."""
        if outputs[q].fn is save_y:
            return zero_t, out_bar, None
        _, pull = jax.vjp(ft.partial(call_fn, q), t, y, diff_args, fn_parts[q][0])
        tb, yb, ab, fb = pull(out_bar)
        return tb, yb, (ab, fb)

    def add_args(acc, q, contrib, active=True):
        # acc = ((args_bar, terms_bar), [fn_bar per output]); nothing where not `active`.
        if contrib is None:
            return acc
        (args_bar, terms_bar), fn_bars = acc
        fn_bars = list(fn_bars)
        fn_bars[q] = add_contribution(fn_bars[q], contrib[1], active)
        return (add_contribution(args_bar, contrib[0], active), terms_bar), fn_bars

    def after_tangent(n):
        # d(time after step n)/d(directions): the next step's start, or the last end.
        nxt = jnp.minimum(n + 1, dtimes.shape[2] - 1)
        return jnp.where(n + 1 < num_steps, dtimes[:, 0, nxt], dtimes[:, 1, n])

    acc0 = jtu.tree_map(jnp.zeros_like, ((diff_args, diff_terms), [p[0] for p in fn_parts]))
    dir0 = None if dtimes is None else jnp.zeros(dtimes.shape[0], dtimes.dtype)
    t0_bar = zero_t
    lam = jtu.tree_map(jnp.zeros_like, y_struct)
    for q, out in enumerate(outputs):
        if out.t1_slot is None:
            continue
        index, pred = out.t1_slot
        # The final time is the last step's end (t0 for a solve without steps).
        t_final = jnp.where(
            num_steps > 0, checkpoints.record.tnext[jnp.maximum(num_steps - 1, 0)], t0
        )
        if event is not None:
            pred = pred & ~event[1]  # else the value at the event time (below)
        out_bar = _mask(pred, _at(out.ybar, index))
        tb, yb, ab = fn_vjp(q, t_final, y_final, out_bar)
        # The slot's save time is the final time too.
        tb = tb + _tsbar_at(out, index, pred)
        lam = _tree_add(lam, yb)
        acc0 = add_args(acc0, q, ab)
        if out.fn is not save_y or out.tsbar is not None:
            if dir0 is not None:
                last = jnp.maximum(num_steps - 1, 0)
                dir0 = dir0 + jnp.where(num_steps > 0, tb, 0.0) * dtimes[:, 1, last]
            t0_bar = t0_bar + jnp.where(num_steps > 0, 0.0, tb)
    ts_bars = [None if o.ts is None else jnp.zeros_like(o.ts) for o in outputs]

    def interp_vjp(q, t, out_bar, tprev, tnext, y_n, y_n1, k_stacked):
        # diffrax's interpolant is linear in (y_n, y_{n+1}, K): its VJP calls no network.
        plain = outputs[q].fn is save_y

        def interp(_t, _y0, _y1, _k, _tp, _tn, _dargs, _dfn):
            info = dict(y0=_y0, y1=_y1, k=_k) if has_k else dict(y0=_y0, y1=_y1)
            y = interpolation_cls(t0=_tp, t1=_tn, **info).evaluate(_t)
            return y if plain else call_fn(q, _t, y, _dargs, _dfn)

        dargs, dfn = (None, None) if plain else (diff_args, fn_parts[q][0])
        _, pull = jax.vjp(interp, t, y_n, y_n1, k_stacked, tprev, tnext, dargs, dfn)
        *bars, da, df = pull(out_bar)
        return (*bars, None if plain else (da, df))

    def stage_time(i, tprev, tnext):
        # As diffrax: a node with c_i = 1 is exactly t1 (no rounding of t0 + dt).
        return tnext if c[i] == 1 else tprev + c[i] * (tnext - tprev)

    def step_data(n):
        # The recorded ends of step n, its control and its stage times.
        tprev = checkpoints.record.tprev[n]
        tnext = checkpoints.record.tnext[n]
        control = terms.contr(tprev, tnext)
        times = [stage_time(i, tprev, tnext) for i in range(s)]
        return tprev, tnext, control, times

    def replay(n, y_n):
        # y_{n+1} from y_n over the recorded step n (budgets only): the recomputation
        # that `step_adjoint` does, plus the update with the weights b.
        tprev, tnext, control, times = step_data(n)
        if implicit is not None:  # the solver's own step, root find included
            return implicit.step(terms, args, tprev, tnext, y_n)[0]

        def f(i, X):
            return ω(terms.vf_prod(times[i], X.ω, args, control))

        return rk_step(tableau, f, ω(y_n), 1, check=False).y1.ω

    def step_outputs(n, y_n, ks, lam, acc, ts_bars, active):
        """The cotangents of everything step ``n`` wrote: added to ``lam``, to ``y_n``
        (``y0_extra``), to the increments (``k_extra``), to ``args`` (``acc``), to the
        output times, to the step's ends (``t_pair``) and to the time after the step."""
        tprev, tnext, _, _ = step_data(n)
        rec = checkpoints.record
        y0b = jtu.tree_map(jnp.zeros_like, y_n)
        y1b = jtu.tree_map(jnp.zeros_like, y_n)
        k_stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *ks) if has_k else None
        kb = jtu.tree_map(jnp.zeros_like, k_stacked)
        t_pair = jnp.zeros(2, time_dtype)
        t_after = zero_t
        if checkpoints.budget is None:
            y_n1 = checkpoints.next_state(n)
        else:
            # Not stored: rebuild it from the stages (only the output cotangents read its
            # value; rounding-level differences to diffrax's y_{n+1}).
            if implicit is not None:
                y_n1 = implicit.advance(y_n, ks)
            else:
                y_n1 = lincomb(ω(y_n), 1, tableau.b, [ω(k) for k in ks]).ω
        ts_bars = list(ts_bars)
        for q, out in enumerate(outputs):
            save_before, save_after = rec.save_before[n, q], rec.save_after[n, q]
            ts_before, ts_after = rec.ts_before[n, q], rec.ts_after[n, q]
            if out.steps:
                saved = (save_after - save_before) > (ts_after - ts_before)
                out_bar = _mask(saved, _at(out.ybar, save_after - 1))
                # Saved at the time after the step, from y_{n+1}.
                tb, yb, ab = fn_vjp(q, rec.tnext[n], y_n1, out_bar)
                y1b = _tree_add(y1b, yb)
                acc = add_args(acc, q, ab, active)
                # The slot's save time is the time after the step.
                t_after = t_after + tb + _tsbar_at(out, save_after - 1, saved)
            if out.ts is not None:
                ts = out.ts

                def out_cond(carry, ts_after=ts_after):
                    return carry[0] < ts_after

                def out_body(carry, q=q, ts=ts, save_before=save_before, ts_before=ts_before):
                    j, y0b, y1b, kb, tsb, tpair, acc = carry
                    slot = save_before + (j - ts_before)
                    out_bar = _at(outputs[q].ybar, slot)
                    holds = True
                    if event is not None:
                        # Deleted after the event time (inf), or overwritten by the final
                        # value: the slot no longer holds this output.
                        holds = event[2][q][slot] == ts[j]
                        out_bar = _mask(holds, out_bar)
                    # The slot's save time is ts[j] itself.
                    tsb = tsb.at[j].add(_tsbar_at(outputs[q], slot, holds))
                    tb, d0, d1, dk, dtp, dtn, da = interp_vjp(
                        q, ts[j], out_bar, tprev, tnext, y_n, y_n1, k_stacked
                    )
                    if has_k:
                        kb = _tree_add(kb, dk)
                    tpair = tpair + jnp.stack([dtp, dtn])
                    y0b, y1b = _tree_add(y0b, d0), _tree_add(y1b, d1)
                    acc = add_args(acc, q, da, active)
                    return j + 1, y0b, y1b, kb, tsb.at[j].add(tb), tpair, acc

                _, y0b, y1b, kb, ts_bars[q], t_pair, acc = lax.while_loop(
                    out_cond, out_body, (ts_before, y0b, y1b, kb, ts_bars[q], t_pair, acc)
                )
        if dense_bar is not None:
            infos_bar, dts_bar = dense_bar
            info = _at(infos_bar, n)
            y0b = _tree_add(y0b, info["y0"])
            y1b = _tree_add(y1b, info["y1"])
            if has_k:
                kb = _tree_add(kb, info["k"])
            t_after = t_after + dts_bar[n + 1]
        if ev_extra is not None:
            last, ey0, ek, epair = ev_extra
            here = n == last
            y0b = _tree_add(y0b, _mask(here, ey0))
            kb = _tree_add(kb, _mask(here, ek))
            t_pair = t_pair + jnp.where(here, epair, 0.0)
        lam = _tree_add(lam, y1b)
        # Structural zeros stay None, so stages nobody reads are skipped (FSAL stages).
        k_extra = [ω(_at(kb, i)) for i in range(s)] if has_k and reads_k else None
        return acc, (y0b if reads_k else None), k_extra, ts_bars, t_pair, t_after, lam

    def stages(n, y_n):
        """The increments ``K_i`` and stage inputs ``X_i`` of step ``n`` from ``y_n``."""
        tprev, tnext, control, times = step_data(n)

        def vf_prod(i, X):
            return terms.vf_prod(times[i], X, args, control)

        ks = checkpoints.increments(n, s)
        X: list = []
        if implicit is not None:  # stages by the solver's own root find
            ks, X = implicit.stages(terms, args, tprev, tnext, y_n, ks)
        elif ks is None:
            ks = []
            for i in range(s):
                X.append(stage_input(tableau, i, ω(y_n), 1, [ω(k) for k in ks]).ω)
                # Unused increments (e.g. an FSAL stage nobody reads) are dead code for XLA.
                ks.append(vf_prod(i, X[i]))
        else:
            for i in range(s):
                X.append(stage_input(tableau, i, ω(y_n), 1, [ω(k) for k in ks]).ω)
        return ks, X

    ev_extra = None
    t1_outs = [q for q, o in enumerate(outputs) if o.t1_slot is not None]
    if event is not None and t1_outs:
        cond_fn, happened, saved_ts, cond_kwargs = event
        last = jnp.maximum(num_steps - 1, 0)
        y_l, y_l1 = checkpoints.state(last), checkpoints.next_state(last)
        ks_l, _ = stages(last, y_l)
        k_l = jtu.tree_map(lambda *xs: jnp.stack(xs), *ks_l)
        tp_l, tn_l = checkpoints.record.tprev[last], checkpoints.record.tnext[last]
        q0 = t1_outs[0]
        t_star = saved_ts[q0][outputs[q0].t1_slot[0]]

        def interp_at(t, y0, y1, k, tp, tn):
            info = dict(y0=y0, y1=y1, k=k) if has_k else dict(y0=y0, y1=y1)
            return interpolation_cls(t0=tp, t1=tn, **info).evaluate(t)

        primals = (t_star, y_l, y_l1, k_l, tp_l, tn_l)
        y_star, interp_pull = jax.vjp(interp_at, *primals)
        t_bar, y_star_bar = zero_t, jtu.tree_map(jnp.zeros_like, y_star)
        for q in t1_outs:
            out_bar = _mask(happened, _at(outputs[q].ybar, outputs[q].t1_slot[0]))
            tb, yb, ab = fn_vjp(q, t_star, y_star, out_bar)
            # The slot's save time is the event time t* too.
            tb = tb + _tsbar_at(outputs[q], outputs[q].t1_slot[0], happened)
            t_bar, y_star_bar = t_bar + tb, _tree_add(y_star_bar, yb)
            acc0 = add_args(acc0, q, ab)
        tI, d0, d1, dk, dtp, dtn = interp_pull(y_star_bar)
        t_bar = t_bar + tI
        is_bool = jnp.issubdtype(
            jax.eval_shape(lambda: cond_fn(t=t_star, y=y_star, args=args, **cond_kwargs)).dtype,
            jnp.bool_,
        )

        def g(t, y0, y1, k, tp, tn, dargs):
            if is_bool:  # the root is the end of the last step
                return tn - t
            y = interp_at(t, y0, y1, k, tp, tn)
            return cond_fn(t=t, y=y, args=eqx.combine(dargs, static_args), **cond_kwargs)

        # Implicit function theorem: dt*/dtheta = -g_theta / g_t at the root found.
        g_t = jax.grad(g)(*primals, diff_args)
        _, g_pull = jax.vjp(g, *primals, diff_args)
        _, e0, e1, ek, etp, etn, eargs = g_pull(
            jnp.where(happened, -t_bar / g_t, 0.0).astype(jnp.result_type(g_t))
        )
        lam = _tree_add(lam, _tree_add(d1, e1))
        acc0 = ((_tree_add(acc0[0][0], eargs), acc0[0][1]), acc0[1])
        ev_extra = (
            last,
            _tree_add(d0, e0),
            _tree_add(dk, ek) if has_k else None,
            jnp.stack([dtp + etp, dtn + etn]),
        )

    def step_adjoint(n, y_n, lam, acc, ts_bars, active):
        """The adjoint of step ``n`` from ``y_n``: the new ``(lam, acc, ts_bars)``, and the
        old ones where ``active`` is false (a row of a vmapped sweep that is done, or not
        reversing a step this round). Parameter cotangents are masked where they are
        added, so the large accumulators are updated in place, never selected whole."""
        old = (lam, acc, ts_bars)
        acc, dir_bar = acc  # acc = ((args_bar, terms_bar), fn_bars)
        acc, fn_bars = acc
        tprev, tnext, _, _ = step_data(n)
        ks, X = stages(n, y_n)
        (acc, fn_bars), y0_extra, k_extra, ts_bars, t_pair, t_after, lam = step_outputs(
            n, y_n, ks, lam, (acc, fn_bars), ts_bars, active
        )

        def stage_vjp(i, Xi, kbar, carry):
            # The control (e.g. a CDE's interpolated path, or dt for an ODE) and the stage
            # time are computed inside the differentiated function: their data and the
            # step's ends get their cotangents here.
            def f(_X, _diff_args, _diff_terms, _tp, _tn):
                _terms = eqx.combine(_diff_terms, static_terms)
                _args = eqx.combine(_diff_args, static_args)
                return _terms.vf_prod(stage_time(i, _tp, _tn), _X, _args, _terms.contr(_tp, _tn))

            def linearise_and_pull(operands):
                _X, _kbar, (acc, pair) = operands
                _, pull = jax.vjp(f, _X, diff_args, diff_terms, tprev, tnext)
                _Xbar, args_bar, terms_bar, tp_bar, tn_bar = pull(_kbar)
                pair = pair + jnp.stack([tp_bar, tn_bar])
                return _Xbar, _kbar, (add_contribution(acc, (args_bar, terms_bar), active), pair)

            # One network graph at a time. Left in the open, XLA linearises every stage
            # of the step before the first pull-back (the X_i are all known) and fuses
            # the parameter-cotangent sum into one late add, so s graphs and s parameter
            # cotangents are alive together; an optimisation barrier does not survive
            # the CPU pipeline. A conditional's branch is a separate computation whose
            # buffers live only while it runs, so each stage is linearised, pulled back
            # and accumulated inside one. The predicate (``active``) is true whenever a
            # step is reversed but opaque to the compiler, so the branch is not inlined;
            # it stays a separate computation under vmap (`branch`).
            Xbar, _, carry = branch(active, linearise_and_pull, (Xi.ω, kbar.ω, carry))
            return ω(Xbar), None, carry

        if implicit is not None:
            # Implicit/IMEX steps: the core's implicit adjoint with transposed solves; the
            # stage functions' VJPs give the step's end-time cotangents too.
            y0_bar, (acc, t_pair) = implicit.step_vjp(
                terms, args, active, tprev, tnext, stage_time, X, lam, k_extra, y0_extra,
                (acc, t_pair),
            )  # fmt: skip
            y0_bar = ω(y0_bar)
        else:
            result = rk_step_vjp(
                tableau,
                stage_vjp,
                ω(lam),
                [ω(x) for x in X],
                1,
                k_bar=k_extra,
                y0_bar=None if y0_extra is None else ω(y0_extra),
                carry=(acc, t_pair),
            )
            (acc, t_pair), y0_bar = result.carry, result.y0_bar
        if dir_bar is not None:
            # Chain (tprev_n, tnext_n) and the time after the step onto the perturbed
            # time inputs.
            dir_bar = dir_bar + dtimes[:, :, n] @ t_pair + t_after * after_tangent(n)
        (old_lam, ((_, old_fn_bars), old_dir_bar), old_ts_bars) = old
        lam, fn_bars, dir_bar, ts_bars = _tree_where(
            active,
            (y0_bar.ω, fn_bars, dir_bar, ts_bars),
            (old_lam, old_fn_bars, old_dir_bar, old_ts_bars),
        )
        return lam, ((acc, fn_bars), dir_bar), ts_bars

    acc0 = (acc0, dir0)

    # Under vmap each row has its own step count; the loop runs while any row has steps
    # left (an unbatched predicate, so JAX does not select the whole carry -- the
    # parameter cotangents -- between iterations) and a row with none is inactive: it
    # revisits step 0 and its results are masked (`step_adjoint`).
    def cond(carry):
        return any_true(carry[0] >= 0)

    def body(carry):
        n, lam, acc, ts_bars = carry
        m = jnp.maximum(n, 0)
        lam, acc, ts_bars = step_adjoint(m, checkpoints.state(m), lam, acc, ts_bars, n >= 0)
        return n - 1, lam, acc, ts_bars

    if checkpoints.budget is None:
        _, lam, (acc, dir_bar), ts_bars = lax.while_loop(
            cond, body, (num_steps - 1, lam, acc0, ts_bars)
        )
    else:
        rec = checkpoints.record
        (lam, (acc, dir_bar), ts_bars), _ = _budget_sweep(
            checkpoints.budget,
            checkpoints.state(0),
            num_steps,
            replay,
            step_adjoint,
            (lam, acc0, ts_bars),
            stored=(rec.ys, rec.pos, rec.stride),
        )

    y0 = checkpoints.state(0)
    for q, out in enumerate(outputs):
        if out.t0:
            tb, yb, ab = fn_vjp(q, t0, y0, _at(out.ybar, 0))
            lam = _tree_add(lam, yb)
            acc = add_args(acc, q, ab)
            t0_bar = t0_bar + tb + _tsbar_at(out, 0)
        if out.ts is not None:
            # A zero-length solve writes fn(t0, y_0) into every `ts` slot (diffrax's
            # t0 == t1 case).
            lo, hi = (1 if out.t0 else 0), (1 if out.t0 else 0) + len(out.ts)
            copies = jtu.tree_map(
                lambda b, lo=lo, hi=hi: jnp.where(t0_equals_t1, jnp.sum(b[lo:hi], axis=0), 0.0),
                out.ybar,
            )
            tb, yb, ab = fn_vjp(q, t0, y0, copies)
            lam = _tree_add(lam, yb)
            acc = add_args(acc, q, ab)
            t0_bar = t0_bar + tb
            if out.tsbar is not None:
                # ... and their save times are t0.
                t0_bar = t0_bar + jnp.where(t0_equals_t1, jnp.sum(out.tsbar[lo:hi]), 0.0)
    if dense_bar is not None:
        t0_bar = t0_bar + dense_bar[1][0]
    (args_bar, terms_bar), fn_bars = acc
    ts_bars = [tb if o.need_ts_bar else None for o, tb in zip(outputs, ts_bars, strict=True)]
    return lam, args_bar, terms_bar, ts_bars, dir_bar, t0_bar, fn_bars


def _segments(c: int, num_steps: Any, stride: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Segment ``k`` of the stored plan: ``[starts[k], ends[k])`` between the kept
    ``y_{k stride}`` and the next kept state (or ``y_N``), present where ``segments[k]``,
    reversed with ``frees[k] = c - 1 - k`` free slots (int32 arrays of length ``c``)."""
    k = jnp.arange(c, dtype=jnp.int32)
    starts = k * stride
    ends = jnp.minimum(starts + stride, num_steps)
    return k, starts, ends, starts < num_steps, c - 1 - k


# The largest l with l (l - 1) < 2^31: past it a segment reversed without a free slot
# (l (l - 1) / 2 replays) has a count that int32 cannot hold.
_QUADRATIC_MAX = 46341


def _plan_replays(c: int, num_steps: Any, stride: Any) -> tuple[Any, Any]:
    """Replays of the two plans of :func:`_budget_sweep`: the segments between the states
    kept at multiples of ``stride``, and ``y_0`` alone (float32, to compare).

    A segment reversed without a free slot past ``_QUADRATIC_MAX`` steps counts
    ``2^31 - 1`` (its true count leaves int32, and a wrapped one could come out small or
    negative and pick a plan replaying orders of magnitude more); the sum is taken in
    float32, which holds ``c`` such counts (exact below ``2^24``; above, a rounding can
    only swap plans within a relative ``6e-8`` of each other). Within
    :func:`binomial_split`'s bound the other counts fit int32.
    """

    def replays(length, free):
        count = segment_replays_traced(
            length, free, while_loop=lax.while_loop, where=jnp.where, maximum=jnp.maximum
        )
        wraps = (free == 0) & (length > _QUADRATIC_MAX)
        return jnp.where(wraps, 2**31 - 1, count).astype(jnp.float32)

    _, starts, ends, segments, frees = _segments(c, num_steps, stride)
    cost_stored = jnp.sum(jnp.where(segments, jax.vmap(replays)(ends - starts, frees), 0))
    return cost_stored, replays(num_steps, jnp.asarray(c - 1, jnp.int32))


def _budget_sweep(
    budget: int,
    y0: Any,
    num_steps: Any,
    replay: Any,
    step_adjoint: Any,
    carry: tuple[Any, Any, Any],
    *,
    stored: tuple[Any, Any, Any] | None = None,
) -> tuple[tuple[Any, Any, Any], Any]:
    """Reverse steps ``num_steps-1, ..., 0`` holding at most ``budget`` states.

    ``replay(n, y_n) -> y_{n+1}``; ``step_adjoint(n, y_n, lam, acc, ts_bar, active)`` is
    the adjoint of step ``n`` where ``active`` (its old carry elsewhere); ``carry = (lam,
    acc, ts_bar)``. The schedule is the task stack of the module docstring, run inside
    one ``lax.while_loop`` (``num_steps`` is traced; under vmap each row has its own).

    ``stored = (slots, pos, stride)``: what the forward pass kept (``_jax_record``:
    ``budget`` slots, slot ``j`` holding ``y_{pos[j]}``, every multiple of ``stride`` up
    to ``num_steps`` held, ``pos[0] = 0``); ``None``: ``y0`` alone. The sweep then starts
    from whichever of two plans replays fewer steps: one task per segment between
    consecutive stored states, the last first, the ``k``-th with the ``budget - 1 - k``
    slots the earlier ones leave free (``sum_k T(l_k, budget - 1 - k)``); or one task
    from ``y_0`` alone (``T(num_steps, budget - 1)``), which wins when the stride has
    grown large against the free slots (few states, long solves).

    Returns the final ``(lam, acc, ts_bar)`` and the number of replayed steps.
    """
    c = budget
    i32 = jnp.int32
    num_steps = num_steps.astype(i32)
    if stored is None:
        slots = jtu.tree_map(
            lambda x: jnp.zeros((c, *jnp.shape(x)), jnp.result_type(x)).at[0].set(x), y0
        )
        pos, stride = jnp.full(c, -1, i32).at[0].set(0), num_steps + 1
    else:
        slots, pos, stride = stored
        pos, stride = pos.astype(i32), jnp.maximum(stride.astype(i32), 1)

    # Slot j holds the state y_{pos[j]}; pos[j] = -1 marks a free slot (y_N, if kept,
    # starts no task).
    k, starts, ends, segments, frees = _segments(c, num_steps, stride)
    cost_stored, cost_y0 = _plan_replays(c, num_steps, stride)
    use_stored = cost_stored < cost_y0
    only_y0 = jnp.where(k == 0, 0, -1)
    pos = jnp.where(use_stored, jnp.where(pos < num_steps, pos, -1), only_y0).astype(i32)
    # At most c tasks are pending (each owns the slot of its start state); one spare
    # entry keeps the masked writes of the last push in range. Task k is segment k, so
    # the last segment is on top.
    depth = c + 1
    per_segment = jnp.stack([starts, ends, frees], axis=1)
    from_y0 = jnp.where(
        (k == 0)[:, None], jnp.stack([jnp.asarray(0, i32), num_steps, jnp.asarray(c - 1, i32)]), 0
    )
    stack = jnp.zeros((depth, 3), i32).at[:c].set(jnp.where(use_stored, per_segment, from_y0))
    top = jnp.where(
        num_steps > 0, jnp.where(use_stored, jnp.sum(segments.astype(i32)), 1), 0
    ).astype(i32)

    # As in the "states" sweep: under vmap the loop runs while any row has tasks left
    # (an unbatched predicate), and a row with none changes nothing.
    def cond(state):
        return any_true(state[0] > 0)

    def body(state):
        top, stack, slots, pos, replayed, carry = state
        live = top > 0
        top = jnp.maximum(top - 1, 0)
        a, b, f = stack[top, 0], stack[top, 1], stack[top, 2]
        length = b - a
        leaf = live & (length == 1)
        tail = live & (length > 1) & (f == 0)
        split = live & (length > 1) & (f > 0)
        m = a + binomial_split(
            jnp.maximum(length, 2),
            jnp.maximum(f, 1),
            while_loop=lax.while_loop,
            minimum=jnp.minimum,
        )
        # The state to rebuild: y_a itself (leaf), y_{b-1} (tail) or y_m (split).
        target = jnp.where(leaf | ~live, a, jnp.where(tail, b - 1, m))
        slot_a = jnp.argmax(pos == a)
        y_a = _at(slots, slot_a)
        y_t = lax.fori_loop(a, target, replay, y_a)
        replayed = replayed + (target - a)

        # Leaf and tail reverse step `target`; a split reverses nothing this round.
        reverse = leaf | tail
        carry = branch(reverse, lambda cr: step_adjoint(target, y_t, *cr, reverse), carry)

        free = jnp.argmax(pos < 0)
        slots = jtu.tree_map(
            lambda buf, y: buf.at[free].set(jnp.where(split, y, buf[free])), slots, y_t
        )
        pos = pos.at[free].set(jnp.where(split, m, pos[free]))
        pos = pos.at[slot_a].set(jnp.where(leaf, -1, pos[slot_a]))

        # Pushes: tail (a, b-1, 0); split (a, m, f) then (m, b, f-1) on top.
        first = jnp.stack([a, jnp.where(tail, b - 1, m), jnp.where(tail, 0, f)])
        second = jnp.stack([m, b, f - 1])
        stack = stack.at[top].set(jnp.where(tail | split, first, stack[top]))
        stack = stack.at[top + 1].set(jnp.where(split, second, stack[top + 1]))
        top = jnp.where(live, top + jnp.where(tail, 1, 0) + jnp.where(split, 2, 0), 0)
        return top, stack, slots, pos, replayed, carry

    state = (top, stack, slots, pos, jnp.asarray(0, i32), carry)
    *_, replayed, carry = lax.while_loop(cond, body, state)
    return carry, replayed
