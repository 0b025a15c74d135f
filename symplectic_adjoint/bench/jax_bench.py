"""Memory and time of diffrax's adjoints against :class:`SymplecticAdjoint` (DESIGN.md §5).

Problem (DESIGN.md §6): Tsit5 with ``ConstantStepSize``, ``N`` steps over ``[0, 1]``,
``y`` of shape 256x32 float32, vector field an MLP 32 -> 128 -> 128 -> 32 (tanh)
applied row-wise; the loss is ``sum(y(1)^2)``, differentiated with respect to the MLP's
parameters and ``y0``. ``max_steps = N`` so that every buffer is exactly ``N`` long.

For each method and ``N`` it reports XLA's ``temp_size_in_bytes`` of the compiled
gradient (``jax.jit(f).lower(*a).compile().memory_analysis()``; identical across runs)
and the median wall time of the gradient over ``--repeats`` runs after one warm-up
(``block_until_ready``; the methods take turns, one run each per round), and the
ratios to ``RecursiveCheckpointAdjoint(checkpoints=N)``.

Run ``python -m symplectic_adjoint.bench.jax_bench`` (``--quick``: ``N = 50`` only).
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from symplectic_adjoint import SymplecticAdjoint

BATCH, DIM, WIDTH = 256, 32, 128


class Field(eqx.Module):
    """Row-wise MLP vector field ``dy/dt = mlp(y)``."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jax.vmap(self.mlp)(y)


def methods(n: int) -> dict[str, diffrax.AbstractAdjoint]:
    return {
        "Symplectic (states)": SymplecticAdjoint(),
        "Symplectic (stages)": SymplecticAdjoint(checkpoint="stages"),
        f"RecursiveCheckpoint(checkpoints={n})": diffrax.RecursiveCheckpointAdjoint(checkpoints=n),
        "RecursiveCheckpoint() default": diffrax.RecursiveCheckpointAdjoint(),
        "Backsolve": diffrax.BacksolveAdjoint(),
        "Direct": diffrax.DirectAdjoint(),
    }


def make_grad(adjoint: diffrax.AbstractAdjoint, n: int, static) -> Callable:
    def loss(params, y0):
        field = eqx.combine(params, static)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            0.0,
            1.0,
            1.0 / n,
            y0,
            adjoint=adjoint,
            max_steps=n,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure_all(adjoints: dict, n: int, field, y0, repeats: int) -> dict[str, tuple]:
    """(temp MiB, median seconds) per method. The timed runs are interleaved (one run of
    every method per round), so that load from other processes on a shared machine falls
    on all methods alike."""
    params, static = eqx.partition(field, eqx.is_array)
    compiled, temps = {}, {}
    for name, adjoint in adjoints.items():
        compiled[name] = make_grad(adjoint, n, static).lower(params, y0).compile()
        temps[name] = compiled[name].memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled[name](params, y0))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in adjoints}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, y0))
            times[name].append(time.perf_counter() - start)
    return {name: (temps[name], statistics.median(times[name])) for name in adjoints}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 50 only")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="values of N")
    opts = parser.parse_args(argv)
    ns = opts.steps or ([50] if opts.quick else [50, 100, 200, 400])

    key_mlp, key_y = jax.random.split(jax.random.PRNGKey(0))
    mlp = eqx.nn.MLP(DIM, DIM, WIDTH, 2, activation=jnp.tanh, key=key_mlp)
    field = Field(mlp)
    y0 = 0.5 * jax.random.normal(key_y, (BATCH, DIM), jnp.float32)

    print(f"jax {jax.__version__}, diffrax {diffrax.__version__}, {jax.devices()[0]}; ")
    print(f"Tsit5, ConstantStepSize, y {BATCH}x{DIM} float32, MLP width {WIDTH}, ")
    print(f"median of {opts.repeats} runs after warm-up\n")
    print("| N | method | XLA temp MiB | temp / RCA(N) | time ms | time / RCA(N) |")
    print("|---|---|---:|---:|---:|---:|")
    for n in ns:
        rows = measure_all(methods(n), n, field, y0, opts.repeats)
        ref_mem, ref_time = rows[f"RecursiveCheckpoint(checkpoints={n})"]
        for name, (mem, sec) in rows.items():
            print(
                f"| {n} | {name} | {mem:.2f} | {mem / ref_mem:.2f} | {1e3 * sec:.1f} "
                f"| {sec / ref_time:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
