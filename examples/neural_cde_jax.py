"""Classify irregularly sampled spirals with a neural CDE, in JAX with diffrax.

A neural controlled differential equation

    dz(t) = f_θ(z(t)) dX(t),     z(t0) = ℓ_θ(X(t0)),     label ≈ σ(r_θ(z(t1)))

is driven by a continuous path ``X`` built from the observations: each time series (the
channels are the time itself and the two coordinates) is interpolated by
``diffrax.CubicInterpolation`` with coefficients from
``diffrax.backward_hermite_coefficients``. Every series here has its own 50 irregular
observation times, so a CDE -- which only needs the path -- handles them natively.

The task: tell clockwise from anticlockwise spirals (generated below with a fixed seed).
The solve is ``diffrax.ControlTerm(f, X).to_ode()`` with ``Tsit5`` and a
``PIDController``, differentiated with ``adjoint=SymplecticAdjoint()`` (``--adjoint rca``
switches to diffrax's ``RecursiveCheckpointAdjoint``). Before training, the gradient of
the loss on one batch is compared with ``RecursiveCheckpointAdjoint``'s in float64: the
symplectic adjoint is exact, so they agree to rounding error (the script exits with
status 1 if the relative difference exceeds 1e-10).

Run ``python examples/neural_cde_jax.py`` (under a minute on a CPU), ``--quick`` for a
few-second smoke run. Needs the ``[jax]`` extra. The optimiser is a plain Adam written
out below, so optax is not needed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from symplectic_adjoint.demo.extras import requirements

with requirements("examples/neural_cde_jax.py", "jax", "diffrax", "equinox"):
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from symplectic_adjoint import SymplecticAdjoint

jax.config.update("jax_enable_x64", True)  # float64: the exactness check needs it

TOLERANCE = 1e-10  # largest accepted relative gradient difference to RCA
ADJOINTS = {
    "symplectic": SymplecticAdjoint,
    "rca": diffrax.RecursiveCheckpointAdjoint,
}


def make_spirals(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` spirals of ``length`` irregular samples: (n, length, 3) data, (n,) labels.

    Channels are (t, x, y); label 1 is anticlockwise, 0 clockwise. Each series has its
    own sorted random times on [0, 4π] (the end points included), a random phase, radius
    and decay rate, and a little observation noise.
    """
    rng = np.random.default_rng(seed)
    horizon = 4 * math.pi
    inner = np.sort(rng.uniform(0.0, horizon, (n, length - 2)), axis=1)
    t = np.concatenate([np.zeros((n, 1)), inner, np.full((n, 1), horizon)], axis=1)
    phase = rng.uniform(0.0, 2 * math.pi, (n, 1))
    radius = rng.uniform(0.8, 1.2, (n, 1)) * np.exp(-rng.uniform(0.05, 0.15, (n, 1)) * t)
    labels = (np.arange(n) % 2).astype(np.float64)
    direction = np.where(labels == 1, 1.0, -1.0)[:, None]
    angle = phase + direction * t
    x = radius * np.cos(angle) + 0.02 * rng.standard_normal(t.shape)
    y = radius * np.sin(angle) + 0.02 * rng.standard_normal(t.shape)
    order = rng.permutation(n)
    data = np.stack([t / horizon, x, y], axis=-1)  # time channel rescaled to [0, 1]
    return data[order], labels[order]


class VectorField(eqx.Module):
    """f_θ: hidden state (h,) -> matrix (h, channels), an MLP with a tanh output."""

    mlp: eqx.nn.MLP
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(self, hidden: int, channels: int, width: int, *, key: jax.Array):
        self.hidden, self.channels = hidden, channels
        self.mlp = eqx.nn.MLP(
            hidden, hidden * channels, width, depth=2, activation=jax.nn.softplus,
            final_activation=jnp.tanh, key=key,
        )  # fmt: skip

    def __call__(self, t: jax.Array, z: jax.Array, args: None) -> jax.Array:
        return self.mlp(z).reshape(self.hidden, self.channels)


class NeuralCDE(eqx.Module):
    """Initial map ℓ, CDE vector field f and linear readout r (one logit)."""

    initial: eqx.nn.Linear
    field: VectorField
    readout: eqx.nn.Linear

    def __init__(self, channels: int, hidden: int, width: int, *, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.initial = eqx.nn.Linear(channels, hidden, key=k1)
        self.field = VectorField(hidden, channels, width, key=k2)
        self.readout = eqx.nn.Linear(hidden, 1, key=k3)

    def __call__(self, ts: jax.Array, data: jax.Array, adjoint) -> jax.Array:
        """The logit for one series with observation times ``ts`` and values ``data``."""
        path = diffrax.CubicInterpolation(ts, diffrax.backward_hermite_coefficients(ts, data))
        term = diffrax.ControlTerm(self.field, path).to_ode()
        solution = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), ts[0], ts[-1], None, self.initial(path.evaluate(ts[0])),
            stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-5),
            saveat=diffrax.SaveAt(t1=True), adjoint=adjoint, max_steps=4096,
        )  # fmt: skip
        return self.readout(solution.ys[-1])[0]


def make_loss(adjoint):
    """Mean binary cross-entropy and accuracy of a model on a batch."""

    def loss(model: NeuralCDE, data: jax.Array, labels: jax.Array):
        ts = data[:, :, 0]  # the time channel doubles as the observation times
        logits = jax.vmap(model, in_axes=(0, 0, None))(ts, data, adjoint)
        bce = jnp.mean(jax.nn.softplus(logits) - labels * logits)
        accuracy = jnp.mean((logits > 0) == (labels == 1))
        return bce, accuracy

    return loss


def value_and_grad_fn(adjoint):
    """Jitted ``model, data, labels -> ((loss, accuracy), gradient)`` for an adjoint."""
    return eqx.filter_jit(eqx.filter_value_and_grad(make_loss(adjoint), has_aux=True))


def flat(tree) -> jax.Array:
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])


def adam_init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return zeros, zeros, jnp.zeros((), jnp.int32)


@jax.jit
def adam_update(grads, state, lr, b1: float = 0.9, b2: float = 0.999):
    """One Adam step: returns the updates (to add) and the new state."""
    m, v, count = state
    count += 1
    m = jax.tree.map(lambda a, g: b1 * a + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda a, g: b2 * a + (1 - b2) * g * g, v, grads)
    scale = lr * jnp.sqrt(1 - b2**count) / (1 - b1**count)
    updates = jax.tree.map(lambda a, b: -scale * a / (jnp.sqrt(b) + 1e-8), m, v)
    return updates, (m, v, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adjoint", choices=sorted(ADJOINTS), default="symplectic",
                        help="the adjoint= of diffeqsolve used for training")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: 100, or 3 with --quick)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=128, help="number of spirals")
    parser.add_argument("--length", type=int, default=50, help="observations per spiral")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--hidden", type=int, default=8, help="CDE hidden state size")
    parser.add_argument("--width", type=int, default=16, help="vector field MLP width")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and weights")
    parser.add_argument("--print-every", type=int, default=10, help="steps between logs")
    parser.add_argument("--quick", action="store_true", help="tiny data, 3 steps")
    args = parser.parse_args(argv)

    if args.quick:
        args.samples, args.length, args.batch = 16, 12, 8
        args.print_every = 1
    steps = args.steps if args.steps is not None else (3 if args.quick else 100)

    data_np, labels_np = make_spirals(args.samples, args.length, args.seed)
    data, labels = jnp.asarray(data_np), jnp.asarray(labels_np)
    model = NeuralCDE(3, args.hidden, args.width, key=jax.random.PRNGKey(args.seed))

    batch = min(args.batch, args.samples)
    fns = {name: value_and_grad_fn(ADJOINTS[name]()) for name in ("symplectic", "rca")}
    sa_grad = flat(fns["symplectic"](model, data[:batch], labels[:batch])[1])
    rca_grad = flat(fns["rca"](model, data[:batch], labels[:batch])[1])
    difference = float(jnp.linalg.norm(sa_grad - rca_grad) / jnp.linalg.norm(rca_grad))
    print(f"gradient rel. difference SymplecticAdjoint vs RCA (float64): {difference:.3e}")
    if not difference <= TOLERANCE:
        print(f"FAILED: gradient difference above {TOLERANCE:.0e}", file=sys.stderr)
        return 1

    apply_updates = eqx.filter_jit(eqx.apply_updates)
    value_and_grad = fns[args.adjoint]  # already compiled for this batch shape
    state = adam_init(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(args.seed + 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = rng.choice(args.samples, batch, replace=False)
        (value, accuracy), grads = value_and_grad(model, data[index], labels[index])
        updates, state = adam_update(grads, state, args.lr)
        model = apply_updates(model, updates)
        if step % args.print_every == 0 or step == steps:
            print(
                f"step {step:4d}  batch loss {float(value):.4f}  batch accuracy "
                f"{float(accuracy):.3f}  ({time.perf_counter() - start:.1f} s)"
            )
    if args.quick:  # spares compiling the forward-only solve
        return 0
    evaluate = eqx.filter_jit(make_loss(diffrax.RecursiveCheckpointAdjoint()))
    full_loss, full_accuracy = evaluate(model, data, labels)
    print(
        f"final ({args.adjoint}): loss {float(full_loss):.4f}, accuracy "
        f"{float(full_accuracy):.3f} on all {args.samples} spirals"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
