"""Memory and time of diffrax's adjoints against :class:`SymplecticAdjoint`.

Measured as the README's measurement protocol says.

Problem: Tsit5 with ``ConstantStepSize``, ``N`` steps over ``[0, 1]``,
``y`` of shape 256x32 float32, vector field an MLP 32 -> 128 -> 128 -> 32 (tanh)
applied row-wise; the loss is ``sum(y(1)^2)``, differentiated with respect to the MLP's
parameters and ``y0``. ``max_steps = N`` so that every buffer is exactly ``N`` long.

For each method and ``N`` it reports XLA's ``temp_size_in_bytes`` of the compiled
gradient (``jax.jit(f).lower(*a).compile().memory_analysis()``; identical across runs)
and the median wall time of the gradient over ``--repeats`` runs after one warm-up
(``block_until_ready``; the methods take turns, one run each per round), and the
ratios to ``RecursiveCheckpointAdjoint(checkpoints=N)`` (diffrax's backprop through the
solver loop, keeping one checkpoint per step: the reference gradient).

Run ``python -m symplectic_adjoint bench --backend jax``. A benchmark, not a test: it
asserts nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from symplectic_adjoint import SymplecticAdjoint

from .protocol import BUDGETS, JAX_BATCH, JAX_DIM, JAX_STEPS, JAX_WIDTH, REPEATS, STIFF_JAX_BUDGET

BATCH, DIM, WIDTH = JAX_BATCH, JAX_DIM, JAX_WIDTH
#: The reference of the ratios: diffrax's backprop through the solver loop, one
#: checkpoint per step.
REFERENCE = "backprop: RecursiveCheckpoint(N)"


class Field(eqx.Module):
    """Row-wise MLP vector field ``dy/dt = mlp(y)``."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jax.vmap(self.mlp)(y)


def methods(n: int) -> dict[str, diffrax.AbstractAdjoint]:
    """Label -> adjoint for ``n`` steps; the first is the reference of the ratios."""
    return {
        REFERENCE: diffrax.RecursiveCheckpointAdjoint(checkpoints=n),
        "Symplectic (states)": SymplecticAdjoint(),
        "Symplectic (stages)": SymplecticAdjoint(checkpoint="stages"),
        "RecursiveCheckpoint() default": diffrax.RecursiveCheckpointAdjoint(),
        "Backsolve": diffrax.BacksolveAdjoint(),
        "Direct": diffrax.DirectAdjoint(),
    }


_SLOW_PEERS = ("RecursiveCheckpoint() default", "Direct")


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


def measure_all(
    adjoints: dict,
    n: int,
    field,
    y0,
    repeats: int,
    *,
    progress: Callable[[str], None],
    make: Callable = make_grad,
    label: str = "Tsit5",
) -> tuple[dict[str, tuple], dict]:
    """(temp MiB, median seconds) per method, and each method's gradient. The timed runs
    are interleaved (one run of every method per round), so that load from other
    processes on a shared machine falls on all methods alike."""
    params, static = eqx.partition(field, eqx.is_array)
    compiled, temps = {}, {}
    for name, adjoint in adjoints.items():
        progress(f"jax {label} N={n}: compiling {name}")
        compiled[name] = make(adjoint, n, static).lower(params, y0).compile()
        temps[name] = compiled[name].memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled[name](params, y0))  # warm-up
    progress(f"jax {label} N={n}: timing, {repeats} rounds of {len(compiled)} methods")
    times: dict[str, list[float]] = {name: [] for name in adjoints}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, y0))
            times[name].append(time.perf_counter() - start)
    out = {name: (temps[name], statistics.median(times[name])) for name in adjoints}
    return out, {name: fn(params, y0) for name, fn in compiled.items()}


def _relerr(g, ref) -> float:
    leaves = jax.tree_util.tree_leaves(g)
    ref_leaves = jax.tree_util.tree_leaves(ref)
    num = sum(float(jnp.sum((a.astype(jnp.float64) - b.astype(jnp.float64)) ** 2))
              for a, b in zip(leaves, ref_leaves, strict=True))  # fmt: skip
    den = sum(float(jnp.sum(b.astype(jnp.float64) ** 2)) for b in ref_leaves)
    return (num / den) ** 0.5


def _problem(dtype, *, dim: int = DIM, width: int = WIDTH, batch: int = BATCH):
    key_mlp, key_y = jax.random.split(jax.random.PRNGKey(0))
    mlp = eqx.nn.MLP(dim, dim, width, 2, activation=jnp.tanh, key=key_mlp, dtype=dtype)
    return Field(mlp), 0.5 * jax.random.normal(key_y, (batch, dim), dtype)


def measure(
    *,
    steps=JAX_STEPS,
    repeats: int = REPEATS,
    quick: bool = False,
    budgets=BUDGETS,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows in :mod:`.report`'s format: XLA temp memory, median time, and the gradient's
    error against :data:`REFERENCE` in float32 and float64."""
    from .report import add_ratios

    jax.config.update("jax_enable_x64", True)  # for the float64 error column only
    tick = progress or (lambda message: None)
    size = dict(dim=8, width=16, batch=16) if quick else {}
    field32, y32 = _problem(jnp.float32, **size)
    field64, y64 = _problem(jnp.float64, **size)
    rows = []
    for n in steps:
        adjoints = methods(n)
        if quick:  # a smoke test: the two slowest-to-compile peers add nothing there
            adjoints = {k: v for k, v in adjoints.items() if k not in _SLOW_PEERS}
        for c in budgets:
            try:
                adjoints[f"Symplectic (c={c})"] = SymplecticAdjoint(checkpoint=c)
            except (TypeError, ValueError):
                pass  # budgets not available in this build
        results, grads32 = measure_all(adjoints, n, field32, y32, repeats, progress=tick)
        tick(f"jax Tsit5 N={n}: float64 gradients for the error column")
        grads64 = _gradients(adjoints, n, field64, y64)
        for name, (mem, sec) in results.items():
            rows.append(dict(
                backend="jax", case="tsit5", steps=n,
                method=name,
                memory_bytes=mem * 2**20, memory_kind="XLA temp_size_in_bytes", time_s=sec,
                error=_relerr(grads32[name], grads32[REFERENCE]),
                error_f64=_relerr(grads64[name], grads64[REFERENCE]),
            ))  # fmt: skip
    return add_ratios(rows, reference=REFERENCE)


def _gradients(adjoints: dict, n: int, field, y0) -> dict:
    params, static = eqx.partition(field, eqx.is_array)
    return {name: make_grad(adj, n, static)(params, y0) for name, adj in adjoints.items()}


# ------------------------------------------------------------------ --suite stiff (issue 13)

#: The stiff suite's reference: backprop through the solver loop, one checkpoint per step.
STIFF_REFERENCE = "RecursiveCheckpoint(N)"


class StiffField(eqx.Module):
    """One row's stiff field ``dy/dt = mlp(y) - decay * y`` (the solve is vmapped over rows)."""

    mlp: eqx.nn.MLP
    decay: float = eqx.field(static=True)

    def __call__(self, t, y, args):
        return self.mlp(y) - self.decay * y


def stiff_methods(n: int) -> dict[str, diffrax.AbstractAdjoint]:
    """Label -> adjoint for the stiff suite; the first is the reference of the ratios."""
    return {
        STIFF_REFERENCE: diffrax.RecursiveCheckpointAdjoint(checkpoints=n),
        "Symplectic (states)": SymplecticAdjoint(),
        "Symplectic (stages)": SymplecticAdjoint(checkpoint="stages"),
        f"Symplectic (c={STIFF_JAX_BUDGET})": SymplecticAdjoint(checkpoint=STIFF_JAX_BUDGET),
        "RecursiveCheckpoint() default": diffrax.RecursiveCheckpointAdjoint(),
    }


def make_stiff_grad(adjoint: diffrax.AbstractAdjoint, n: int, static, tol: float) -> Callable:
    """``grad`` of ``sum(y(1)^2)``: Kvaerno5, ``n`` constant steps on ``[0, 1]``, Newton to
    ``tol``, ``SaveAt(t1=True)``, each row of the 64x8 state its own solve (``vmap``)."""
    import optimistix as optx

    solver = diffrax.Kvaerno5(root_finder=optx.Newton(rtol=tol, atol=tol))

    def loss(params, y0):
        term = diffrax.ODETerm(eqx.combine(params, static))

        def row(y):
            sol = diffrax.diffeqsolve(term, solver, 0.0, 1.0, 1.0 / n, y, adjoint=adjoint,
                                      max_steps=n, saveat=diffrax.SaveAt(t1=True))  # fmt: skip
            return sol.ys[-1]

        return jnp.sum(jax.vmap(row)(y0) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _stiff_problem(dtype, *, batch: int, dim: int, width: int, decay: float):
    key_mlp, key_y = jax.random.split(jax.random.PRNGKey(0))
    mlp = eqx.nn.MLP(dim, dim, width, 2, activation=jnp.tanh, key=key_mlp, dtype=dtype)
    return StiffField(mlp, decay), 0.5 * jax.random.normal(key_y, (batch, dim), dtype)


def measure_stiff(
    *,
    steps=None,
    repeats: int = REPEATS,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Issue 13: XLA temp memory and median gradient time of Kvaerno5 on a stiff MLP field,
    float32 weights (Newton tolerance 1e-6), ratios to :data:`STIFF_REFERENCE`; the float64
    error (Newton tolerance 1e-10) against the reference at the smallest N only.

    The float32 rows integrate a float64 *state*, for every method alike: x64 is on (for
    the error column), the times are Python floats, so diffrax promotes ``y0`` to their
    float64 dtype. (In float32 throughout, Newton at 1e-6 does not converge here.)"""
    from .protocol import STIFF_BATCH, STIFF_DECAY, STIFF_DIM, STIFF_STEPS, STIFF_WIDTH
    from .report import add_ratios

    jax.config.update("jax_enable_x64", True)  # for the float64 error column only
    tick = progress or (lambda message: None)
    size = dict(batch=4, dim=4, width=8) if quick else \
        dict(batch=STIFF_BATCH, dim=STIFF_DIM, width=STIFF_WIDTH)  # fmt: skip
    steps = tuple(steps or STIFF_STEPS)
    rows = []
    for n in steps:
        adjoints = stiff_methods(n)
        field, y0 = _stiff_problem(jnp.float32, decay=STIFF_DECAY, **size)
        results, grads = measure_all(
            adjoints, n, field, y0, repeats, progress=tick, label="Kvaerno5 stiff",
            make=lambda adjoint, n, static: make_stiff_grad(adjoint, n, static, 1e-6),
        )  # fmt: skip
        grads64 = {}
        if n == steps[0]:
            tick(f"jax stiff N={n}: float64 gradients for the error column")
            field64, y64 = _stiff_problem(jnp.float64, decay=STIFF_DECAY, **size)
            p64, s64 = eqx.partition(field64, eqx.is_array)
            grads64 = {name: make_stiff_grad(adj, n, s64, 1e-10)(p64, y64)
                       for name, adj in adjoints.items()}  # fmt: skip
        for name in adjoints:
            rows.append(dict(
                backend="jax", case="kvaerno5 stiff", steps=n, method=name,
                memory_bytes=results[name][0] * 2**20, memory_kind="XLA temp_size_in_bytes",
                time_s=results[name][1],
                error=_relerr(grads[name], grads[STIFF_REFERENCE]),
                error_f64=_relerr(grads64[name], grads64[STIFF_REFERENCE]) if grads64 else None,
            ))  # fmt: skip
    return add_ratios(rows, reference=STIFF_REFERENCE)


# ------------------------------------------------------- --suite features (issue 12)

#: The feature suite's query times of ``sol.evaluate`` (dense case).
FEATURE_QUERIES = 101


def make_feature_grad(adjoint: diffrax.AbstractAdjoint, n: int, static, feature: str) -> Callable:
    """``grad`` w.r.t. the MLP's parameters and ``y0`` of the benchmark problem (Tsit5,
    ``n`` constant steps on ``[0, 1]``, ``max_steps = n``) with one diffrax feature:

    * ``"event"``: a terminating ``diffrax.Event`` with the real-valued
      ``cond_fn = mean(y) + t - 0.75`` and ``optimistix.Newton`` as its root finder;
      loss ``sum(y(t*)^2) + t*``;
    * ``"dense"``: ``SaveAt(dense=True)``, loss ``sum(sol.evaluate(t_j)^2)`` over
      :data:`FEATURE_QUERIES` equispaced ``t_j`` in ``[0, 1]``.
    """
    import optimistix as optx

    queries = jnp.linspace(0.0, 1.0, FEATURE_QUERIES)

    def cond_fn(t, y, args, **kwargs):
        return jnp.mean(y) + t - 0.75

    def loss(params, y0):
        term = diffrax.ODETerm(eqx.combine(params, static))
        if feature == "event":
            event = diffrax.Event(cond_fn, root_finder=optx.Newton(rtol=1e-6, atol=1e-6))
            sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, 1.0 / n, y0, adjoint=adjoint,
                                      max_steps=n, event=event)  # fmt: skip
            return jnp.sum(sol.ys[-1] ** 2) + sol.ts[-1]
        if feature != "dense":
            raise ValueError(f"unknown feature {feature!r}")
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, 1.0 / n, y0, adjoint=adjoint,
                                  max_steps=n, saveat=diffrax.SaveAt(dense=True))  # fmt: skip
        return jnp.sum(jax.vmap(sol.evaluate)(queries) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure_features(
    *, steps=(400,), quick: bool = False, progress: Callable[[str], None] | None = None
) -> list[dict]:
    """Issue 12: XLA temp memory of the gradient (compile only, float32) of the event and
    dense-output programs of :func:`make_feature_grad`, ``SymplecticAdjoint()`` against
    ``RecursiveCheckpointAdjoint(checkpoints=N)``. No timing: the figure of interest is
    memory. Rows as :func:`measure`'s, with ``memory_ratio`` to ``RCA(N)``."""
    tick = progress or (lambda message: None)
    size = dict(dim=8, width=16, batch=16) if quick else {}
    field, y0 = _problem(jnp.float32, **size)
    params, static = eqx.partition(field, eqx.is_array)
    rows = []
    for n in steps:
        adjoints = {
            "RCA(N)": diffrax.RecursiveCheckpointAdjoint(checkpoints=n),
            "Symplectic (states)": SymplecticAdjoint(),
        }
        for feature in ("event", "dense"):
            for name, adjoint in adjoints.items():
                tick(f"jax features N={n}: compiling {feature} {name}")
                grad = make_feature_grad(adjoint, n, static, feature)
                temp = grad.lower(params, y0).compile().memory_analysis().temp_size_in_bytes
                rows.append(dict(
                    backend="jax", case=f"tsit5 {feature}", steps=n, method=name,
                    memory_bytes=temp, memory_kind="XLA temp_size_in_bytes", time_s=None,
                ))  # fmt: skip
    refs = {(r["case"], r["steps"]): r["memory_bytes"] for r in rows if r["method"] == "RCA(N)"}
    for r in rows:
        r["memory_ratio"] = r["memory_bytes"] / refs[(r["case"], r["steps"])]
    return rows
