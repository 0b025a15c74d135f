"""A conditional that stays a conditional under ``jax.vmap``: the reverse sweep's tool for
keeping one vector-field graph alive at a time.

Why. The reverse sweep runs each stage's linearisation, pull-back (and, for implicit
stages, transposed solve) inside an XLA conditional: a branch is a separate computation
whose buffers live only while it runs, whereas in the open XLA linearises every stage of a
step before the first pull-back. But JAX rewrites a ``lax.cond`` whose predicate is
batched -- under ``jax.vmap`` every per-row quantity is, e.g. the step counter -- into a
``select`` over both branches with *every operand broadcast to one copy per row*: the
vector field's parameters become per-row arrays, the branch runs the network with per-row
weights, and both memory and time grow with the batch (measured: 9x the memory of
``RecursiveCheckpointAdjoint`` on the stiff benchmark's 64 vmapped rows).

Here the predicate is first reduced over the batch by a custom batching rule
(:func:`any_true`: "does any row take the branch?"), so the conditional keeps an unbatched
predicate and stays a conditional, with unbatched operands left unbatched. Rows whose own
predicate is false run the branch too; the callers mask what they add
(:func:`add_contribution`) and keep their old values (the reverse sweep's
``step_adjoint``). Without ``vmap`` this is the plain ``lax.cond``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

__all__ = ["add_contribution", "any_true", "branch"]


@jax.custom_batching.custom_vmap
def any_true(pred: Any) -> Any:
    """``True`` when any element of the boolean array ``pred`` is; under ``vmap``, any
    element of any row (the result is not batched)."""
    return jnp.any(pred)


@any_true.def_vmap
def _any_true_vmap(axis_size: int, in_batched: list, pred: Any) -> tuple[Any, bool]:
    # The batch axis is one more axis to reduce over; nested vmaps recurse here.
    del axis_size, in_batched
    return any_true(pred), False


def branch(pred: Any, fun: Callable, carry: Any) -> Any:
    """``fun(carry)`` (the same structure out as in) inside a conditional taken when any
    row's ``pred`` holds, else ``carry``: every row gets ``fun``'s result while any row's
    ``pred`` holds. For callers that mask the rows whose ``pred`` is false themselves."""
    return lax.cond(any_true(pred), fun, lambda c: c, carry)


def add_contribution(acc: Any, contribution: Any, active: Any = True) -> Any:
    """``acc + contribution`` leaf by leaf, in the accumulator's dtype, where ``active``
    (per row under vmap; elsewhere ``acc``).

    The mask replaces a select of the whole accumulator (a second copy of it, per row
    under vmap) by a select of each contribution, fused into the add. The cast keeps a
    parameter's cotangent in the parameter's dtype whatever the stage computed in
    (float32 weights in a float64 state: diffrax promotes the state to the time dtype)."""
    return jtu.tree_map(
        lambda a, b: a + jnp.where(active, b.astype(a.dtype), jnp.zeros((), a.dtype)),
        acc,
        contribution,
    )
