"""Implicit Runge--Kutta solvers for the torch adapter (stiff problems).

The mathematics: README, "How it works: implicit steps".

Solver classes in torchdiffeq 0.2.5's machinery, under torchdiffeq master's names:

* fixed grid (:class:`ImplicitFixedGridSolver`, a ``FixedGridODESolver``): ``implicit_euler``,
  ``implicit_midpoint``, ``trapezoid``, ``sdirk2``, ``trbdf2`` (diagonally implicit) and
  ``gl4``, ``gl6``, ``radauIIA3``, ``radauIIA5`` (fully implicit, one coupled solve);
  options ``step_size``, ``grid_constructor``, ``perturb``, ``interp`` as the explicit
  fixed-grid methods;
* adaptive (:class:`KvaernoSolver`, an ``RKAdaptiveStepsizeODESolver``): ``kvaerno3/4/5``
  (ESDIRK with an embedded error estimate), torchdiffeq's step-size control and options;
  outputs by the cubic Hermite interpolant through ``(y_n, k_1)`` and ``(y_{n+1}, k_s)``
  (diffrax's ``ThirdOrderHermitePolynomialInterpolation`` for Kvaerno), linear in
  ``(y_n, k)``.

The stage equations are solved by Newton's method (:class:`Newton`) with the Jacobian
``J = df/dy`` dense (one batched VJP per entry, as ``torch.func.jacrev``), block-diagonal
per sample (``per_sample=True``: one batched VJP per row entry over the leading batch
dimension), both from one evaluation with a graph (in the forward the one that gives the
step's first slope, where it has a graph) or matrix-free GMRES on
Jacobian-vector products (``linear_solver="gmres"``). By default (dense or per sample;
GMRES iterates full Newton) the Newton matrix ``I - h a_ii J`` is built and LU-factorised
once per step, at ``(t_n, y_n)``, and reused
by every iteration of every stage with the same ``a_ii`` (simplified Newton, as Hairer and
Wanner's RADAU5 and diffrax's ``VeryChord``); a stage whose iteration contracts by less
than :data:`CHORD_RATE` per iteration, or too slowly to reach the tolerance within the
iterations left, continues by full Newton (``jacobian="step"``;
``"stage"``: once per stage; ``"iterate"``: full Newton throughout). The convergence test
is on the size of the update in every mode. The iteration is
deterministic, so recomputing a step from ``y_n`` reproduces its stages bitwise.

The adjoint (:class:`TransposedSolves`) supplies the core's
:func:`~symplectic_adjoint.core.implicit_step.implicit_step_vjp` with the transposed
solves ``(I - gamma J_i)^T kbar = rhs`` and, for Gauss/Radau, the coupled one, each stage
evaluated once with a graph that serves the solve and the stage's VJP. The solves must use
``J`` at the converged stage ``X_i`` for the gradient to be exact. By default
(``adjoint_solve="refine"``) one factorisation per step preconditions an iterative
refinement whose products ``J(X_i)^T v`` are VJPs through the stage graphs, to rounding
level (the recomputed step's own Jacobian at ``y_n`` under ``checkpoint="states"``, else
the first implicit stage's, solved directly); ``"fresh"`` builds ``J(X_i)`` and factorises
at every implicit stage; Gauss/Radau build every stage's Jacobian; GMRES applies
``J(X_i)^T v`` through the graphs.

Stage times follow torchdiffeq: adaptive ``t_n + c_i h`` in ``y``'s dtype with
``prev(t_{n+1})`` where ``c_i = 1`` and the first slope carried (FSAL: ESDIRK, stiffly
accurate: ``y_{n+1}`` is the last stage input itself, and the carried slope is
``f(prev(t_{n+1}), y_{n+1})``, evaluated afresh at the converged state); fixed grid
``t_n + c_i h`` in the grid's dtype, ``t_{n+1}`` where ``c_i = 1``, perturbed
(``next``/``prev``) at ``c_i = 0``/``1`` with ``perturb=True`` as the explicit fixed-grid
solvers (torchdiffeq master always takes ``prev(t_{n+1})`` at ``c_i = 1``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, overload

import torch

from ..core import ButcherTableau, DenseOutput
from ..core.dense import hermite
from ..core.dense import linear as linear_dense
from ..core.implicit_methods import get_implicit_tableau, is_diagonally_implicit
from ..core.implicit_step import implicit_step_vjp, validate_implicit
from ..core.step import StepVJP, lincomb
from ._torchdiffeq_compat import (
    FixedGridODESolver,
    Perturb,
    RKAdaptiveStepsizeODESolver,
    RungeKuttaState,
    TorchdiffeqTableau,
    compute_error_ratio,
    optimal_step_size,
)

__all__ = [
    "IMPLICIT_FIXED_METHODS",
    "IMPLICIT_ADAPTIVE_METHODS",
    "IMPLICIT_METHODS",
    "IMPLICIT_SOLVERS",
    "CHORD_RATE",
    "JACOBIAN_MODES",
    "ADJOINT_SOLVES",
    "StageGraphs",
    "NewtonConvergenceError",
    "NewtonOptions",
    "Newton",
    "TransposedSolves",
    "ImplicitFixedGridSolver",
    "KvaernoSolver",
    "implicit_tableau",
    "implicit_interpolant",
    "first_stage_joins_last",
    "implicit_recompute",
    "implicit_reverse_step",
    "fixed_stage_times",
    "gmres",
]

IMPLICIT_FIXED_METHODS = (
    "implicit_euler", "implicit_midpoint", "trapezoid", "sdirk2", "trbdf2",
    "gl4", "gl6", "radauIIA3", "radauIIA5",
)  # fmt: skip
IMPLICIT_ADAPTIVE_METHODS = ("kvaerno3", "kvaerno4", "kvaerno5")
IMPLICIT_METHODS = (*IMPLICIT_FIXED_METHODS, *IMPLICIT_ADAPTIVE_METHODS)

#: States (times stages for Gauss/Radau) up to this many entries get a dense Jacobian by
#: default; larger ones use GMRES (``linear_solver="auto"``).
DENSE_MAX = 1024

#: Chord and simplified Newton switch to full Newton for the rest of a stage when the
#: scaled update shrinks by less than this factor per iteration (a stale Jacobian), or
#: when at its rate it would not reach the tolerance in the iterations left.
CHORD_RATE = 0.5

JACOBIAN_MODES = ("step", "stage", "iterate")
ADJOINT_SOLVES = ("refine", "fresh")

#: The default Newton ``rtol`` is at least this many machine epsilons of the state's dtype.
EPS_FLOOR = 10
#: Newton's convergence scale holds this many epsilons of the stage's ``|h a_ii k|``: the
#: rounding floor of the field's value (see :meth:`Newton._size`).
NOISE_ULPS = 100

_NEWTON_KEYS = (
    "newton_rtol", "newton_atol", "max_newton_iters", "max_iters", "linear_solver",
    "per_sample", "jacobian", "adjoint_solve", "gmres_rtol", "gmres_restart", "gmres_maxiter",
    "jacobian_chunk_size",
)  # fmt: skip


class NewtonConvergenceError(RuntimeError):
    """The stage equations of a step were not solved to the Newton tolerance."""


def implicit_tableau(method: str) -> ButcherTableau:
    tab = get_implicit_tableau(method)
    assert isinstance(tab, ButcherTableau)
    return tab


def implicit_interpolant(method: str, interp: str = "linear") -> DenseOutput:
    """Dense output inside a step: Hermite (Kvaerno) or linear (fixed grid)."""
    tab = implicit_tableau(method)
    if method in IMPLICIT_ADAPTIVE_METHODS:
        return hermite(tab)
    if interp != "linear":
        raise ValueError(
            f"method {method!r}: interp={interp!r} is not supported for implicit methods "
            "(torchdiffeq's cubic fit needs f(t_n, y_n), which is no stage here); use 'linear'"
        )
    return linear_dense(tab)


# ------------------------------------------------------------------------ options


@dataclasses.dataclass
class NewtonOptions:
    """Newton and linear-solver options (``options=dict(...)`` of ``odeint``).

    Attributes:
        rtol, atol: the iteration stops when the RMS norm of the update of the stage
            values, scaled by ``atol + rtol |X|``, is at most 1 (defaults: the solve's
            ``rtol``/``atol`` divided by 100; ``newton_rtol``/``newton_atol``).
        max_iters: iterations per stage (or per coupled system) before
            :class:`NewtonConvergenceError` (``max_newton_iters``; torchdiffeq master's
            ``max_iters`` is accepted as its alias). Default 20.
        linear_solver: ``"dense"``, ``"gmres"`` or ``"auto"`` (dense up to
            :data:`DENSE_MAX` unknowns).
        per_sample: the field acts on each row of the leading batch dimension separately,
            so its Jacobian is block diagonal (``B`` blocks ``n x n`` from ``n`` batched VJPs;
            never a ``(B n)^2`` matrix). A field whose rows read other rows (a batch mean, a
            neighbour) is refused at the solve's first Jacobian (:func:`_check_rows`).
        jacobian: where the forward's Newton matrix is linearised. ``"step"`` (the default
            with a dense or per-sample Jacobian; simplified Newton): once per step at
            ``(t_n, y_n)``, factorised once per distinct ``a_ii`` (Gauss/Radau: the
            coupled matrix once) and reused across iterations and stages; ``"stage"``
            (chord): once per stage (or coupled system) at its starting iterate;
            ``"iterate"`` (the default with GMRES, whose Jacobian-vector products cost the
            same at any point, so reuse would only add iterations): at every iterate (full
            Newton, quadratic convergence). In the chord modes a stage (coupled system)
            whose update shrinks by less than :data:`CHORD_RATE` per iteration continues
            by full Newton; when the update grew (a diverging chord) full Newton starts
            over from the stage's first guess with ``max_iters`` iterations of its own.
            Only the forward's speed depends on it: the converged stages agree to the
            Newton tolerance, the backward's transposed solves always use ``J`` at the
            converged stages (exact), and ``adjoint="backprop"`` differentiates the same
            iterations (the Newton matrix detached, see :meth:`Newton.stage`).
        adjoint_solve: how the backward solves ``(I - h a_ii J(X_i))^T kbar = c`` (dense and
            per-sample Jacobians; GMRES is matrix-free either way). ``"refine"`` (default):
            one Jacobian and factorisation per step, at the first implicit stage the
            backward reaches (solved directly), the other stages by iterative refinement
            preconditioned by it, each correction applying the exact ``J(X_i)^T`` as one
            VJP through the stage's graph, until the correction is at rounding level
            (:class:`TransposedSolves`); a stage where it does not contract fast enough
            falls back to a fresh Jacobian. ``"fresh"``: a fresh Jacobian and
            factorisation at every implicit stage. Both solve the same exact system: the
            gradients agree to rounding. Gauss/Radau's coupled solve builds every stage's
            Jacobian in both modes.
        gmres_rtol, gmres_restart, gmres_maxiter: GMRES's relative residual, restart length
            and iteration cap.
        jacobian_chunk_size: basis vectors per batched VJP when a Jacobian is built (as
            ``torch.func.jacrev``'s ``chunk_size``): ``None`` (default) all ``n`` at once
            (per sample; ``N`` dense), the fastest; a smaller chunk bounds the workspace,
            which is about ``chunk`` times one VJP's (one evaluation's activations), at the
            price of more calls. On the stiff benchmark (per sample, ``n = 8``)
            ``jacobian_chunk_size=4`` lowers the peak by about 0.4 MiB at about 2 % more
            time; for a dense Jacobian of a large field (a convolution, ``N`` up to
            :data:`DENSE_MAX`) it is the difference between ``N`` evaluations' activations
            and a few.
    """

    rtol: float
    atol: float
    max_iters: int = 20
    linear_solver: str = "auto"
    per_sample: bool = False
    jacobian: str | None = None
    adjoint_solve: str = "refine"
    gmres_rtol: float = 1e-12
    gmres_restart: int = 40
    gmres_maxiter: int = 400
    jacobian_chunk_size: int | None = None

    @classmethod
    def pop(cls, kwargs: dict, rtol: Any, atol: Any, dtype: torch.dtype) -> NewtonOptions:
        """Take the Newton options out of a solver's keyword arguments.

        The default ``newton_rtol`` (``rtol/100``) is floored at :data:`EPS_FLOOR` machine
        epsilons of the state's ``dtype``: below that the update cannot shrink in float32
        (torchdiffeq's default ``rtol=1e-7`` would ask 1e-9, and every step would fail).
        """
        got = {k: kwargs.pop(k) for k in _NEWTON_KEYS if k in kwargs}

        def scalar(x: Any, name: str) -> float:
            if isinstance(x, torch.Tensor):
                if x.numel() != 1:
                    raise ValueError(f"{name} must be a scalar for implicit methods")
                x = x.item()
            try:
                return float(x)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={x!r}: use a number") from None

        if "max_iters" in got and "max_newton_iters" in got:
            raise ValueError("give max_newton_iters or its alias max_iters, not both")
        floor = EPS_FLOOR * torch.finfo(dtype).eps
        opts = cls(
            # the solve's tolerances are read only when no Newton tolerance is given (they
            # may be per component for the error control)
            rtol=scalar(got["newton_rtol"], "newton_rtol")
            if "newton_rtol" in got
            else max(scalar(rtol, "rtol") / 100, floor),
            atol=scalar(got["newton_atol"], "newton_atol")
            if "newton_atol" in got
            else scalar(atol, "atol") / 100,
            max_iters=_count(got, "max_newton_iters", got.get("max_iters", 20),
                             "Newton iterations per stage"),
            linear_solver=got.get("linear_solver", "auto"),
            per_sample=_flag(got, "per_sample"),
            jacobian=got.get("jacobian"),
            adjoint_solve=got.get("adjoint_solve", "refine"),
            gmres_rtol=float(got.get("gmres_rtol", 1e-12)),
            gmres_restart=_count(got, "gmres_restart", 40, "Krylov vectors per cycle"),
            gmres_maxiter=_count(got, "gmres_maxiter", 400, "operator applications"),
            jacobian_chunk_size=None
            if got.get("jacobian_chunk_size") is None
            else _count(got, "jacobian_chunk_size", None,
                        "basis vectors per batched VJP; None: all at once"),
        )  # fmt: skip
        if not 0 < opts.gmres_rtol < math.inf:
            raise ValueError(f"gmres_rtol={opts.gmres_rtol!r}: use a finite relative residual > 0")
        if opts.linear_solver not in ("auto", "dense", "gmres"):
            raise ValueError(
                f"linear_solver={opts.linear_solver!r}: use 'dense', 'gmres' or 'auto'"
            )
        if opts.jacobian is not None and opts.jacobian not in JACOBIAN_MODES:
            raise ValueError(
                f"jacobian={opts.jacobian!r}: use 'step' (once per step), 'stage' (once per "
                "stage) or 'iterate' (full Newton)"
            )
        if opts.adjoint_solve not in ADJOINT_SOLVES:
            raise ValueError(
                f"adjoint_solve={opts.adjoint_solve!r}: use 'refine' (one factorisation per "
                "step, refined to rounding) or 'fresh' (a Jacobian per stage)"
            )
        # (finite: an infinite tolerance accepts Newton's first iterate, whatever it is)
        if not (0 <= opts.rtol < math.inf and 0 <= opts.atol < math.inf
                and opts.rtol + opts.atol > 0):  # fmt: skip
            raise ValueError(
                f"newton_rtol={opts.rtol:g}, newton_atol={opts.atol:g}: both must be finite and "
                ">= 0, and one of them > 0"
            )
        return opts


def _count(got: dict, name: str, default: Any, what: str) -> int:
    """``got[name]`` (else ``default``) as a positive int: an integer of any kind (NumPy's,
    a 0-d integer tensor), never a bool or a float (``int(2.5)`` would quietly give 2)."""
    x = got.get(name, default)
    try:
        n = None if isinstance(x, bool) else operator.index(x)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{name}={x!r}: use a positive int ({what})")
    return n


def _flag(got: dict, name: str) -> bool:
    """``got[name]`` as a bool; a string is refused (``bool("no")`` is ``True``)."""
    x = got.get(name, False)
    if isinstance(x, str) or x not in (True, False):
        raise ValueError(f"{name}={x!r}: use True or False")
    return bool(x)


# -------------------------------------------------------------------------- GMRES


def gmres(
    op: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    rtol: float,
    restart: int,
    maxiter: int,
) -> torch.Tensor:
    """Solve ``op(x) = b`` (flat vectors) by restarted GMRES from ``x = 0``.

    Raises :class:`NewtonConvergenceError` when the relative residual ``rtol`` is not
    reached in ``maxiter`` operator applications.
    """
    x = torch.zeros_like(b)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x
    target = rtol * bnorm
    used = 0
    while used < maxiter:
        r = b - op(x) if used else b
        beta = torch.linalg.vector_norm(r)
        if float(beta) <= target:
            return x
        V = [r / beta]
        H = torch.zeros(restart + 1, restart, dtype=b.dtype, device=b.device)
        y = None
        for j in range(min(restart, maxiter - used)):
            w = op(V[j])
            used += 1
            for i in range(j + 1):
                hij = torch.dot(w, V[i])
                H[i, j] = hij
                w = w - hij * V[i]
            hn = torch.linalg.vector_norm(w)
            H[j + 1, j] = hn
            e1 = torch.zeros(j + 2, dtype=b.dtype, device=b.device)
            e1[0] = beta
            Hj = H[: j + 2, : j + 1]
            y = torch.linalg.lstsq(Hj, e1.unsqueeze(-1)).solution.squeeze(-1)
            res = float(torch.linalg.vector_norm(Hj @ y - e1))
            if res <= target or float(hn) <= 1e-300:
                break
            V.append(w / hn)
        assert y is not None
        x = x + torch.stack(V[: y.shape[0]], dim=1) @ y
        if res <= target:
            return x
    raise NewtonConvergenceError(
        f"GMRES did not reach the relative residual {rtol:g} in {maxiter} iterations "
        "(raise gmres_maxiter, loosen gmres_rtol, or use linear_solver='dense')"
    )


class _KrylovSolve(torch.autograd.Function):
    """``x = A^{-1} b`` by GMRES, differentiated as the linear map it solves:
    ``bbar = A^{-T} xbar``, by GMRES on the transposed operator.

    ``adjoint="backprop"`` records Newton's iterations; recording GMRES itself would
    differentiate the Arnoldi process (Gram--Schmidt, normalisation by residual norms that
    vanish as it converges), whose derivative is not ``A^{-1}`` and blows up (1e28 on a
    stiff 8-dimensional problem). ``A`` is held fixed, as the dense path holds its LU
    factors: its derivative is multiplied by the residual, which vanishes at convergence.
    """

    @staticmethod
    def forward(ctx: Any, b: torch.Tensor, op: Callable, op_T: Callable,
                solve: Callable) -> torch.Tensor:  # fmt: skip
        ctx.op_T, ctx.solve = op_T, solve
        return solve(op, b)

    @staticmethod
    def backward(ctx: Any, xbar: torch.Tensor) -> tuple:
        return ctx.solve(ctx.op_T, xbar), None, None, None


def _krylov(solve: Callable, op: Callable, op_T: Callable, b: torch.Tensor) -> torch.Tensor:
    """``solve(op, b)``; recorded as the linear map (:class:`_KrylovSolve`) under autograd."""
    if torch.is_grad_enabled() and b.requires_grad:
        return _KrylovSolve.apply(b, op, op_T, solve)
    return solve(op, b)


# ------------------------------------------------------------------ linearisation


Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Linear:
    """The field's Jacobian at one point, as the chosen linear solver needs it, and the LU
    factors of the Newton matrices built from it (cached by their diagonal coefficient:
    reused while the Jacobian is)."""

    def __init__(self, fn: Field, t: torch.Tensor, x: torch.Tensor, mode: str,
                 graph: tuple[torch.Tensor, torch.Tensor] | None = None,
                 chunk_size: int | None = None) -> None:  # fmt: skip
        self.fn, self.t, self.x, self.mode = fn, t, x.detach(), mode
        self.shape = x.shape
        self.J: torch.Tensor | None = None
        self.factors: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._vjp: Any = None
        if mode != "gmres":
            # From the evaluation that also gave the step's first slope (``graph``, see
            # :meth:`Newton.first_slope`), else from one of its own: the same batched VJPs
            # either way, so the forward's values do not depend on which.
            per_sample = mode == "per_sample"
            J = None
            if graph is not None:
                J = graph_jacobian(*graph, per_sample=per_sample, strict=True,
                                   chunk_size=chunk_size)  # fmt: skip
            if J is None:
                J = _jacobian(fn, t, self.x, per_sample, chunk_size=chunk_size)
            self.J = J

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.func.jvp(lambda z: self.fn(self.t, z), (self.x,), (v.view(self.shape),))[
                1
            ].reshape(-1)

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        if self._vjp is None:
            with torch.no_grad():
                self._vjp = torch.func.vjp(lambda z: self.fn(self.t, z), self.x)[1]
        with torch.no_grad():
            return self._vjp(v.view(self.shape))[0].reshape(-1)


def _jacobian(fn: Field, t: torch.Tensor, x: torch.Tensor, per_sample: bool,
              chunk_size: int | None = None) -> torch.Tensor:  # fmt: skip
    """The Jacobian of ``fn(t, .)`` at ``x`` from one evaluation with a graph and batched VJPs
    (:func:`graph_jacobian`): ``(B, n, n)`` blocks with ``per_sample`` (about 1.6x faster on
    the benchmark's MLP than ``vmap(jacrev)`` over single rows, which calls ``fn`` on batches
    of one), else ``(N, N)``."""
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(t, z)
    return graph_jacobian(out, z, per_sample=per_sample, chunk_size=chunk_size)


@overload
def graph_jacobian(out: torch.Tensor, z: torch.Tensor, *, per_sample: bool,
                   strict: Literal[False] = False,
                   chunk_size: int | None = None) -> torch.Tensor: ...  # fmt: skip
@overload
def graph_jacobian(out: torch.Tensor, z: torch.Tensor, *, per_sample: bool, strict: bool,
                   chunk_size: int | None = None) -> torch.Tensor | None: ...  # fmt: skip
def graph_jacobian(out: torch.Tensor, z: torch.Tensor, *, per_sample: bool,
                   strict: bool = False,
                   chunk_size: int | None = None) -> torch.Tensor | None:  # fmt: skip
    """The Jacobian ``d out / d z`` from an evaluation's graph (kept for further VJPs).

    ``per_sample``: ``(B, n, n)`` blocks of a row-wise field from ``n`` batched VJPs with the
    cotangent ``e_j`` in every row: row ``b`` of the ``j``-th is ``e_j^T J[b]`` because
    ``f_b`` depends on ``z_b`` only (the ``per_sample`` contract). Otherwise the dense
    ``(N, N)`` matrix from ``N = z.numel()`` batched VJPs (what ``jacrev`` does).
    Where the graph does not reach ``z`` (a field that does not read ``y``, or an
    evaluation made on a detached copy) the Jacobian is zero, or ``None`` with ``strict``.
    ``chunk_size``: basis vectors per batched VJP (:attr:`NewtonOptions.jacobian_chunk_size`).
    """
    N = z.numel()
    B = z.shape[0] if per_sample else 1
    n = N // B if B else 0
    shape = (B, n, n) if per_sample else (N, N)
    if N == 0:  # a zero-size state: no batched VJP to take
        return torch.zeros(shape, dtype=z.dtype, device=z.device)
    if not out.requires_grad:  # a field that does not read y
        return None if strict else torch.zeros(shape, dtype=z.dtype, device=z.device)
    eye = torch.eye(n, dtype=out.dtype, device=out.device)
    if per_sample:
        basis = eye.view(n, 1, *z.shape[1:]).expand(n, *out.shape)
    else:
        basis = eye.view(n, *out.shape)
    step = basis.shape[0] if chunk_size is None else chunk_size
    parts = []
    for j in range(0, basis.shape[0], step):
        part = _batched_vjp(out, z, basis[j : j + step])
        if part is None:
            return None if strict else torch.zeros(shape, dtype=z.dtype, device=z.device)
        parts.append(part)
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows.reshape(n, B, n).transpose(0, 1) if per_sample else rows.reshape(N, N)


def _batched_vjp(out: torch.Tensor, z: torch.Tensor, cots: torch.Tensor) -> torch.Tensor | None:
    """``(m, *z.shape)``: the VJPs ``cots[j]^T d out / d z`` through ``out``'s graph (kept),
    ``None`` where the graph does not reach ``z``.

    One vectorised backward: ``torch.func.vmap`` over ``torch.autograd.grad``, whose
    batching rules cover the backward ops (measured on the stiff benchmark's MLP, batch 64
    by 8: 12 % faster, 612 KiB of workspace against 869 KiB, than ``is_grads_batched``,
    whose legacy vmap has no rule for ``tanh_backward`` and loops over the cotangents
    there, stacking the results). A backward that cannot be vectorised (data-dependent
    control flow in a custom ``autograd.Function``'s backward) is taken one cotangent at a
    time instead: the same products, never an error from inside the batching.
    """
    unused = False

    def vjp(v: torch.Tensor) -> torch.Tensor:
        nonlocal unused
        (g,) = torch.autograd.grad(out, z, v, retain_graph=True, allow_unused=True)
        if g is None:  # vmap's outputs must be tensors
            unused = True
            return torch.zeros_like(v)
        return g

    # Each attempt on its own contiguous copy of the cotangents: autograd hands them to
    # the backward of ``out``'s own op as they are, and a custom backward may write into
    # its cotangent (``g.mul_(s)``): a vmap attempt that raised after such a write left the
    # fallback a scaled basis (a Jacobian 3x off, a silently wrong gradient), and the
    # per-sample basis is an expanded view, which refuses in-place writes.
    try:
        rows = torch.func.vmap(vjp)(cots.clone(memory_format=torch.contiguous_format))
    except RuntimeError:
        rows = torch.stack([vjp(v.clone(memory_format=torch.contiguous_format)) for v in cots])
    return None if unused else rows


def _check_rows(fn: Field, t: torch.Tensor, x: torch.Tensor) -> None:
    """Refuse a field that mixes the rows of the batch under ``per_sample=True`` (a batch
    mean, batch norm, attention over the batch, a row reading its neighbour): its
    block-diagonal Jacobian would be wrong, and while Newton still converges (its residuals
    are exact), the transposed solves are not: a silently wrong gradient (3e-4 off on a
    field reading ``y.mean(0)``).

    Once per solve, at its first Jacobian: the blocks ``J_b`` as the solver builds them
    (:func:`graph_jacobian`; with mixing, ``J_b`` is the sum of the column of blocks
    ``sum_b' J_b'b``) and one VJP with a cotangent ``v`` that differs in every row. A
    block-diagonal field gives ``(J^T v)_b = J_b^T v_b`` to rounding; with mixing the
    difference is ``sum_{b' != b} J_b'b^T (v_b' - v_b)``, refused above ``sqrt(eps)`` of
    the row's scale (a coupling below that moves the gradient by about as little). An
    evaluation of its own: the first slope's graph may not reach ``x`` (see
    :meth:`Newton.first_slope`)."""
    B = x.shape[0]
    if B < 2 or x.numel() == 0:
        return
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(t, z)
    if not out.requires_grad:
        return
    blocks = graph_jacobian(out, z, per_sample=True)  # (B, n, n)
    # Distinct, well-scaled entries in every row: 1 + (j / numel), j the flat index.
    v = torch.linspace(1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device)
    v = v.view_as(out)
    (g,) = torch.autograd.grad(out, z, v.clone(), allow_unused=True)  # (see _batched_vjp)
    if g is None:
        return
    rows = v.reshape(B, -1, 1)
    expect = (blocks.mT @ rows).view(B, -1)
    # Per row, against sqrt(eps) of the row's largest term: far above the rounding of two
    # VJPs through a deep or wide field (whose error follows its layers' sizes, not J's),
    # far below any coupling that matters (one that small moves the gradient by less).
    scale = (blocks.abs().mT @ rows.abs()).view(B, -1) + g.reshape(B, -1).abs()
    bound = scale.amax(dim=1, keepdim=True) * torch.finfo(out.dtype).eps ** 0.5
    if bool(((g.reshape(B, -1) - expect).abs() > bound).any()):
        raise ValueError(
            "options['per_sample']=True, but func mixes the rows of the batch (a row of "
            "func(t, y) depends on other rows of y): its Jacobian is not block diagonal. "
            "Drop per_sample (a dense Jacobian, or linear_solver='gmres')"
        )


def _lu_factor(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LU factors; a singular matrix raises ``LinAlgError`` (``lu_factor`` raises a bare
    ``RuntimeError``), which Newton turns into :class:`NewtonConvergenceError`."""
    LU, pivots, info = torch.linalg.lu_factor_ex(M)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError("the Newton matrix is singular")
    return LU, pivots


def _identity_minus(blocks: torch.Tensor, scale: Any) -> torch.Tensor:
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return eye - blocks * scale


class Newton:
    """Newton's method for the stage equations of one implicit tableau.

    Arguments:
        tableau: a core implicit tableau.
        opts: :class:`NewtonOptions`.
        fn: ``fn(t, y)``, the field (no recording); ``t`` a 0-d tensor.
        unknowns: entries of one state (for ``linear_solver="auto"``).
    """

    def __init__(self, tableau: ButcherTableau, opts: NewtonOptions, numel: int) -> None:
        validate_implicit(tableau)
        self.tableau = tableau
        self.opts = opts
        self.diagonal = is_diagonally_implicit(tableau)
        unknowns = numel if self.diagonal else numel * tableau.stages
        if opts.linear_solver == "gmres":
            self.mode = "gmres"
        elif opts.per_sample:
            self.mode = "per_sample"
        elif opts.linear_solver == "dense" or unknowns <= DENSE_MAX:
            self.mode = "dense"
        else:
            self.mode = "gmres"
        #: the forward's linearisation point (NewtonOptions.jacobian, default by mode)
        self.jacobian = opts.jacobian or ("iterate" if self.mode == "gmres" else "step")
        self.iterations = 0  # Newton iterations, all stages, all steps (statistics)
        self.n_jacobians = 0  # linearisations (Jacobians built), forward and backward
        self.n_refine_fallbacks = 0  # backward stages refined in vain (TransposedSolves)
        #: the reverse pass's hint that the preconditioner is exact to rounding (the last
        #: refined stage needed no sweep): the next stage's first VJP is its final one
        self.refine_direct = False
        self._rows_checked = False  # per_sample's contract, checked at the first Jacobian

    # ------------------------------------------------------------------ linear algebra
    def linear(self, fn: Field, t: torch.Tensor, x: torch.Tensor,
               graph: tuple[torch.Tensor, torch.Tensor] | None = None) -> _Linear:  # fmt: skip
        """The Jacobian at ``(t, x)``; ``graph``: an evaluation there (:meth:`first_slope`)."""
        if self.mode == "per_sample" and not self._rows_checked:
            self._rows_checked = True
            _check_rows(fn, t, x)
        self.n_jacobians += 1
        return _Linear(fn, t, x, self.mode, graph, self.opts.jacobian_chunk_size)

    def first_slope(self, fn: Field, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(f(t, y), graph)``: a step's first slope, evaluated where simplified Newton
        (``jacobian="step"``, dense or per sample) linearises the step, with the graph its
        Jacobian is then built from (:meth:`linear`): one evaluation for both. ``graph`` is
        ``None`` in the other modes, and under autograd recording when ``y`` does not
        require grad (a detached copy would make the slope require grad whatever the
        parameters: the Jacobian evaluates on its own there, by the same batched VJPs).
        """
        recording = torch.is_grad_enabled()
        if self.jacobian != "step" or self.mode == "gmres" or (recording and not y.requires_grad):
            return fn(t, y), None
        z = y if recording else y.detach().requires_grad_(True)
        with torch.enable_grad():
            out = fn(t, z)
        return (out if recording else out.detach()), (out, z)

    def _gmres(self, op: Callable, b: torch.Tensor) -> torch.Tensor:
        o = self.opts
        return gmres(op, b, rtol=o.gmres_rtol, restart=o.gmres_restart, maxiter=o.gmres_maxiter)

    def solve(self, lin: _Linear, gamma: Any, r: torch.Tensor, *, transpose: bool,
              key: Any = None) -> torch.Tensor:  # fmt: skip
        """``(I - gamma J) d = r`` (or the transposed system).

        ``key`` (forward only): the matrix's identity within ``lin`` (its ``a_ii``, the
        step size being fixed); its LU factors are cached there and reused by later solves
        with the same key. Without a key the system is solved once (the backward's).
        """
        if self.mode == "gmres":
            prod, prod_T = (lin.vjp, lin.jvp) if transpose else (lin.jvp, lin.vjp)
            d = _krylov(self._gmres, lambda v: v - prod(v) * gamma,
                        lambda v: v - prod_T(v) * gamma, r.reshape(-1))  # fmt: skip
            return d.view_as(r)
        assert lin.J is not None
        rhs = r.reshape(-1, 1) if self.mode == "dense" else r.reshape(r.shape[0], -1, 1)
        if key is None:
            M = _identity_minus(lin.J, gamma)
            return torch.linalg.solve(M.mT if transpose else M, rhs).view_as(r)
        if key not in lin.factors:
            lin.factors[key] = _lu_factor(_identity_minus(lin.J, gamma))
        LU, pivots = lin.factors[key]
        return torch.linalg.lu_solve(LU, pivots, rhs, adjoint=transpose).view_as(r)

    def coupled(self, lins: Sequence[_Linear], h: Any, r: Sequence[torch.Tensor], *,
                transpose: bool, cache: bool = False) -> list[torch.Tensor]:  # fmt: skip
        """``d_i - h J_i sum_j a_ij d_j = r_i`` (or ``d_i - h sum_j a_ji J_j^T d_j = r_i``).

        ``cache`` (forward only): keep the LU factors of the coupled matrix in ``lins[0]``
        and reuse them while the same ``lins`` are passed.
        """
        a, s = self.tableau.a, self.tableau.stages
        shape = r[0].shape
        if self.mode == "gmres":
            n = r[0].numel()

            def op(v: torch.Tensor, transpose: bool = transpose) -> torch.Tensor:
                parts = v.view(s, n)
                out = []
                for i in range(s):
                    if transpose:
                        acc = sum(lins[j].vjp(parts[j]) * a[j][i] for j in range(s) if a[j][i])
                    else:
                        comb = sum(parts[j] * a[i][j] for j in range(s) if a[i][j])
                        acc = lins[i].jvp(comb) if not isinstance(comb, int) else 0
                    out.append(parts[i] - acc * h)
                return torch.cat(out)

            d = _krylov(self._gmres, op, lambda v: op(v, not transpose),
                        torch.cat([ri.reshape(-1) for ri in r]))  # fmt: skip
            return [di.view(shape) for di in d.view(s, -1)]
        if self.mode == "dense":
            rhs = torch.cat([ri.reshape(-1) for ri in r]).unsqueeze(-1)
        else:
            B = shape[0]
            rhs = torch.cat([ri.reshape(B, -1) for ri in r], dim=-1).unsqueeze(-1)
        if cache and "coupled" in lins[0].factors:
            LU, pivots = lins[0].factors["coupled"]
            d = torch.linalg.lu_solve(LU, pivots, rhs, adjoint=transpose)
        else:
            M = self._coupled_matrix(lins, h)
            if cache:
                lins[0].factors["coupled"] = LU, pivots = _lu_factor(M)
                d = torch.linalg.lu_solve(LU, pivots, rhs, adjoint=transpose)
            else:
                d = torch.linalg.solve(M.mT if transpose else M, rhs)
        if self.mode == "dense":
            return [di.view(shape) for di in d.view(s, -1)]
        d = d.view(shape[0], s, -1)
        return [d[:, i].reshape(shape) for i in range(s)]

    def _coupled_matrix(self, lins: Sequence[_Linear], h: Any) -> torch.Tensor:
        """``I - h blockdiag(J_i) (a (x) I)``, ``(s n, s n)`` (per sample: ``(B, s n, s n)``)."""
        a, s = self.tableau.a, self.tableau.stages
        Js = [lin.J for lin in lins if lin.J is not None]
        assert len(Js) == s  # the dense path builds every stage's Jacobian
        rows = []
        for i in range(s):
            row = []
            for j in range(s):
                blk = -Js[i] * (a[i][j] * h) if a[i][j] else torch.zeros_like(Js[i])
                if i == j:
                    blk = blk + torch.eye(Js[i].shape[-1], dtype=blk.dtype, device=blk.device)
                row.append(blk)
            rows.append(torch.cat(row, dim=-1))
        return torch.cat(rows, dim=-2)

    # ------------------------------------------------------------------ nonlinear solves
    def _size(self, dx: torch.Tensor, x: torch.Tensor, factor: float = 1.0,
              k: torch.Tensor | None = None) -> float:  # fmt: skip
        """RMS of ``factor * dx`` scaled by ``atol + rtol |x|`` (converged when at most 1);
        not finite when ``dx`` is not. Few tensor operations and one sync: this runs once
        per Newton iteration.

        ``k``: the slope, ``x = base + factor k``; the scale then also holds
        :data:`NOISE_ULPS` epsilons of ``|factor k|``: the rounding of the field's value
        (a sum of many larger terms in a wide network) and of forming ``x``, below which no
        update can shrink. Without it float32 stages stalled at 1.3-1.8 times the default
        tolerance on a width-512 MLP and raised :class:`NewtonConvergenceError`.
        """
        o = self.opts
        n = dx.numel()
        if n == 0:  # a zero-size state: nothing to solve
            return 0.0
        scale = x.detach().abs().mul_(o.rtol).add_(o.atol)
        if k is not None:
            noise = NOISE_ULPS * torch.finfo(x.dtype).eps * factor
            scale.add_(k.detach().abs(), alpha=noise)
        rms = float(torch.linalg.vector_norm(dx.detach() / scale)) / math.sqrt(n)
        return rms * factor

    def _fail(self, where: str, why: str) -> NewtonConvergenceError:
        return NewtonConvergenceError(
            f"Newton's method did not converge {where}: {why}. Reduce the step size, raise "
            "max_newton_iters, or loosen newton_rtol/newton_atol"
        )

    def _stale(self, size: float, previous: float | None, left: int) -> bool:
        """A reused Jacobian is stale: the update shrank by less than ``CHORD_RATE``, or
        at the rate it shrank by it would still be above the tolerance after the ``left``
        iterations that remain (a chord converging linearly from far: at a rate of 0.35,
        a tight tolerance 1e10 times the first update's size takes 22 iterations, where
        full Newton from here takes a few)."""
        if previous is None:
            return False
        rate = size / previous
        return rate > CHORD_RATE or size * rate**left > 1.0

    def stage(self, fn: Field, t: torch.Tensor, base: torch.Tensor, gamma: Any,
              k: torch.Tensor, where: str, *, lin: _Linear | None = None,
              key: Any = None) -> tuple[torch.Tensor, _Linear | None]:  # fmt: skip
        """Solve ``k = fn(t, base + gamma k)`` from the guess ``k``.

        ``lin``: a Jacobian to start from (``jacobian="step"``: the step's); ``key``: the
        Newton matrix's identity in its LU cache (the stage's ``a_ii``). Returns the
        converged ``k`` and the Jacobian in use at the end (passed on to the next stage).

        Under ``adjoint="backprop"`` autograd records exactly these iterations: the
        residual ``fn(t, x) - k`` is recorded, the Newton matrix (Jacobian, LU factors) is
        built without a graph. Differentiating the iteration ``k <- k + M^{-1}(fn(x) - k)``
        with ``M`` held fixed gives a derivative iteration that contracts at the same
        rate as the iteration itself (its fixed point is the implicit-function-theorem
        gradient whatever ``M``), so backprop converges to the exact gradient of the
        converged stages as Newton converges; recording ``M`` would only add terms
        multiplied by the residual, which vanishes at convergence, at the price of a
        graph through every Jacobian.
        """
        full = self.jacobian == "iterate"
        previous: float | None = None
        guess, it = k, 0
        factor = abs(float(gamma.detach() if isinstance(gamma, torch.Tensor) else gamma))
        while it < self.opts.max_iters:
            it += 1
            self.iterations += 1
            x = base + k * gamma
            r = fn(t, x) - k
            if lin is None or full:
                lin = self.linear(fn, t, x)
            try:
                d = self.solve(lin, gamma, r, transpose=False, key=key)
            except torch.linalg.LinAlgError as err:
                raise self._fail(where, "the Newton matrix I - h a_ii J is singular") from err
            size = self._size(d, x, factor, k)  # the update of x is gamma d
            if not math.isfinite(size) and not bool(torch.isfinite(d).all()):
                raise self._fail(where, "the iterate became inf/nan")
            if size <= 1.0:
                return k + d, lin
            if not full and self._stale(size, previous, self.opts.max_iters - it):
                # The reused Jacobian is too far from this stage: full Newton from here on;
                # a diverging chord may have led far off, so then from the first guess.
                full = True
                if previous is not None and size > previous:
                    k, previous, it = guess, None, 0
                    continue
            k = k + d
            previous = size
        raise self._fail(where, f"no convergence in {self.opts.max_iters} iterations")

    def coupled_stages(self, fn: Field, times: Sequence[torch.Tensor], y0: torch.Tensor, h: Any,
                       k: list[torch.Tensor], where: str,
                       graph: Any = None) -> list[torch.Tensor]:  # fmt: skip
        """Solve ``k_i = fn(t_i, y0 + h sum_j a_ij k_j)`` for all stages at once.

        ``jacobian="step"``: every stage's block uses ``J(t_n, y_n)`` (one LU of the
        coupled matrix per step; ``graph``: an evaluation there, :meth:`first_slope`);
        ``"stage"``: ``J_i`` at the starting iterate.
        """
        a, s = self.tableau.a, self.tableau.stages
        full = self.jacobian == "iterate"
        lins: list[_Linear] | None = None
        if self.jacobian == "step":
            lins = [self.linear(fn, times[0], y0, graph)] * s
        previous: float | None = None
        guess, it = k, 0
        while it < self.opts.max_iters:
            it += 1
            self.iterations += 1
            # X_i = y0 + inc_i, bitwise lincomb(y0, h, a[i], k); the increments also set
            # each stage's rounding floor below (see _size)
            inc = [lincomb(None, h, a[i], k) for i in range(s)]
            X = [y0 if v is None else y0 + v for v in inc]
            r = [fn(times[i], X[i]) - k[i] for i in range(s)]
            if lins is None or full:
                lins = [self.linear(fn, times[i], X[i]) for i in range(s)]
            try:
                d = self.coupled(lins, h, r, transpose=False, cache=not full)
            except torch.linalg.LinAlgError as err:
                raise self._fail(where, "the Newton matrix I - h (A kron J) is singular") from err
            if not all(bool(torch.isfinite(di).all()) for di in d):
                raise self._fail(where, "the iterate became inf/nan")
            dX = [lincomb(None, h, a[i], d) for i in range(s)]
            size = max(self._size(dX[i], X[i], 1.0, inc[i]) for i in range(s)
                       if dX[i] is not None)  # fmt: skip
            if size <= 1.0:
                return [ki + di for ki, di in zip(k, d, strict=True)]
            # a stale Jacobian: full Newton from here on (as in :meth:`stage`)
            if not full and self._stale(size, previous, self.opts.max_iters - it):
                full = True
                if previous is not None and size > previous:
                    k, previous, it = guess, None, 0
                    continue
            k = [ki + di for ki, di in zip(k, d, strict=True)]
            previous = size
        raise self._fail(where, f"no convergence in {self.opts.max_iters} iterations")

    def step(self, fn: Field, times: Sequence[torch.Tensor], y0: torch.Tensor, h: Any,
             k1: torch.Tensor | None, where: str, *, start: _Linear | None = None,
             graph: Any = None) -> tuple[list, list]:  # fmt: skip
        """One step's stage inputs and slopes ``(X, k)``.

        ``k1``: the first slope when stage 1 is explicit and its slope is known (FSAL), and
        ``graph`` the evaluation that gave it (:meth:`first_slope`) if the caller has it.
        ``start``: the step's Jacobian at ``(t_n, y_n)`` if the caller has it
        (``jacobian="step"``; the reverse pass, :func:`implicit_recompute`).
        The last stage input of a stiffly accurate tableau is ``y_{n+1}``. Everything here
        depends only on the arguments (the Jacobians are local to the step), so a step
        recomputed in the reverse pass reproduces the forward's stages bitwise.
        """
        tab, s = self.tableau, self.tableau.stages
        a = tab.a
        if not self.diagonal:
            if k1 is None:
                k1, graph = self.first_slope(fn, times[0], y0)
            k = self.coupled_stages(fn, times, y0, h, [k1] * s, where, graph)
            return [lincomb(y0, h, a[i], k) for i in range(s)], k
        X: list[torch.Tensor] = []
        k = []
        lin: _Linear | None = start if self.jacobian == "step" else None
        for i in range(s):
            base = lincomb(y0, h, a[i][:i], k)
            gamma = a[i][i]
            if gamma == 0:
                Xi = base
                if i == 0 and k1 is not None:
                    ki = k1
                elif i == 0 and lin is None:  # the step's Jacobian is linearised here
                    ki, graph = self.first_slope(fn, times[0], Xi)
                else:
                    ki = fn(times[i], Xi)
            else:
                guess = k[-1] if k else fn(times[i], base)
                if lin is None and self.jacobian == "step":
                    # From the first slope's evaluation when it had one: the forward's
                    # first evaluation is observed with its arguments detached, which
                    # leaves no graph to build from (then one evaluation of its own).
                    lin = self.linear(fn, times[0], y0, graph)
                ki, lin = self.stage(fn, times[i], base, h * gamma, guess,
                                     f"{where}, stage {i + 1}", lin=lin, key=gamma)  # fmt: skip
                if self.jacobian != "step":
                    lin = None
                Xi = base + ki * (h * gamma)
            X.append(Xi)
            k.append(ki)
        return X, k


# --------------------------------------------------------------------------- adjoint


class StageGraphs(Protocol):
    """The reverse pass's evaluations of the field at one step's stages: one graph per stage,
    used for the transposed solve's products and the stage's final VJP alike."""

    def linearize(self, i: int, x: torch.Tensor) -> Any:
        """``f(t_i, x)`` with a graph (a handle for the other methods)."""

    def output(self, g: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(t_i, x), x)``: the evaluation and its input leaf."""

    def pull(self, g: Any, cot: torch.Tensor, *, retain: bool = False) -> tuple[Any, Any]:
        """``(J^T cot, tau)`` (``None`` where ``f`` does not read it), adding the parameter
        cotangents to the sweep's sums; ``retain`` keeps the graph for further pulls."""

    def pull_x(self, g: Any, cot: torch.Tensor) -> torch.Tensor | None:
        """``J^T cot`` alone (no parameter cotangents), keeping the graph."""


class _GraphLinear(_Linear):
    """A stage's linearisation from its evaluation graph in the reverse pass: ``J^T v`` is a
    VJP through that graph; ``J`` itself (dense and per-sample modes) is built on demand
    from the same graph."""

    def __init__(self, graphs: StageGraphs, g: Any, mode: str,
                 chunk_size: int | None = None) -> None:  # fmt: skip
        out, x = graphs.output(g)
        self.graphs, self.g, self.mode, self.chunk_size = graphs, g, mode, chunk_size
        self.shape = x.shape
        self.factors = {}
        self.J = None

    def build(self) -> _GraphLinear:
        if self.J is None and self.mode != "gmres":
            out, x = self.graphs.output(self.g)
            self.J = graph_jacobian(out, x, per_sample=self.mode == "per_sample",
                                    chunk_size=self.chunk_size)  # fmt: skip
        return self

    def jvp(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - transposed only
        raise NotImplementedError("the reverse pass's linearisations are transposed only")

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        u = self.graphs.pull_x(self.g, v.view(self.shape))
        return torch.zeros_like(v) if u is None else u.reshape(-1)


#: Iterative refinement of a transposed stage solve: correction sweeps (each one VJP) before
#: it gives up for a fresh Jacobian (which costs about as much as six VJPs on the stiff
#: benchmark's MLP), and the largest contraction per sweep it accepts.
REFINE_MAX_SWEEPS = 6
REFINE_RATE = 0.25
#: Converged when the correction is at most this many ulps of the residual's terms.
REFINE_ULPS = 16.0


class TransposedSolves:
    """The transposed solves and stage VJPs of the implicit adjoint for one step.

    Every stage is evaluated once with a graph (:class:`StageGraphs`), which serves the
    Jacobian (when one is built), the products ``J_i^T v`` of the solve and the final VJP.

    Diagonally implicit stages, ``(I - gamma_i J_i)^T kbar_i = c_i`` (stages ``i = s..1``):

    * ``adjoint_solve="fresh"``: ``J_i`` from stage ``i``'s graph, LU, solve;
    * ``"refine"`` (default): a Jacobian ``J_p`` for the whole step: ``start``, the
      recomputed step's own at ``y_n`` (``checkpoint="states"``), or the one the reverse
      pass ended the next step with (stored stages: :attr:`pre`, carried over by the
      caller), else the first implicit stage's, that stage solved directly. Stages start from
      ``kbar = P^{-T} c`` with ``P = I - gamma_i J_p`` (its explicit inverse) and iterate
      ``kbar <- kbar + P^{-T} (c - kbar + gamma_i J_i^T kbar)``, ``J_i^T kbar`` one VJP
      through stage ``i``'s graph at its converged input (the exact operator, so the fixed
      point is the exact solution; the preconditioner sets only the speed, a contraction
      by ``||P^{-T} gamma_i (J_i - J_p)^T||``: one sweep per stage on the stiff
      benchmark, whose worst case is about ``1e-4`` in its first steps). It stops once
      the predicted error (last correction times ``rate / (1 - rate)``) is within
      :data:`REFINE_ULPS` ulps of ``|c| + |kbar| + gamma_i |J_i^T kbar|``
      (per row with ``per_sample``), then takes the stage VJP with the parameters and
      checks the residual ``r`` that it gives once more (first by the bound
      ``|P^{-T} r| <= |P^{-T}|_F |r|``, per block, without the product; then by the
      correction ``P^{-T} r`` itself), correcting (linearly: one more VJP of the
      correction) while it shrinks by ``REFINE_RATE``, else finishing from a fresh
      Jacobian. When a stage's first sweep finds ``P^{-T} c`` already within the bound
      (the Jacobian hardly changes: a solution near equilibrium, a linear field), the
      following stages skip the sweeps (:attr:`Newton.refine_direct`): their stage VJP
      comes directly after ``P^{-T} c`` and its residual check is the only one, one VJP
      per stage; the first check that fails restores the sweeps. A stage whose
      corrections shrink by less than
      :data:`REFINE_RATE` per sweep, or that would need more than
      :data:`REFINE_MAX_SWEEPS`, falls back to ``J_i`` from its graph and a direct solve
      (and that Jacobian preconditions the remaining stages): never an unconverged solve.

    Gauss/Radau: one coupled solve with every stage's Jacobian from its graph; GMRES
    applies ``J_i^T v`` through the graphs.
    """

    def __init__(self, newton: Newton, graphs: StageGraphs, start: _Linear | None = None,
                 kept: dict[int, Any] | None = None) -> None:  # fmt: skip
        self.newton, self.graphs = newton, graphs
        self.mode = newton.mode
        self.refine = newton.opts.adjoint_solve == "refine" and self.mode != "gmres"
        self.pre: _Linear | None = start if self.refine else None  # the preconditioner
        self.kept: dict[int, Any] = dict(kept or {})  # stage -> graph, for its VJP later
        self.used: set[Any] = set()  # the keys of the inverses this step used (carried())

    def carried(self) -> _Linear | None:
        """The preconditioner in use at the end, for the previous step's solves (the
        Jacobian changes little from step to step; the refinement's checks make a poor one
        cost time only): its Jacobian and explicit inverses, without the graph it came
        from, which must not outlive this step (one network graph at a time)."""
        pre = self.pre
        if pre is None or pre.J is None:
            return None
        out = _Linear.__new__(_Linear)
        out.mode, out.shape, out.J = pre.mode, pre.shape, pre.J
        # Only the inverses this step used: they are keyed by ``h a_ii`` (the step size in
        # the key), the forward's LU factors by ``a_ii`` alone (its step size fixed); an
        # adaptive solve's sizes seldom recur, and keeping every one's inverse held one
        # ``B n^2`` matrix per step of the reverse pass while the Jacobian was carried.
        out.factors = {key: v for key, v in pre.factors.items() if key in self.used}
        return out

    def _linear(self, g: Any) -> _GraphLinear:
        return _GraphLinear(self.graphs, g, self.mode, self.newton.opts.jacobian_chunk_size)

    def _jacobian(self, lin: _GraphLinear) -> _GraphLinear:
        self.newton.n_jacobians += 1
        return lin.build()

    def vjp(self, i: int, Xi: torch.Tensor, kb: torch.Tensor, carry: Any) -> tuple:
        """The stage VJP (explicit stages, and every stage after a coupled solve)."""
        g = self.kept.pop(i, None)
        if g is None:
            g = self.graphs.linearize(i, Xi)
        xb, tau = self.graphs.pull(g, kb)
        return xb, tau, carry

    def solve_and_vjp(self, i: int, Xi: torch.Tensor, gamma: Any, rhs: torch.Tensor,
                      carry: Any) -> tuple:  # fmt: skip
        """``kbar_i`` from ``(I - gamma J_i)^T kbar_i = rhs``, then its VJP (see the class)."""
        g = self.graphs.linearize(i, Xi)
        lin = self._linear(g)
        if self.refine and self.pre is not None:
            done = self._refined(lin, gamma, rhs)
            if done is not None:
                xb, tau = done
                return xb, tau, carry
            self.newton.n_refine_fallbacks += 1
        if self.mode != "gmres":
            lin = self._jacobian(lin)
            self.pre = lin
        kb = self.newton.solve(lin, gamma, rhs, transpose=True, key=gamma)
        xb, tau = self.graphs.pull(g, kb)
        return xb, tau, carry

    def _inverse_T(self, pre: _Linear, gamma: Any) -> tuple | None:
        """``(r -> P^{-T} r, norms)`` with ``P = I - gamma J_pre``: one (batched) product
        with the explicit inverse, and the Frobenius norms of its blocks (``(B,)`` with
        ``per_sample``, else ``(1,)``), which bound the products' row norms. A
        preconditioner need not be backward stable (the refinement's residuals are exact
        products), and a product is several times cheaper than a triangular solve on
        small blocks. ``None`` when ``P`` is singular: a carried ``J_pre`` meets this
        step's ``gamma`` for the first time (another step size), so ``P`` may be singular
        where the step's own matrices are not."""
        # Keyed by gamma to 10 digits: a fixed grid's step sizes differ in their last bits
        # (differences of rounded nodes: about 40 distinct values over 200 steps), and a
        # preconditioner that far off costs nothing (the residuals are exact products).
        key = ("inverse_T", float(f"{float(gamma):.9e}"))
        self.used.add(key)
        if key not in pre.factors:
            assert pre.J is not None
            inv, info = torch.linalg.inv_ex(_identity_minus(pre.J, gamma))
            if bool((info != 0).any()):
                return None
            inv_T = inv.mT.contiguous()
            norms = torch.linalg.matrix_norm(inv_T).reshape(-1)  # Frobenius, per block
            pre.factors[key] = (inv_T, norms)
        inv_T, norms = pre.factors[key]
        if self.mode == "per_sample":
            B = inv_T.shape[0]
            return (lambda r: torch.bmm(inv_T, r.reshape(B, -1, 1)).view_as(r)), norms
        return (lambda r: (inv_T @ r.reshape(-1, 1)).view_as(r)), norms

    def _refined(self, lin: _GraphLinear, gamma: Any, c: torch.Tensor) -> tuple | None:
        """``(Xbar_i, tau_i)`` of the refined solve, or ``None`` (nothing pulled) when it
        does not contract fast enough."""
        assert self.pre is not None
        graphs, g = self.graphs, lin.g
        dtype = c.dtype
        tol, tiny = REFINE_ULPS * torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        inverse = self._inverse_T(self.pre, gamma)
        if inverse is None:
            return None
        precond, precond_norms = inverse
        rows = c.shape[0] if self.mode == "per_sample" else 1
        gam = float(gamma)  # the reverse pass is not recorded: a number suffices
        # The rows' rounding bounds, tol (|c| + |kbar| + |gamma| |J^T kbar|): the first
        # term once per stage, when first needed.
        tol_c: torch.Tensor | None = None

        def certain(kb: torch.Tensor, u: torch.Tensor) -> bool:
            """A sufficient test that ``kb`` is converged, without the correction:
            ``|P^{-T} r|_b <= |P^{-T}_b|_F |r_b|`` within the rows' bounds, ``r`` the
            residual. The common case after the final VJP; fewer operations than
            :func:`step` (no product with the inverse), and where it fails,
            :func:`step` decides from the correction itself."""
            r = (c - kb).add_(u, alpha=gam)
            nr, nc, nk, nu = torch.linalg.vector_norm(
                torch.stack((r, c, kb, u)).view(4, rows, -1), dim=2
            ).unbind()
            bound = (nc + nk).add_(nu, alpha=abs(gam)).mul_(tol).clamp_min_(tiny)
            return float((nr.mul_(precond_norms) / bound).amax()) <= 1.0

        def step(kb: torch.Tensor, u: Any, prev: torch.Tensor | None) -> tuple:
            """The correction ``d``, its row norms, the contraction ``rate`` (the largest
            ratio of ``d``'s row norms to ``prev``'s, ``None``: ``kb``'s, over the rows not
            yet within their rounding bounds: a converged row's corrections are rounding
            noise, which does not shrink, and must not fail the others; 0 when every row
            is within) and ``q``, the largest ratio of ``d``'s row norms to the rows'
            rounding bounds (``d`` is within the bounds when ``q <= 1``). Few tensor
            operations and one sync when ``q <= 1``: this runs once or twice per stage
            (``u = J^T kbar``, ``None`` for zero)."""
            nonlocal tol_c
            if tol_c is None:
                tol_c = torch.linalg.vector_norm(c.reshape(rows, -1), dim=1).mul_(tol)
            if u is None:
                u = torch.zeros_like(kb)
            d = precond((c - kb).add_(u, alpha=gam))
            norms = torch.linalg.vector_norm(torch.stack((d, kb, u)).view(3, rows, -1), dim=2)
            nd = norms[0]
            bound = torch.add(norms[1], norms[2], alpha=abs(gam)).mul_(tol).add_(tol_c)
            within = nd / bound.clamp_min_(tiny)
            q = float(within.amax())
            if q <= 1.0:
                return d, nd, 0.0, q
            base = norms[1] if prev is None else prev
            # ``not <=`` keeps a nan row open (and its nan rate fails the refinement)
            rates = (nd / base.clamp_min(tiny)).masked_fill_(within <= 1.0, 0.0)
            return d, nd, float(rates.amax()), q

        kb = precond(c)
        prev: torch.Tensor | None = None  # the rows' norms of kb (computed in ``step``)
        newton = self.newton
        if not newton.refine_direct:
            for sweep in range(REFINE_MAX_SWEEPS + 1):
                d, nd, rate, q = step(kb, graphs.pull_x(g, kb), prev)
                if sweep == 0:  # kbar = P^{-T} c was already within the bounds: the
                    newton.refine_direct = q <= 1.0  # next stage skips the sweeps
                if not rate <= REFINE_RATE:  # also nan
                    return None
                kb = kb + d
                prev = nd
                if q * (rate / (1 - rate)) <= 1.0:  # predicted within the bound after d
                    break
                if not _refinement_pays(sweep, rate, q):
                    return None
            else:  # pragma: no cover - the sweep count is checked before each sweep
                return None
        # The stage VJP with the parameters at the predicted solution; its J_i^T kbar checks
        # the residual once more. Corrections from here on are pulled too (all linear).
        # Directly after P^{-T} c (``refine_direct``: the last stage needed no sweep, as
        # when the Jacobian hardly changes over the steps) this is the only VJP.
        xb, tau = graphs.pull(g, kb, retain=True)
        if xb is not None and certain(kb, xb):
            return xb, tau
        for correction in range(REFINE_MAX_SWEEPS + 1):
            d, nd, rate, q = step(kb, xb, prev)
            if q <= 1.0:
                return xb, tau
            newton.refine_direct = False
            if not _refinement_pays(correction, rate, q):
                break
            xd, td = graphs.pull(g, d, retain=True)
            kb, xb, tau = kb + d, _add(xb, xd), _add(tau, td)
            prev = nd
        # Not converged after all: the exact correction from a fresh Jacobian (linear too).
        self.newton.n_refine_fallbacks += 1
        fresh = self._jacobian(lin)
        self.pre = fresh
        d = self.newton.solve(fresh, gamma, c - kb + (0 if xb is None else xb * gamma),
                              transpose=True, key=gamma)  # fmt: skip
        xd, td = graphs.pull(g, d)
        return _add(xb, xd), _add(tau, td)

    def coupled_solve_T(self, X: Sequence[torch.Tensor], h: Any,
                        rhs: Sequence[torch.Tensor | None]) -> list:  # fmt: skip
        """Gauss/Radau: the coupled transposed solve; the stage graphs are kept for the
        stage VJPs that follow (:meth:`vjp`)."""
        lins = []
        for i, Xi in enumerate(X):
            self.kept[i] = g = self.graphs.linearize(i, Xi)
            lin = self._linear(g)
            lins.append(lin if self.mode == "gmres" else self._jacobian(lin))
        r = [torch.zeros_like(X[i]) if v is None else v for i, v in enumerate(rhs)]
        return self.newton.coupled(lins, h, r, transpose=True)


def _refinement_pays(done: int, rate: float, q: float) -> bool:
    """Whether a refinement that has made ``done`` corrections, the last ``q`` times the
    rounding bound, should go on at contraction ``rate``: the rate is in
    ``(0, REFINE_RATE]`` (``nan`` fails) and the error left after the last correction,
    predicted as ``q rate / (1 - rate)``, reaches the bound within
    :data:`REFINE_MAX_SWEEPS` corrections in all, each gaining ``rate``."""
    if not 0.0 < rate <= REFINE_RATE:
        return False
    worst = q * (rate / (1 - rate))
    return done + 1 + math.log(worst) / -math.log(rate) <= REFINE_MAX_SWEEPS


def _add(a: Any, b: Any) -> Any:
    return b if a is None else (a if b is None else a + b)


def implicit_recompute(
    newton: Newton,
    graphs: StageGraphs,
    fn: Field,
    times: Sequence[torch.Tensor],
    y: torch.Tensor,
    h: Any,
    where: str,
) -> tuple[list, list, _Linear | None, dict[int, Any]]:
    """A step recomputed from ``y_n`` for its reverse: ``(X, k, start, kept)``.

    The same Newton iteration as the forward's (bitwise its stages), with ``f(t_n, y_n)``
    evaluated once with a graph: its Jacobian is the step's simplified-Newton matrix
    (``jacobian="step"``; returned as ``start``, the transposed solves' preconditioner),
    and when the first stage is explicit its value is ``k_1`` and its graph, returned in
    ``kept``, serves stage 1's VJP.
    """
    kept: dict[int, Any] = {}
    start = k1 = None
    explicit_first = newton.diagonal and newton.tableau.a[0][0] == 0
    want_start = newton.jacobian == "step" and newton.mode != "gmres" and newton.diagonal
    if explicit_first or want_start:
        g0 = graphs.linearize(0, y)
        if explicit_first:
            kept[0] = g0
            k1 = graphs.output(g0)[0].detach()
        if want_start:
            newton.n_jacobians += 1
            start = _GraphLinear(graphs, g0, newton.mode, newton.opts.jacobian_chunk_size).build()
    X, k = newton.step(fn, times, y, h, k1, where, start=start)
    return X, k, start, kept


def implicit_reverse_step(
    newton: Newton,
    graphs: StageGraphs,
    lam: torch.Tensor | None,
    X: Sequence[torch.Tensor],
    h: Any,
    *,
    k: Any = None,
    k_bar: Any = None,
    y0_bar: torch.Tensor | None = None,
    need_h_bar: bool = False,
    start: _Linear | None = None,
    kept: dict[int, Any] | None = None,
    k1_given: bool = False,
) -> tuple[StepVJP, _Linear | None]:
    """The core's :func:`implicit_step_vjp` with this module's transposed solves, each stage
    evaluated once with a graph (``graphs``), and the preconditioner to carry to the
    previous step (:meth:`TransposedSolves.carried`). ``start``: the step's Jacobian at
    ``y_n`` from :func:`implicit_recompute` when the reverse pass has just recomputed the
    step, else the next step's carried preconditioner (or ``None``); ``kept``: from
    :func:`implicit_recompute`. ``k1_given``: the first slope ``f(t_n, y_n)`` evaluated
    the previous step's last stage again (Kvaerno's FSAL, see ``ReverseSweep._reverse``):
    stage 1 is not differentiated here, its cotangent is returned as ``k1_bar``."""
    solves = TransposedSolves(newton, graphs, start, kept)
    res = implicit_step_vjp(
        newton.tableau, solves.vjp, lam, X, h,
        solve_and_vjp=solves.solve_and_vjp, coupled_solve_T=solves.coupled_solve_T,
        k=k, k_bar=k_bar, y0_bar=y0_bar, k1_given=k1_given, need_h_bar=need_h_bar,
        check=False,
    )  # fmt: skip
    return res, solves.carried()


# --------------------------------------------------------------------------- solvers


def _next(x: torch.Tensor) -> torch.Tensor:
    """One ulp up; differentiable (identity derivative): ``x + (next(x) - x)`` is exact."""
    d = x.detach()
    return x + (torch.nextafter(d, d + 1) - d)


def _prev(x: torch.Tensor) -> torch.Tensor:
    d = x.detach()
    return x + (torch.nextafter(d, d - 1) - d)


def fixed_stage_times(
    tableau: ButcherTableau, t0: Any, dt: Any, t1: Any, ydt: torch.dtype, perturb: bool
) -> list[torch.Tensor]:
    """Stage times of a fixed-grid implicit step (elementwise: also for all steps at once)."""
    out = []
    for ci in tableau.c:
        if ci == 0:
            ti = t0.to(ydt)
            out.append(_next(ti) if perturb else ti)
        elif ci == 1:
            ti = t1.to(ydt)
            out.append(_prev(ti) if perturb else ti)
        else:
            out.append((t0 + dt * ci).to(ydt))
    return out


def first_stage_joins_last(tableau: ButcherTableau) -> bool:
    """Whether a step's first slope ``f(t_n, y_n)`` is the previous step's last stage
    evaluated again: the first stage is explicit and the last is ``y_{n+1}`` at
    ``t_{n+1}`` (``c_s = 1``, stiffly accurate ``b = a_s``): Kvaerno, ``trbdf2``,
    ``trapezoid``. The reverse pass then pulls the first slope's cotangent through that
    last stage (``ReverseSweep._joins_last``), and ``checkpoint="stages"`` on a fixed
    grid need not keep ``y_n`` (only stage 1's VJP would read it)."""
    return not any(tableau.a[0]) and tableau.c[-1] == 1 and tuple(tableau.b) == tuple(tableau.a[-1])


class _ImplicitMixin:
    """Stage evaluation and recording shared by both solver kinds."""

    core_tableau: ButcherTableau
    newton: Newton
    func: Any

    def _field(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The field, with a recorder's stage capture suspended (Newton's evaluations are
        not stages); time already perturbed."""
        calls = getattr(self.func, "calls", None)
        if calls is None:
            return self.func(t, y)
        self.func.calls = None
        try:
            return self.func(t, y)
        finally:
            self.func.calls = calls

    def _capture(self, X: Sequence[torch.Tensor], k: Sequence[torch.Tensor], first: int) -> None:
        """Hand the converged stages to a recorder (``checkpoint="stages"``)."""
        calls = getattr(self.func, "calls", None)
        if calls is not None:
            calls.extend(zip(X[first:], k[first:], strict=True))


class ImplicitFixedGridSolver(_ImplicitMixin, FixedGridODESolver):
    """A fixed-grid implicit Runge--Kutta solver (subclassed per method below)."""

    order: int
    method: str

    def __init__(self, func: Any, y0: torch.Tensor, step_size: Any = None,
                 grid_constructor: Any = None, interp: str = "linear", perturb: bool = False,
                 **kwargs: Any) -> None:  # fmt: skip
        opts = NewtonOptions.pop(
            kwargs, kwargs.get("rtol", 1e-7), kwargs.get("atol", 1e-9), y0.dtype
        )
        if interp != "linear":
            implicit_interpolant(self.method, interp)  # raises
        super().__init__(func, y0, step_size=step_size, grid_constructor=grid_constructor,
                         interp=interp, perturb=perturb, **kwargs)  # fmt: skip
        self.core_tableau = implicit_tableau(self.method)
        self.newton = Newton(self.core_tableau, opts, y0.numel())

    def step_stages(self, fn: Field, t0: Any, dt: Any, t1: Any, y0: torch.Tensor) -> tuple:
        """``(X, k, h)`` of the step from ``t0``: the same computation forward and reverse."""
        # The event loop passes dt as the Python float step_size: read in t0's dtype, as
        # torchdiffeq's own arithmetic does (torch.as_tensor alone made it float32, and a
        # float64 solve then stepped by float32(step_size), 1.5e-8 off for 0.05).
        t0 = torch.as_tensor(t0, device=y0.device)
        dt, t1 = (torch.as_tensor(v, dtype=t0.dtype, device=y0.device) for v in (dt, t1))
        times = fixed_stage_times(self.core_tableau, t0, dt, t1, y0.dtype, bool(self.perturb))
        h = dt.to(y0.dtype)
        where = f"in the step from t={float(t0.detach()):.17g} to t={float(t1.detach()):.17g}"
        X, k = self.newton.step(fn, times, y0, h, None, where)
        return X, k, h

    def _step_func(self, func, t0, dt, t1, y0):
        X, k, h = self.step_stages(self._field, t0, dt, t1, y0)
        self._capture(X, k, 0)
        dy = lincomb(None, h, self.core_tableau.b, k)
        return dy, None


class KvaernoSolver(_ImplicitMixin, RKAdaptiveStepsizeODESolver):
    """Kvaerno's ESDIRK 3(2)/4(3)/5(4) in torchdiffeq's adaptive machinery.

    Step-size control, ``first_step``/``step_t``/``jump_t``/``min_step``/``max_step``/
    ``safety``/``ifactor``/``dfactor``/``max_num_steps``/``norm`` are torchdiffeq's
    (``_select_initial_step``, ``_compute_error_ratio``, ``_optimal_step_size``). A step
    whose Newton iteration fails is rejected and retried at a quarter of its size (as
    diffrax does); :class:`NewtonConvergenceError` is raised when that drives the step
    below ``min_step`` or under the resolution of ``t``.
    """

    method: str

    def __init__(self, func: Any, y0: torch.Tensor, rtol: Any, atol: Any, **kwargs: Any) -> None:
        opts = NewtonOptions.pop(kwargs, rtol, atol, y0.dtype)
        super().__init__(func, y0, rtol, atol, **kwargs)
        self.core_tableau = implicit_tableau(self.method)
        self.newton = Newton(self.core_tableau, opts, y0.numel())
        self._dense_w = torch.tensor(hermite(self.core_tableau).W, dtype=y0.dtype,
                                     device=y0.device)  # fmt: skip

    def stage_times(self, t0: torch.Tensor, dt: torch.Tensor, t1: torch.Tensor,
                    ydt: torch.dtype, first: torch.Tensor) -> list[torch.Tensor]:  # fmt: skip
        t0c, dtc, t1c = t0.to(ydt), dt.to(ydt), t1.to(ydt)
        alpha = self.tableau.alpha
        out = [first]
        for i in range(1, self.core_tableau.stages):
            out.append(_prev(t1c) if self.core_tableau.c[i] == 1 else t0c + alpha[i - 1] * dtc)
        return out

    def step_stages(self, fn: Field, times: Sequence[torch.Tensor], y0: torch.Tensor,
                    h: torch.Tensor, k1: torch.Tensor | None,
                    graph: Any = None) -> tuple:  # fmt: skip
        where = (
            f"in the step from t={float(times[0].detach()):.17g} of size {float(h.detach()):.17g}"
        )
        return self.newton.step(fn, times, y0, h, k1, where, graph=graph)

    def _adaptive_step(self, rk_state):
        y0, f0, _, t0, dt, interp_coeff = rk_state
        if not torch.isfinite(dt):
            dt = self.min_step
        dt = dt.clamp(self.min_step, self.max_step)
        self.func.callback_step(t0, y0, dt)
        t1 = t0 + dt
        assert t0 + dt > t0, f"underflow in dt {dt.item()}"
        assert torch.isfinite(y0).all(), f"non-finite values in state `y`: {y0}"
        on_step_t = on_jump_t = False
        if len(self.step_t):
            nxt = self.step_t[self.next_step_index]
            on_step_t = bool(t0 < nxt < t0 + dt)
            if on_step_t:
                t1, dt = nxt, nxt - t0
        if len(self.jump_t):
            nxt = self.jump_t[self.next_jump_index]
            on_jump_t = bool(t0 < nxt < t0 + dt)
            if on_jump_t:
                on_step_t = False
                t1, dt = nxt, nxt - t0

        ydt = y0.dtype
        h = dt.to(ydt)
        # The first slope's time: the field was last evaluated at the previous step's end.
        first = getattr(self, "_first_time", None)
        if first is None:
            first = t0.to(ydt)
        times = self.stage_times(t0, dt, t1, ydt, first)
        # The evaluation that gave f0, when it also serves this step's Jacobian.
        graph = getattr(self, "_first_graph", None)
        try:
            X, k = self.step_stages(self._field, times, y0, h, f0, graph)
        except NewtonConvergenceError as err:
            small = dt * 0.25
            if small <= self.min_step or not bool(t0 + small > t0):
                raise NewtonConvergenceError(
                    f"{err} (the step size cannot be reduced further)"
                ) from err
            self.func.callback_reject_step(t0, y0, dt)
            return RungeKuttaState(y0, f0, t0, t0, small, interp_coeff)
        tab = self.core_tableau
        y1 = X[-1]  # stiffly accurate: y_{n+1} = y_n + h sum_i b_i k_i is the last stage input
        error = lincomb(None, h, tab.b_error, k)
        error_ratio = compute_error_ratio(error, self.rtol, self.atol, y0, y1, self.norm)
        accept = bool(error_ratio <= 1)
        if dt > self.max_step:
            accept = False
        if dt <= self.min_step:
            accept = True
        if accept:
            self._capture(X, k, 1)
            self.func.callback_accept_step(t0, y0, dt)
            kk = torch.stack(k, dim=-1)
            interp_coeff = self._interp_fit(y0, y1, kk, dt)
            if on_step_t and self.next_step_index != len(self.step_t) - 1:
                self.next_step_index += 1
            # The next first slope: f at y_{n+1} itself (not Newton's last iterate k_s), so
            # that it is a function of the state and a states-only checkpoint suffices; its
            # evaluation's graph serves the next step's Jacobian (Newton.first_slope).
            f1, self._first_graph = self.newton.first_slope(self._field, times[-1], y1)
            self._first_time = times[-1]
            if on_jump_t:
                if self.next_jump_index != len(self.jump_t) - 1:
                    self.next_jump_index += 1
                f1 = self.func(t1, y1, perturb=Perturb.NEXT)
                self._first_time = _next(t1.to(ydt))
                self._first_graph = None
            t_next, y_next, f_next = t1, y1, f1
        else:
            self.func.callback_reject_step(t0, y0, dt)
            t_next, y_next, f_next = t0, y0, f0
        dt_next = optimal_step_size(dt, error_ratio, self.safety, self.ifactor, self.dfactor,
                                     self.order)  # fmt: skip
        dt_next = dt_next.clamp(self.min_step, self.max_step)
        return RungeKuttaState(y_next, f_next, t0, t_next, dt_next, interp_coeff)

    def _interp_fit(self, y0, y1, k, dt):
        coeff = torch.matmul(k, self._dense_w) * dt.type_as(y0)
        return [y0, *(coeff[..., p] for p in range(1, coeff.shape[-1]))]


def _torchdiffeq_layout(tab: ButcherTableau) -> Any:
    """The nodes in torchdiffeq's layout (``alpha``, without ``c_1``); the solver reads only
    those (the stages are solved from the core tableau)."""
    f64 = torch.float64
    weights = torch.tensor(tab.b, dtype=f64)
    error = torch.tensor(tab.b_error, dtype=f64)
    return TorchdiffeqTableau(torch.tensor(tab.c[1:], dtype=f64), [], weights, error)


def _class_name(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_")) + "Solver"


def _make(method: str) -> type:
    tab = implicit_tableau(method)
    if method in IMPLICIT_ADAPTIVE_METHODS:
        attrs = {
            "method": method,
            "order": tab.order,
            "tableau": _torchdiffeq_layout(tab),
            "mid": torch.zeros(tab.stages, dtype=torch.float64),
        }
        return type(_class_name(method), (KvaernoSolver,), attrs)
    return type(_class_name(method), (ImplicitFixedGridSolver,), {"method": method,
                                                                   "order": tab.order})  # fmt: skip


#: name -> solver class, torchdiffeq master's names (and kvaerno3/4/5).
IMPLICIT_SOLVERS: dict[str, type] = {m: _make(m) for m in IMPLICIT_METHODS}
