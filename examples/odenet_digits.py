"""An ODE-Net classifier on scikit-learn's bundled 8x8 handwritten digits.

The network is ``linear encoder -> ODE block -> linear classifier``, where the ODE block
replaces a stack of residual layers by the flow of ``dz/dt = f(z, t; θ)`` on ``[0, 1]``
(Chen et al., NeurIPS 2018). The block calls ``symplectic_adjoint.odeint`` exactly as it
would call ``torchdiffeq.odeint``; the gradient method is the ``adjoint=`` keyword (the
``--adjoint`` flag), so the same model trains with

* ``symplectic``: exact gradients, keeping one state per step and one network graph;
* ``backprop``: torchdiffeq's ``odeint`` (every stage's graph is kept);
* ``adjoint``: torchdiffeq's ``odeint_adjoint`` (continuous adjoint, approximate).

With a fixed-step method the symplectic and backprop runs compute the same gradients
to rounding, so their training curves coincide (up to floating-point summation order).
The data (1797 images) ships with scikit-learn: nothing is downloaded.

Run ``python examples/odenet_digits.py`` (under a minute on a CPU; ~96 % test accuracy),
``--adjoint backprop`` to compare, ``--quick`` for a seconds-long smoke run. Needs the
``[torch]`` and ``[demo]`` (scikit-learn) extras.
"""

from __future__ import annotations

import argparse
import time

from symplectic_adjoint.demo.extras import requirements

with requirements("examples/odenet_digits.py", "torch", "torchdiffeq", "sklearn"):
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    from symplectic_adjoint import odeint


class ODEFunc(nn.Module):
    """The vector field ``f(z, t)``: an MLP on the state concatenated with time."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim), nn.Tanh()
        )

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))


class ODENet(nn.Module):
    """``encoder -> z(1) of dz/dt = f(z, t), z(0) = encoder(x) -> classifier``."""

    def __init__(
        self, *, dim: int = 32, hidden: int = 64, adjoint: str, method: str, n_steps: int
    ) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, dim)
        self.func = ODEFunc(dim, hidden)
        self.classifier = nn.Linear(dim, 10)
        self.solve_kwargs = dict(
            adjoint=adjoint, method=method, options={"step_size": 1.0 / n_steps}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, 1.0], dtype=x.dtype)
        z1 = odeint(self.func, self.encoder(x), t, **self.solve_kwargs)[-1]
        return self.classifier(z1)


def load_data(*, seed: int, limit: int | None) -> tuple[torch.Tensor, ...]:
    """Train/test split of the digits, pixels scaled to [0, 1]; ``limit`` caps the size."""
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


@torch.no_grad()
def accuracy(model: ODENet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


def train_epoch(
    model: ODENet,
    optimiser: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch: int,
    rng: np.random.Generator,
) -> float:
    """One pass over ``(x, y)`` in shuffled minibatches; returns the mean loss."""
    order = torch.as_tensor(rng.permutation(len(x)))
    losses = []
    for idx in torch.split(order, batch):
        optimiser.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--adjoint",
        choices=("symplectic", "backprop", "adjoint"),
        default="symplectic",
        help="gradient method of odeint",
    )
    parser.add_argument("--method", default="rk4", help="fixed-grid torchdiffeq method")
    parser.add_argument("--ode-steps", type=int, default=4, help="steps on [0, 1]")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--batch", type=int, default=64, help="minibatch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed (split, init)")
    parser.add_argument("--quick", action="store_true", help="2 epochs on 300 images")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    epochs, limit = (2, 300) if args.quick else (args.epochs, None)
    x_train, y_train, x_test, y_test = load_data(seed=args.seed, limit=limit)
    model = ODENet(adjoint=args.adjoint, method=args.method, n_steps=args.ode_steps)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(
        f"ODE-Net on digits: {len(x_train)} train / {len(x_test)} test images, "
        f"{args.method} x {args.ode_steps} steps, adjoint={args.adjoint!r}"
    )
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, optimiser, x_train, y_train, batch=args.batch, rng=rng)
        if epoch == epochs or epoch % 5 == 0 or epoch == 1:
            acc = accuracy(model, x_test, y_test)
            print(f"epoch {epoch:3d}  loss {loss:.4f}  test accuracy {acc:.3f}")
    seconds = time.perf_counter() - start
    print(f"test accuracy: {accuracy(model, x_test, y_test):.4f}")
    print(f"training time: {seconds:.1f} s ({seconds / epochs:.2f} s/epoch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
