"""Forward pass of the torch adapter: torchdiffeq's own solvers, observed step by step.

The forward solve runs torchdiffeq 0.2.5's solver classes unchanged, so the accepted
steps, the error control, every option and every output value are torchdiffeq's. Thin
subclasses (built once per solver class by :func:`recording_class`) watch it:

* the vector field handed to the solver is replaced by a :class:`Recorder`, which counts
  evaluations, sees the step callbacks (``callback_step`` gets the step size before
  ``step_t``/``jump_t`` clip it, ``callback_accept_step`` after) and, inside a step,
  the stage inputs ``X_i`` and slopes ``k_i`` exactly as torchdiffeq computed them;
* adaptive solvers: ``_adaptive_step`` is wrapped; an accepted step is logged with its
  start/end times, its size, whether its end was pinned to a ``step_t``/``jump_t`` point,
  and how its first slope was produced (``f(t0, y0)`` for the first step, the carried
  last stage otherwise (FSAL), ``f(next(t_n), y_n)`` after a ``jump_t``);
* fixed-grid solvers: ``_step_func`` is wrapped (it is also what their event loop uses).

What is kept per step is decided by :class:`Store` (the checkpoint policy): the state
``y_n``, plus the carried first slope where it is not a function of ``y_n``
(``fehlberg2``, ``adaptive_heun``), or all stage inputs (``checkpoint="stages"``), or
only an online budget of states (``checkpoint=<int>``).
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

import torch
from torchdiffeq._impl.misc import Perturb
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _ButcherTableau
from torchdiffeq._impl.solvers import FixedGridODESolver

from ..core import ButcherTableau, DenseOutput, get_tableau
from ..core.checkpointing import OnlineCheckpointer
from ..core.interpolants import diffrax_interpolant, torchdiffeq_interpolant

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "REFUSED_METHODS",
    "SOLVERS",
    "Tsit5Solver",
    "Recorder",
    "StepLog",
    "Store",
    "recording_class",
    "method_tableau",
    "method_interpolant",
    "K1_FIRST",
    "K1_NEXT",
    "K1_FSAL",
    "CHAIN",
    "PINNED",
    "GRID",
]

ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
REFUSED_METHODS = {
    "explicit_adams": "a linear multistep method (each step reuses earlier slopes)",
    "implicit_adams": "an implicit linear multistep method (solved by fixed-point iteration)",
    "fixed_adams": "an implicit linear multistep method (solved by fixed-point iteration)",
    "scipy_solver": "a wrapper around SciPy's solvers, which torch cannot see into",
}

# How the first slope k_1 of a step was produced (torchdiffeq 0.2.5).
K1_FIRST = 0  # f(t_n, y_n), time unperturbed: first adaptive step; fixed grid without perturb
K1_NEXT = 1  # f(nextafter(t_n, +), y_n): after a jump_t; fixed grid with perturb=True
K1_FSAL = 2  # the previous step's last stage, carried over (adaptive solvers)

# How a step's end time depends on the inputs (for time gradients; DESIGN 3.1/3.2).
CHAIN = 0  # t_{n+1} = t_n + h with h constant (adaptive steps, fixed-step event loop)
PINNED = 1  # t_{n+1} is a step_t/jump_t point (constant), h = t_{n+1} - t_n
GRID = 2  # fixed grid: t_n, t_{n+1} are grid nodes (a function of t), h = t_{n+1} - t_n


def _torchdiffeq_tableau(tab: ButcherTableau) -> _ButcherTableau:
    """A core tableau in torchdiffeq's layout (float64 tensors, nodes without c_1)."""
    s = tab.stages
    return _ButcherTableau(
        alpha=torch.tensor(tab.c[1:], dtype=torch.float64),
        beta=[torch.tensor(tab.a[i][:i], dtype=torch.float64) for i in range(1, s)],
        c_sol=torch.tensor(tab.b, dtype=torch.float64),
        c_error=torch.tensor(tab.b_error, dtype=torch.float64),
    )


class Tsit5Solver(RKAdaptiveStepsizeODESolver):
    """Tsitouras' 5(4) pair in torchdiffeq's adaptive machinery (not part of torchdiffeq).

    Steps, error control and options are those of every torchdiffeq adaptive solver;
    output times are interpolated with Tsit5's own degree-4 dense output (the
    polynomials diffrax uses), ``y(t_n + theta h) = y_n + h sum_i w_i(theta) k_i``.
    """

    order = 5
    tableau = _torchdiffeq_tableau(get_tableau("tsit5"))
    mid = torch.zeros(7, dtype=torch.float64)  # unused: _interp_fit is replaced below

    def __init__(self, func: Any, y0: torch.Tensor, rtol: Any, atol: Any, **kwargs: Any) -> None:
        super().__init__(func, y0, rtol, atol, **kwargs)
        # W[i, p]: coefficient of theta**p in w_i; stage coefficients take y's dtype, as
        # torchdiffeq casts its tableaux.
        self._dense_w = torch.tensor(
            diffrax_interpolant("Tsit5").W, dtype=y0.dtype, device=y0.device
        )

    def _interp_fit(self, y0, y1, k, dt):
        # torchdiffeq evaluates sum_p coeff[p] x**p: coeff[0] = y0, coeff[p] = dt W[:, p].k
        coeff = torch.matmul(k, self._dense_w) * dt.type_as(y0)
        return [y0, *(coeff[..., p] for p in range(1, coeff.shape[-1]))]


#: torchdiffeq's Runge--Kutta solvers plus tsit5 (name -> solver class).
SOLVERS: dict[str, type] = {
    **{name: _TORCHDIFFEQ_SOLVERS[name] for name in ADAPTIVE_METHODS if name != "tsit5"},
    "tsit5": Tsit5Solver,
    **{name: _TORCHDIFFEQ_SOLVERS[name] for name in FIXED_METHODS},
}


def method_tableau(method: str) -> ButcherTableau:
    """The tableau torchdiffeq's ``method`` steps with (its ``rk4`` is the 3/8 rule)."""
    return get_tableau("rk38" if method == "rk4" else method)


def method_interpolant(method: str, interp: str) -> DenseOutput:
    """The dense output torchdiffeq (or, for tsit5, our solver) uses inside a step."""
    if method == "tsit5":
        return diffrax_interpolant("Tsit5")
    return torchdiffeq_interpolant(method, interp if method in FIXED_METHODS else "linear")


class Recorder:
    """Stands in for torchdiffeq's wrapped vector field inside the solver.

    Counts evaluations and, while ``calls`` is a list, appends each stage's
    ``(X_i, k_i)``. In adaptive solvers the only call with ``Perturb.NEXT`` is the
    re-evaluation of the first slope after a ``jump_t`` (an accepted step that ended on
    a jump); it is kept in ``jump_k1``, which the step wrapper clears before each step.
    """

    def __init__(self, func: Any, *, adaptive: bool) -> None:
        self.func = func  # torchdiffeq's _PerturbFunc: carries the user's callbacks
        self.base = func.base_func
        self.adaptive = adaptive
        self.nfe = 0
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.jump_k1: torch.Tensor | None = None
        self.dt_attempt: Any = None
        self.dt_accept: Any = None
        self.accepted = False

    def __call__(self, t: torch.Tensor, y: torch.Tensor, *, perturb: Perturb = Perturb.NONE):
        self.nfe += 1
        # _PerturbFunc's semantics (cast t to y's real dtype, then step one ulp for
        # NEXT/PREV), without its per-call y.abs() and autograd wrapper: no grad here.
        t = t.to(y.dtype)
        if perturb is Perturb.NEXT:
            t = torch.nextafter(t, t + 1)
        elif perturb is Perturb.PREV:
            t = torch.nextafter(t, t - 1)
        out = self.base(t, y)
        if self.adaptive and perturb is Perturb.NEXT:
            self.jump_k1 = out
        elif self.calls is not None:
            self.calls.append((y, out))
        return out

    def callback_step(self, t0, y0, dt):
        self.dt_attempt = dt
        return self.func.callback_step(t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted = True
        self.dt_accept = dt
        return self.func.callback_accept_step(t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        return self.func.callback_reject_step(t0, y0, dt)


@dataclasses.dataclass
class StepLog:
    """The accepted steps of one solve, in solver time (negated when ``t`` decreases).

    ``t0``, ``t1``, ``dt`` hold 0-d tensors (torchdiffeq's time dtype for adaptive
    solvers, the grid's for fixed ones); ``mode`` and ``k1`` the CHAIN/PINNED/GRID and
    K1_* tags above; ``y_final`` is the state at the end of the last step.
    """

    t0: list[torch.Tensor] = dataclasses.field(default_factory=list)
    t1: list[torch.Tensor] = dataclasses.field(default_factory=list)
    dt: list[Any] = dataclasses.field(default_factory=list)
    mode: list[int] = dataclasses.field(default_factory=list)
    k1: list[int] = dataclasses.field(default_factory=list)
    y_final: torch.Tensor | None = None
    first_step: float | None = None
    n_rejected: int = 0
    event: bool = False

    def __len__(self) -> int:
        return len(self.t0)


class Store:
    """Checkpoint policy: which per-step tensors survive the forward pass.

    Arguments:
        checkpoint: ``"states"``, ``"stages"`` or a budget (int >= 1) of stored states.
        keep_k1: also keep the carried first slope with each state (FSAL methods whose
            last stage is not evaluated at ``y_{n+1}``: fehlberg2, adaptive_heun).
        keep_slopes: in ``"stages"`` mode also keep the slopes ``k_i`` (needed only for
            time gradients).

    ``stored[n]`` is ``(y_n, k1_n or None)`` for states/budgets and
    ``(X_1..X_s, k_1..k_s or ())`` for stages.
    """

    def __init__(self, checkpoint: str | int, *, keep_k1: bool, keep_slopes: bool) -> None:
        self.stages = checkpoint == "stages"
        self.keep_k1 = keep_k1
        self.keep_slopes = keep_slopes
        self.online = OnlineCheckpointer(checkpoint) if isinstance(checkpoint, int) else None
        self.stored: dict[int, tuple] = {}

    @property
    def capture(self) -> bool:
        """Whether stage inputs must be captured during a step."""
        return self.stages

    def offer(
        self, n: int, y: torch.Tensor, k1: torch.Tensor | None, calls: list | None, *, carried: bool
    ) -> None:
        """Offer step ``n``'s start: ``y_n``, its first slope (adaptive solvers; ``carried``
        when it is the previous step's last stage) and the captured stage calls."""
        if self.stages:
            assert calls is not None
            X = (y, *(c[0] for c in calls)) if k1 is not None else tuple(c[0] for c in calls)
            k: tuple = ()
            if self.keep_slopes:
                k = (k1, *(c[1] for c in calls)) if k1 is not None else tuple(c[1] for c in calls)
            self.stored[n] = (X, k)
            return
        if self.online is not None:
            keep, dropped = self.online.keep(n)
            for d in dropped:
                self.stored.pop(d, None)
            if not keep:
                return
        self.stored[n] = (y, k1 if self.keep_k1 and carried else None)


def _check_finite(x: torch.Tensor, sign: float, t0: Any, dt: Any) -> None:
    """Raise if ``x`` has inf/nan, naming the step ``[t0, t0 + dt]`` in user time."""
    if not bool(torch.isfinite(x).all()):
        a, b = sign * float(t0), sign * (float(t0) + float(dt))
        raise FloatingPointError(
            f"non-finite values (inf or nan) in the state during the step from t={a:.17g} "
            f"to t={b:.17g}: the vector field returned inf/nan or the solution blew up"
        )


class _AdaptiveRecording:
    """Mixin over a torchdiffeq adaptive RK solver: logs accepted steps."""

    _rec: Recorder
    _log: StepLog
    _store: Store
    _sign: float
    _next_k1: int

    def integrate_until_event(self, t0, event_fn):
        self._log.event = True
        return super().integrate_until_event(t0, event_fn)

    def _adaptive_step(self, rk_state):
        rec, log = self._rec, self._log
        if log.first_step is None and not log.n_rejected and not len(log):
            log.first_step = float(rk_state.dt)  # selected or given; pin it to reproduce
        rec.accepted, rec.jump_k1 = False, None
        rec.calls = [] if self._store.capture else None
        try:
            new = super()._adaptive_step(rk_state)
        finally:
            calls, rec.calls = rec.calls, None
        t0 = rk_state.t1  # the step starts where the previous accepted step ended
        if not rec.accepted:
            log.n_rejected += 1
            # A nan/inf slope makes the error ratio nan and with it the next step size;
            # torchdiffeq would only fail later with "underflow in dt".
            _check_finite(new.dt, self._sign, t0, rec.dt_attempt)
            return new
        _check_finite(new.y1, self._sign, t0, rec.dt_accept)
        n = len(log)
        log.t0.append(t0)
        log.t1.append(new.t1)
        log.dt.append(rec.dt_accept)
        # step_t/jump_t clipping replaces dt by t1 - t0: the accepted dt is then a new
        # tensor, the attempted one otherwise (torchdiffeq 0.2.5 _adaptive_step).
        log.mode.append(CHAIN if rec.dt_accept is rec.dt_attempt else PINNED)
        log.k1.append(self._next_k1)
        self._store.offer(n, rk_state.y1, rk_state.f1, calls, carried=self._next_k1 == K1_FSAL)
        self._next_k1 = K1_NEXT if rec.jump_k1 is not None else K1_FSAL
        log.y_final = new.y1
        return new


class _FixedRecording:
    """Mixin over a torchdiffeq fixed-grid solver: logs every step."""

    _rec: Recorder
    _log: StepLog
    _store: Store
    _sign: float
    _pending: Any = None

    def integrate_until_event(self, t0, event_fn):
        self._log.event = True
        return super().integrate_until_event(t0, event_fn)

    def _step_func(self, func, t0, dt, t1, y0):
        rec, log = self._rec, self._log
        rec.calls = [] if self._store.capture else None
        try:
            dy, f0 = super()._step_func(func, t0, dt, t1, y0)
        finally:
            calls, rec.calls = rec.calls, None
        _check_finite(dy, self._sign, t0, dt)
        n = len(log)
        log.t0.append(t0)
        log.t1.append(t1)
        log.dt.append(torch.as_tensor(dt, dtype=t0.dtype, device=t0.device))
        log.mode.append(CHAIN if log.event else GRID)
        log.k1.append(K1_NEXT if self.perturb else K1_FIRST)
        self._store.offer(n, y0, None, calls, carried=False)
        # torchdiffeq forms y1 = y0 + dy after this returns; the last one is the final state.
        self._pending = (y0, dy)
        return dy, f0

    def finish(self) -> None:
        if self._pending is not None:
            y0, dy = self._pending
            self._log.y_final = y0 + dy
            self._pending = None


@cache
def recording_class(method: str) -> type:
    """The solver class of ``method`` with the recording mixin in front."""
    base = SOLVERS[method]
    mixin = _FixedRecording if issubclass(base, FixedGridODESolver) else _AdaptiveRecording
    return type(f"_Recording{base.__name__}", (mixin, base), {})


def make_solver(
    method: str,
    func: Any,
    y0: torch.Tensor,
    rtol: Any,
    atol: Any,
    options: dict,
    *,
    store: Store,
    sign: float,
):
    """Instantiate the recording solver (same arguments as torchdiffeq's ``odeint``)."""
    solver = recording_class(method)(func=func, y0=y0, rtol=rtol, atol=atol, **options)
    adaptive = method in ADAPTIVE_METHODS
    solver._rec = Recorder(func, adaptive=adaptive)
    solver.func = solver._rec
    solver._log = StepLog()
    solver._store = store
    solver._sign = sign
    if adaptive:
        solver._next_k1 = K1_FIRST
    return solver
