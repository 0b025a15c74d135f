"""Reverse half of the torch adapter: the symplectic adjoint over a recorded solve.

A :class:`ReverseSweep` is created per backward pass from the :class:`Recording` and the
saved :class:`Checkpoints`; it holds the sweep's working state (the cotangent ``lam`` of
``y_{n+1}``, the carried FSAL cotangent, the time cotangents) while it walks the steps
``n = N-1, ..., 0`` (README, How it works; Matsubara, Miyatake & Yaguchi, NeurIPS 2021):

1. get the stage inputs ``X_i``: stored (``"stages"``), or recomputed without a graph
   from the stored ``y_n`` with the recorded step size (``"states"``; a budget replays
   earlier steps first via :func:`~symplectic_adjoint.core.checkpointing.execute`);
2. add the cotangents of the outputs interpolated inside the step: the dense output is
   linear in ``(y_n, k)`` (:meth:`DenseOutput.vjp`), so they enter as extra ``kbar_i`` and
   ``ybar_n`` with no network call (the cubic fixed-grid fit has one extra slope
   ``f(t_{n+1}, y_{n+1})``, differentiated through ``f``);
3. FSAL: a step whose first slope is the previous step's last stage gets
   ``k1_given=True``; the returned ``k1_bar`` is added to the previous step's last-stage
   cotangent (for ``fehlberg2``/``adaptive_heun`` that stage is not ``f(t_{n+1}, y_{n+1})``);
4. run :func:`~symplectic_adjoint.core.step.rk_step_vjp`, whose per-stage VJP is
   :meth:`StageEvaluator.vjp` (one network graph alive at a time, parameter cotangents
   accumulated in place);
5. time cotangents (when ``t`` requires grad): stage times ``t_n + c_i h`` give
   ``tbar_n`` and ``hbar``; an output at ``tau`` in ``[t_n, t_{n+1}]`` has
   ``theta = (tau - t_n)/(t_{n+1} - t_n)``. Step sizes are constants (README, How it works), so
   ``t_{n+1} = t_n + h`` carries ``tbar`` back to ``t_0``; a step pinned to a
   ``step_t``/``jump_t`` point has a constant end and ``h = t_{n+1} - t_n``; on a fixed
   grid the node cotangents are pulled back through the grid constructor.

Every evaluation of the vector field in the backward pass goes through one
:class:`StageEvaluator`: it re-enters the forward's surroundings (random generator state
per stage, autocast; :mod:`._torch_inputs`), checks that each graph reaches no tensor
requiring grad besides the known inputs, and in graph mode (``create_graph=True``)
records the VJPs themselves, after :meth:`ReverseSweep.run` replayed the trajectory
from ``y0`` with a graph.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.checkpointing import execute, store_all_schedule
from ..core.step import add, lincomb, rk_step_vjp, stage_input, sub
from ._torch_implicit import first_stage_joins_last, implicit_recompute, implicit_reverse_step
from ._torch_inputs import Cut, Inputs, Replay
from ._torch_record import Checkpoints, K1Source, OutputKind, Recording, StepMode

__all__ = ["StageEvaluator", "ReverseSweep"]

_run_backward: Any
try:  # the C++ engine entry torch.autograd.grad ends in (torch 2.x)
    from torch.autograd import Variable as _Variable

    _run_backward = _Variable._execution_engine.run_backward
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _run_backward = None


def _grad(
    out: torch.Tensor, inputs: tuple[torch.Tensor, ...], cot: torch.Tensor, retain: bool = False
) -> tuple:
    """``torch.autograd.grad(out, inputs, cot, retain_graph=retain, allow_unused=True)``.

    On CPU it calls the engine directly: the public wrapper's argument normalisation
    costs ~30 us per call, as much as the rest of a stage's bookkeeping, and this runs
    once per stage. Elsewhere (device threads may need the wrapper's context) and on
    other torch versions it uses the public function.
    """
    if _run_backward is not None and out.device.type == "cpu" and cot.shape == out.shape:
        return _run_backward((out,), (cot,), retain, False, inputs, True, False)
    return torch.autograd.grad(out, inputs, cot, retain_graph=retain, allow_unused=True)


class StageEvaluator:
    """Every evaluation of the vector field in the backward pass.

    Arguments:
        func: the field ``func(t, x)`` on torchdiffeq's flat state and solver time
            (``_PerturbFunc.base_func``: the user's function behind torchdiffeq's
            tuple/time-reversal wrappers); ``t`` arrives already perturbed.
        params: the tensors whose cotangents are accumulated (the autograd function's
            parameter inputs, in order); ``acc`` holds their sums.
        need_t: also return the cotangent of the time argument.
        replay: the forward's surroundings to re-enter per evaluation (``None``: none).
        inputs: the :class:`Inputs` whose graph check runs before each VJP.
        graph: record the VJPs (``create_graph=True``); the stage inputs then carry the
            replayed trajectory's graph, hidden from each VJP by a :class:`Cut`.

    ``nfe`` counts evaluations, ``n_vjp`` vector-Jacobian products. ``rng``, where the
    methods take it, is the generator state the forward's evaluation started from.
    """

    def __init__(
        self,
        func: Any,
        params: tuple[torch.Tensor, ...],
        *,
        need_t: bool,
        replay: Replay | None = None,
        inputs: Inputs | None = None,
        graph: bool = False,
    ) -> None:
        self.func = func
        self.params = params
        self.need_t = need_t
        self.replay = replay
        self.inputs = inputs
        self.graph = graph
        self.acc = [torch.zeros_like(p) for p in params]
        self.nfe = 0
        self.n_vjp = 0

    def _call(self, t: torch.Tensor, x: torch.Tensor, rng: Any) -> torch.Tensor:
        if self.replay is None:
            return self.func(t, x)
        with self.replay.evaluation(rng):
            return self.func(t, x)

    def eval(self, t: torch.Tensor, x: torch.Tensor, rng: Any = None) -> torch.Tensor:
        """``f(t, x)`` without a graph (with one in graph mode)."""
        self.nfe += 1
        return self._call(t, x, rng)

    def linearize(self, t: torch.Tensor, x: torch.Tensor, rng: Any = None) -> tuple:
        """``f(t, x)`` with a graph: ``(out, x_leaf, t_leaf, gate)`` for :meth:`pull`."""
        gate = None
        if self.graph:  # x keeps its history, which this VJP must not see
            gate = Cut.Gate()
            x = Cut.apply(x, gate)
        else:
            x = x.detach().requires_grad_(True)
        if self.need_t:
            t = t.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self._call(t, x, rng)
        self.nfe += 1
        return out, x, t, gate

    def vjp(
        self, t: torch.Tensor, x: torch.Tensor, cot: torch.Tensor, rng: Any = None
    ) -> tuple[Any, Any]:
        """One evaluation of ``f`` with a graph and its VJP with cotangent ``cot``.

        Returns ``(xbar, tau)`` (``None`` where ``f`` does not depend on it) and adds the
        parameter cotangents to ``acc`` in place.
        """
        return self.pull(self.linearize(t, x, rng), cot)

    def pull(self, lin: tuple, cot: torch.Tensor, *, retain: bool = False) -> tuple[Any, Any]:
        """The VJP of a :meth:`linearize` result with cotangent ``cot`` (``retain``: keep its
        graph for another)."""
        out, x, t, gate = lin
        self.n_vjp += 1
        if not out.requires_grad:
            return None, None
        params = self.params
        inputs = (x, *params, t) if self.need_t else (x, *params)
        if self.inputs is not None:
            self.inputs.check_graph(out, (x, t) if self.need_t else (x,))
        if gate is not None:
            return self._pull_graph(out, inputs, cot, gate)
        grads = _grad(out, inputs, cot, retain)
        pg = grads[1 : 1 + len(params)]
        if any(g is None for g in pg):  # parameters this evaluation did not touch
            pairs = [(a, g) for a, g in zip(self.acc, pg, strict=True) if g is not None]
            if pairs:
                torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
        elif pg:
            torch._foreach_add_(self.acc, pg)  # one fused call per evaluation
        return grads[0], (grads[-1] if self.need_t else None)

    def pull_x(self, lin: tuple, cot: torch.Tensor) -> torch.Tensor | None:
        """``J^T cot`` of a :meth:`linearize` result in ``x`` alone, keeping its graph (the
        products of an implicit stage's transposed solve; not graph mode)."""
        out, x = lin[0], lin[1]
        if not out.requires_grad:
            return None
        return _grad(out, (x,), cot, True)[0]

    def _pull_graph(self, out, inputs, cot, gate) -> tuple[Any, Any]:
        """:meth:`pull` recorded by autograd (graph mode): accumulated out of place."""
        gate.closed = True
        try:
            grads = torch.autograd.grad(out, inputs, cot, allow_unused=True, create_graph=True)
        finally:
            gate.closed = False
        for j, g in enumerate(grads[1 : 1 + len(self.params)]):
            if g is not None:
                self.acc[j] = self.acc[j] + g
        return grads[0], (grads[-1] if self.need_t else None)


class _StepGraphs:
    """One step's stage evaluations for the implicit transposed solves
    (:class:`~._torch_implicit.StageGraphs`)."""

    def __init__(self, ev: StageEvaluator, times: Any, rng: Any) -> None:
        self.ev, self.times, self.rng = ev, times, rng

    def linearize(self, i: int, x: torch.Tensor) -> tuple:
        return self.ev.linearize(self.times[i], x, self.rng(i))

    def output(self, g: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return g[0], g[1]

    def pull(self, g: tuple, cot: torch.Tensor, *, retain: bool = False) -> tuple[Any, Any]:
        return self.ev.pull(g, cot, retain=retain)

    def pull_x(self, g: tuple, cot: torch.Tensor) -> torch.Tensor | None:
        return self.ev.pull_x(g, cot)


class ReverseSweep:
    """One backward pass over a :class:`Recording` (create one per backward).

    Arguments:
        rec: the recording of the forward solve.
        saved: the checkpoints, as unpacked from ``ctx``.
        evaluator: evaluates ``f`` and its VJPs, accumulating the parameter cotangents.
        grad_sol: the cotangent of the solution (leading time axis).
        y0: the initial state with its graph, for graph mode (``evaluator.graph``): the
            trajectory is then replayed from it with a graph, every step's stage inputs
            kept (memory as backprop's), and the checkpoints are not read.
    """

    def __init__(
        self,
        rec: Recording,
        saved: Checkpoints,
        evaluator: StageEvaluator,
        grad_sol: torch.Tensor,
        y0: torch.Tensor | None = None,
    ) -> None:
        self.rec = rec
        self.y0 = y0
        self.saved = saved
        self.ev = evaluator
        self.gsol = grad_sol
        self.tab = rec.spec.tableau
        self.steps = rec.steps
        self.n = len(rec.steps)
        # Per step, the stage times as 0-d tensors (unbound once).
        st = rec.stage_times
        self.times = [] if st is None else [row.unbind() for row in st.unbind()]
        self.lam: torch.Tensor | None = None  # cotangent of y_{n+1}
        self.k1bar_next: torch.Tensor | None = None  # cotangent of the next step's k_1
        self.k1_next: torch.Tensor | None = None  # value of the next step's k_1
        self.y_next: torch.Tensor = saved.y_final  # y_{n+1}
        self.T: Any = None  # time cotangent of t_{n+1} carried from the step after
        self.tbar_out: dict[int, Any] = {}  # output index -> cotangent of its time
        self.node_bar: dict[int, Any] = {}  # fixed-grid node -> cotangent
        self.expect = self.n - 1
        self.replays = 0
        self.pre: Any = None  # an implicit step's transposed-solve preconditioner, carried
        self._ssal = rec.spec.implicit and first_stage_joins_last(self.tab)  # (_joins_last)

    def run(self, t_input: torch.Tensor, *, need_y0: bool) -> tuple[Any, Any, list[torch.Tensor]]:
        """``(ybar_0 or None, tbar or None, parameter cotangents)``."""
        rec, saved = self.rec, self.saved
        stored = saved.stored
        if self.ev.graph:
            stored, schedule = self._replay_with_graph(), store_all_schedule(self.n)
        elif rec.online is not None:
            schedule = rec.online.schedule(self.n)
        else:
            schedule = store_all_schedule(self.n)
        self.replays = execute(schedule, stored, advance=self._advance, reverse=self._reverse)
        ybar = add(self.lam, self.gsol[0])
        for j in rec.loose:
            ybar = add(ybar, self.gsol[j])
        tbar = self._assemble_tbar(t_input, saved.y0) if rec.need_t else None
        return (ybar if need_y0 else None), tbar, self.ev.acc

    def _rng(self, m: int, i: int) -> Any:
        """The generator state stage ``i`` of step ``m`` started from (random func)."""
        rng = self.rec.rng
        return None if rng is None else rng[m][i]

    def _replay_with_graph(self) -> dict[int, tuple]:
        """Every step's stage inputs, recomputed from ``y0`` with a graph (graph mode)."""
        stored: dict[int, tuple] = {}
        assert self.y0 is not None  # graph mode keeps y0
        y, k1 = self.y0, None
        for m in range(self.n):
            X, k = self._slopes(m, y, k1, replay=True)
            stored[m] = (tuple(X), ())
            y, k1 = self._step_end(m, y, k)
        self.y_next = y  # the final state, with its graph
        return stored

    def _joins_last(self, m: int) -> bool:
        """Whether step ``m``'s first slope ``f(t_m, y_m)`` is step ``m - 1``'s last stage
        evaluated again, so that its cotangent can join that stage's (implicit methods).

        The tableau's first stage is explicit and its last is ``y_{n+1}`` at ``t_{n+1}``
        (stiffly accurate, ``c_s = 1``: Kvaerno, ``trbdf2``, ``trapezoid``). Kvaerno's
        carried slope is ``f(prev(t_m), X_s)`` itself; on a fixed grid (unperturbed) the
        step starts from ``y_m = y_{m-1} + sum_i h b_i k_i``, which equals ``X_s`` to
        rounding (the same terms, summed in another order), at the same grid node. Never
        with random draws (the two evaluations drew different numbers) nor after a
        ``jump_t`` or with ``perturb=True`` (the slope is evaluated just after ``t_m``
        there: a right limit, the stage a left one).
        """
        rec = self.rec
        if not (0 < m < self.n and rec.spec.implicit and rec.rng is None and self._ssal):
            return False
        return self.steps[m].k1 is (K1Source.FSAL if rec.spec.adaptive else K1Source.FIRST)

    def _carried(self, m: int) -> bool:
        """Whether step ``m + 1`` starts from step ``m``'s last slope (FSAL)."""
        return m + 1 < self.n and self.steps[m + 1].k1 is K1Source.FSAL

    def _slopes(self, m: int, y: torch.Tensor, k1_stored: Any, *, replay: bool):
        """Stage inputs and slopes of step ``m`` from ``y_m``, without a graph.

        Only slopes that something reads are evaluated: the later stages always; the
        last one for time gradients (its value enters ``hbar``) or, in a replay, when
        ``y_{n+1}`` or the next step's carried slope needs it. In the reverse pass the
        last slope is the next step's carried first slope (FSAL) when there is one.
        """
        spec, tab = self.rec.spec, self.tab
        s = tab.stages
        h, times = self.steps[m].h, self.times[m]
        carried = self._carried(m)
        if replay:
            want_last = tab.b[-1] != 0 or (carried and spec.keep_k1)
        else:
            want_last = self.rec.need_t
        ev = self.ev
        k: list[Any] = [None] * s
        if self.steps[m].k1 is K1Source.FSAL and k1_stored is not None:
            k[0] = k1_stored
        elif s > 1 or want_last:
            k[0] = ev.eval(times[0], y, self._rng(m, 0))
        X = [y]
        for i in range(1, s):
            if i == s - 1 and spec.fsal_at_y1 and not replay:
                Xi = self.y_next  # torchdiffeq evaluates the last stage at y_{n+1} itself
            else:
                Xi = stage_input(tab, i, y, h, k)
            X.append(Xi)
            if i < s - 1 or want_last:
                reuse = i == s - 1 and carried and not replay and self.k1_next is not None
                k[i] = self.k1_next if reuse else ev.eval(times[i], Xi, self._rng(m, i))
        return X, k

    def _implicit_stages(self, m: int, y: torch.Tensor) -> tuple[list, list]:
        """An implicit step's ``(X, k)`` recomputed from ``y_m`` by the forward's own Newton
        iteration (same times, same step-size tensor: bitwise the forward's stages)."""
        step = self.steps[m]
        h = step.dt.to(y.dtype)
        return self.rec.newton.step(self.ev.eval, self.times[m], y, h, None, self._where(m))

    def _where(self, m: int) -> str:
        return f"in the reverse pass, recomputing step {m} from t={float(self.steps[m].t0):.17g}"

    def _graphs(self, m: int) -> _StepGraphs:
        return _StepGraphs(self.ev, self.times[m], lambda i: self._rng(m, i))

    def _advance(self, m: int, state: tuple) -> tuple:
        """Replay step ``m`` from ``y_m`` with its recorded size (budgets)."""
        y, k1 = state
        if self.rec.spec.implicit:  # as the forward forms y_{n+1}
            X, k = self._implicit_stages(m, y)
            step = self.steps[m]
            if self.rec.spec.adaptive:  # stiffly accurate: the last stage input
                return (X[-1], None)
            return (y + lincomb(None, step.dt.to(y.dtype), self.tab.b, k), None)
        _, k = self._slopes(m, y, k1, replay=True)
        return self._step_end(m, y, k)

    def _step_end(self, m: int, y: torch.Tensor, k: list) -> tuple:
        """``(y_{m+1}, the carried slope or None)`` from step ``m``'s slopes."""
        y1 = lincomb(y, self.steps[m].h, self.tab.b, k)
        keep = self._carried(m) and self.rec.spec.keep_k1
        return (y1, k[-1] if keep else None)

    def _reverse(self, m: int, state: tuple) -> None:
        if m != self.expect:  # pragma: no cover - the schedules reverse in order
            raise RuntimeError(f"reverse pass out of order: step {m}, expected {self.expect}")
        self.expect -= 1
        rec, tab, ev = self.rec, self.tab, self.ev
        s = tab.stages
        step = self.steps[m]
        h, times = step.h, self.times[m]
        need_t = rec.need_t
        graphs = self._graphs(m) if rec.spec.implicit else None
        start = kept = None  # an implicit step's Jacobian at y_n and graphs, when recomputed
        if rec.stages or ev.graph:
            X, k = list(state[0]), (list(state[1]) if state[1] else [None] * s)
        elif graphs is not None:
            y = state[0]
            X, k, start, kept = implicit_recompute(
                rec.newton, graphs, ev.eval, times, y, step.dt.to(y.dtype), self._where(m)
            )
        else:
            X, k = self._slopes(m, state[0], state[1], replay=False)

        # Cotangents of the outputs interpolated inside this step.
        lam, y0bar = self.lam, None
        kbar: list[Any] = [None] * (s + 1)
        ts_bar = te_bar = hb = None
        f1 = None
        if rec.spec.cubic and any(o.kind is OutputKind.INSIDE for o in step.outputs):
            # torchdiffeq's cubic fit uses f(t_{n+1}, y_{n+1}), an extra evaluation.
            assert rec.end_times is not None
            f1 = ev.linearize(rec.end_times[m], self.y_next)
        kvals = k if f1 is None else [*k, f1[0].detach()]
        for out in step.outputs:
            g = self.gsol[out.index]
            if out.kind is OutputKind.AT_END:
                lam = add(lam, g)
                continue
            y0bar = add(y0bar, g)
            if out.kind is OutputKind.AT_START:
                continue
            theta = out.theta
            kb, thbar, hbd = rec.spec.dense.vjp(g, kvals, h, theta, need_time=need_t)
            for i, v in enumerate(kb):
                kbar[i] = add(kbar[i], v)
            if need_t and thbar is not None:
                D = step.span
                ts_bar = add(ts_bar, thbar * ((theta - 1) / D))
                te_bar = add(te_bar, thbar * (-theta / D))
                hb = add(hb, hbd)
                if out.time_input:
                    self.tbar_out[out.index] = add(self.tbar_out.get(out.index), thbar / D)
        if f1 is not None:
            xb, tau = ev.pull(f1, kbar[s])
            lam = add(lam, xb)
            te_bar = add(te_bar, tau)
        if self._carried(m) or self._joins_last(m + 1):
            kbar[s - 1] = add(kbar[s - 1], self.k1bar_next)

        def vjp(i: int, Xi: torch.Tensor, kb: torch.Tensor, carry: Any):
            xb, tau = ev.vjp(times[i], Xi, kb, self._rng(m, i))
            return xb, tau, carry

        joins = self._joins_last(m)
        # Stored stages keep no y_n where stage 1 joins the previous step's last (Store).
        assert X[0] is not None or joins, "y_n dropped but stage 1 not joined"
        if graphs is not None:  # transposed stage solves; every k_1 is f(y_n) itself
            # Stored stages have no Jacobian at y_n: the next step's preconditioner serves
            # (a recomputed step has its own; carrying one there would only hold memory).
            # The first slope f(t_n, y_n) evaluates the previous step's last stage again
            # (_joins_last): its cotangent joins that stage's, whose transposed solve and
            # VJP take both (k_s = f(X_s) at the converged stage; b = a_s makes the
            # cotangents of y_n agree), so stage 1 needs no evaluation of its own.
            res, pre = implicit_reverse_step(
                rec.newton, graphs, lam, X, h, k=k, k_bar=kbar[:s], y0_bar=y0bar,
                need_h_bar=need_t, start=self.pre if start is None else start, kept=kept,
                k1_given=joins,
            )  # fmt: skip
            self.pre = pre if start is None else None
        else:
            res = rk_step_vjp(
                tab, vjp, lam, X, h,
                k=k, k_bar=kbar[:s], y0_bar=y0bar,
                k1_given=step.k1 is K1Source.FSAL, need_h_bar=need_t, check=False,
            )  # fmt: skip
        self.lam = res.y0_bar
        self.k1bar_next = res.k1_bar
        self.k1_next = k[0]
        self.y_next = X[0]
        if need_t:
            self._carry_time(m, add(ts_bar, res.t_bar), add(hb, res.h_bar), te_bar)

    def _carry_time(self, m: int, ts_bar: Any, hb: Any, te_bar: Any) -> None:
        """Map the step's (t_n, h, t_{n+1}) cotangents onto its independent times."""
        mode = self.steps[m].mode
        if mode is StepMode.CHAIN:  # t_{n+1} = t_n + h, h constant
            self.T = add(add(ts_bar, te_bar), self.T)
        elif mode is StepMode.PINNED:  # t_{n+1} constant, h = t_{n+1} - t_n
            self.T = sub(ts_bar, hb)
        else:  # GRID: nodes m and m+1, h = node[m+1] - node[m]
            nb = self.node_bar
            nb[m] = add(nb.get(m), sub(ts_bar, hb))
            nb[m + 1] = add(nb.get(m + 1), add(te_bar, hb))

    def _assemble_tbar(self, t: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        rec = self.rec
        tbar = torch.zeros(rec.n_outputs, dtype=torch.float64, device=t.device)
        for j, v in self.tbar_out.items():
            tbar[j] += v.to(torch.float64)
        if self.T is not None:
            tbar[0] += self.T.to(torch.float64)
        if self.node_bar:
            grid_bar = torch.zeros(self.n + 1, dtype=torch.float64, device=t.device)
            for i, v in self.node_bar.items():
                if v is not None:
                    grid_bar[i] = v.to(torch.float64)
            tbar += self._pull_grid(t, y0, grid_bar)
        return tbar.to(rec.t_dtype)

    def _pull_grid(self, t: torch.Tensor, y0: Any, grid_bar: torch.Tensor) -> torch.Tensor:
        """Pull node cotangents back through the fixed-grid constructor (any of them)."""
        grid_fn = self.rec.grid
        assert grid_fn is not None, "a fixed grid with node cotangents keeps its constructor"
        leaf = t.detach().requires_grad_(True)
        with torch.enable_grad():
            grid = grid_fn.constructor(grid_fn.func, y0, leaf)
        if grid is leaf:
            return grid_bar
        zero = torch.zeros(self.rec.n_outputs, dtype=torch.float64, device=t.device)
        if not grid.requires_grad:
            return zero
        (g,) = torch.autograd.grad(grid, leaf, grid_bar.to(grid.dtype), allow_unused=True)
        return zero if g is None else g.to(torch.float64)
