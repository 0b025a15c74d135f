"""``python -m symplectic_adjoint demo``: train a continuous normalizing flow, compare adjoints.

What it does, in order:

1. trains a 2-D continuous normalizing flow (FFJORD-style, with the *exact* trace of
   the Jacobian) on a density sampled on the fly (two moons, rings or a checkerboard),
   differentiating the ODE solve with the symplectic adjoint;
2. checks the gradient on one batch in float64 against plain backprop through the
   same solver steps (the relative error is at rounding level, ~1e-15: the symplectic
   adjoint is the exact gradient of the discrete solve, not an approximation);
3. measures peak memory and median time of one training iteration for the symplectic
   adjoint, backprop and the continuous adjoint (DESIGN.md §5);
4. saves a PNG with the data, the learned density and samples, and prints a summary.

``--backend torch`` uses :func:`symplectic_adjoint.odeint` (torchdiffeq);
``--backend jax`` the same flow in equinox/diffrax with
:class:`symplectic_adjoint.SymplecticAdjoint`. ``--quick`` shrinks every size so the
whole run takes seconds (used by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ._toy2d import DENSITIES, DemoConfig, Report, format_report

__all__ = ["main", "parse_config"]

#: Default ``--solver`` per backend: fixed-step 4th/5th-order methods.
DEFAULT_SOLVER = {"torch": "rk4", "jax": "tsit5"}

#: Sizes used by ``--quick``: tiny, for smoke tests (seconds, not a useful model). Training
#: in float64 on a batch the size of the check batch lets JAX reuse one compilation per
#: adjoint for training, the gradient check and the measurements.
QUICK = dict(
    quick=True,
    dtype="float64",
    train_steps=3,
    ode_steps=4,
    batch=64,
    hidden=16,
    check_batch=64,
    eval_points=256,
    plot_samples=1000,
    grid=24,
)


def _parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m symplectic_adjoint demo",
        description="Train a 2-D continuous normalizing flow with the symplectic adjoint and "
        "compare its gradient, memory and time with backprop and the continuous adjoint.",
    )
    p.add_argument("--backend", choices=("torch", "jax"), default=defaults.backend)
    p.add_argument("--density", choices=sorted(DENSITIES), default=defaults.density)
    p.add_argument(
        "--adjoint",
        choices=("symplectic", "backprop", "adjoint"),
        default=defaults.adjoint,
        help="gradient method used for training (all three are measured at the end)",
    )
    p.add_argument(
        "--checkpoint",
        choices=("states", "stages"),
        default=defaults.checkpoint,
        help="what the symplectic adjoint keeps for the backward pass: one state per step, "
        "or also the stage inputs (more memory, no recomputation)",
    )
    p.add_argument(
        "--solver",
        default=None,
        help="torch: a torchdiffeq method (default rk4; adaptive ones such as dopri5 use "
        "--rtol/--atol); jax: a diffrax solver in lower case (default tsit5), "
        "always with --ode-steps constant steps",
    )
    p.add_argument("--ode-steps", type=int, default=defaults.ode_steps, help="fixed-step grid size")
    p.add_argument("--rtol", type=float, default=defaults.rtol)
    p.add_argument("--atol", type=float, default=defaults.atol)
    p.add_argument("--steps", type=int, default=defaults.train_steps, help="training iterations")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="MLP width")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=defaults.dtype,
        help="training precision (the gradient check is always float64)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="torch device (cpu, cuda)")
    p.add_argument("--out", type=Path, default=defaults.out, help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    """The :class:`DemoConfig` of a command line (``argv`` without the program name)."""
    args = _parser().parse_args(argv)
    config = DemoConfig(
        backend=args.backend,
        density=args.density,
        adjoint=args.adjoint,
        checkpoint=args.checkpoint,
        solver=args.solver or DEFAULT_SOLVER[args.backend],
        ode_steps=args.ode_steps,
        rtol=args.rtol,
        atol=args.atol,
        train_steps=args.steps,
        batch=args.batch,
        hidden=args.hidden,
        lr=args.lr,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        out=args.out,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.quick:
        explicit = {
            "train_steps": "--steps",
            "ode_steps": "--ode-steps",
            "batch": "--batch",
            "dtype": "--dtype",
        }
        overrides = {
            k: v for k, v in QUICK.items() if k not in explicit or explicit[k] not in (argv or [])
        }
        config = dataclasses.replace(config, **overrides)
    return config


def run(config: DemoConfig) -> Report:
    """Run the demo for ``config`` on its backend and return the report (prints nothing)."""
    if config.backend == "jax":
        from . import _cnf_jax as backend
    else:
        from . import _cnf_torch as backend
    return backend.run_demo(config)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success)."""
    config = parse_config(argv)
    if config.backend == "torch":
        import torch

        torch.set_num_threads(1)  # DESIGN §5: comparable timings on small shared machines
    print(
        f"Training a CNF on '{config.density}' for {config.train_steps} iterations "
        f"({config.backend}, {config.solver}, adjoint={config.adjoint!r}) ...",
        flush=True,
    )
    start = time.perf_counter()
    report = run(config)
    report.notes.append(f"total demo time {time.perf_counter() - start:.1f} s")
    print(format_report(report), flush=True)
    return 0
