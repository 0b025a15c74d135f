"""Shared definitions of the JAX adapter tests (not a test module itself).

One vector field (:class:`Field`) serves every JAX test file; ``relerr`` is the
relative error of README, measurement protocol over PyTrees.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


class Field(eqx.Module):
    """A small nonlinear, non-autonomous vector field with its own parameters.

    ``args`` is either a scale or ``(net, scale)`` with a second network read from
    ``args`` (so that gradients with respect to a PyTree of ``args`` are exercised).
    """

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        net, scale = args if isinstance(args, tuple) else (None, args)
        out = self.mlp(y) * scale + jnp.sin(2.0 * t) * y[::-1]
        if net is not None:
            out = out + 0.3 * jnp.tanh(net(y))
        return out


def cast(tree, dtype):
    return jtu.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def make_mlp(dtype=jnp.float64, key=0):
    return cast(eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(key)), dtype)


def make_problem(dtype=jnp.float64):
    """``(field, y0, args)`` with ``args = (net, scale)``."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    field = cast(Field(eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=k1)), dtype)
    net = cast(eqx.nn.Linear(3, 3, key=k2), dtype)
    y0 = jnp.array([0.4, -0.3, 0.8], dtype)
    args = (net, jnp.asarray(1.2, dtype))
    return field, y0, args


def relerr(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves of two PyTrees of the same structure."""
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    assert len(la) == len(lb)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(jnp.sum(y**2)) for y in lb)
    return (num / den) ** 0.5


def nonzero(tree) -> bool:
    """Whether any leaf has a nonzero entry (a comparison is not vacuous)."""
    return any(bool(jnp.any(x != 0)) for x in jtu.tree_leaves(tree))


def norm(tree) -> float:
    """The 2-norm over all leaves of a PyTree."""
    return sum(float(jnp.sum(x**2)) for x in jtu.tree_leaves(tree)) ** 0.5
