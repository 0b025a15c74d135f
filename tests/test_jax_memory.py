"""SymplecticAdjoint keeps one network graph alive at a time under XLA.

Nothing is timed: the check reads XLA's ``temp_size_in_bytes`` of the compiled gradient
(README, measurement protocol). With a wide network the graph of one vector-field evaluation
dominates the temporaries, so a method with s stages must need about as much as Euler
(s = 1). Left to itself XLA linearises every stage of a step before the first pull-back
and holds s graphs (Dopri8 then needed 8x Euler's memory); the adapter prevents that.
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
eqx = pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

BATCH, DIM, WIDTH, STEPS = 512, 8, 256, 4


class Batched(eqx.Module):
    """The MLP applied to each row; a module, so its weights are the term's parameters."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jax.vmap(self.mlp)(y)


def _temp_bytes(solver: diffrax.AbstractSolver, checkpoint: str | int) -> int:
    # float64 throughout: diffrax promotes the state to the time's dtype under x64.
    mlp = eqx.nn.MLP(DIM, DIM, WIDTH, 2, activation=jnp.tanh, dtype=jnp.float64,
                     key=jax.random.PRNGKey(0))  # fmt: skip
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = jnp.ones((BATCH, DIM), jnp.float64)

    def loss(p, y0):
        term = diffrax.ODETerm(Batched(eqx.combine(p, static)))
        sol = diffrax.diffeqsolve(
            term, solver, 0.0, 1.0, 1.0 / STEPS, y0, max_steps=STEPS,
            adjoint=SymplecticAdjoint(checkpoint=checkpoint),
        )  # fmt: skip
        return jnp.sum(sol.ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params, y0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("checkpoint", ["states", "stages", 2])
@pytest.mark.parametrize("solver", [diffrax.Heun(), diffrax.Tsit5(), diffrax.Dopri8()],
                         ids=lambda s: type(s).__name__)  # fmt: skip
def test_stage_graphs_are_not_alive_together(solver, checkpoint) -> None:
    one_stage = _temp_bytes(diffrax.Euler(), checkpoint)
    many = _temp_bytes(solver, checkpoint)
    # "stages" stores every stage value of every step on top; beyond that a few
    # state-sized buffers per stage are fine, a second network graph (or s parameter
    # cotangents) is not: here one graph is over half of Euler's total.
    stages = len(solver.tableau.c) + 1
    stored = STEPS * stages * BATCH * DIM * 8 if checkpoint == "stages" else 0
    assert many <= 1.3 * one_stage + stored, (many / 2**20, one_stage / 2**20)
