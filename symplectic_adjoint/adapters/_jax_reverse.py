"""Backward half of the diffrax adapter: the reverse sweep over the recorded steps.

For the accepted steps ``n = N-1, ..., 0`` (a ``lax.while_loop``), with
``lam = dL/dy_{n+1}``:

1. Outputs written during step ``n`` add their cotangents: a ``SaveAt(steps=...)``
   value is ``y_{n+1}`` (adds to ``lam``); a ``SaveAt(ts=...)`` value is diffrax's
   interpolant ``I(t; y_n, y_{n+1}, K)``, linear in ``(y_n, y_{n+1}, K)``, so its VJP
   adds to ``lam``, to the cotangent of ``y_n`` and to each ``kbar_i``, and gives
   ``dL/dt`` for the output time -- no vector-field call.
2. The stage increments ``K_i = term.vf_prod(t_i, X_i, args, term.contr(t_n, t_{n+1}))``
   are recomputed from ``y_n`` (``checkpoint="states"``) or read back
   (``checkpoint="stages"``). diffrax's increments already contain the step, so the
   core kernels run with ``h = 1``: ``X_i = y_n + sum_j a_ij K_j``.
3. The core's reverse stage recursion (:func:`symplectic_adjoint.core.step.rk_step_vjp`)
   runs one stage VJP at a time: ``kbar_i = b_i lam + sum_{j>i} a_ji Xbar_j (+ output
   terms)``, then ``(Xbar_i, argsbar_i, termsbar_i) = VJP of vf_prod at stage i``.
   Stages whose cotangent is structurally zero (``b_i = 0`` and read by no later stage,
   e.g. the FSAL stage of Tsit5/Dopri5) are skipped.

The state ``y_n`` a step starts from is obtained through :meth:`Checkpoints.state`, the
one place that a budgeted scheme (recompute ``y_n`` from an earlier stored state by
replaying the recorded step sizes) will change.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import ω

from ..core.step import lincomb, rk_step_vjp
from ..core.tableau import ButcherTableau
from ._jax_record import Record

__all__ = ["Checkpoints", "reverse_sweep"]


def _tree_add(a: Any, b: Any) -> Any:
    return jtu.tree_map(jnp.add, a, b)


def _tree_where(pred: Any, a: Any, b: Any) -> Any:
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _at(tree: Any, i: Any) -> Any:
    return jtu.tree_map(lambda b: b[i], tree)


class Checkpoints(eqx.Module):
    """Access to what the forward pass stored, step by step."""

    record: Record

    def state(self, n: Any) -> Any:
        """``y_n``, the state at the start of step ``n`` (every state is stored)."""
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


def reverse_sweep(
    *,
    tableau: ButcherTableau,
    interpolation_cls: Any,
    has_k: bool,
    terms: Any,
    args: Any,
    checkpoints: Checkpoints,
    num_steps: Any,
    ybar: Any,
    t0_slot: bool,
    t1_slot: Any,
    ts: Any,
    need_ts_bar: bool,
    steps: int,
    t0_equals_t1: Any,
) -> tuple[Any, Any, Any, Any]:
    """Cotangents of ``(y0, args, terms, saveat ts)`` from those of the save buffer.

    Arguments:
        tableau: the solver's explicit tableau (diffrax's floats).
        interpolation_cls: the solver's local interpolation (``SaveAt(ts=...)``).
        has_k: whether the solver's dense information has ``k`` (all but ``Euler``).
        terms, args: the forward pass's terms and args (primal values).
        checkpoints: access to the recorded steps.
        num_steps: number of accepted steps ``N``.
        ybar: cotangent of the save buffer ``save_state.ys`` (materialised).
        t0_slot: whether slot 0 holds ``y_0`` (``SaveAt(t0=True)``).
        t1_slot: ``(index, pred)``: the slot ``_save_t1`` wrote, and whether it holds
            the final state (an array or Python bool), or ``None``.
        ts: the ``SaveAt(ts=...)`` times (or ``None``).
        need_ts_bar: whether the output times are differentiated.
        steps: ``SaveAt(steps=...)`` (``0`` for none).
        t0_equals_t1: a solve of zero length (outputs are copies of ``y_0``).

    Returns:
        ``(y0_bar, args_bar, terms_bar, ts_bar)``; ``args_bar``/``terms_bar`` have the
        structure of ``eqx.filter(., eqx.is_inexact_array)``, ``ts_bar`` is ``None`` when
        ``ts`` is.
    """
    s = tableau.stages
    a, c = tableau.a, tableau.c
    diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
    diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)
    y_struct = checkpoints.state(0)

    lam = jtu.tree_map(jnp.zeros_like, y_struct)
    if t1_slot is not None:
        index, pred = t1_slot
        lam = _tree_where(pred, _tree_add(lam, _at(ybar, index)), lam)
    ts_bar = None if ts is None else jnp.zeros_like(ts)

    def interp_vjp(t, out_bar, tprev, tnext, y_n, y_n1, k_stacked):
        # diffrax's interpolant is linear in (y_n, y_{n+1}, K): its VJP calls no network.
        def interp(_t, _y0, _y1, _k):
            info = dict(y0=_y0, y1=_y1, k=_k) if has_k else dict(y0=_y0, y1=_y1)
            return interpolation_cls(t0=tprev, t1=tnext, **info).evaluate(_t)

        _, pull = jax.vjp(interp, t, y_n, y_n1, k_stacked)
        return pull(out_bar)

    def step_adjoint(n, lam, acc, ts_bar):
        tprev = checkpoints.record.tprev[n]
        tnext = checkpoints.record.tnext[n]
        y_n = checkpoints.state(n)
        control = terms.contr(tprev, tnext)
        dt = tnext - tprev
        # diffrax evaluates a node with c_i = 1 at exactly t1 (no rounding of t0 + dt).
        times = [tnext if ci == 1 else tprev + ci * dt for ci in c]

        def vf_prod(i, X):
            return terms.vf_prod(times[i], X, args, control)

        ks = checkpoints.increments(n, s)
        X: list = []
        if ks is None:
            ks = []
            for i in range(s):
                X.append(lincomb(ω(y_n), 1, a[i][:i], [ω(k) for k in ks]).ω)
                # Unused increments (e.g. an FSAL stage nobody reads) are dead code for XLA.
                ks.append(vf_prod(i, X[i]))
        else:
            for i in range(s):
                X.append(lincomb(ω(y_n), 1, a[i][:i], [ω(k) for k in ks]).ω)

        save_before = checkpoints.record.save_before[n]
        save_after = checkpoints.record.save_after[n]
        ts_before = checkpoints.record.ts_before[n]
        ts_after = checkpoints.record.ts_after[n]
        y0_extra = None
        k_extra = None
        if steps:
            saved = (save_after - save_before) > (ts_after - ts_before)
            lam = _tree_where(saved, _tree_add(lam, _at(ybar, save_after - 1)), lam)
        if ts is not None:
            y_n1 = checkpoints.next_state(n)
            k_stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *ks) if has_k else None
            zero_y = jtu.tree_map(jnp.zeros_like, y_n)
            zero_k = jtu.tree_map(jnp.zeros_like, k_stacked)

            def out_cond(carry):
                return carry[0] < ts_after

            def out_body(carry):
                j, y0b, y1b, kb, tsb = carry
                out_bar = _at(ybar, save_before + (j - ts_before))
                tb, d0, d1, dk = interp_vjp(ts[j], out_bar, tprev, tnext, y_n, y_n1, k_stacked)
                if has_k:
                    kb = _tree_add(kb, dk)
                return j + 1, _tree_add(y0b, d0), _tree_add(y1b, d1), kb, tsb.at[j].add(tb)

            _, y0_extra, y1b, kb, ts_bar = lax.while_loop(
                out_cond, out_body, (ts_before, zero_y, zero_y, zero_k, ts_bar)
            )
            lam = _tree_add(lam, y1b)
            if has_k:
                k_extra = [ω(_at(kb, i)) for i in range(s)]

        def stage_vjp(i, Xi, kbar, carry):
            def f(_X, _diff_args, _diff_terms):
                _terms = eqx.combine(_diff_terms, static_terms)
                return _terms.vf_prod(times[i], _X, eqx.combine(_diff_args, static_args), control)

            _, pull = jax.vjp(f, Xi.ω, diff_args, diff_terms)
            Xbar, args_bar, terms_bar = pull(kbar.ω)
            return ω(Xbar), None, _tree_add(carry, (args_bar, terms_bar))

        result = rk_step_vjp(
            tableau,
            stage_vjp,
            ω(lam),
            [ω(x) for x in X],
            1,
            k_bar=k_extra,
            y0_bar=None if y0_extra is None else ω(y0_extra),
            carry=acc,
        )
        return result.y0_bar.ω, result.carry, ts_bar

    acc0 = jtu.tree_map(jnp.zeros_like, (diff_args, diff_terms))

    def cond(carry):
        return carry[0] >= 0

    def body(carry):
        n, lam, acc, ts_bar = carry
        lam, acc, ts_bar = step_adjoint(n, lam, acc, ts_bar)
        return n - 1, lam, acc, ts_bar

    _, lam, (args_bar, terms_bar), ts_bar = lax.while_loop(
        cond, body, (jnp.asarray(num_steps) - 1, lam, acc0, ts_bar)
    )

    if t0_slot:
        lam = _tree_add(lam, _at(ybar, 0))
    if ts is not None:
        # A zero-length solve writes y_0 into every `ts` slot (diffrax's t0 == t1 case).
        first = 1 if t0_slot else 0
        copies = jtu.tree_map(lambda b: jnp.sum(b[first : first + len(ts)], axis=0), ybar)
        lam = _tree_where(t0_equals_t1, _tree_add(lam, copies), lam)
    return lam, args_bar, terms_bar, (ts_bar if need_ts_bar else None)
