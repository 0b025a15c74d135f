"""Train a 2-D continuous normalizing flow (FFJORD-style, exact trace) with ``odeint``.

The flow moves data points ``x`` at ``t = 0`` along ``dz/dt = f(z, t)`` to a standard
normal at ``t = 1``; the log-density changes by ``dΔ/dt = -tr(∂f/∂z)``, so

    log p(x) = log N(z(1)) - Δ(1),    (z, Δ)(0) = (x, 0).

The vector field with its exact 2-D Jacobian trace is the one of the demo
(``symplectic_adjoint.demo.cnf_torch.CNF``), the data and the figure come from
``symplectic_adjoint.demo.toy2d``; this script shows the training loop a user writes
around them, with the ODE solve spelled out:

* ``odeint(field, y0, t, method=..., options=..., adjoint=...)`` is a drop-in for
  ``torchdiffeq.odeint``; ``--adjoint`` switches between ``symplectic`` (exact,
  low-memory), ``backprop`` and ``adjoint`` (continuous adjoint);
* ``--checkpoint states|stages`` trades memory for recomputation in the symplectic
  adjoint (``stages`` also keeps the stage inputs and skips recomputing them);
* ``SolveStats`` reports the accepted steps, function evaluations and the bytes the
  forward pass kept for the backward pass.

Run ``python examples/cnf_2d.py`` (about a minute on a CPU; writes
``examples-out/cnf_2d_moons.png``), ``--density checkerboard``, ``--adjoint backprop``,
or ``--quick`` for a few iterations. Needs the ``[torch]`` and ``[demo]`` extras.
``python -m symplectic_adjoint demo`` runs the same model with memory/time comparisons.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from symplectic_adjoint.demo.extras import requirements

with requirements("examples/cnf_2d.py", "torch", "torchdiffeq", "matplotlib"):
    import matplotlib  # noqa: F401  (the figure; checked before training starts)
    import numpy as np
    import torch

    from symplectic_adjoint import SolveStats, odeint
    from symplectic_adjoint.demo.cnf_torch import CNF, SolveSpec, sample
    from symplectic_adjoint.demo.toy2d import (
        DENSITIES,
        grid_points,
        sample_density,
        save_density_figure,
    )


def log_prob(
    field: CNF,
    x: torch.Tensor,
    *,
    adjoint: str,
    checkpoint: str,
    n_steps: int,
    stats: SolveStats | None = None,
) -> torch.Tensor:
    """``log p(x)``: integrate ``(x, 0)`` from ``t = 0`` to ``t = 1`` with rk4."""
    y0 = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    t = torch.tensor([0.0, 1.0], dtype=x.dtype)
    y1 = odeint(
        field, y0, t, method="rk4", options={"step_size": 1.0 / n_steps},
        adjoint=adjoint, checkpoint=checkpoint, stats=stats,
    )[-1]  # fmt: skip
    z1, delta = y1[:, :2], y1[:, 2]
    return -0.5 * (z1**2).sum(dim=1) - math.log(2 * math.pi) - delta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--adjoint",
        choices=("symplectic", "backprop", "adjoint"),
        default="symplectic",
        help="gradient method of odeint",
    )
    add(
        "--checkpoint",
        choices=("states", "stages"),
        default="states",
        help="what the symplectic adjoint keeps per step",
    )
    add("--density", choices=sorted(DENSITIES), default="moons", help="the 2-D data")
    add("--iterations", type=int, default=800, help="training iterations (Adam)")
    add("--ode-steps", type=int, default=8, help="rk4 steps on [0, 1]")
    add("--batch", type=int, default=256, help="points per iteration")
    add("--seed", type=int, default=0, help="random seed")
    add("--out", type=Path, default=Path("examples-out"), help="folder for the figure")
    add("--quick", action="store_true", help="5 iterations of a small model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    iterations, hidden, grid = (5, 16, 30) if args.quick else (args.iterations, 64, 100)
    field = CNF(hidden=hidden)
    optimiser = torch.optim.Adam(field.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations)
    solve = dict(adjoint=args.adjoint, checkpoint=args.checkpoint, n_steps=args.ode_steps)

    start = time.perf_counter()
    for it in range(1, iterations + 1):
        x = torch.as_tensor(sample_density(args.density, args.batch, rng=rng), dtype=torch.float32)
        optimiser.zero_grad(set_to_none=True)
        loss = -log_prob(field, x, **solve).mean()
        loss.backward()
        loss = loss.detach()
        optimiser.step()
        schedule.step()
        if it == 1 or it % 100 == 0 or it == iterations:
            print(f"iteration {it:5d}  NLL {loss.item():.4f}", flush=True)
    print(f"training: {time.perf_counter() - start:.1f} s for {iterations} iterations")

    stats = SolveStats()
    x = torch.as_tensor(sample_density(args.density, args.batch, rng=rng), dtype=torch.float32)
    (-log_prob(field, x, stats=stats, **solve).mean()).backward()
    print(f"one iteration: {stats.nfe_forward} evaluations of f in the forward solve", end="")
    if args.adjoint == "symplectic":
        print(
            f", {stats.nfe_backward} in the backward pass; {stats.n_steps} steps, "
            f"{stats.n_checkpoints} tensors ({stats.checkpoint_bytes / 1024:.1f} KiB) kept",
            end="",
        )
    print()

    with torch.no_grad():
        _, _, points = grid_points(grid)
        logp = log_prob(field, torch.as_tensor(points, dtype=torch.float32), **solve)
        spec = SolveSpec(method="rk4", n_steps=args.ode_steps)
        samples = sample(field, 20000, spec=spec, generator=torch.Generator().manual_seed(0))
    figure = save_density_figure(
        args.out / f"cnf_2d_{args.density}.png",
        data=sample_density(args.density, 20000, rng=rng),
        grid_logp=logp.reshape(grid, grid).numpy(),
        samples=samples.numpy(),
        title=f"2-D CNF, adjoint={args.adjoint!r}, checkpoint={args.checkpoint!r}",
    )
    print(f"figure: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
