"""Implicit methods in the torch ``odeint`` (issue 14): forward and exact adjoint.

Oracles (float64): on ``y' = A y`` one step is ``y -> R(hA) y`` with
``R(hA) y = y + h (b^T (x) I)(I - h (a (x) A))^{-1} (1 (x) A y)``, computed here by a dense
solve of the Kronecker form, independently of the solver; gradients are autograd of that map.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")

from symplectic_adjoint.adapters._torch_implicit import (  # noqa: E402
    IMPLICIT_FIXED_METHODS,
    IMPLICIT_METHODS,
    Newton,
    NewtonConvergenceError,
    NewtonOptions,
    _jacobian,
    implicit_reverse_step,
    implicit_tableau,
)
from symplectic_adjoint.adapters.torchdiffeq import SolveStats, odeint  # noqa: E402

F64 = torch.float64
KVAERNO = ("kvaerno3", "kvaerno4", "kvaerno5")
TIGHT = dict(newton_rtol=1e-13, newton_atol=1e-13)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _step_map(method: str, A: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    tab = implicit_tableau(method)
    s, n = tab.stages, A.shape[0]
    a = torch.tensor(tab.a, dtype=F64)
    b = torch.tensor(tab.b, dtype=F64)
    M = torch.eye(s * n, dtype=F64) - h * torch.kron(a, A)
    rhs = torch.kron(torch.ones(s, dtype=F64), A @ y)
    K = torch.linalg.solve(M, rhs).view(s, n)
    return y + h * (b @ K)


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        A = torch.tensor([[-1.0, 2.0, 0.0], [-2.0, -1.0, 0.5], [0.0, 0.3, -30.0]], dtype=F64)
        self.A = torch.nn.Parameter(A)
        self.dts: list[float] = []

    def forward(self, t, y):
        return y @ self.A.T


class LinearSteps(Linear):
    """Records the accepted step sizes (adaptive solvers call back)."""

    def callback_accept_step(self, t0, y0, dt):
        self.dts.append(float(dt))


@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_linear_oracle(method: str) -> None:
    torch.manual_seed(0)
    adaptive = method.startswith("kvaerno")
    func = LinearSteps() if adaptive else Linear()
    y0 = torch.tensor([1.0, -0.5, 2.0], dtype=F64, requires_grad=True)
    if adaptive:
        T = 0.5
        t = torch.tensor([0.0, T], dtype=F64)
        opts = dict(step_t=torch.tensor([T], dtype=F64), **TIGHT)
        rtol, atol = 1e-5, 1e-7
    else:
        t = torch.linspace(0, 0.5, 6, dtype=F64, requires_grad=True)
        opts = dict(TIGHT)
        rtol, atol = 1e-7, 1e-9
    w = torch.randn(len(t), 3, dtype=F64)
    ys = odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=opts)
    loss = (w * ys).sum()
    wrt = [y0, func.A] + ([] if adaptive else [t])
    grads = torch.autograd.grad(loss, wrt)

    # The oracle with the same steps.
    y0r = y0.detach().clone().requires_grad_(True)
    Ar = func.A.detach().clone().requires_grad_(True)
    tr = t.detach().clone().requires_grad_(not adaptive)
    outs = [y0r]
    if adaptive:
        assert abs(sum(func.dts) - T) < 1e-12 and len(func.dts) > 2
        y = y0r
        for dt in func.dts:
            y = _step_map(method, Ar, torch.tensor(dt, dtype=F64), y)
        outs.append(y)
    else:
        for j in range(len(t) - 1):
            outs.append(_step_map(method, Ar, tr[j + 1] - tr[j], outs[-1]))
    ref = torch.stack(outs)
    assert _rel(ys.detach(), ref.detach()) <= 1e-10
    ref_grads = torch.autograd.grad((w * ref).sum(), [y0r, Ar] + ([] if adaptive else [tr]))
    for g, gr in zip(grads, ref_grads, strict=True):
        assert _rel(g, gr) <= 1e-8, method


class Stiff(torch.nn.Module):
    """A nonautonomous stiff nonlinear field acting per row of a (2, 3) batch."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = torch.nn.Parameter(torch.randn(3, 3, generator=g, dtype=F64) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=F64) * 0.1)
        self.L = torch.nn.Parameter(torch.tensor([1.0, 10.0, 200.0], dtype=F64))

    def forward(self, t, y):
        return -self.L * (y - torch.cos(t)) + torch.tanh(y @ self.W.T + self.b) - 0.1 * y**3


def _grads(method, adjoint, *, checkpoint="states", options=None, t_grad=True, stats=None,
           func=None):  # fmt: skip
    func = Stiff() if func is None else func
    y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64, requires_grad=t_grad)
    opts = dict(TIGHT, **(options or {}))
    if method not in ("kvaerno3", "kvaerno4", "kvaerno5"):
        opts.setdefault("step_size", 0.05)
    else:
        opts.setdefault("first_step", 0.01)
    ys = odeint(func, y0, t, rtol=1e-6, atol=1e-8, method=method, options=opts,
                adjoint=adjoint, checkpoint=checkpoint, stats=stats)  # fmt: skip
    w = torch.linspace(-1, 1, ys.numel(), dtype=F64).view_as(ys)
    wrt = [y0, *func.parameters()] + ([t] if t_grad else [])
    return ys.detach(), torch.autograd.grad((w * ys).sum(), wrt)


def _slow(*names: str, among: list | tuple) -> list:
    """``among`` with the ``names`` marked slow (deselected by default, conftest.py)."""
    return [pytest.param(m, marks=pytest.mark.slow) if m in names else m for m in among]


# kvaerno5 stays in the default run for the adaptive methods (fewest steps of the three).
@pytest.mark.parametrize("checkpoint", ["states", "stages", 3])
@pytest.mark.parametrize("method", _slow("kvaerno3", "kvaerno4", among=IMPLICIT_METHODS))
def test_symplectic_matches_backprop_stiff(method: str, checkpoint: Any) -> None:
    ys, g = _grads(method, "symplectic", checkpoint=checkpoint)
    ys_ref, g_ref = _grads(method, "backprop")
    assert torch.equal(ys, ys_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert _rel(a, b) <= 1e-8, method


@pytest.mark.parametrize("solve", ["refine", "fresh"])
@pytest.mark.parametrize("method", _slow("kvaerno5", among=["trbdf2", "radauIIA5", "kvaerno5"]))
def test_checkpoint_modes_agree(method: str, solve: str) -> None:
    """States recompute the stages by the same Newton solve: bitwise the stored stages, so
    a budget's gradient is bitwise the states' one, and with fresh Jacobians the stored
    stages' too. Refined solves start from the Jacobian the backward has at hand (the
    recomputed step's at ``y_n``, or the first implicit stage's from stored stages): the
    same exact solution, to rounding."""
    opts = dict(adjoint_solve=solve)
    _, g_states = _grads(method, "symplectic", checkpoint="states", options=opts)
    _, g_stages = _grads(method, "symplectic", checkpoint="stages", options=opts)
    _, g_budget = _grads(method, "symplectic", checkpoint=3, options=opts)
    for a, b, c in zip(g_states, g_stages, g_budget, strict=True):
        assert torch.equal(a, c)
        if solve == "fresh" or method == "radauIIA5":  # (coupled: fresh Jacobians always)
            assert torch.equal(a, b)
        else:
            assert _rel(b, a) <= 1e-13


# GMRES on kvaerno5 (an adaptive DIRK: sdirk2's path, many more steps) is marked slow.
@pytest.mark.parametrize(
    "method,solver",
    [
        pytest.param(m, s, id=f"{k}-{m}",
                     marks=[pytest.mark.slow] if (m, k) == ("kvaerno5", "gmres") else [])
        for k, s in (("per_sample", dict(per_sample=True)), ("gmres", dict(linear_solver="gmres")))
        for m in ("sdirk2", "gl4", "kvaerno5")
    ],
)  # fmt: skip
def test_linear_solvers_agree(method: str, solver: dict) -> None:
    ys, g = _grads(method, "symplectic")
    ys2, g2 = _grads(method, "symplectic", options=solver)
    assert _rel(ys2, ys) <= 1e-11
    for a, b in zip(g2, g, strict=True):
        assert _rel(a, b) <= 1e-8


def test_newton_failure_names_step_and_time() -> None:
    func = Stiff()
    y0 = torch.ones(2, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(NewtonConvergenceError, match=r"from t=0 to t=0\.5.*stage 1.*1 iter"):
        odeint(func, y0, t, method="implicit_euler", options=dict(step_size=0.5,
               max_newton_iters=1, **TIGHT))  # fmt: skip


def test_refusals() -> None:
    func = Stiff()
    y0 = torch.ones(2, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="odeint_adjoint cannot"):
        odeint(func, y0, t, method="kvaerno5", adjoint="adjoint")
    with pytest.raises(ValueError, match="interp='cubic'"):
        odeint(func, y0, t, method="trbdf2", options=dict(step_size=0.1, interp="cubic"))
    with pytest.raises(ValueError, match="linear_solver"):
        odeint(func, y0, t, method="gl4", options=dict(step_size=0.1, linear_solver="lu"))


def test_stats_and_fixed_methods_listed() -> None:
    stats = SolveStats()
    _grads("kvaerno5", "symplectic", stats=stats)
    assert stats.n_steps > 3 and stats.nfe_backward > 0
    assert set(IMPLICIT_FIXED_METHODS) <= set(
        __import__("symplectic_adjoint.adapters.torchdiffeq", fromlist=["METHODS"]).METHODS
    )


@pytest.mark.parametrize("name", _slow("kvaerno3", "kvaerno4", among=KVAERNO))
def test_kvaerno_matches_diffrax(name: str) -> None:
    """Forward values against diffrax's Kvaerno under PIDs at 1e-8 (kvaerno5 by default:
    the fewest steps; conformance compares all three on a common grid at 1e-10)."""
    pytest.importorskip("diffrax")
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    func = Stiff()
    W, b, L = (p.detach().numpy() for p in (func.W, func.b, func.L))

    def vf(t, y, args):
        return -L * (y - jnp.cos(t)) + jnp.tanh(y @ W.T + b) - 0.1 * y**3

    y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64)
    tol = 1e-8
    cls = getattr(diffrax, name.capitalize())
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), cls(), 0.0, 1.0, 1e-3, jnp.asarray(y0.numpy()),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), max_steps=100000,
    )  # fmt: skip
    ref = torch.from_numpy(jax.device_get(sol.ys[-1]).copy())
    ys = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), rtol=tol, atol=tol,
                method=name)  # fmt: skip
    assert _rel(ys[-1].detach(), ref) <= 100 * tol, name


def test_robertson_example_quick() -> None:
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "robertson.py"
    spec = importlib.util.spec_from_file_location("robertson_example", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick"])
    assert out["calls"] >= 1 and torch.isfinite(out["k"]).all()


def test_implicit_methods_refuse_what_they_cannot_replay():
    """Random draws inside func and create_graph=True are refused for implicit methods,
    naming the alternative, rather than differentiated wrongly."""
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    opts = dict(step_size=0.25)

    def noisy(t, y):  # draws random numbers (that happen not to matter: Newton converges)
        return -3.0 * y + 0.0 * torch.randn_like(y)

    with pytest.raises(ValueError, match="random numbers.*adjoint='backprop'"):
        odeint(noisy, y0, t, method="trbdf2", options=opts)
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ys = odeint(lambda t, y: -w * y**3, y0, t, method="sdirk2", options=opts)
    with pytest.raises(ValueError, match="create_graph=True with an implicit method"):
        torch.autograd.grad(ys[-1].sum(), (y0, w), create_graph=True)


# ------------------------------------------------- Jacobian reuse (simplified / chord Newton)


@pytest.mark.parametrize("jacobian", ["step", "stage", "iterate"])
@pytest.mark.parametrize(
    "method,per_sample",
    [("trbdf2", True), ("gl4", True), ("sdirk2", False),
     pytest.param("kvaerno5", True, marks=pytest.mark.slow)],
)  # fmt: skip
def test_jacobian_modes_exact_against_backprop(method: str, per_sample: bool, jacobian: str):
    """Every Jacobian mode: the same forward under both adjoints (same Newton), the
    symplectic gradient equal to backprop through those iterations, and the converged
    values equal to full Newton's to the Newton tolerance."""
    opts = dict(jacobian=jacobian, per_sample=per_sample)
    ys, g = _grads(method, "symplectic", options=opts)
    ys_bp, g_bp = _grads(method, "backprop", options=opts)
    assert torch.equal(ys, ys_bp)
    for a, b in zip(g, g_bp, strict=True):
        assert _rel(a, b) <= 1e-8, (method, jacobian)
    ys_full, _ = _grads(method, "backprop", options=dict(jacobian="iterate"))
    assert _rel(ys, ys_full) <= 1e-11


def _newton(method: str, jacobian: str, **kw: Any) -> Newton:
    opts = NewtonOptions(rtol=1e-12, atol=1e-12, jacobian=jacobian, **kw)
    return Newton(implicit_tableau(method), opts, 6)


def _one_step(newton: Newton, h: float, y0: torch.Tensor) -> list:
    func = Stiff()
    times = [torch.tensor(0.3 + c * h, dtype=F64) for c in newton.tableau.c]
    with torch.no_grad():
        X, _ = newton.step(func, times, y0, torch.tensor(h, dtype=F64), None, "here")
    return X


@pytest.mark.parametrize("method", ["trbdf2", "kvaerno5", "radauIIA5"])
def test_simplified_newton_builds_one_jacobian_per_step(method: str) -> None:
    """``jacobian="step"``: one Jacobian for all stages and iterations of a step (not one
    per iteration), converging to the same stages as full Newton."""
    y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64)
    step, full = _newton(method, "step"), _newton(method, "iterate")
    X = _one_step(step, 0.02, y0)
    X_full = _one_step(full, 0.02, y0)
    assert step.n_jacobians == 1 and full.n_jacobians >= full.iterations >= 3
    for a, b in zip(X, X_full, strict=True):
        assert _rel(a, b) <= 1e-11


@pytest.mark.parametrize("method", ["implicit_euler", "trbdf2", "radauIIA5"])
def test_stale_jacobian_falls_back_to_full_newton(method: str) -> None:
    """A step-start Jacobian far from the stages (a large step of a cubic field, where
    the chord iteration diverges): the stage falls back to full Newton and converges
    where full Newton does, to its stages."""
    y0 = torch.tensor([[9.0, -12.0, 15.0], [-10.5, 6.0, 12.0]], dtype=F64)
    step, full = _newton(method, "step"), _newton(method, "iterate")
    X = _one_step(step, 0.3, y0)
    assert step.n_jacobians > 1  # rebuilt: the step-start Jacobian alone does not converge
    assert _rel(X[-1], _one_step(full, 0.3, y0)[-1]) <= 1e-11


class _SlowChord(torch.nn.Module):
    """A field whose step-start Jacobian contracts the chord at about 0.35 per iteration
    on the first trbdf2 step of size 0.01 (the cubic term far from y_n's)."""

    def forward(self, t, y):
        return -50.0 * (1 + 19 * torch.sin(40 * t) ** 2) * y - 5 * y**3


def test_slow_chord_switches_to_full_newton_before_running_out() -> None:
    """A chord converging linearly from far at a tight tolerance (1e10 times the first
    update's size away, 22 iterations at its rate) switches to full Newton in time: it
    raised NewtonConvergenceError after 20 iterations, where full Newton takes a few."""
    y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([0.0, 0.01], dtype=F64)
    tight = dict(newton_rtol=1e-12, newton_atol=1e-12, step_size=0.01)
    ys = odeint(_SlowChord(), y0, t, method="trbdf2", options=tight)
    ys_full = odeint(_SlowChord(), y0, t, method="trbdf2", options=dict(tight, jacobian="iterate"))
    assert _rel(ys[-1], ys_full[-1]) <= 1e-11


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
def test_row_jacobians_match_jacrev_per_row(chunk_size: int | None) -> None:
    func = Stiff()
    t = torch.tensor(0.2, dtype=F64)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    J = _jacobian(func, t, x, per_sample=True, chunk_size=chunk_size)
    for b in range(4):
        Jb = torch.func.jacrev(lambda z: func(t, z.unsqueeze(0)).squeeze(0))(x[b])
        assert torch.allclose(J[b], Jb, rtol=1e-14, atol=1e-14)
    dense = _jacobian(func, t, x, per_sample=False, chunk_size=chunk_size)
    full = torch.func.jacrev(lambda z: func(t, z))(x).reshape(12, 12)
    assert torch.allclose(dense, full, rtol=1e-14, atol=1e-14)
    assert torch.equal(_jacobian(lambda t, y: torch.ones_like(y), t, x, per_sample=True,
                                 chunk_size=chunk_size),
                       torch.zeros(4, 3, 3, dtype=F64))  # fmt: skip


class _BranchyCube(torch.autograd.Function):
    """``y^3`` with a hand-written backward that branches on its cotangent's values, which
    no vmap can batch (``torch.autograd.grad(..., is_grads_batched=True)`` raised on it)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        return y**3

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        if bool((g == 0).all()):  # data-dependent control flow
            return torch.zeros_like(y)
        return 3 * y**2 * g


class BranchyStiff(Stiff):
    def forward(self, t, y):
        return -self.L * (y - torch.cos(t)) + torch.tanh(y @ self.W.T + self.b) \
            - 0.1 * _BranchyCube.apply(y)  # fmt: skip


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("per_sample", [True, False])
def test_jacobian_of_a_backward_vmap_cannot_batch(per_sample: bool, chunk_size: Any) -> None:
    """A field whose backward cannot be vectorised: its Jacobian is taken one VJP at a
    time (the same matrix as jacrev's), and the gradient through a stiff solve is
    backprop's (it was a batching error from inside the solver)."""
    t = torch.tensor(0.2, dtype=F64)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    J = _jacobian(BranchyStiff(), t, x, per_sample=per_sample, chunk_size=chunk_size)
    full = torch.autograd.functional.jacobian(lambda z: Stiff()(t, z), x).reshape(6, 6)
    ref = torch.stack([full[3 * b : 3 * b + 3, 3 * b : 3 * b + 3] for b in range(2)])
    assert torch.allclose(J, ref if per_sample else full, rtol=1e-14, atol=1e-14)
    opts = dict(per_sample=per_sample, jacobian_chunk_size=chunk_size)
    for method in ("trbdf2", "kvaerno3"):
        _, got = _grads(method, "symplectic", options=opts, func=BranchyStiff())
        _, ref_g = _grads(method, "backprop", options=opts, func=BranchyStiff())
        for a, b in zip(got, ref_g, strict=True):
            assert _rel(a, b) <= 1e-9, method


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("checkpoint", ["states", "stages"])
def test_jacobian_chunk_size_changes_only_the_workspace(checkpoint: str, per_sample: bool):
    """Jacobians built a few basis vectors at a time (forward Newton matrices and the
    backward's transposed solves): the same stages and gradients as all at once."""
    opts = dict(per_sample=per_sample)
    ys, g = _grads("kvaerno5", "symplectic", checkpoint=checkpoint, options=opts)
    ys_c, g_c = _grads("kvaerno5", "symplectic", checkpoint=checkpoint,
                       options=dict(opts, jacobian_chunk_size=2))  # fmt: skip
    assert _rel(ys_c, ys) <= 1e-13
    for a, b in zip(g_c, g, strict=True):
        assert _rel(a, b) <= 1e-12


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True, "4"])
def test_bad_jacobian_chunk_size_is_refused(chunk: Any) -> None:
    with pytest.raises(ValueError, match="jacobian_chunk_size=.*positive int"):
        odeint(Stiff(), torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="trbdf2", options=dict(step_size=0.1, jacobian_chunk_size=chunk))  # fmt: skip


@pytest.mark.parametrize("jacobian", ["step", "stage", "iterate"])
@pytest.mark.parametrize("method,where", [("implicit_euler", r"stage 1"), ("gl4", r": no conv")])
def test_newton_failure_named_in_every_jacobian_mode(method: str, where: str, jacobian: str):
    func = Stiff()
    y0 = torch.ones(2, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    opts = dict(step_size=0.5, max_newton_iters=2, jacobian=jacobian, **TIGHT)
    with pytest.raises(NewtonConvergenceError, match=rf"from t=0 to t=0\.5.*{where}.*2 iter"):
        odeint(func, y0, t, method=method, options=opts)


def test_unknown_jacobian_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="jacobian='chord'.*'step'.*'stage'.*'iterate'"):
        odeint(Stiff(), torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="trbdf2", options=dict(step_size=0.1, jacobian="chord"))  # fmt: skip


# ----------------------------------------- transposed solves: refinement (adjoint_solve)


@pytest.mark.parametrize("checkpoint", ["states", "stages"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2", "trbdf2", "kvaerno5"])
def test_refined_solves_match_fresh(method: str, per_sample: bool, checkpoint: str) -> None:
    """Iterative refinement from one factorisation per step (the default) and a fresh
    Jacobian per stage solve the same exact transposed systems: gradients to 1e-12."""
    opts = dict(per_sample=per_sample)
    _, g = _grads(method, "symplectic", checkpoint=checkpoint, options=opts)
    _, g_fresh = _grads(method, "symplectic", checkpoint=checkpoint,
                        options=dict(opts, adjoint_solve="fresh"))  # fmt: skip
    for a, b in zip(g, g_fresh, strict=True):
        assert _rel(a, b) <= 1e-12, method


class _Graphs:
    """A :class:`StageGraphs` on plain autograd, for one step of :class:`Stiff`; ``skew``
    scales the products ``J^T v`` that the refinement sweeps see (not the final VJPs)."""

    def __init__(self, func: torch.nn.Module, times: list, skew: float = 1.0) -> None:
        self.func, self.times, self.skew = func, times, skew
        self.params = list(func.parameters())
        self.acc = [torch.zeros_like(p) for p in self.params]

    def linearize(self, i: int, x: torch.Tensor) -> tuple:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return self.func(self.times[i], x), x

    def output(self, g: tuple) -> tuple:
        return g

    def pull(self, g: tuple, cot: torch.Tensor, *, retain: bool = False) -> tuple:
        out, x = g
        grads = torch.autograd.grad(out, (x, *self.params), cot, retain_graph=retain)
        for a, p in zip(self.acc, grads[1:], strict=True):
            a += p
        return grads[0], None

    def pull_x(self, g: tuple, cot: torch.Tensor) -> torch.Tensor:
        self.n_pull_x = getattr(self, "n_pull_x", 0) + 1
        out, x = g
        return torch.autograd.grad(out, x, cot, retain_graph=True)[0] * self.skew


def _one_reverse(method: str, solve: str, *, start_at: float | None, skew: float = 1.0,
                 func: torch.nn.Module | None = None, h: float = 0.2):  # fmt: skip
    """One step of ``func`` (default :class:`Stiff`) and its reverse with a preconditioner
    from the Jacobian at ``start_at * y_n`` (``None``: none given). Returns the cotangents
    of ``y_n`` and the parameters, the Newton object and the graphs (for their counts)."""
    func = Stiff() if func is None else func
    y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64)
    opts = NewtonOptions(rtol=1e-12, atol=1e-12, per_sample=True, adjoint_solve=solve)
    newton = Newton(implicit_tableau(method), opts, y0.numel())
    times = [torch.tensor(0.3 + c * h, dtype=F64) for c in newton.tableau.c]
    with torch.no_grad():
        X, _ = newton.step(func, times, y0, torch.tensor(h, dtype=F64), None, "here")
    start = None if start_at is None else newton.linear(func, times[0], start_at * y0)
    graphs = _Graphs(func, times, skew)
    lam = torch.linspace(-1, 1, y0.numel(), dtype=F64).view_as(y0)
    res, _ = implicit_reverse_step(newton, graphs, lam, X, h, start=start)
    return [res.y0_bar, *graphs.acc], newton, graphs


@pytest.mark.parametrize("checkpoint", ["stages", "states"])
@pytest.mark.parametrize(
    "method,variant",
    [("kvaerno5", None), ("kvaerno5", "jump_t"), ("trbdf2", None), ("trbdf2", "perturb"),
     ("trapezoid", None), ("sdirk2", None)],
)  # fmt: skip
def test_first_slope_joins_the_previous_last_stage(method: str, variant: Any,
                                                   checkpoint: str) -> None:  # fmt: skip
    """A step's first slope ``f(t_n, y_n)`` evaluates the previous step's last stage again
    where the first stage is explicit and the last is ``y_{n+1}`` (Kvaerno's carried
    slope; trbdf2's and trapezoid's ``y_{n+1}``, equal to ``X_s`` to rounding, at the same
    grid node): the reverse pass pulls its cotangent through that stage's solve and VJP,
    one evaluation per step fewer, except after a ``jump_t`` or with ``perturb=True``
    (the slope is evaluated just after ``t_n`` there) and for tableaux without an
    explicit first stage (sdirk2). Gradients, ``t``'s included, as backprop's through
    tight Newton."""
    out, counts = {}, {}
    for adjoint in ("symplectic", "backprop"):
        func = Stiff()
        stats = SolveStats()
        y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64, requires_grad=True)
        t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
        # (states: fresh transposed solves, whose VJPs are one per stage exactly)
        opts = dict(TIGHT, per_sample=True,
                    adjoint_solve="fresh" if checkpoint == "states" else "refine")  # fmt: skip
        if method in KVAERNO:
            opts["jump_t"] = torch.tensor([0.3] if variant == "jump_t" else [])
        else:
            opts.update(step_size=0.05, perturb=variant == "perturb")
        ys = odeint(func, y0, t, method=method, rtol=1e-6, atol=1e-8, options=opts,
                    adjoint=adjoint, checkpoint=checkpoint, stats=stats)  # fmt: skip
        w = torch.linspace(-1, 1, ys.numel(), dtype=F64).view_as(ys)
        out[adjoint] = torch.autograd.grad((w * ys).sum(), [y0, *func.parameters(), t])
        counts[adjoint] = stats
    stats = counts["symplectic"]
    s = implicit_tableau(method).stages
    joined = 0 if method == "sdirk2" or variant == "perturb" else stats.n_steps - 1
    joined -= variant == "jump_t"
    if checkpoint == "stages":  # one evaluation per stage and step, less the joined ones
        assert stats.nfe_backward == s * stats.n_steps - joined
    else:  # one VJP per stage and step, less the joined ones
        assert stats.n_vjp == s * stats.n_steps - joined
    for a, b in zip(out["symplectic"], out["backprop"], strict=True):
        assert _rel(a, b) <= 1e-9


@pytest.mark.parametrize("perturb", [False, True])
@pytest.mark.parametrize("method", ["trbdf2", "trapezoid", "sdirk2"])
def test_stored_stages_keep_no_state_only_stage_one_reads(method: str, perturb: bool) -> None:
    """``checkpoint="stages"`` on a fixed grid: where stage 1 joins the previous step's last
    stage (explicit first stage, ``y_{n+1}`` the last; not perturbed), nothing reads
    ``y_n`` after the first step, and it is not kept: ``s - 1`` stage inputs per step,
    ``y_0`` and the final state. Gradients as with ``"states"``."""
    grads, stats = {}, SolveStats()
    for checkpoint in ("stages", "states"):
        func = Stiff()
        y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64, requires_grad=True)
        opts = dict(TIGHT, per_sample=True, step_size=0.1, perturb=perturb)
        st = stats if checkpoint == "stages" else None
        ys = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                    options=opts, checkpoint=checkpoint, stats=st)  # fmt: skip
        grads[checkpoint] = torch.autograd.grad(ys[-1].square().sum(), [y0, *func.parameters()])
    s, n = implicit_tableau(method).stages, stats.n_steps
    joined = method != "sdirk2" and not perturb
    assert stats.n_checkpoints == (s * n + 1 - (n - 1) if joined else s * n + 1)
    for a, b in zip(grads["stages"], grads["states"], strict=True):
        assert _rel(a, b) <= 1e-12


class RowLinear(torch.nn.Module):
    """``f(t, y) = y A^T`` row by row: every stage has the same Jacobian."""

    def __init__(self) -> None:
        super().__init__()
        A = torch.tensor([[-50.0, 2.0, 0.0], [-2.0, -1.0, 0.5], [0.0, 0.3, -300.0]], dtype=F64)
        self.A = torch.nn.Parameter(A)

    def forward(self, t, y):
        return y @ self.A.T


@pytest.mark.parametrize("method", ["kvaerno5", "sdirk2"])
def test_exact_preconditioner_takes_one_vjp_per_stage(method: str) -> None:
    """When the preconditioner is exact to rounding (here: a linear field, every stage's
    Jacobian the step's), the first refined stage's sweep shows it, and the later stages
    take their final VJP directly after ``P^{-T} c``: one VJP per stage, no sweep, the
    residual still checked with it. Gradients equal fresh solves and the exact map's."""
    grads, counts = {}, {}
    for solve in ("refine", "fresh"):
        grads[solve], newton, graphs = _one_reverse(method, solve, start_at=1.0,
                                                    func=RowLinear(), h=0.05)  # fmt: skip
        counts[solve] = getattr(graphs, "n_pull_x", 0), newton.n_refine_fallbacks
    assert counts["refine"] == (1, 0)  # the first refined stage's sweep only
    y0r = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64, requires_grad=True)
    A = RowLinear().A
    lam = torch.linspace(-1, 1, 6, dtype=F64).view(2, 3)
    y1 = torch.stack([_step_map(method, A, torch.tensor(0.05, dtype=F64), row) for row in y0r])
    exact = torch.autograd.grad((lam * y1).sum(), [y0r, A])
    for a, b, c in zip(grads["refine"], grads["fresh"], exact, strict=True):
        assert _rel(a, b) <= 1e-12 and _rel(a, c) <= 1e-12


@pytest.mark.parametrize("method", ["sdirk2", "trbdf2"])
def test_refinement_falls_back_to_a_fresh_jacobian_when_it_does_not_contract(method: str):
    """A preconditioner from far away (the cubic term 900x stiffer there) contracts by less
    than REFINE_RATE: each stage falls back to its own Jacobian (never an unconverged
    solve); a preconditioner at y_n needs no fallback. Both equal the fresh solves."""
    ref, _, _ = _one_reverse(method, "fresh", start_at=None)
    poor, newton, _ = _one_reverse(method, "refine", start_at=30.0)
    assert newton.n_refine_fallbacks >= 1
    good, newton_good, _ = _one_reverse(method, "refine", start_at=1.0)
    assert newton_good.n_refine_fallbacks == 0
    for a, b, c in zip(poor, good, ref, strict=True):
        assert _rel(a, c) <= 1e-12 and _rel(b, c) <= 1e-12


def test_refinement_checks_the_residual_with_the_final_vjp() -> None:
    """Sweeps that see a wrong operator (products off by 1e-6) converge, to the wrong
    solution; the residual from the stage's final VJP (the true operator) is far above the
    converged sweeps' corrections, so the stage is finished from a fresh Jacobian (the
    correction is linear): the fresh solves' gradient to 1e-12."""
    ref, _, _ = _one_reverse("trbdf2", "fresh", start_at=None)
    got, newton, _ = _one_reverse("trbdf2", "refine", start_at=1.0, skew=1.0 + 1e-6)
    assert newton.n_refine_fallbacks == 2  # both implicit stages
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) <= 1e-12


class JumpStiff(Stiff):
    """:class:`Stiff` whose first component's stiffness jumps 200x at ``t = 0.5``: the
    Jacobians before the jump precondition the transposed solves after it poorly."""

    def forward(self, t, y):
        jump = torch.where(t < 0.5, 1.0, 200.0).to(y.dtype)
        scale = torch.stack([jump, torch.ones_like(jump), torch.ones_like(jump)])
        return super().forward(t, y) * scale


@pytest.mark.parametrize("method", ["trbdf2", "kvaerno5"])
def test_stored_stages_carry_the_preconditioner_between_steps(method: str) -> None:
    """``checkpoint="stages"`` has no Jacobian at ``y_n``: each reverse step starts from the
    one the next step ended with. On a smooth field the whole reverse pass builds one
    Jacobian; across a stiffness jump the carried one contracts too slowly, the refinement
    falls back to fresh Jacobians there, and every gradient still equals fresh solves and
    backprop through Newton."""
    for field, smooth in ((Stiff, True), (JumpStiff, False)):
        grads = {}
        for adjoint, solve in (("symplectic", "refine"), ("symplectic", "fresh"),
                               ("backprop", "refine")):  # fmt: skip
            func = field()
            y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64, requires_grad=True)
            stats = SolveStats()
            opts = dict(
                TIGHT,
                per_sample=True,
                adjoint_solve=solve,
                **({"first_step": 0.02} if method in KVAERNO else {"step_size": 0.05}),
            )
            ys = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                        rtol=1e-7, atol=1e-9, options=opts, adjoint=adjoint,
                        checkpoint="stages", stats=stats)  # fmt: skip
            forward = stats.n_jacobians
            grads[adjoint, solve] = torch.autograd.grad(
                (ys[-1] * torch.arange(1.0, 7.0, dtype=F64).view(2, 3)).sum(),
                [y0, *func.parameters()],
            )
            if adjoint == "symplectic" and solve == "refine":
                backward = stats.n_jacobians - forward
                if smooth:
                    assert backward == 1 and stats.n_refine_fallbacks == 0
                else:
                    assert stats.n_refine_fallbacks >= 1 and backward >= 2
        ref = grads["symplectic", "fresh"]
        for a, b, c in zip(grads["symplectic", "refine"], ref, grads["backprop", "refine"],
                           strict=True):  # fmt: skip
            assert _rel(a, b) <= 1e-12 and _rel(a, c) <= 1e-10


def test_unknown_adjoint_solve_is_refused() -> None:
    with pytest.raises(ValueError, match="adjoint_solve='lu'.*'refine'.*'fresh'"):
        odeint(Stiff(), torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="trbdf2", options=dict(step_size=0.1, adjoint_solve="lu"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("method", ["trbdf2", "kvaerno5"])
def test_refined_solves_on_the_stiff_benchmark_state(method: str, per_sample: bool) -> None:
    """The stiff benchmark's field and 64x8 state (512 unknowns: 64 blocks of 8, or one
    dense 512x512 Jacobian): refinement against fresh Jacobians to 1e-12 and against
    backprop through Newton to 1e-8, both checkpoint modes."""
    from symplectic_adjoint.bench.torch_suites import make_stiff_field

    field = make_stiff_field()
    y0 = 0.5 * torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    y0.requires_grad_(True)
    t = torch.tensor([0.0, 0.2], dtype=F64)
    opts = dict(per_sample=per_sample, newton_rtol=1e-12, newton_atol=1e-12)
    if method == "trbdf2":
        opts["step_size"] = 0.02
    else:
        opts.update(first_step=0.02, max_step=0.02)

    def grads(**kw: Any) -> tuple:
        options = dict(opts, **kw.pop("options", {}))
        ys = odeint(field, y0, t, method=method, rtol=1e12, atol=1e12, options=options, **kw)
        return torch.autograd.grad(ys[-1].square().sum(), (y0, *field.parameters()))

    ref = grads(adjoint="backprop")
    for checkpoint in ("states", "stages"):
        g = grads(checkpoint=checkpoint)
        g_fresh = grads(checkpoint=checkpoint, options=dict(adjoint_solve="fresh"))
        for a, b, c in zip(g, g_fresh, ref, strict=True):
            assert _rel(a, b) <= 1e-12 and _rel(a, c) <= 1e-8, (checkpoint, per_sample)
