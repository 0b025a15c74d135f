"""Forward half of the torch adapter: torchdiffeq's own solvers, observed step by step.

:func:`record_solve` runs torchdiffeq 0.2.5's solver classes unchanged, so the accepted
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

The solve hands back a :class:`Recording` (the typed step log, the stage times, where
each output lies, the counts) and the :class:`Checkpoints` (the tensors the backward
pass needs, for ``ctx.save_for_backward``). Nothing refers to the solver afterwards, so
its final state (``y1``, ``f1``, the stage tensor, the interpolation coefficients)
is freed when the forward pass returns.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from ..core.checkpointing import OfflineCheckpointer, OnlineCheckpointer
from ._torch_implicit import first_stage_joins_last, fixed_stage_times
from ._torch_methods import SOLVERS, MethodSpec, method_spec
from ._torchdiffeq_compat import FixedGridODESolver, Perturb, perturb_time

__all__ = [
    "K1Source",
    "StepMode",
    "OutputKind",
    "OutputRef",
    "StepRecord",
    "Recording",
    "Checkpoints",
    "Problem",
    "Recorder",
    "Store",
    "recording_class",
    "record_solve",
]


class K1Source(enum.Enum):
    """How the first slope ``k_1`` of a step was produced (torchdiffeq 0.2.5)."""

    FIRST = "first"  # f(t_n, y_n), time unperturbed: first adaptive step; fixed grid
    NEXT = "next"  # f(nextafter(t_n, +), y_n): after a jump_t; fixed grid with perturb=True
    FSAL = "fsal"  # the previous step's last stage, carried over (adaptive solvers)


class StepMode(enum.Enum):
    """How a step's end time depends on the inputs (for time gradients; README, How it works)."""

    CHAIN = "chain"  # t_{n+1} = t_n + h with h constant (adaptive steps, fixed-step event loop)
    PINNED = "pinned"  # t_{n+1} is a step_t/jump_t point (constant), h = t_{n+1} - t_n
    GRID = "grid"  # fixed grid: t_n, t_{n+1} are grid nodes (a function of t)


class OutputKind(enum.Enum):
    """Where an output sits in its step. Fixed-grid linear interpolation returns ``y_n`` or
    ``y_{n+1}`` itself at the step's ends (no theta-derivative there, as torchdiffeq)."""

    INSIDE = "inside"
    AT_START = "at_start"
    AT_END = "at_end"


@dataclasses.dataclass(frozen=True)
class OutputRef:
    """One output ``solution[index]`` interpolated in a step at ``theta`` in ``[0, 1]``.

    ``theta = (tau - t_n)/(t_{n+1} - t_n)`` as a Python float (y's dtype for adaptive
    solvers, as torchdiffeq casts it); ``time_input`` is false for an event time, which
    is not an input of the solve.
    """

    index: int
    theta: float
    kind: OutputKind
    time_input: bool


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One accepted step, in solver time (negated when ``t`` decreases).

    Attributes:
        t0, t1, dt: 0-d tensors in torchdiffeq's time dtype (adaptive: its ``dtype``
            option promoted with y's; fixed grid: the grid's); ``dt`` is the size the
            step used, ``t1`` where it ended (``t0 + dt`` unless pinned).
        mode: how ``t1`` depends on the inputs.
        k1: how the first slope was produced.
        h: ``dt`` in y's dtype, as a Python float (the step size the stages used).
        span: ``t1 - t0`` as a Python float (outputs' ``theta`` derivative).
        outputs: the outputs interpolated in this step.
    """

    t0: torch.Tensor
    t1: torch.Tensor
    dt: torch.Tensor
    mode: StepMode
    k1: K1Source
    h: float
    span: float
    outputs: tuple[OutputRef, ...]


@dataclasses.dataclass(frozen=True)
class GridPullback:
    """How a fixed grid was built from ``t`` (kept only when ``t`` needs a gradient).

    ``constructor(func, y0, t)`` is the solver's grid constructor (torchdiffeq's from
    ``step_size``, the user's ``grid_constructor``, or the identity); ``y0`` travels in
    the :class:`Checkpoints` (it is the solve's input, so no copy).
    """

    constructor: Callable[..., torch.Tensor]
    func: Any


@dataclasses.dataclass(frozen=True)
class Recording:
    """What the reverse pass needs from the forward solve, besides the saved tensors.

    Attributes:
        spec: the method.
        steps: the accepted steps, in order.
        stage_times: ``(N, s)`` tensor in y's dtype: the time at which torchdiffeq
            evaluated each stage of each step (perturbed where it perturbs).
        end_times: ``(N,)`` tensor in y's dtype: ``t_{n+1}`` unperturbed (the cubic
            fit's extra slope ``f(t_{n+1}, y_{n+1})``).
        loose: outputs equal to ``y_0`` without any step (an immediate event).
        n_outputs: ``len(t)``; ``t_dtype``: ``t``'s dtype (for its cotangent).
        need_t: whether ``t`` needs a gradient (the forward then kept what it needs).
        checkpoint: ``"states"``, ``"stages"`` or a budget.
        online: the budget's online checkpointer (its reverse schedule), else ``None``.
        grid: the grid constructor, for a fixed grid whose nodes need cotangents.
        nfe, n_rejected, first_step: counts of the forward solve (``first_step`` the
            initial step size of an adaptive solve).
        newton: an implicit method's Newton solver (:class:`~._torch_implicit.Newton`;
            options only, no tensors): the reverse pass recomputes stages and solves the
            transposed systems with it.
        rng: when func draws random numbers, per step the generator state each stage's
            evaluation started from (stage 1: the call that produced the step's first
            slope), for the backward to replay; else ``None``.
    """

    spec: MethodSpec
    steps: tuple[StepRecord, ...]
    stage_times: torch.Tensor | None
    end_times: torch.Tensor | None
    loose: tuple[int, ...]
    n_outputs: int
    t_dtype: torch.dtype
    need_t: bool
    checkpoint: str | int
    online: OnlineCheckpointer | OfflineCheckpointer | None
    grid: GridPullback | None
    nfe: int
    n_rejected: int
    first_step: float | None
    newton: Any = None
    rng: tuple[tuple, ...] | None = None

    @property
    def stages(self) -> bool:
        """Whether the checkpoints hold every stage input (``checkpoint="stages"``)."""
        return self.checkpoint == "stages"


@dataclasses.dataclass
class Checkpoints:
    """The tensors the backward pass needs: moved into ``ctx`` by :meth:`pack`.

    ``stored[n]`` is ``(y_n, k1_n or None)`` for states/budgets and
    ``((X_1..X_s), (k_1..k_s) or ())`` for stages; ``y_final`` is the state after the
    last step; ``y0`` the initial state when a fixed grid is pulled back (else ``None``).
    Every tensor has torchdiffeq's flat state shape and y's dtype.
    """

    stored: dict[int, tuple]
    y_final: torch.Tensor
    stages: bool
    y0: torch.Tensor | None = None

    def pack(self) -> tuple[list[torch.Tensor], Any]:
        """Flatten for ``ctx.save_for_backward`` (each tensor once) and the layout that
        :meth:`unpack` rebuilds the checkpoints from. Nothing else refers to the tensors
        once the forward returns, so they live in ``ctx`` only (saved-tensor hooks that
        offload them really free the originals)."""
        tensors: list[torch.Tensor] = []
        index: dict[int, int] = {}

        def put(x: torch.Tensor | None) -> int:
            if x is None:
                return -1
            i = index.get(id(x))
            if i is None:
                i = index[id(x)] = len(tensors)
                tensors.append(x)
            return i

        parts = self._parts
        spec = [(n, tuple(tuple(map(put, p)) for p in parts(st))) for n, st in self.stored.items()]
        return tensors, (spec, put(self.y_final), put(self.y0), self.stages)

    def _parts(self, st: tuple) -> tuple[tuple, ...]:
        return st if self.stages else ((st[0], st[1]),)

    @classmethod
    def unpack(cls, saved: tuple[torch.Tensor, ...], layout: Any) -> Checkpoints:
        spec, final, y0, stages = layout

        def get(i: int) -> torch.Tensor | None:
            return None if i < 0 else saved[i]

        stored: dict[int, tuple] = {}
        for n, parts in spec:
            got = tuple(tuple(map(get, p)) for p in parts)
            stored[n] = got if stages else got[0]
        return cls(stored, saved[final], stages, get(y0))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One solve as torchdiffeq's ``_check_inputs`` normalised it.

    Attributes:
        wfunc: torchdiffeq's wrapped field (``_PerturbFunc``; ``wfunc.base_func`` is the
            field the solver evaluates after perturbing time, with the user's callbacks).
        method, options, rtol, atol, event_fn: as normalised by ``_check_inputs``.
        checkpoint: ``"states"``, ``"stages"`` or a budget of stored states.
        sign: -1 when torchdiffeq negated time (decreasing ``t``), for error messages.
    """

    wfunc: Any
    method: str
    options: dict
    rtol: Any
    atol: Any
    event_fn: Any
    checkpoint: str | int
    sign: float

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method, self.options.get("interp", "linear"))


class Recorder:
    """Stands in for torchdiffeq's wrapped vector field inside the solver.

    Counts evaluations and, while ``calls`` is a list, appends each stage's
    ``(X_i, k_i)``. In adaptive solvers the only call with ``Perturb.NEXT`` is the
    re-evaluation of the first slope after a ``jump_t`` (an accepted step that ended on
    a jump); it is kept in ``jump_k1``, which the step wrapper clears before each step.

    ``observer(base, t, y)`` (a :class:`~._torch_inputs.FuncObserver`), when given,
    evaluates the field: it watches the first evaluation and, when func draws random
    numbers, gives each call's starting generator state, collected like ``calls`` in
    ``rng_calls`` (and ``rng_jump`` for the re-evaluation after a jump).
    """

    def __init__(self, func: Any, *, adaptive: bool, observer: Any = None) -> None:
        self.func = func  # torchdiffeq's _PerturbFunc: carries the user's callbacks
        self.base = func.base_func
        self.adaptive = adaptive
        self.observer = observer
        self.rng_calls: list | None = None
        self.rng_jump: Any = None
        self.nfe = 0
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.jump_k1: torch.Tensor | None = None
        self.dt_attempt: Any = None
        self.dt_accept: Any = None
        self.accepted = False
        #: an implicit method's name: a random func is refused at its first evaluation
        #: (noise keeps Newton from converging, or adaptive steps shrink without end)
        self.refuse_random: str | None = None

    def __call__(self, t: torch.Tensor, y: torch.Tensor, *, perturb: Perturb = Perturb.NONE):
        self.nfe += 1
        # _PerturbFunc's semantics without its per-call y.abs() and autograd wrapper.
        obs = self.observer
        t = perturb_time(t, y.dtype, perturb)
        out = self.base(t, y) if obs is None else obs(self.base, t, y)
        if self.refuse_random is not None and obs is not None and obs.random:
            raise _random_implicit_error(self.refuse_random)
        if self.adaptive and perturb is Perturb.NEXT:
            self.jump_k1 = out
            if obs is not None and obs.random:
                self.rng_jump = obs.last_state
            return out
        if self.calls is not None:
            self.calls.append((y, out))
        if self.rng_calls is not None and obs.random:
            self.rng_calls.append(obs.last_state)
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
class _Log:
    """The steps as the solver reports them (mutable while the solve runs)."""

    t0: list[torch.Tensor] = dataclasses.field(default_factory=list)
    t1: list[torch.Tensor] = dataclasses.field(default_factory=list)
    dt: list[torch.Tensor] = dataclasses.field(default_factory=list)
    mode: list[StepMode] = dataclasses.field(default_factory=list)
    k1: list[K1Source] = dataclasses.field(default_factory=list)
    rng: list[tuple] = dataclasses.field(default_factory=list)  # random func only
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
        n_steps: the number of steps when it is known before the solve (a fixed grid
            without an event): a budget then follows the optimal offline (binomial)
            schedule; otherwise an online schedule (within 1.5x of it in replays).

    ``stored`` is laid out as in :class:`Checkpoints`.
    """

    def __init__(
        self, checkpoint: str | int, *, keep_k1: bool, keep_slopes: bool, n_steps: int | None
    ) -> None:
        self.stages = checkpoint == "stages"
        self.keep_k1 = keep_k1
        self.keep_slopes = keep_slopes
        self.online: OnlineCheckpointer | OfflineCheckpointer | None = None
        if isinstance(checkpoint, int):
            self.online = (
                OnlineCheckpointer(checkpoint)
                if n_steps is None
                else OfflineCheckpointer(n_steps, checkpoint)
            )
        self.stored: dict[int, tuple] = {}
        #: with stages, keep no ``y_n`` after the first step (an implicit fixed-grid method
        #: whose first slope joins the previous last stage: nothing reads it)
        self.drop_first = False

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
            if self.drop_first and n > 0:
                X = (None, *X[1:])
            k: tuple = ()
            if self.keep_slopes:
                k = (
                    (_own(k1), *(c[1] for c in calls))
                    if k1 is not None
                    else tuple(c[1] for c in calls)
                )
            self.stored[n] = (X, k)
            return
        if self.online is not None:
            keep, dropped = self.online.keep(n)
            for d in dropped:
                self.stored.pop(d, None)
            if not keep:
                return
        self.stored[n] = (y, _own(k1) if self.keep_k1 and carried else None)


class _Given:
    """A grid constructor that returns a grid already built (so ``func``-reading user
    constructors run once); ``original`` is kept for the time-gradient pull-back."""

    def __init__(self, grid: torch.Tensor, original: Any) -> None:
        self.grid, self.original = grid, original

    def __call__(self, func: Any, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.grid


def _own(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x``, copied if it is a view: torchdiffeq's carried slope ``rk_state.f1`` is the
    last column of the step's whole stage tensor, which a stored view would keep alive."""
    return x.clone() if x is not None and x._base is not None else x


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
    _log: _Log
    _store: Store
    _sign: float
    _next_k1: K1Source = K1Source.FIRST
    _k1_state: Any = None  # generator state of the call that made the next step's k_1

    def integrate_until_event(self, t0, event_fn):
        self._log.event = True
        return super().integrate_until_event(t0, event_fn)  # type: ignore[misc]

    def _adaptive_step(self, rk_state):
        rec, log = self._rec, self._log
        if log.first_step is None and not log.n_rejected and not len(log):
            log.first_step = float(rk_state.dt)  # selected or given; pin it to reproduce
        rec.accepted, rec.jump_k1, rec.rng_jump = False, None, None
        rec.calls = [] if self._store.capture else None
        random = rec.observer is not None and rec.observer.random
        rec.rng_calls = [] if random else None
        try:
            new = super()._adaptive_step(rk_state)  # type: ignore[misc]
        finally:
            calls, rec.calls = rec.calls, None
            rng_calls, rec.rng_calls = rec.rng_calls, None
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
        log.mode.append(StepMode.CHAIN if rec.dt_accept is rec.dt_attempt else StepMode.PINNED)
        log.k1.append(self._next_k1)
        carried = self._next_k1 is K1Source.FSAL
        self._store.offer(n, rk_state.y1, rk_state.f1, calls, carried=carried)
        self._next_k1 = K1Source.NEXT if rec.jump_k1 is not None else K1Source.FSAL
        if random:  # stage 1's state: the first call of the solve, a jump's or FSAL's
            log.rng.append((self._k1_state if n else rec.observer.first_state, *rng_calls))
            self._k1_state = rec.rng_jump if rec.jump_k1 is not None else rng_calls[-1]
        log.y_final = new.y1
        return new


class _FixedRecording:
    """Mixin over a torchdiffeq fixed-grid solver: logs every step."""

    _rec: Recorder
    _log: _Log
    _store: Store
    _sign: float
    _pending: Any = None
    perturb: bool

    def integrate_until_event(self, t0, event_fn):
        self._log.event = True
        return super().integrate_until_event(t0, event_fn)  # type: ignore[misc]

    def _step_func(self, func, t0, dt, t1, y0):
        rec, log = self._rec, self._log
        rec.calls = [] if self._store.capture else None
        rec.rng_calls = [] if rec.observer is not None else None
        try:
            dy, f0 = super()._step_func(func, t0, dt, t1, y0)  # type: ignore[misc]
        finally:
            calls, rec.calls = rec.calls, None
            rng_calls, rec.rng_calls = rec.rng_calls, None
        _check_finite(dy, self._sign, t0, dt)
        n = len(log)
        log.t0.append(t0)
        log.t1.append(t1)
        log.dt.append(torch.as_tensor(dt, dtype=t0.dtype, device=t0.device))
        log.mode.append(StepMode.CHAIN if log.event else StepMode.GRID)
        log.k1.append(K1Source.NEXT if self.perturb else K1Source.FIRST)
        self._store.offer(n, y0, None, calls, carried=False)
        if rng_calls:
            log.rng.append(tuple(rng_calls))
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


def _random_implicit_error(method: str) -> ValueError:
    return ValueError(
        f"func draws random numbers, which adjoint='symplectic' cannot replay through the "
        f"Newton iterations of the implicit method {method!r} (and unless the noise is far "
        "below the Newton tolerance, no Newton iteration converges on it); draw the noise "
        "outside func (e.g. pass it in a closure), or use adjoint='backprop'"
    )


def record_solve(
    problem: Problem, y0: torch.Tensor, t: torch.Tensor, *, need_t: bool, observer: Any = None
) -> tuple[Any, Recording, Checkpoints]:
    """Run torchdiffeq's solver on ``problem`` and record it.

    Arguments:
        y0, t: torchdiffeq's flat state and (possibly negated) increasing time.
        need_t: ``t`` needs a gradient (keep the slopes and the grid constructor).
        observer: evaluates the field (see :class:`Recorder`).

    Returns:
        ``(solution, recording, checkpoints)``: ``solution`` is what torchdiffeq's solver
        returns (``(event_t, solution)`` with an ``event_fn``).
    """
    spec = problem.spec
    solver = recording_class(problem.method)(
        func=problem.wfunc, y0=y0, rtol=problem.rtol, atol=problem.atol, **problem.options
    )
    n_steps = None
    if isinstance(problem.checkpoint, int) and not spec.adaptive and problem.event_fn is None:
        # A fixed grid knows its step count before the solve: the budget can follow the
        # offline optimum. The grid is built once and handed back to torchdiffeq's loop.
        with torch.no_grad():
            time_grid = solver.grid_constructor(problem.wfunc, y0, t)
        n_steps = len(time_grid) - 1
        solver.grid_constructor = _Given(time_grid, solver.grid_constructor)
    store = Store(problem.checkpoint, keep_k1=spec.keep_k1, keep_slopes=need_t, n_steps=n_steps)
    rec = solver._rec = Recorder(problem.wfunc, adaptive=spec.adaptive, observer=observer)
    solver.func = rec
    log = solver._log = _Log()
    solver._store = store
    solver._sign = problem.sign
    if spec.implicit:
        rec.refuse_random = problem.method
        # (a perturbed grid evaluates the first slope just after t_n: it joins nothing)
        store.drop_first = (
            store.stages
            and not spec.adaptive
            and not solver.perturb
            and first_stage_joins_last(solver.core_tableau)
        )
    if problem.event_fn is None:
        solution = solver.integrate(t)
        event_t = None
    else:
        event_t, solution = solver.integrate_until_event(t[0], problem.event_fn)
    if spec.adaptive:
        alpha = solver.tableau.alpha  # torchdiffeq's nodes, cast to y's dtype
        perturb = False
    else:
        solver.finish()
        alpha, perturb = None, bool(solver.perturb)
    newton = solver.newton if spec.implicit else None
    grid = None
    if need_t and not spec.adaptive and not log.event:
        constructor = solver.grid_constructor
        grid = GridPullback(getattr(constructor, "original", constructor), problem.wfunc)
    del solver  # its final state (y1, f1, stage tensor, interpolation) is not needed

    if spec.implicit and log.rng:
        # Newton evaluates func a data-dependent number of times per stage: the random
        # numbers of the converged stage cannot be replayed on their own.
        raise _random_implicit_error(problem.method)
    steps, stage_times, end_times, loose = _steps(
        log, spec, t, event_t, ydt=y0.dtype, alpha=alpha, perturb=perturb
    )
    recording = Recording(
        spec=spec, steps=steps, stage_times=stage_times, end_times=end_times, loose=loose,
        n_outputs=len(t), t_dtype=t.dtype, need_t=need_t, checkpoint=problem.checkpoint,
        online=store.online, grid=grid, nfe=rec.nfe, n_rejected=log.n_rejected,
        first_step=log.first_step, newton=newton,
        rng=tuple(log.rng) if log.rng else None,
    )  # fmt: skip
    y_final = log.y_final if log.y_final is not None else y0  # None: no step taken
    checkpoints = Checkpoints(store.stored, y_final, store.stages, y0 if grid else None)
    return (solution if event_t is None else (event_t, solution)), recording, checkpoints


def _steps(
    log: _Log,
    spec: MethodSpec,
    t: torch.Tensor,
    event_t: torch.Tensor | None,
    *,
    ydt: torch.dtype,
    alpha: torch.Tensor | None,
    perturb: bool,
) -> tuple[tuple[StepRecord, ...], Any, Any, tuple[int, ...]]:
    """The typed step records, the stage and end times, and the loose outputs."""
    n = len(log)
    if n == 0:  # outputs equal to y0 without any step (immediate event)
        return (), None, None, ((1,) if event_t is not None else ())
    t0s, t1s, dts = torch.stack(log.t0), torch.stack(log.t1), torch.stack(log.dt)
    stage_times = _stage_times(log.k1, t0s, t1s, dts, spec, ydt, alpha, perturb)
    outputs = _locate_outputs(t0s, t1s, t, event_t, spec, ydt)
    hs = dts.to(ydt).tolist()
    spans = (t1s - t0s).tolist()
    steps = tuple(
        StepRecord(
            t0=log.t0[m],
            t1=log.t1[m],
            dt=log.dt[m],
            mode=log.mode[m],
            k1=log.k1[m],
            h=hs[m],
            span=spans[m],
            outputs=tuple(outputs.get(m, ())),
        )  # fmt: skip
        for m in range(n)
    )
    return steps, stage_times, t1s.to(ydt), ()


def _stage_times(
    k1: list[K1Source],
    t0s: torch.Tensor,
    t1s: torch.Tensor,
    dts: torch.Tensor,
    spec: MethodSpec,
    ydt: torch.dtype,
    alpha: torch.Tensor | None,
    perturb: bool,
) -> torch.Tensor:
    """``(N, s)``: the times at which torchdiffeq evaluated each stage (y's dtype).

    Adaptive (``_runge_kutta_step``): ``t_n + alpha_i dt`` in y's dtype, and the
    perturbed ``prev(t_{n+1})`` where ``alpha_i = 1``; the first slope at ``t_0``
    (first step), ``next(t_n)`` (after a jump) or ``prev(t_n)`` (carried last stage).
    Fixed grid (``fixed_grid.py``): ``t_n + dt c_i`` in the grid's dtype, ``t_{n+1}``
    for rk4's last stage, cast to y's dtype, perturbed when ``perturb=True``; implicit
    fixed-grid methods: :func:`~._torch_implicit.fixed_stage_times`.
    """
    tab = spec.tableau
    cols = []
    if alpha is not None:
        t0c, dtc = t0s.to(ydt), dts.to(ydt)
        is_next = torch.tensor([s is K1Source.NEXT for s in k1], device=t0c.device)
        is_fsal = torch.tensor([s is K1Source.FSAL for s in k1], device=t0c.device)
        first = torch.where(is_next, perturb_time(t0c, ydt, Perturb.NEXT), t0c)
        cols.append(torch.where(is_fsal, perturb_time(t0c, ydt, Perturb.PREV), first))
        for i in range(1, tab.stages):
            if tab.c[i] == 1:
                cols.append(perturb_time(t1s, ydt, Perturb.PREV))
            else:
                cols.append(t0c + alpha[i - 1] * dtc)
    elif spec.implicit:  # the times the implicit fixed-grid solver itself computes
        cols = fixed_stage_times(tab, t0s, dts, t1s, ydt, perturb)
    else:
        start = Perturb.NEXT if perturb else Perturb.NONE
        end = Perturb.PREV if perturb else Perturb.NONE
        cols.append(perturb_time(t0s, ydt, start))
        for i in range(1, tab.stages):
            ci = tab.c[i]
            if ci == 1:
                cols.append(perturb_time(t1s if spec.method == "rk4" else t0s + dts, ydt, end))
            else:
                cols.append((t0s + dts * ci).to(ydt))
    return torch.stack(cols, dim=1)


def _locate_outputs(
    t0s: torch.Tensor,
    t1s: torch.Tensor,
    t: torch.Tensor,
    event_t: torch.Tensor | None,
    spec: MethodSpec,
    ydt: torch.dtype,
) -> dict[int, list[OutputRef]]:
    """Assign every output after the first to its step and position ``theta``.

    torchdiffeq interpolates output ``t_j`` in the first accepted step with
    ``t_{n+1} >= t_j`` (adaptive: ``while t_j > t1: step``; fixed grid:
    ``while t1 >= t[j]``), with ``x = (t_j - t_n)/(t_{n+1} - t_n)``.
    """
    n = len(t0s)
    tq = event_t.reshape(1) if event_t is not None else t[1:]
    # Adaptive solvers cast t to their time dtype; the fixed-grid loop compares and
    # interpolates 0-d tensors of t's and the grid's dtypes, i.e. in the promoted one.
    common = t1s.dtype if spec.adaptive else torch.promote_types(tq.dtype, t1s.dtype)
    tq, t0s, t1s = tq.to(common), t0s.to(common), t1s.to(common)
    if event_t is not None:
        idx = torch.full((1,), n - 1, dtype=torch.long, device=t1s.device)
        js = [1]
    else:
        idx = torch.searchsorted(t1s, tq, side="left").clamp_(max=n - 1)
        js = list(range(1, len(t)))
    s0, s1 = t0s[idx], t1s[idx]
    theta = (tq - s0) / (s1 - s0)
    if spec.adaptive:
        theta = theta.to(ydt)  # torchdiffeq casts x to the coefficients' dtype
    at_start = (tq == s0).tolist()
    at_end = (tq == s1).tolist()
    linear = not spec.adaptive and not spec.cubic
    outputs: dict[int, list[OutputRef]] = {}
    for j, m, th, a0, a1 in zip(js, idx.tolist(), theta.tolist(), at_start, at_end, strict=True):
        kind = OutputKind.INSIDE
        if linear and a0:
            kind = OutputKind.AT_START
        elif linear and a1:
            kind = OutputKind.AT_END
        outputs.setdefault(m, []).append(OutputRef(j, th, kind, event_t is None))
    return outputs
