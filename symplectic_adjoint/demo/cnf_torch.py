"""A 2-D continuous normalizing flow in PyTorch, trained through ``symplectic_adjoint.odeint``.

The flow transports data ``x`` at ``t = 0`` to a standard normal at ``t = 1`` along
``dz/dt = f(z, t; θ)``. The state is ``y = (z, Δ)`` with ``dΔ/dt = -tr(∂f/∂z)`` (the
instantaneous change of variables of Chen et al. 2018, as in FFJORD), so that

    log p(x) = log N(z(1); 0, I) - Δ(1).

The trace is computed *exactly* with autograd, one backward pass per dimension (two in
2-D), rather than with FFJORD's stochastic Hutchinson estimator: the gradient of the
loss is then a deterministic function of the batch and can be compared bit-for-bit
with backprop.

Public names: the model (:class:`CNF`, :class:`SolveSpec`, :func:`log_prob`,
:func:`sample`), the gradient check (:func:`gradient_rel_error`) and :func:`run_demo`,
the demo's torch run. Memory and time are measured with the benchmark's helpers
(:mod:`symplectic_adjoint.bench.torch_bench`, README, measurement protocol).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import SolveStats, odeint
from ..bench.torch_bench import median_seconds, peak_memory
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

__all__ = [
    "CNF",
    "SolveSpec",
    "flat_grad",
    "gradient_rel_error",
    "log_prob",
    "loss_and_backward",
    "run_demo",
    "sample",
]

#: torchdiffeq's fixed-grid methods: they take ``step_size`` instead of tolerances.
FIXED_GRID_METHODS = frozenset({"euler", "midpoint", "heun2", "heun3", "rk4"})


@dataclass(frozen=True)
class SolveSpec:
    """How every ODE solve of the flow is integrated (method, grid or tolerances).

    Fixed-grid methods use ``n_steps`` equal steps on ``[0, 1]``; adaptive methods use
    ``rtol``/``atol`` and, when given, a pinned ``first_step`` (README, How it works).
    ``checkpoint`` is what the symplectic adjoint keeps (``"states"`` or ``"stages"``);
    the other adjoints ignore it.
    """

    method: str = "rk4"
    n_steps: int = 10
    rtol: float = 1e-5
    atol: float = 1e-5
    first_step: float | None = None
    checkpoint: str = "states"

    @property
    def adaptive(self) -> bool:
        return self.method not in FIXED_GRID_METHODS

    def odeint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``odeint`` (method, options and tolerances)."""
        common = {"method": self.method, "checkpoint": self.checkpoint}
        if not self.adaptive:
            return {**common, "options": {"step_size": 1.0 / self.n_steps}}
        options = {} if self.first_step is None else {"first_step": self.first_step}
        return {**common, "rtol": self.rtol, "atol": self.atol, "options": options}

    def describe(self) -> str:
        if self.adaptive:
            return f"{self.method}, rtol={self.rtol:g}, atol={self.atol:g}"
        return f"{self.method}, {self.n_steps} steps"


class CNF(nn.Module):
    """Vector field of the flow on the augmented state ``y = (z1, z2, Δ)``, shape ``(n, 3)``.

    ``f`` is an MLP on ``(z, t)``. ``forward`` returns ``(f, -tr ∂f/∂z)``; it switches
    autograd on internally (the trace needs it even when the solver runs without a
    graph) and returns a detached result when the caller had gradients off, so a
    no-graph forward solve never accumulates graphs.
    """

    def __init__(self, *, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = 3
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.Tanh()]
            width_in = hidden
        layers.append(nn.Linear(width_in, 2))
        self.net = nn.Sequential(*layers)

    def velocity(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``f(z, t)`` for a batch ``z`` of shape ``(n, 2)``."""
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(1, 1)
        return self.net(torch.cat([z, tt.expand(z.shape[0], 1)], dim=1))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = y[:, :2]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            v = self.velocity(t, z)
            trace = exact_trace(v, z, create_graph=keep_graph)
        dy = torch.cat([v, -trace[:, None]], dim=1)
        return dy if keep_graph else dy.detach()


def exact_trace(v: torch.Tensor, z: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """``tr(∂v/∂z)`` per sample, exactly: one autograd pass per dimension of ``z``.

    Rows of a batch are independent, so ``∂(Σ_rows v_i)/∂z`` holds ``∂v_i/∂z_i`` of each
    row in column ``i``.
    """
    diag = [
        torch.autograd.grad(v[:, i].sum(), z, retain_graph=True, create_graph=create_graph)[0][:, i]
        for i in range(z.shape[1])
    ]
    return torch.stack(diag, dim=1).sum(dim=1)


def _standard_normal_logp(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z**2).sum(dim=1) - z.shape[1] * 0.5 * math.log(2.0 * math.pi)


def log_prob(
    model: CNF,
    x: torch.Tensor,
    *,
    spec: SolveSpec,
    adjoint: str = "symplectic",
    stats: Any = None,
) -> torch.Tensor:
    """``log p(x)`` of the flow for a batch ``x`` of shape ``(n, 2)``."""
    y0 = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    extra = {} if stats is None else {"stats": stats}
    y1 = odeint(model, y0, t, adjoint=adjoint, **spec.odeint_kwargs(), **extra)[-1]
    return _standard_normal_logp(y1[:, :2]) - y1[:, 2]


@torch.no_grad()
def sample(model: CNF, n: int, *, spec: SolveSpec, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` samples: integrate standard-normal points from ``t = 1`` back to ``t = 0``."""
    param = next(model.parameters())
    z1 = torch.randn(n, 2, generator=generator, dtype=param.dtype).to(param.device)
    y1 = torch.cat([z1, torch.zeros_like(z1[:, :1])], dim=1)
    t = torch.tensor([1.0, 0.0], dtype=param.dtype, device=param.device)
    solve = replace(spec, first_step=None).odeint_kwargs()
    return odeint(model, y1, t, adjoint="backprop", **solve)[-1][:, :2]


def loss_and_backward(
    model: CNF, x: torch.Tensor, *, spec: SolveSpec, adjoint: str, stats: Any = None
) -> float:
    """Mean negative log-likelihood of ``x``; fills ``.grad`` of the parameters."""
    model.zero_grad(set_to_none=True)
    loss = -log_prob(model, x, spec=spec, adjoint=adjoint, stats=stats).mean()
    loss.backward()
    return float(loss.detach())


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All parameter gradients as one flat vector (zeros where a gradient is missing)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    )


def gradient_rel_error(
    model: CNF, x: torch.Tensor, *, spec: SolveSpec, adjoint: str = "symplectic"
) -> tuple[float, SolveSpec]:
    """``‖g − g_ref‖ / ‖g_ref‖`` in float64 on the batch ``x``, ``g_ref`` from backprop.

    Runs on a float64 copy of ``model``. For adaptive methods the first step that the
    ``adjoint`` solve selected is pinned in the reference solve, so both differentiate
    the same discrete computation (torchdiffeq's backprop would otherwise also
    differentiate its initial step selection, README, How it works). Returns the error and the
    solve spec of the reference.
    """
    model64 = copy.deepcopy(model).double()
    x64 = x.detach().double()
    stats = SolveStats()
    loss_and_backward(model64, x64, spec=spec, adjoint=adjoint, stats=stats)
    grad = flat_grad(model64)
    ref_spec = replace(spec, first_step=stats.first_step) if spec.adaptive else spec
    loss_and_backward(model64, x64, spec=ref_spec, adjoint="backprop")
    ref = flat_grad(model64)
    return float(torch.linalg.vector_norm(grad - ref) / torch.linalg.vector_norm(ref)), ref_spec


# ------------------------------------------------------------------ the demo's torch run


def _batch(cfg: DemoConfig, n: int, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    points = sample_density(cfg.density, n, rng=rng)
    return torch.as_tensor(points, dtype=getattr(torch, cfg.dtype), device=device)


def _spec(cfg: DemoConfig) -> SolveSpec:
    return SolveSpec(
        method=cfg.solver,
        n_steps=cfg.ode_steps,
        rtol=cfg.rtol,
        atol=cfg.atol,
        checkpoint=cfg.checkpoint,
    )


def train(cfg: DemoConfig, model: CNF, *, rng: np.random.Generator) -> list[float]:
    """Fit ``model`` by maximum likelihood with Adam, differentiating with ``cfg.adjoint``."""
    device = next(model.parameters()).device
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(cfg.iterations, 1))
    spec = _spec(cfg)

    def step(_: int) -> float:
        loss = loss_and_backward(
            model, _batch(cfg, cfg.batch, rng, device), spec=spec, adjoint=cfg.adjoint
        )
        optimiser.step()
        schedule.step()
        return loss

    return train_loop(step, iterations=cfg.iterations, progress=cfg.progress)


@torch.no_grad()
def mean_nll(model: CNF, x: torch.Tensor, *, spec: SolveSpec, chunk: int = 4096) -> float:
    """Mean negative log-likelihood of ``x`` (no graph; evaluated in chunks)."""
    total = sum(
        float(-log_prob(model, part, spec=spec, adjoint="backprop").sum())
        for part in torch.split(x, chunk)
    )
    return total / x.shape[0]


@torch.no_grad()
def grid_logp(model: CNF, resolution: int, *, spec: SolveSpec, chunk: int = 4096) -> np.ndarray:
    """The model's log-density on :func:`grid_points` as a ``(resolution, resolution)`` array."""
    param = next(model.parameters())
    _, _, points = grid_points(resolution)
    x = torch.as_tensor(points, dtype=param.dtype, device=param.device)
    logp = torch.cat(
        [log_prob(model, part, spec=spec, adjoint="backprop") for part in torch.split(x, chunk)]
    )
    return logp.reshape(resolution, resolution).cpu().numpy()


def compare_methods(cfg: DemoConfig, model: CNF, x: torch.Tensor) -> list[MethodRow]:
    """Peak memory and median time of one training iteration for each gradient method,
    backprop (the reference of the ratios) first."""
    device = x.device
    spec = _spec(cfg)
    rows = []
    with Progress("measuring", len(METHODS), mode=cfg.progress, every=0, unit="method") as bar:
        for label, (adjoint, checkpoint) in METHODS.items():
            method_spec = replace(spec, checkpoint=checkpoint)

            def iteration(adjoint: str = adjoint, method_spec: SolveSpec = method_spec) -> float:
                return loss_and_backward(model, x, spec=method_spec, adjoint=adjoint)

            seconds = median_seconds(iteration, repeats=cfg.timing_repeats, device=device)
            peak = peak_memory(iteration, device=device)
            rows.append(MethodRow(name=label, peak_bytes=peak, seconds_per_iter=seconds))
            bar.update(status=label)
    model.zero_grad(set_to_none=True)
    return rows


#: Table label -> (``adjoint=``, ``checkpoint=``) of the measured gradient methods; the
#: first is the reference of the ratios.
METHODS = {
    "backprop (torchdiffeq.odeint)": ("backprop", "states"),
    "symplectic, checkpoint='states'": ("symplectic", "states"),
    "symplectic, checkpoint='stages'": ("symplectic", "stages"),
    "continuous adjoint (odeint_adjoint)": ("adjoint", "states"),
}

#: What the time column means on the demo's network (printed under the table).
TIME_NOTE = """\
time: backprop makes one backward pass through the whole solve; the
symplectic adjoint makes one autograd call per network evaluation (and
'states' recomputes the stages). On a network this small the fixed cost
of each call dominates; larger networks approach the arithmetic's ~1.6x
('states') and ~1.35x ('stages'), see the README's Results and
python -m symplectic_adjoint bench --width 512 --batch 512"""


def run_demo(cfg: DemoConfig, *, say: Callable[[str], None] = print) -> Report:
    """Train the flow, check the gradient, measure the methods, save the figure.

    ``say`` receives one line as each of the four phases starts.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    model = CNF(hidden=cfg.hidden).to(device=device, dtype=getattr(torch, cfg.dtype))
    spec = _spec(cfg)

    say(f"[1/4] training: {cfg.iterations} iterations of Adam, batch {cfg.batch}")
    train(cfg, model, rng=rng)
    final_nll = mean_nll(model, _batch(cfg, cfg.eval_points, rng, device), spec=spec)
    say(f"[2/4] gradient check: float64, {cfg.check_batch} points, symplectic vs backprop")
    error, ref_spec = gradient_rel_error(
        model, _batch(cfg, cfg.check_batch, rng, device), spec=spec, adjoint="symplectic"
    )
    say(
        f"[3/4] measuring {len(METHODS)} gradient methods: peak memory and median time "
        f"of {cfg.timing_repeats} training iterations each"
    )
    rows = compare_methods(cfg, model, _batch(cfg, cfg.batch, rng, device))

    say(f"[4/4] drawing the figure ({cfg.plot_samples} samples, {cfg.grid}x{cfg.grid} grid)")
    generator = torch.Generator().manual_seed(cfg.seed)
    samples = sample(model, cfg.plot_samples, spec=spec, generator=generator).cpu().numpy()
    figure = save_density_figure(
        cfg.out / f"cnf_{cfg.density}_torch.png",
        data=sample_density(cfg.density, cfg.plot_samples, rng=rng),
        grid_logp=grid_logp(model, cfg.grid, spec=spec),
        samples=samples,
        title=f"CNF trained with adjoint={cfg.adjoint!r} ({spec.describe()})",
    )
    pinned = f", first_step={ref_spec.first_step:.3g} pinned" if ref_spec.adaptive else ""
    return Report(
        backend=f"torch {torch.__version__}, {device.type}",
        solver=spec.describe(),
        density=cfg.density,
        iterations=cfg.iterations,
        final_nll=final_nll,
        grad_rel_error=error,
        grad_reference=f"backprop{pinned}",
        memory_measure=(
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "torch.profiler allocator events (peak of running sum)"
        ),
        figure=figure,
        rows=rows,
        notes=[TIME_NOTE],
    )
