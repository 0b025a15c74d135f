"""The 2-D continuous normalizing flow of the demo in JAX (equinox + diffrax).

Same model and loss as :mod:`symplectic_adjoint.demo.cnf_torch`: the state is
``y = (z, Δ)`` with ``dz/dt = f(z, t)`` and ``dΔ/dt = -tr(∂f/∂z)``, data at ``t = 0``
and a standard normal at ``t = 1``, so ``log p(x) = log N(z(1)) - Δ(1)``. The trace is
exact (``jax.jacfwd`` of the 2-D field per sample, under ``vmap``).

Solves use a constant step ``1/ode_steps`` and ``max_steps = ode_steps`` so that every
adjoint sees the same steps and buffers sized to the solve. The gradient method is the
``adjoint=`` argument of :func:`diffrax.diffeqsolve`:
:class:`symplectic_adjoint.SymplecticAdjoint`, ``diffrax.RecursiveCheckpointAdjoint``
(backprop through the solver loop, with or without recursive checkpointing) or
``diffrax.BacksolveAdjoint`` (the continuous adjoint). Memory is XLA's temporary
buffer size of the compiled gradient (the README's measurement protocol), time the
median of several calls.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .progress import Progress
from .toy2d import (
    DemoConfig,
    MethodRow,
    Report,
    grid_points,
    sample_density,
    save_density_figure,
    train_loop,
)

__all__ = ["CNF", "make_adjoint", "log_prob", "run_demo", "solver_by_name"]

#: Lower-case names accepted by ``--solver`` for the jax backend.
SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "euler": diffrax.Euler,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
}


def solver_by_name(name: str) -> diffrax.AbstractSolver:
    """The diffrax solver called ``name`` (lower case), e.g. ``"tsit5"``."""
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(f"unknown jax solver {name!r}; choose from {sorted(SOLVERS)}") from None


def make_adjoint(name: str, *, n_steps: int) -> diffrax.AbstractAdjoint:
    """The diffrax adjoint behind a method name of the demo.

    ``"symplectic-states"``/``"symplectic-stages"``:
    :class:`symplectic_adjoint.SymplecticAdjoint` with that checkpoint mode; ``"backprop"``:
    ``RecursiveCheckpointAdjoint`` storing every step (plain reverse mode);
    ``"recursive"``: diffrax's default ``RecursiveCheckpointAdjoint`` (binomial
    checkpointing); ``"adjoint"``: ``BacksolveAdjoint``.
    """
    if name.startswith("symplectic-"):
        from .. import SymplecticAdjoint

        return SymplecticAdjoint(checkpoint=name.removeprefix("symplectic-"))
    if name == "backprop":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=n_steps)
    if name == "recursive":
        return diffrax.RecursiveCheckpointAdjoint()
    if name == "adjoint":
        return diffrax.BacksolveAdjoint()
    raise ValueError(f"unknown adjoint {name!r}")


class CNF(eqx.Module):
    """Vector field on the augmented batch state ``y`` of shape ``(n, 3)``: ``(f, -tr ∂f/∂z)``."""

    mlp: eqx.nn.MLP

    def __init__(self, *, hidden: int, key: jax.Array, depth: int = 2, dtype: Any = jnp.float32):
        self.mlp = eqx.nn.MLP(3, 2, hidden, depth, activation=jnp.tanh, dtype=dtype, key=key)

    def velocity(self, t: jax.Array, z: jax.Array) -> jax.Array:
        """``f(z, t)`` for one point ``z`` of shape ``(2,)``."""
        return self.mlp(jnp.concatenate([z, jnp.reshape(t, (1,)).astype(z.dtype)]))

    def __call__(self, t: jax.Array, y: jax.Array, args: Any) -> jax.Array:
        def one(z: jax.Array) -> tuple[jax.Array, jax.Array]:
            def field(w: jax.Array) -> jax.Array:
                return self.velocity(t, w)

            return field(z), jnp.trace(jax.jacfwd(field)(z))

        v, trace = jax.vmap(one)(y[:, :2])
        return jnp.concatenate([v, -trace[:, None]], axis=1)


def _solve(
    model: CNF,
    y0: jax.Array,
    *,
    solver: diffrax.AbstractSolver,
    n_steps: int,
    adjoint: diffrax.AbstractAdjoint,
    reverse: bool = False,
) -> jax.Array:
    """``y(1)`` from ``y(0) = y0`` in ``n_steps`` constant steps (``reverse``: from 1 to 0)."""
    t0, t1 = (1.0, 0.0) if reverse else (0.0, 1.0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(model), solver, t0, t1, (t1 - t0) / n_steps, y0,
        stepsize_controller=diffrax.ConstantStepSize(), adjoint=adjoint,
        saveat=diffrax.SaveAt(t1=True), max_steps=n_steps,
    )  # fmt: skip
    return sol.ys[-1]


def log_prob(
    model: CNF,
    x: jax.Array,
    *,
    solver: diffrax.AbstractSolver,
    n_steps: int,
    adjoint: diffrax.AbstractAdjoint,
) -> jax.Array:
    """``log p(x)`` of the flow for a batch ``x`` of shape ``(n, 2)``."""
    y0 = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    y1 = _solve(model, y0, solver=solver, n_steps=n_steps, adjoint=adjoint)
    z1 = y1[:, :2]
    base = -0.5 * jnp.sum(z1**2, axis=1) - math.log(2.0 * math.pi)
    return base - y1[:, 2]


class _Gradients:
    """Jitted ``(params, x) -> (loss, grads)`` per adjoint, built once and reused.

    Reusing one jitted function for training and for the measurements means XLA
    compiles each (adjoint, shape, dtype) once: ``jit(f).lower(...).compile()`` hits the
    cache of an earlier call with the same shapes.
    """

    def __init__(self, cfg: DemoConfig, static: Any) -> None:
        self._cfg = cfg
        self._static = static
        self._solver = solver_by_name(cfg.solver)
        self._fns: dict[str, Any] = {}

    def __call__(self, adjoint: str) -> Any:
        if adjoint not in self._fns:
            adj = make_adjoint(adjoint, n_steps=self._cfg.ode_steps)

            def loss(params: Any, x: jax.Array) -> jax.Array:
                model = eqx.combine(params, self._static)
                logp = log_prob(
                    model, x, solver=self._solver, n_steps=self._cfg.ode_steps, adjoint=adj
                )
                return -jnp.mean(logp)

            self._fns[adjoint] = jax.jit(jax.value_and_grad(loss))
        return self._fns[adjoint]


# ------------------------------------------------------------------ training (Adam by hand)


def _adam_update(
    params: Any, grads: Any, state: tuple[Any, Any, int], *, lr: float
) -> tuple[Any, tuple[Any, Any, int]]:
    """One Adam step (β = 0.9, 0.999) on a pytree; returns new params and state."""
    m, v, count = state
    count += 1
    m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
    v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
    scale = lr * math.sqrt(1 - 0.999**count) / (1 - 0.9**count)
    params = jax.tree.map(lambda p, a, b: p - scale * a / (jnp.sqrt(b) + 1e-8), params, m, v)
    return params, (m, v, count)


def train(
    cfg: DemoConfig, params: Any, grads: _Gradients, *, rng: np.random.Generator
) -> tuple[Any, list[float]]:
    """Fit by maximum likelihood with Adam (cosine-decayed step) using ``cfg.adjoint``."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    state: tuple[Any, Any, int] = (zeros, zeros, 0)
    grad_fn = grads(_method(cfg))

    def step(i: int) -> float:
        nonlocal params, state
        x = jnp.asarray(sample_density(cfg.density, cfg.batch, rng=rng), dtype=cfg.dtype)
        value, g = grad_fn(params, x)
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * i / max(cfg.iterations, 1)))
        params, state = _adam_update(params, g, state, lr=lr)
        return float(value)

    losses = train_loop(step, iterations=cfg.iterations, progress=cfg.progress)
    return params, losses


# ------------------------------------------------------------------ evaluation and comparison


_log_prob_jit = eqx.filter_jit(log_prob)
_solve_jit = eqx.filter_jit(_solve)


def _chunked_logp(cfg: DemoConfig, model: CNF, x: np.ndarray, *, chunk: int = 2048) -> np.ndarray:
    """``log p`` of many points, in zero-padded chunks of one shape (one compilation)."""
    padded = np.zeros((-(-len(x) // chunk) * chunk, 2), dtype=cfg.dtype)
    padded[: len(x)] = x
    solve = dict(
        solver=solver_by_name(cfg.solver), n_steps=cfg.ode_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
    )  # fmt: skip
    parts = [
        np.asarray(_log_prob_jit(model, jnp.asarray(padded[i : i + chunk]), **solve))
        for i in range(0, len(padded), chunk)
    ]
    return np.concatenate(parts)[: len(x)]


def _sample(cfg: DemoConfig, model: CNF, n: int, *, key: jax.Array) -> np.ndarray:
    """Integrate ``n`` standard-normal points from ``t = 1`` back to the data side."""
    z1 = jax.random.normal(key, (n, 2), dtype=cfg.dtype)
    y1 = jnp.concatenate([z1, jnp.zeros_like(z1[:, :1])], axis=1)
    y0 = _solve_jit(
        model, y1, solver=solver_by_name(cfg.solver), n_steps=cfg.ode_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint(), reverse=True,
    )  # fmt: skip
    return np.asarray(y0[:, :2])


def _method(cfg: DemoConfig) -> str:
    """The :func:`make_adjoint` name of the configured training method."""
    return f"symplectic-{cfg.checkpoint}" if cfg.adjoint == "symplectic" else cfg.adjoint


def gradient_rel_error(grads: _Gradients, params: Any, x: np.ndarray, *, method: str) -> float:
    """``‖g − g_ref‖/‖g_ref‖`` in float64 on ``x``: ``method`` vs full-store backprop."""
    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x64 = jnp.asarray(x, dtype=jnp.float64)
    flat = {}
    for name in (method, "backprop"):
        _, g = grads(name)(params64, x64)
        flat[name] = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])
    diff = jnp.linalg.norm(flat[method] - flat["backprop"])
    return float(diff / jnp.linalg.norm(flat["backprop"]))


#: :func:`make_adjoint` name -> table label; the first is the reference of the ratios.
METHODS = {
    "backprop": "backprop (RecursiveCheckpoint, all steps)",
    "symplectic-states": "SymplecticAdjoint(checkpoint='states')",
    "symplectic-stages": "SymplecticAdjoint(checkpoint='stages')",
    "recursive": "RecursiveCheckpointAdjoint() (default)",
    "adjoint": "continuous adjoint (BacksolveAdjoint)",
}

#: Why memory barely differs at the demo's size (printed under the table).
MEMORY_NOTE = """\
memory: diffrax's backprop already checkpoints (one state per step, each
step recomputed in the backward pass). With {steps} steps of a {batch}x3 state,
every method holds about one network evaluation's graph, so memory
barely differs at this size. SymplecticAdjoint keeps less per step:
0.51x backprop's memory at 400 Tsit5 steps of a 256x32 state (README,
Results; python -m symplectic_adjoint bench --backend jax)."""


def _measured(cfg: DemoConfig) -> list[str]:
    """The methods measured for ``cfg``: a smoke test measures three (fewer compilations)."""
    if not cfg.quick:
        return list(METHODS)
    return [m for m in METHODS if m in ("backprop", _method(cfg), "adjoint")]


def compare_methods(
    cfg: DemoConfig, grads: _Gradients, params: Any, x: jax.Array
) -> list[MethodRow]:
    """XLA temporary memory and median time of one gradient evaluation per method,
    backprop (the reference of the ratios) first."""
    rows = []
    names = _measured(cfg)
    with Progress("measuring", len(names), mode=cfg.progress, every=0, unit="method") as bar:
        for name in names:
            fn = grads(name)

            def call(fn: Any = fn) -> None:
                jax.block_until_ready(fn(params, x))

            call()  # warm-up (compiles; the lowering below then hits the cache)
            seconds = []
            for _ in range(cfg.timing_repeats):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            memory = fn.lower(params, x).compile().memory_analysis()
            rows.append(
                MethodRow(
                    name=METHODS[name],
                    peak_bytes=int(memory.temp_size_in_bytes),
                    seconds_per_iter=statistics.median(seconds),
                )
            )
            bar.update(status=METHODS[name])
    return rows


def run_demo(cfg: DemoConfig, *, say: Callable[[str], None] = print) -> Report:
    """Train the flow, check the gradient, measure the methods, save the figure.

    ``say`` receives one line as each of the four phases starts.
    """
    jax.config.update("jax_enable_x64", True)  # for the float64 check; dtypes are explicit
    rng = np.random.default_rng(cfg.seed)
    key_model, key_sample = jax.random.split(jax.random.PRNGKey(cfg.seed))
    model = CNF(hidden=cfg.hidden, key=key_model, dtype=cfg.dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grads = _Gradients(cfg, static)

    say(f"[1/4] training: {cfg.iterations} iterations of Adam, batch {cfg.batch} (compiles first)")
    params, _ = train(cfg, params, grads, rng=rng)
    model = eqx.combine(params, static)
    held_out = sample_density(cfg.density, cfg.eval_points, rng=rng)
    final_nll = -float(np.mean(_chunked_logp(cfg, model, held_out)))
    say(f"[2/4] gradient check: float64, {cfg.check_batch} points, symplectic vs backprop")
    check_batch = sample_density(cfg.density, cfg.check_batch, rng=rng)
    error = gradient_rel_error(grads, params, check_batch, method=f"symplectic-{cfg.checkpoint}")
    say(
        f"[3/4] measuring {len(_measured(cfg))} gradient methods: XLA memory and median time "
        f"of {cfg.timing_repeats} calls each (each compiles first)"
    )
    x = jnp.asarray(sample_density(cfg.density, cfg.batch, rng=rng), dtype=cfg.dtype)
    rows = compare_methods(cfg, grads, params, x)

    say(f"[4/4] drawing the figure ({cfg.plot_samples} samples, {cfg.grid}x{cfg.grid} grid)")
    _, _, grid = grid_points(cfg.grid)
    figure = save_density_figure(
        cfg.out / f"cnf_{cfg.density}_jax.png",
        data=sample_density(cfg.density, cfg.plot_samples, rng=rng),
        grid_logp=_chunked_logp(cfg, model, grid).reshape(cfg.grid, cfg.grid),
        samples=_sample(cfg, model, cfg.plot_samples, key=key_sample),
        title=f"CNF trained with adjoint={cfg.adjoint!r} ({cfg.solver}, {cfg.ode_steps} steps)",
    )
    return Report(
        backend=f"jax {jax.__version__}, {jax.default_backend()}",
        solver=f"{cfg.solver}, {cfg.ode_steps} steps",
        density=cfg.density,
        iterations=cfg.iterations,
        final_nll=final_nll,
        grad_rel_error=error,
        grad_reference="backprop (RecursiveCheckpointAdjoint)",
        memory_measure="XLA temp_size_in_bytes of the compiled gradient",
        figure=figure,
        rows=rows,
        notes=[MEMORY_NOTE.format(steps=cfg.ode_steps, batch=cfg.batch)],
    )
