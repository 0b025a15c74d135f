"""The symplectic adjoint as a ``torch.autograd.Function`` over a recorded torchdiffeq solve.

Forward: :mod:`._torch_solve` runs torchdiffeq's solver without a graph and logs the
accepted steps; the checkpoints (per the ``checkpoint`` policy) go through
``ctx.save_for_backward``.

Backward, for each step ``n = N-1, ..., 0`` (DESIGN.md section 3):

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
4. run :func:`~symplectic_adjoint.core.step.rk_step_vjp`, whose per-stage VJP evaluates
   ``f`` once with a graph and calls ``torch.autograd.grad`` (so one network graph is
   alive at a time), accumulating parameter cotangents in place;
5. time cotangents (when ``t`` requires grad): stage times ``t_n + c_i h`` give
   ``tbar_n`` and ``hbar``; an output at ``tau`` in ``[t_n, t_{n+1}]`` has
   ``theta = (tau - t_n)/(t_{n+1} - t_n)``. Step sizes are constants (DESIGN 3.1), so
   ``t_{n+1} = t_n + h`` carries ``tbar`` back to ``t_0``; a step pinned to a
   ``step_t``/``jump_t`` point has a constant end and ``h = t_{n+1} - t_n``; on a fixed
   grid the node cotangents are pulled back through the grid constructor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..core.checkpointing import execute, store_all_schedule
from ..core.step import add, lincomb, rk_step_vjp, stage_input, sub
from ._torch_solve import (
    ADAPTIVE_METHODS,
    CHAIN,
    K1_FSAL,
    K1_NEXT,
    PINNED,
    Store,
    make_solver,
    method_interpolant,
    method_tableau,
)

__all__ = ["Plan", "SymplecticFunction", "SolveStats"]

# Where an output sits inside its step (fixed-grid linear interpolation returns y_n or
# y_{n+1} itself at the step's ends, so no theta-derivative there, as torchdiffeq).
_INSIDE, _AT_START, _AT_END = 0, 1, 2


class SolveStats:
    """Counts of one solve, filled in by :func:`symplectic_adjoint.odeint` (``stats=``).

    Attributes:
        method: the integration method.
        adjoint: ``"symplectic"``, ``"backprop"`` or ``"adjoint"``.
        checkpoint: the checkpoint mode (``"states"``, ``"stages"`` or a budget).
        n_steps: accepted steps of the forward solve.
        n_rejected: rejected step attempts (adaptive methods).
        first_step: the initial step size of an adaptive solve (selected by
            torchdiffeq's ``_select_initial_step`` unless given); passing it as
            ``options["first_step"]`` reproduces the same steps.
        nfe_forward: evaluations of ``func`` in the forward solve (initial step
            selection, rejected attempts, interpolation slopes included).
        nfe_backward: evaluations of ``func`` in the backward pass, all kinds.
        n_vjp: of those, evaluations with a graph followed by a vector-Jacobian product.
        n_replayed_steps: steps recomputed from an earlier checkpoint (budgets only).
        n_checkpoints: tensors kept for the backward pass.
        checkpoint_bytes: their total size in bytes.

    The backward fields stay 0 until a gradient is computed; each backward adds to them.
    For ``adjoint="backprop"``/``"adjoint"`` only the evaluation counts are filled
    (counted by wrapping ``func``; evaluations after the forward returns count as
    backward).
    """

    def __init__(self) -> None:
        self.method = ""
        self.adjoint = ""
        self.checkpoint: str | int = ""
        self.n_steps = 0
        self.n_rejected = 0
        self.first_step: float | None = None
        self.nfe_forward = 0
        self.nfe_backward = 0
        self.n_vjp = 0
        self.n_replayed_steps = 0
        self.n_checkpoints = 0
        self.checkpoint_bytes = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"SolveStats({fields})"


try:  # the C++ engine entry torch.autograd.grad ends in (torch 2.x)
    from torch.autograd import Variable as _Variable

    _run_backward = _Variable._execution_engine.run_backward
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _run_backward = None


def _grad(out: torch.Tensor, inputs: list[torch.Tensor], cot: torch.Tensor) -> tuple:
    """``torch.autograd.grad(out, inputs, cot, allow_unused=True)``.

    On CPU it calls the engine directly: the public wrapper's argument normalisation
    costs ~30 us per call, as much as the rest of a stage's bookkeeping, and this runs
    once per stage. Elsewhere (device threads may need the wrapper's context) and on
    other torch versions it uses the public function.
    """
    if _run_backward is not None and out.device.type == "cpu" and cot.shape == out.shape:
        return _run_backward((out,), (cot,), False, False, tuple(inputs), True, False)
    return torch.autograd.grad(out, inputs, cot, allow_unused=True)


def _prev(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, x - 1)


def _next(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, x + 1)


class Plan:
    """One symplectic solve: configuration, the forward log, and the reverse pass.

    Arguments:
        wfunc: torchdiffeq's wrapped vector field (``_PerturbFunc``) from ``_check_inputs``.
        method, options, rtol, atol, event_fn: as normalised by ``_check_inputs``.
        checkpoint: ``"states"``, ``"stages"`` or a budget of stored states.
        sign: -1 when torchdiffeq negated time (decreasing ``t``), for error messages.
        stats: the :class:`SolveStats` to fill in.
        params: the parameters to differentiate (those that require grad, each once);
            the same tensors are handed to :class:`SymplecticFunction` as inputs.
    """

    def __init__(
        self,
        *,
        wfunc: Any,
        method: str,
        options: dict,
        rtol: Any,
        atol: Any,
        event_fn: Any,
        checkpoint: str | int,
        sign: float,
        stats: SolveStats,
        params: tuple[torch.Tensor, ...],
    ) -> None:
        self.wfunc = wfunc
        self.param_refs = params
        self.base = wfunc.base_func  # the field after torchdiffeq's time perturbation
        self.method = method
        self.options = options
        self.rtol, self.atol = rtol, atol
        self.event_fn = event_fn
        self.checkpoint = checkpoint
        self.sign = sign
        self.stats = stats
        self.adaptive = method in ADAPTIVE_METHODS
        self.tableau = method_tableau(method)
        self.tableau.validate()  # once per solve: the kernels then skip it per step
        self.cubic = not self.adaptive and options.get("interp", "linear") == "cubic"
        self.dense = method_interpolant(method, "cubic" if self.cubic else "linear")
        tab = self.tableau
        s = tab.stages
        # FSAL solvers whose last stage is evaluated at y_{n+1} itself (torchdiffeq skips
        # recomputing y1 exactly then): its carried slope is a function of y_{n+1}.
        self.fsal_at_y1 = (
            self.adaptive
            and tab.b_exact[-1] == 0
            and all(tab.a_exact[-1][j] == tab.b_exact[j] for j in range(s - 1))
        )

    # ----------------------------------------------------------------- forward
    def forward(self, y0: torch.Tensor, t: torch.Tensor, need_t: bool) -> Any:
        self.need_t = need_t
        self.ydt = y0.dtype
        store = Store(
            self.checkpoint,
            keep_k1=self.adaptive and not self.fsal_at_y1,
            keep_slopes=need_t,
        )
        solver = make_solver(
            self.method, self.wfunc, y0, self.rtol, self.atol, self.options,
            store=store, sign=self.sign,
        )  # fmt: skip
        self.solver = solver
        if self.event_fn is None:
            solution = solver.integrate(t)
            event_t = None
        else:
            event_t, solution = solver.integrate_until_event(t[0], self.event_fn)
        if not self.adaptive:
            solver.finish()
        log = solver._log
        self.log = log
        self.store = store
        self.n = len(log)
        self.t_len = len(t)
        self.t_dtype = t.dtype
        st = self.stats
        st.n_steps, st.n_rejected, st.first_step = self.n, log.n_rejected, log.first_step
        st.nfe_forward = solver._rec.nfe
        self._locate_outputs(t, event_t)
        self.stored = store.stored
        if self.n == 0:
            log.y_final = y0
        return solution if event_t is None else (event_t, solution)

    def _locate_outputs(self, t: torch.Tensor, event_t: torch.Tensor | None) -> None:
        """Assign every output after the first to its step and position ``theta``.

        torchdiffeq interpolates output ``t_j`` in the first accepted step with
        ``t_{n+1} >= t_j`` (adaptive: ``while t_j > t1: step``; fixed grid:
        ``while t1 >= t[j]``), with ``x = (t_j - t_n)/(t_{n+1} - t_n)``.
        """
        self.outputs: dict[int, list[tuple[int, float, int, bool]]] = {}
        self.loose: list[int] = []  # outputs equal to y0 without any step (immediate event)
        if self.n == 0:
            self.loose = [1] if event_t is not None else []
            return
        t0s = torch.stack(self.log.t0)
        t1s = torch.stack(self.log.t1)
        tq = event_t.reshape(1) if event_t is not None else t[1:]
        # Adaptive solvers cast t to their time dtype; the fixed-grid loop compares and
        # interpolates 0-d tensors of t's and the grid's dtypes, i.e. in the promoted one.
        common = t1s.dtype if self.adaptive else torch.promote_types(tq.dtype, t1s.dtype)
        tq, t0s, t1s = tq.to(common), t0s.to(common), t1s.to(common)
        if event_t is not None:
            idx = torch.full((1,), self.n - 1, dtype=torch.long, device=t1s.device)
            js = [1]
        else:
            idx = torch.searchsorted(t1s, tq, side="left").clamp_(max=self.n - 1)
            js = list(range(1, self.t_len))
        s0, s1 = t0s[idx], t1s[idx]
        theta = (tq - s0) / (s1 - s0)
        if self.adaptive:
            theta = theta.to(self.ydt)  # torchdiffeq casts x to the coefficients' dtype
        at_start = (tq == s0).tolist()
        at_end = (tq == s1).tolist()
        linear = not self.adaptive and not self.cubic
        for j, n, th, a0, a1 in zip(
            js, idx.tolist(), theta.tolist(), at_start, at_end, strict=True
        ):
            kind = _INSIDE
            if linear and a0:
                kind = _AT_START
            elif linear and a1:
                kind = _AT_END
            self.outputs.setdefault(n, []).append((j, th, kind, event_t is None))

    # ------------------------------------------------------------- checkpoints
    def pack(self) -> tuple[list[torch.Tensor], Any]:
        """Flatten the stored checkpoints for ``ctx.save_for_backward`` (deduplicated)."""
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

        spec = [(n, tuple(tuple(map(put, part)) for part in self._parts(st))) for n, st in
                self.stored.items()]  # fmt: skip
        final = put(self.log.y_final)
        # The tensors now live in ctx only (so saved-tensor hooks that offload them
        # really free the originals).
        self.stored = self.store.stored = None
        self.log.y_final = None
        self.stats.n_checkpoints = len(tensors)
        self.stats.checkpoint_bytes = sum(x.numel() * x.element_size() for x in tensors)
        return tensors, (spec, final)

    def _parts(self, st: tuple) -> tuple[tuple, ...]:
        return st if self.store.stages else ((st[0], st[1]),)

    def unpack(self, saved: tuple[torch.Tensor, ...], layout: Any) -> tuple[dict, torch.Tensor]:
        spec, final = layout

        def get(i: int) -> torch.Tensor | None:
            return None if i < 0 else saved[i]

        stored: dict[int, tuple] = {}
        for n, parts in spec:
            got = tuple(tuple(map(get, part)) for part in parts)
            stored[n] = got if self.store.stages else got[0]
        return stored, saved[final]

    # ------------------------------------------------------------- stage times
    def _stage_times(self) -> list[tuple[torch.Tensor, ...]]:
        """Per step, the times at which torchdiffeq evaluated each stage (y's dtype).

        Adaptive (``_runge_kutta_step``): ``t_n + alpha_i dt`` in y's dtype, and the
        perturbed ``prev(t_{n+1})`` where ``alpha_i = 1``; the first slope at ``t_0``
        (first step), ``next(t_n)`` (after a jump) or ``prev(t_n)`` (carried last stage).
        Fixed grid (``fixed_grid.py``): ``t_n + dt c_i`` in the grid's dtype, ``t_{n+1}``
        for rk4's last stage, cast to y's dtype, perturbed when ``perturb=True``.
        """
        log, ydt, tab = self.log, self.ydt, self.tableau
        t0s, t1s, dts = torch.stack(log.t0), torch.stack(log.t1), torch.stack(log.dt)
        k1 = torch.tensor(log.k1, device=t0s.device)
        cols = []
        if self.adaptive:
            t0c, t1c, dtc = t0s.to(ydt), t1s.to(ydt), dts.to(ydt)
            first = torch.where(k1 == K1_NEXT, _next(t0c), t0c)
            cols.append(torch.where(k1 == K1_FSAL, _prev(t0c), first))
            alpha = self.solver.tableau.alpha  # torchdiffeq's nodes, cast to y's dtype
            for i in range(1, tab.stages):
                cols.append(_prev(t1c) if tab.c[i] == 1 else t0c + alpha[i - 1] * dtc)
        else:
            perturb = bool(self.solver.perturb)
            start = t0s.to(ydt)
            cols.append(_next(start) if perturb else start)
            for i in range(1, tab.stages):
                ci = tab.c[i]
                if ci == 1:
                    ti = (t1s if self.method == "rk4" else t0s + dts).to(ydt)
                    cols.append(_prev(ti) if perturb else ti)
                else:
                    cols.append((t0s + dts * ci).to(ydt))
        table = torch.stack(cols, dim=1)
        self._end_times = t1s.to(ydt)  # the cubic fit's extra slope, unperturbed
        return [row.unbind() for row in table.unbind()]

    # ---------------------------------------------------------------- backward
    def backward(
        self,
        grad_sol: torch.Tensor,
        stored: dict,
        y_final: torch.Tensor,
        params: tuple[torch.Tensor, ...],
        t_input: torch.Tensor,
        need_y0: bool,
    ) -> tuple[Any, Any, list[torch.Tensor]]:
        self.gsol = grad_sol
        self.params = params
        self.acc = [torch.zeros_like(p) for p in params]
        self.nfe_b = self.n_vjp = 0
        self.lam: torch.Tensor | None = None  # cotangent of y_{n+1}
        self.k1bar_next: torch.Tensor | None = None  # cotangent of the next step's k_1
        self.k1_next: torch.Tensor | None = None  # value of the next step's k_1
        self.y_next = y_final  # y_{n+1}
        self.T: Any = None  # time cotangent of t_{n+1} carried from the step after
        self.tbar_out: dict[int, Any] = {}
        self.node_bar: dict[int, Any] = {}
        self.expect = self.n - 1
        n = self.n
        if n:
            self.h = torch.stack(self.log.dt).to(self.ydt).tolist()
            self.times = self._stage_times()
            self.D = (torch.stack(self.log.t1) - torch.stack(self.log.t0)).tolist()
        if self.store.online is not None:
            schedule = self.store.online.schedule(n)
        else:
            schedule = store_all_schedule(n)
        replays = execute(schedule, stored, advance=self._advance, reverse=self._reverse)

        ybar = add(self.lam, grad_sol[0])
        for j in self.loose:
            ybar = add(ybar, grad_sol[j])
        tbar = self._assemble_tbar(t_input) if self.need_t else None
        st = self.stats
        st.nfe_backward += self.nfe_b
        st.n_vjp += self.n_vjp
        st.n_replayed_steps += replays
        return (ybar if need_y0 else None), tbar, self.acc

    # A stage of the vector field, without a graph.
    def _eval(self, ti: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe_b += 1
        return self.base(ti, x)

    def _vjp(self, ti: torch.Tensor, x: torch.Tensor, cot: torch.Tensor, *, value: bool = False):
        """One evaluation of ``f`` with a graph and its VJP with cotangent ``cot``.

        Returns ``(xbar, tau)`` (``None`` where ``f`` does not depend on it) and adds the
        parameter cotangents to the accumulators in place. With ``value`` the graph is
        returned instead, for callers that need ``f``'s value before the cotangent.
        """
        x = x.detach().requires_grad_(True)
        if self.need_t:
            ti = ti.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.base(ti, x)
        self.nfe_b += 1
        if value:
            return out, x, ti
        return self._pull(out, x, ti, cot)

    def _pull(self, out, x, ti, cot):
        self.n_vjp += 1
        if not out.requires_grad:
            return None, None
        inputs = [x, *self.params, ti] if self.need_t else [x, *self.params]
        grads = _grad(out, inputs, cot)
        pg = grads[1 : 1 + len(self.params)]
        if any(g is None for g in pg):  # parameters this evaluation did not touch
            pairs = [(a, g) for a, g in zip(self.acc, pg, strict=True) if g is not None]
            if pairs:
                torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
        elif pg:
            torch._foreach_add_(self.acc, list(pg))  # one fused call per evaluation
        return grads[0], (grads[-1] if self.need_t else None)

    def _slopes(self, m: int, y: torch.Tensor, k1_stored: Any, *, replay: bool):
        """Stage inputs and slopes of step ``m`` from ``y_m``, without a graph.

        Only slopes that something reads are evaluated: the later stages always; the
        last one for time gradients (its value enters ``hbar``) or, in a replay, when
        ``y_{n+1}`` or the next step's carried slope needs it. In the reverse pass the
        last slope is the next step's carried first slope (FSAL) when there is one.
        """
        tab, s = self.tableau, self.tableau.stages
        h, times = self.h[m], self.times[m]
        carried = m + 1 < self.n and self.log.k1[m + 1] == K1_FSAL
        if replay:
            want_last = tab.b[-1] != 0 or (carried and self.store.keep_k1)
        else:
            want_last = self.need_t
        k: list[Any] = [None] * s
        if self.log.k1[m] == K1_FSAL and k1_stored is not None:
            k[0] = k1_stored
        elif s > 1 or want_last:
            k[0] = self._eval(times[0], y)
        X = [y]
        for i in range(1, s):
            if i == s - 1 and self.fsal_at_y1 and not replay:
                Xi = self.y_next  # torchdiffeq evaluates the last stage at y_{n+1} itself
            else:
                Xi = stage_input(tab, i, y, h, k)
            X.append(Xi)
            if i < s - 1 or want_last:
                reuse = i == s - 1 and carried and not replay and self.k1_next is not None
                k[i] = self.k1_next if reuse else self._eval(times[i], Xi)
        return X, k

    def _advance(self, m: int, state: tuple) -> tuple:
        """Replay step ``m`` from ``y_m`` with its recorded size (budgets)."""
        y, k1 = state
        _, k = self._slopes(m, y, k1, replay=True)
        y1 = lincomb(y, self.h[m], self.tableau.b, k)
        carried = m + 1 < self.n and self.log.k1[m + 1] == K1_FSAL
        return (y1, k[-1] if carried and self.store.keep_k1 else None)

    def _reverse(self, m: int, state: tuple) -> None:
        if m != self.expect:  # pragma: no cover - the schedules reverse in order
            raise RuntimeError(f"reverse pass out of order: step {m}, expected {self.expect}")
        self.expect -= 1
        tab, s, log = self.tableau, self.tableau.stages, self.log
        h, times = self.h[m], self.times[m]
        need_t = self.need_t
        if self.store.stages:
            X, k = list(state[0]), (list(state[1]) if state[1] else [None] * s)
        else:
            X, k = self._slopes(m, state[0], state[1], replay=False)

        # Cotangents of the outputs interpolated inside this step.
        lam, y0bar = self.lam, None
        kbar: list[Any] = [None] * (s + 1)
        ts_bar = te_bar = hb = None
        outs = self.outputs.get(m, ())
        f1 = None
        if self.cubic and any(kind == _INSIDE for _, _, kind, _ in outs):
            # torchdiffeq's cubic fit uses f(t_{n+1}, y_{n+1}), an extra evaluation.
            f1 = self._vjp(self._end_times[m], self.y_next, None, value=True)
        kvals = k if f1 is None else [*k, f1[0].detach()]
        for j, theta, kind, tdiff in outs:
            g = self.gsol[j]
            if kind == _AT_END:
                lam = add(lam, g)
                continue
            y0bar = add(y0bar, g)
            if kind == _AT_START:
                continue
            kb, thbar, hbd = self.dense.vjp(g, kvals, h, theta, need_time=need_t)
            for i, v in enumerate(kb):
                kbar[i] = add(kbar[i], v)
            if need_t and thbar is not None:
                D = self.D[m]
                ts_bar = add(ts_bar, thbar * ((theta - 1) / D))
                te_bar = add(te_bar, thbar * (-theta / D))
                hb = add(hb, hbd)
                if tdiff:
                    self.tbar_out[j] = add(self.tbar_out.get(j), thbar / D)
        if f1 is not None:
            xb, tau = self._pull(*f1, kbar[s])
            lam = add(lam, xb)
            te_bar = add(te_bar, tau)
        if m + 1 < self.n and log.k1[m + 1] == K1_FSAL:
            kbar[s - 1] = add(kbar[s - 1], self.k1bar_next)

        def vjp(i: int, Xi: torch.Tensor, kb: torch.Tensor, carry: Any):
            xb, tau = self._vjp(times[i], Xi, kb)
            return xb, tau, carry

        res = rk_step_vjp(
            tab, vjp, lam, X, h,
            k=k, k_bar=kbar[:s], y0_bar=y0bar,
            k1_given=log.k1[m] == K1_FSAL, need_h_bar=need_t, check=False,
        )  # fmt: skip
        self.lam = res.y0_bar
        self.k1bar_next = res.k1_bar
        self.k1_next = k[0]
        self.y_next = X[0]
        if need_t:
            self._carry_time(m, add(ts_bar, res.t_bar), add(hb, res.h_bar), te_bar)

    def _carry_time(self, m: int, ts_bar: Any, hb: Any, te_bar: Any) -> None:
        """Map the step's (t_n, h, t_{n+1}) cotangents onto its independent times."""
        mode = self.log.mode[m]
        if mode == CHAIN:  # t_{n+1} = t_n + h, h constant
            self.T = add(add(ts_bar, te_bar), self.T)
        elif mode == PINNED:  # t_{n+1} constant, h = t_{n+1} - t_n
            self.T = sub(ts_bar, hb)
        else:  # GRID: nodes m and m+1, h = node[m+1] - node[m]
            nb = self.node_bar
            nb[m] = add(nb.get(m), sub(ts_bar, hb))
            nb[m + 1] = add(nb.get(m + 1), add(te_bar, hb))

    def _assemble_tbar(self, t: torch.Tensor) -> torch.Tensor:
        tbar = torch.zeros(self.t_len, dtype=torch.float64, device=t.device)
        for j, v in self.tbar_out.items():
            tbar[j] += v.to(torch.float64)
        if self.T is not None:
            tbar[0] += self.T.to(torch.float64)
        if self.node_bar:
            grid_bar = torch.zeros(self.n + 1, dtype=torch.float64, device=t.device)
            for i, v in self.node_bar.items():
                if v is not None:
                    grid_bar[i] = v.to(torch.float64)
            tbar += self._pull_grid(t, grid_bar)
        return tbar.to(self.t_dtype)

    def _pull_grid(self, t: torch.Tensor, grid_bar: torch.Tensor) -> torch.Tensor:
        """Pull node cotangents back through the fixed-grid constructor (any of them)."""
        leaf = t.detach().requires_grad_(True)
        with torch.enable_grad():
            grid = self.solver.grid_constructor(self.wfunc, self.solver.y0, leaf)
        if grid is leaf:
            return grid_bar
        zero = torch.zeros(self.t_len, dtype=torch.float64, device=t.device)
        if not grid.requires_grad:
            return zero
        (g,) = torch.autograd.grad(grid, leaf, grid_bar.to(grid.dtype), allow_unused=True)
        return zero if g is None else g.to(torch.float64)


class SymplecticFunction(torch.autograd.Function):
    """``apply(plan, y0, t, *params)`` -> solution, or ``(event_t, solution)``.

    ``y0`` is torchdiffeq's flat state, ``t`` its (possibly negated) time; ``params`` are
    the tensors whose gradients are wanted.
    """

    @staticmethod
    def forward(ctx, plan: Plan, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor):
        out = plan.forward(y0, t, need_t=ctx.needs_input_grad[2])
        tensors, layout = plan.pack()
        ctx.save_for_backward(*tensors)
        ctx.plan, ctx.layout, ctx.t_input = plan, layout, t.detach()
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(out[0])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        plan: Plan = ctx.plan
        stored, y_final = plan.unpack(ctx.saved_tensors, ctx.layout)
        params = plan.param_refs
        with torch.no_grad():
            ybar, tbar, pbar = plan.backward(
                grads[-1], stored, y_final, params, ctx.t_input, ctx.needs_input_grad[1]
            )
        return (None, ybar, tbar, *pbar)
