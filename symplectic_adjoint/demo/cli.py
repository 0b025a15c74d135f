"""``python -m symplectic_adjoint demo``: train a continuous normalizing flow, compare adjoints.

What it does, in order:

1. trains a 2-D continuous normalizing flow (FFJORD-style, with the *exact* trace of
   the Jacobian) on a density sampled on the fly (two moons, rings or a checkerboard),
   differentiating the ODE solve with the symplectic adjoint;
2. checks the gradient on one batch in float64 against plain backprop through the
   same solver steps (the relative error is at rounding level, ~1e-15: the symplectic
   adjoint is the exact gradient of the discrete solve, not an approximation);
3. measures peak memory and median time of one training iteration for the symplectic
   adjoint, backprop and the continuous adjoint (README, measurement protocol);
4. saves a PNG with the data, the learned density and samples, and prints a summary
   whose table has backprop as the reference of every ratio.

Before any work it checks that the backend's packages and matplotlib are installed and
otherwise stops with the extra to install. Progress goes to stderr: a bar on a terminal,
a line every few seconds in a log file.

``--backend torch`` uses :func:`symplectic_adjoint.odeint` (torchdiffeq);
``--backend jax`` the same flow in equinox/diffrax with
:class:`symplectic_adjoint.SymplecticAdjoint`. ``--quick`` shrinks every size so the
whole run takes seconds (used by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from . import extras
from .progress import choose_mode
from .toy2d import DENSITIES, DemoConfig, Report, format_report

__all__ = ["main", "parse_config", "run"]

PROG = "python -m symplectic_adjoint demo"

#: Default ``--solver`` per backend: fixed-step 4th/5th-order methods.
DEFAULT_SOLVER = {"torch": "rk4", "jax": "tsit5"}
#: The float64 gradient check must agree with backprop through the same discrete solve to
#: rounding; anything above this is a bug, and the demo exits with status 1.
GRADIENT_TOLERANCE = 1e-10

#: Sizes used by ``--quick``: tiny, for smoke tests (seconds, not a useful model). Training
#: in float64 on a batch the size of the check batch lets JAX reuse one compilation per
#: adjoint for training, the gradient check and the measurements.
QUICK = dict(
    quick=True,
    dtype="float64",
    iterations=3,
    ode_steps=4,
    batch=64,
    hidden=16,
    check_batch=64,
    eval_points=256,
    plot_samples=1000,
    grid=24,
)


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line. Options default to ``None`` so that :func:`parse_config` can tell
    what was given from what comes from :class:`DemoConfig` (or from ``--quick``)."""
    defaults = DemoConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a 2-D continuous normalizing flow with the symplectic adjoint and "
        "compare its gradient, memory and time with backprop and the continuous adjoint.",
    )

    def option(flag: str, field: str, help: str = "", **kwargs: object) -> None:
        shown = f"(default: {getattr(defaults, field)})"
        if "choices" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        p.add_argument(flag, dest=field, default=None, help=f"{help} {shown}".strip(), **kwargs)

    option(
        "--backend",
        "backend",
        "torch: symplectic_adjoint.odeint (torchdiffeq); jax: SymplecticAdjoint (diffrax)",
        choices=("torch", "jax"),
    )
    option("--density", "density", "the 2-D data to fit", choices=sorted(DENSITIES))
    option(
        "--adjoint",
        "adjoint",
        "gradient method used for training (all of them are measured at the end)",
        choices=("symplectic", "backprop", "adjoint"),
    )
    option(
        "--checkpoint",
        "checkpoint",
        "what the symplectic adjoint keeps for the backward pass: a state per step, "
        "or also the stage inputs (more memory, no recomputation)",
        choices=("states", "stages"),
    )
    p.add_argument(
        "--solver",
        help="torch: a torchdiffeq method (default rk4; adaptive ones such as dopri5 use "
        "--rtol/--atol); jax: a diffrax solver in lower case (default tsit5), always "
        "with --ode-steps constant steps",
    )
    option("--ode-steps", "ode_steps", "fixed-step grid size on [0, 1]", type=int)
    option("--rtol", "rtol", "adaptive torch methods", type=float)
    option("--atol", "atol", "adaptive torch methods", type=float)
    option("--iterations", "iterations", "training iterations", type=int)
    option("--batch", "batch", "training batch size", type=int)
    option("--hidden", "hidden", "MLP width", type=int)
    option("--lr", "lr", "Adam learning rate (cosine-decayed)", type=float)
    option(
        "--dtype",
        "dtype",
        "training precision (the gradient check is always float64)",
        choices=("float32", "float64"),
    )
    option("--seed", "seed", "random seed (data, initialisation, samples)", type=int)
    option("--device", "device", "torch device: cpu, cuda, cuda:1, ...")
    option("--out", "out", "output directory", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (by default a bar on a terminal, else periodic lines)",
    )
    return p


def parse_config(argv: list[str] | None = None, *, prog: str = PROG) -> DemoConfig:
    """The :class:`DemoConfig` of a command line (``argv`` without the program name).

    Options given explicitly win over ``--quick``'s sizes, which win over the defaults.
    Progress is a bar when stderr is a terminal, periodic lines otherwise, and off with
    ``--no-progress``.
    """
    args = vars(_parser(prog).parse_args(argv))
    quick, no_progress = args.pop("quick"), args.pop("no_progress")
    given = {field: value for field, value in args.items() if value is not None}
    base = DemoConfig(**QUICK) if quick else DemoConfig()
    backend = given.get("backend", base.backend)
    return dataclasses.replace(
        base,
        **{"solver": DEFAULT_SOLVER[backend], **given},
        progress=choose_mode(enabled=not no_progress),
    )


def check_requirements(config: DemoConfig, *, prog: str = PROG) -> None:
    """Stop (``SystemExit``) with the extra to install if the run of ``config`` cannot work."""
    backend = config.backend
    other = "jax" if backend == "torch" else "torch"
    alternative = None
    if extras.missing(extras.BACKENDS[backend]) and not extras.missing(
        [*extras.BACKENDS[other], "matplotlib"]
    ):
        alternative = f"or run the {other} version, which is installed: {prog} --backend {other}"
    extras.require(
        f"{prog} --backend {backend}",
        *extras.BACKENDS[backend],
        "matplotlib",
        alternative=alternative,
    )


def run(config: DemoConfig) -> Report:
    """Run the demo for ``config`` on its backend and return the report.

    Prints one line per phase (stdout) and the progress (stderr), not the summary.
    """
    if config.backend == "jax":
        from . import cnf_jax as backend
    else:
        from . import cnf_torch as backend
    return backend.run_demo(config, say=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Command-line entry point; returns the exit status (0 on success)."""
    config = parse_config(argv, prog=prog)
    check_requirements(config, prog=prog)
    if config.backend == "torch":
        import torch

        torch.set_num_threads(
            1
        )  # README, measurement protocol: comparable timings on small shared machines
    print(
        f"Training a CNF on '{config.density}' for {config.iterations} iterations "
        f"({config.backend}, {config.solver}, adjoint={config.adjoint!r}), then checking "
        "its gradient and measuring memory and time ...",
        flush=True,
    )
    start = time.perf_counter()
    report = run(config)
    report.notes.append(f"total demo time {time.perf_counter() - start:.1f} s")
    print(format_report(report), flush=True)
    # The demo is also a check: a gradient that is not the exact one, or a training run
    # that diverged, fails the command (CI runs it) instead of printing a bad number.
    if not report.grad_rel_error <= GRADIENT_TOLERANCE:
        print(
            f"FAILED: the symplectic gradient differs from {report.grad_reference} by "
            f"{report.grad_rel_error:.3e} (relative, float64; expected <= "
            f"{GRADIENT_TOLERANCE:g}). Please report this with the command line used.",
            file=sys.stderr,
        )
        return 1
    if not math.isfinite(report.final_nll):
        print("FAILED: the training loss is not finite; try a smaller --lr.", file=sys.stderr)
        return 1
    return 0
