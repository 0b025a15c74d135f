"""Framework-free pieces of the 2-D density demo: data, figure, configuration, summary.

The continuous normalizing flow of ``python -m symplectic_adjoint demo`` is written twice
(PyTorch in :mod:`symplectic_adjoint.demo.cnf_torch`, JAX in
:mod:`symplectic_adjoint.demo.cnf_jax`); everything that does not depend on the framework
lives here so that both backends draw the same data, draw the same figure and print the
same table. ``examples/cnf_2d.py`` uses the densities and the figure.

Public names: :data:`DENSITIES` and :func:`sample_density` (2-D toy densities),
:func:`grid_points` and :func:`save_density_figure` (the figure), :class:`DemoConfig`,
:class:`MethodRow`, :class:`Report` and :func:`format_report` (the demo's run and its
summary). Only NumPy is imported at module level; matplotlib when a figure is saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .progress import Progress

__all__ = [
    "DENSITIES",
    "DemoConfig",
    "MethodRow",
    "Report",
    "format_bytes",
    "format_report",
    "grid_points",
    "sample_density",
    "save_density_figure",
    "train_loop",
]

#: Half-width of the square on which densities are drawn and evaluated.
PLOT_RADIUS = 3.5


def _two_moons(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two interleaved half circles, shifted and scaled to roughly unit variance."""
    upper = rng.random(n) < 0.5
    angle = rng.uniform(0.0, math.pi, n)
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x - 0.5, y - 0.25], axis=1) * 2.0
    return points + 0.1 * rng.standard_normal((n, 2))


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    """Three concentric noisy circles with as many points per unit length each."""
    radii = np.array([0.8, 1.8, 2.8])
    ring = rng.choice(len(radii), size=n, p=radii / radii.sum())
    angle = rng.uniform(0.0, 2.0 * math.pi, n)
    points = radii[ring, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return points + 0.08 * rng.standard_normal((n, 2))


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform on the black squares of a 4x4 board spanning [-2, 2]^2 (scaled to [-3, 3])."""
    x = rng.uniform(-2.0, 2.0, n)
    column = np.floor(x).astype(int)
    y = rng.uniform(0.0, 1.0, n) + 2.0 * rng.integers(0, 2, n) - 2.0
    y = y + (column % 2)
    return 1.5 * np.stack([x, y], axis=1)


#: Name -> sampler ``(rng, n) -> float64 array of shape (n, 2)``.
DENSITIES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "moons": _two_moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
}


def sample_density(name: str, n: int, *, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` points of the named 2-D density as a float64 array of shape ``(n, 2)``."""
    try:
        sampler = DENSITIES[name]
    except KeyError:
        raise ValueError(f"unknown density {name!r}; choose from {sorted(DENSITIES)}") from None
    return sampler(rng, n)


def train_loop(step: Callable[[int], float], *, iterations: int, progress: str) -> list[float]:
    """Call ``step(i)`` (one optimiser update, returning the loss) ``iterations`` times.

    Reports the running loss through :class:`~.progress.Progress` in mode ``progress``
    (a bar on a terminal, periodic lines in a log); returns the losses. Shared by both
    backends so that they report training the same way.
    """
    losses: list[float] = []
    with Progress("training", iterations, mode=progress) as bar:
        for i in range(iterations):
            losses.append(step(i))
            bar.update(status=f"nll={losses[-1]:.3f}")
    return losses


def grid_points(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square grid over the plotting window: ``(xs, ys, points)`` with points ``(r*r, 2)``."""
    axis = np.linspace(-PLOT_RADIUS, PLOT_RADIUS, resolution)
    xs, ys = np.meshgrid(axis, axis)
    return xs, ys, np.stack([xs.ravel(), ys.ravel()], axis=1)


def save_density_figure(
    path: Path,
    *,
    data: np.ndarray,
    grid_logp: np.ndarray,
    samples: np.ndarray,
    title: str,
) -> Path:
    """Save data, learned density and model samples side by side as a PNG.

    ``grid_logp`` holds the model's log-density on :func:`grid_points` (square array).
    Uses matplotlib's non-interactive Agg backend, so no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent = (-PLOT_RADIUS, PLOT_RADIUS, -PLOT_RADIUS, PLOT_RADIUS)
    # Constrained layout keeps the figure title clear of the panel titles.
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), layout="constrained")
    axes[0].hist2d(data[:, 0], data[:, 1], bins=100, range=[extent[:2], extent[2:]])
    axes[0].set_title("data")
    axes[1].imshow(np.exp(grid_logp), origin="lower", extent=extent, cmap="viridis")
    axes[1].set_title("learned density")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=100, range=[extent[:2], extent[2:]])
    axes[2].set_title("samples from the flow")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes and switches of one demo run (the parsed command line).

    ``solver`` is a method name of the backend (torchdiffeq's for torch, a diffrax
    solver class name in lower case for jax); fixed-step solves use ``ode_steps``
    equal steps on ``[0, 1]``, adaptive torch methods use ``rtol``/``atol``. ``dtype``
    is the training precision (the gradient check always runs in float64). ``quick``
    marks a smoke-test run: the jax backend then measures three methods instead of five.
    ``progress`` is a :data:`~.progress.MODES` value.
    """

    backend: str = "torch"
    density: str = "moons"
    adjoint: str = "symplectic"
    checkpoint: str = "states"
    solver: str = "rk4"
    ode_steps: int = 8
    rtol: float = 1e-5
    atol: float = 1e-5
    iterations: int = 800
    batch: int = 256
    hidden: int = 64
    lr: float = 5e-3
    check_batch: int = 128
    eval_points: int = 2000
    plot_samples: int = 20000
    grid: int = 100
    timing_repeats: int = 5
    dtype: str = "float32"
    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    out: Path = Path("demo-out")
    progress: str = "bar"


@dataclass(frozen=True)
class MethodRow:
    """One gradient method's cost on the same training iteration."""

    name: str
    peak_bytes: int
    seconds_per_iter: float
    memory_note: str = ""


@dataclass
class Report:
    """Everything the demo prints at the end; the same for both backends.

    ``rows[0]`` is the reference of the ratios: backprop through the solver.
    """

    backend: str
    solver: str
    density: str
    iterations: int
    final_nll: float
    grad_rel_error: float
    grad_reference: str
    memory_measure: str
    figure: Path
    rows: list[MethodRow] = field(default_factory=list)
    #: Printed under the table, each prefixed "note: "; may hold several lines.
    notes: list[str] = field(default_factory=list)


def format_bytes(n: int) -> str:
    """Human-readable byte count (KiB/MiB/GiB, binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024.0 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    rule = "  ".join("-" * w for w in widths)
    return [fmt.format(*header), rule, *(fmt.format(*r) for r in rows)]


def format_report(report: Report) -> str:
    """The demo's closing summary: result lines, then one table row per gradient method.

    Ratios are relative to the first row, backprop, and the table says so in its header
    (``/ backprop`` after the memory and the time columns) and in the line under it. Lines start
    with fixed labels (``final NLL``, ``gradient rel. error``, ...) that tests look for.
    """
    ref = report.rows[0] if report.rows else None
    body = []
    for row in report.rows:
        mem_ratio = row.peak_bytes / ref.peak_bytes if ref and ref.peak_bytes else math.nan
        time_ratio = row.seconds_per_iter / ref.seconds_per_iter if ref else math.nan
        body.append(
            [
                row.name,
                format_bytes(row.peak_bytes) + row.memory_note,
                f"{mem_ratio:.3f}x",
                f"{1e3 * row.seconds_per_iter:.1f} ms",
                f"{time_ratio:.2f}x",
            ]
        )
    header = ["gradient method", "peak memory", "/ backprop", "time/iter", "/ backprop"]
    lines = [
        "",
        "=" * 72,
        f"symplectic-adjoint demo: CNF on '{report.density}' ({report.backend}, {report.solver})",
        "=" * 72,
        f"training iterations     : {report.iterations}",
        f"final NLL (nats/sample) : {report.final_nll:.4f}",
        f"gradient rel. error     : {report.grad_rel_error:.3e}  "
        f"(float64, one batch, vs {report.grad_reference})",
        f"figure                  : {report.figure}",
        f"peak memory measured by : {report.memory_measure}",
        "",
        *_table(header, body),
        "Ratios are to backprop (first row): below 1.00x a method needs less memory, or",
        "less time per training iteration, than backprop; above 1.00x, more.",
        *(
            ("note: " if i == 0 else "      ") + line
            for note in report.notes
            for i, line in enumerate(note.splitlines())
        ),
        "=" * 72,
    ]
    return "\n".join(lines)
