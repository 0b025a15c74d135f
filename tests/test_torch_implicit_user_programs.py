"""User programs that tried to break the implicit (stiff) methods of ``adjoint="symplectic"``.

Each program is what a torchdiffeq user would write; the reference is ``adjoint="backprop"``
(autograd through the same Newton iterations) on the same accepted steps (adaptive:
``first_step`` pinned), float64, or a clear error at call time. The first tests are
programs that once returned a silently wrong gradient or a misleading error.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from symplectic_adjoint import odeint  # noqa: E402
from symplectic_adjoint.adapters._torch_implicit import NewtonConvergenceError  # noqa: E402
from symplectic_adjoint.adapters.torchdiffeq import SolveStats, odeint_event  # noqa: E402

F64 = torch.float64
TIGHT = dict(newton_rtol=1e-12, newton_atol=1e-14)


def _rel(a, b) -> float:
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    nb = b.abs().max()
    return float((a - b).abs().max() / nb) if nb > 0 else float(a.abs().max())


def _opts(method: str, **kw) -> dict:
    fixed = not method.startswith("kvaerno")
    return dict(kw, **({"step_size": 0.1} if fixed else {"first_step": 0.02}))


class Forced(nn.Module):
    """A stiff, time-forced, per-row field with a buffer (rates 1 and 50)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(2, 2).double()
        self.register_buffer("rate", torch.tensor([1.0, 50.0], dtype=F64))

    def forward(self, t, y):
        return -self.rate * (y - torch.sin(3 * t)) + torch.tanh(self.lin(y))


def _run(method, adjoint, *, options, t=None, y0=None, func=None, checkpoint="states"):
    """(values, grads wrt y0, parameters and t) of a weighted sum of the outputs."""
    func = Forced() if func is None else func
    torch.manual_seed(2)
    y0 = torch.randn(3, 2, dtype=F64) if y0 is None else y0
    y0 = y0.clone().requires_grad_(True)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64) if t is None else t
    t = t.clone().requires_grad_(True)
    extra = dict(checkpoint=checkpoint) if adjoint == "symplectic" else {}
    ys = odeint(func, y0, t, method=method, options=options, adjoint=adjoint, **extra)
    w = torch.linspace(-1, 1, ys.numel(), dtype=ys.dtype).view_as(ys)
    wrt = [y0, *func.parameters()] + ([t] if not method.startswith("kvaerno") else [])
    return ys.detach(), torch.autograd.grad((w * ys).sum(), wrt)


def _assert_match(method, *, options, tol=1e-8, **kw):
    ys_ref, g_ref = _run(method, "backprop", options=options, **kw)
    ys, g = _run(method, "symplectic", options=options, **kw)
    assert torch.equal(ys, ys_ref), method
    for a, b in zip(g, g_ref, strict=True):
        assert _rel(a, b) <= tol, method


# ------------------------------------------------------------------ once silently wrong


class _HalveInPlace(torch.autograd.Function):
    """``u / 2`` whose backward halves its cotangent in place (``g.mul_``), as a hand-written
    gradient scaling or clipping may; ``check`` adds a ``.item()`` test, which no vmap can
    batch, after the write."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, check: bool) -> torch.Tensor:
        ctx.check = check
        return 0.5 * u

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        g.mul_(0.5)
        if ctx.check and g.abs().sum().item() < 0:  # never: data-dependent control flow
            raise AssertionError
        return g, None


class _HalvedForced(Forced):
    """:class:`Forced` returned through :class:`_HalveInPlace`: its backward receives the
    solver's cotangent itself (autograd does not copy ``grad_outputs``)."""

    def __init__(self, check: bool) -> None:
        super().__init__()
        self.check = check

    def forward(self, t, y):
        return _HalveInPlace.apply(super().forward(t, y), self.check)


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("check", [False, True])
def test_jacobian_of_a_backward_that_writes_into_its_cotangent(check, per_sample, chunk_size):
    """The batched VJPs' vmap attempt wrote into the shared basis before the ``.item()``
    raised, and the one-at-a-time fallback read the halved basis: a Jacobian off by 2x
    (Newton failed on a fixed grid; kvaerno3's gradient was 3e-4 off backprop's, silently).
    Per sample, the basis is an expanded view: the write raised an obscure "more than one
    element ... refers to a single memory location". Now autograd's dense Jacobian."""
    from symplectic_adjoint.adapters._torch_implicit import _jacobian

    func, t = _HalvedForced(check), torch.tensor(0.2, dtype=F64)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    J = _jacobian(func, t, x, per_sample, chunk_size=chunk_size)
    full = torch.autograd.functional.jacobian(lambda z: func(t, z), x).reshape(6, 6)
    ref = torch.stack([full[2 * b : 2 * b + 2, 2 * b : 2 * b + 2] for b in range(3)])
    assert torch.equal(J, ref if per_sample else full)


@pytest.mark.parametrize(
    "method,checkpoint",
    [("trbdf2", "states"), ("kvaerno3", "stages"),
     pytest.param("radauIIA3", "states", marks=pytest.mark.slow)],
)  # fmt: skip
@pytest.mark.parametrize("per_sample", [False, True])
def test_field_whose_backward_writes_into_its_cotangent_matches_backprop(
    method: str, checkpoint: str, per_sample: bool
) -> None:
    """Through whole solves (``adjoint_solve="fresh"``: the Jacobian itself solves): per
    sample, the row check's probe was halved by the backward, refusing the field as
    mixing its rows."""
    opts = _opts(method, per_sample=per_sample, adjoint_solve="fresh", **TIGHT)
    _assert_match(method, options=opts, tol=1e-10, func=_HalvedForced(True),
                  checkpoint=checkpoint)  # fmt: skip


@pytest.mark.parametrize("method", ["implicit_euler", "radauIIA3", "trbdf2"])
def test_gmres_backprop_reference_is_the_exact_gradient(method: str) -> None:
    """adjoint='backprop' with GMRES once differentiated the Arnoldi process (gradients
    ~1e28 on this 6-unknown problem); it must agree with the dense solver's gradient."""
    opts = _opts(method, **TIGHT)
    _, g_dense = _run(method, "backprop", options=opts)
    _, g_gmres = _run(method, "backprop", options=dict(opts, linear_solver="gmres"))
    _, g_sympl = _run(method, "symplectic", options=dict(opts, linear_solver="gmres"))
    for a, b, c in zip(g_gmres, g_dense, g_sympl, strict=True):
        assert _rel(a, b) <= 1e-8
        assert _rel(c, b) <= 1e-8


@pytest.mark.parametrize("adjoint", ["symplectic", "backprop"])
@pytest.mark.parametrize("method", ["sdirk2", "kvaerno3"])
def test_per_sample_with_tuple_state_is_refused(method: str, adjoint: str) -> None:
    """A tuple state is solved as one vector: per-sample blocks of it were wrong Jacobians,
    and the symplectic gradient was off by 3e-2 (Newton still converged)."""

    def f(t, y):
        x, v = y
        return -10 * x + torch.tanh(v[:, :2]), -v + torch.sin(x).sum(-1, keepdim=True)

    y0 = (torch.randn(4, 2, dtype=F64), torch.randn(4, 3, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="per_sample.*tuple state"):
        odeint(f, y0, t, method=method, options=_opts(method, per_sample=True), adjoint=adjoint)


def test_per_sample_without_batch_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="leading batch dimension"):
        odeint(lambda t, y: -y, torch.tensor(1.0, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="sdirk2", options=dict(step_size=0.5, per_sample=True))  # fmt: skip


# ------------------------------------------------------------------ once a misleading error


@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2", "radauIIA5", "kvaerno3"])
def test_float32_with_default_tolerances_converges(method: str) -> None:
    """torchdiffeq's default rtol=1e-7 asked Newton for 1e-9, below float32's epsilon:
    every fixed-grid step raised NewtonConvergenceError."""
    k0 = torch.tensor(5.0)
    t = torch.tensor([0.0, 0.5, 1.0])
    out = []
    for adjoint in ("symplectic", "backprop"):
        k = k0.clone().requires_grad_(True)
        y0 = torch.tensor([1.0, 2.0], requires_grad=True)
        ys = odeint(lambda t, y, k=k: -k * y**3 + torch.cos(t), y0, t, method=method,
                    options=_opts(method), adjoint=adjoint)  # fmt: skip
        out.append((ys.detach(), torch.autograd.grad(ys.sum(), (k, y0))))
    assert out[0][0].dtype == torch.float32
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert _rel(a, b) <= 1e-4  # float32 Newton iterates: agreement to its tolerance


@pytest.mark.parametrize("method", ["sdirk2", "gl4"])
def test_zero_size_state_on_a_fixed_grid(method: str) -> None:
    """As rk4 does; the implicit methods once never 'converged' (the RMS of nothing is nan)."""
    k = torch.tensor(2.0, dtype=F64, requires_grad=True)
    y0 = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -k * y, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                options=dict(step_size=0.25))  # fmt: skip
    assert ys.shape == (2, 0, 3)
    (g,) = torch.autograd.grad(ys.sum(), y0)
    assert g.shape == (0, 3)


@pytest.mark.parametrize("adjoint", ["symplectic", "backprop"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_singular_newton_matrix_names_the_step(adjoint: str, per_sample: bool) -> None:
    """f = 10 y with h = 0.1: I - h J = 0. Once torch's bare lu_factor RuntimeError."""
    with pytest.raises(NewtonConvergenceError, match=r"step from t=0 to t=0\.1.*singular"):
        odeint(lambda t, y: 10.0 * y, torch.ones(1, 1, dtype=F64),
               torch.tensor([0.0, 1.0], dtype=F64), method="implicit_euler",
               options=dict(step_size=0.1, per_sample=per_sample), adjoint=adjoint)  # fmt: skip


def test_singular_newton_matrix_is_retried_smaller_by_adaptive_methods() -> None:
    t = torch.tensor([0.0, 0.5], dtype=F64)
    ys = odeint(lambda t, y: 10.0 * y, torch.ones(1, dtype=F64), t, method="kvaerno3",
                options=dict(first_step=0.4))  # fmt: skip
    assert abs(float(ys[-1]) - torch.e**5) / torch.e**5 < 1e-4


@pytest.mark.parametrize("method", ["sdirk2", "radauIIA3", "kvaerno3"])
def test_random_func_is_refused_even_when_newton_fails(method: str) -> None:
    """Noise above the Newton tolerance kept Newton from converging: the user saw a
    NewtonConvergenceError instead of the documented refusal naming the fix."""
    k = torch.tensor(5.0, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="draws random numbers.*outside func"):
        odeint(lambda t, y: -k * y**3 + 1e-3 * torch.randn_like(y),
               torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method,
               options=_opts(method))  # fmt: skip


def test_per_component_tolerances_with_explicit_newton_tolerances() -> None:
    """Tuple rtol/atol drive the error control; with newton_rtol/newton_atol given they
    must not be needed as scalars (they once raised 'rtol must be a scalar')."""

    def f(t, y):
        return -50 * y[0] + y[1].sum(), -y[1] + y[0].sum()

    y0 = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    kw = dict(rtol=(1e-6, 1e-5), atol=(1e-8, 1e-9), method="kvaerno3",
              options=dict(first_step=0.01, **TIGHT))  # fmt: skip
    a = odeint(f, y0, t, **kw)
    b = odeint(f, y0, t, adjoint="backprop", **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.detach(), y.detach())
    with pytest.raises(ValueError, match="rtol must be a scalar"):
        odeint(f, y0, t, **dict(kw, options=dict(first_step=0.01)))


@pytest.mark.parametrize("bad", [dict(newton_rtol=-1.0), dict(newton_rtol=0.0, newton_atol=0.0)])
def test_meaningless_newton_tolerances_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="newton_rtol"):
        odeint(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="sdirk2", options=dict(step_size=0.5, **bad))  # fmt: skip


# ------------------------------------------------------------------ programs that work

FEATURES = {
    "decreasing_t": dict(t=torch.tensor([1.0, 0.6, 0.1], dtype=F64)),
    "many_outputs": dict(t=torch.linspace(0, 1, 23, dtype=F64)),
    "budget": dict(checkpoint=2),
    "stages": dict(checkpoint="stages"),
    "per_sample": dict(options=dict(per_sample=True)),
    "jacobian_stage": dict(options=dict(jacobian="stage")),
    "jacobian_iterate": dict(options=dict(jacobian="iterate")),
    "perturb": dict(options=dict(perturb=True)),
}


_PROGRAM_METHODS = {"implicit_midpoint": (), "trbdf2": (), "gl6": (),
                    "radauIIA5": (pytest.mark.slow,), "kvaerno4": (pytest.mark.slow,)}  # fmt: skip


@pytest.mark.parametrize(
    "method,feature",
    [
        pytest.param(m, f, marks=marks, id=f"{m}-{f}")
        for m, marks in _PROGRAM_METHODS.items()
        for f in FEATURES
        if not (f == "perturb" and m.startswith("kvaerno"))  # perturb: a fixed-grid option
    ],
)
def test_user_program_matches_backprop(method: str, feature: str) -> None:
    kw = dict(FEATURES[feature])
    extra = kw.pop("options", {})
    _assert_match(method, options=_opts(method, **extra, **TIGHT), **kw)


def test_grid_constructor_with_t_gradient_matches_backprop() -> None:
    def grid(func, y0, t):
        s = torch.linspace(0, 1, 9, dtype=t.dtype) ** 2
        return t[0] + (t[-1] - t[0]) * s

    _assert_match("sdirk2", options=dict(grid_constructor=grid, **TIGHT))


def test_interp_cubic_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="interp='cubic' is not supported for implicit"):
        _run("trbdf2", "symplectic", options=dict(step_size=0.1, interp="cubic"))


@pytest.mark.parametrize(
    "method,rtol,newton",
    [("kvaerno3", 1e-6, 1e-13), pytest.param("kvaerno5", 1e-6, 1e-13, marks=pytest.mark.slow)],
)
def test_robertson_rates_gradient_matches_backprop(method: str, rtol: float, newton: float):
    """Stiff kinetics over [0, 100]. The backprop reference is exact only as far as Newton
    converged: at the default Newton tolerances (rtol/100) it is off by ~1e-7 here (8e-5 on
    Van der Pol, mu = 1000) while the symplectic gradient stays within 2e-10 of the tight
    one; so the reference runs with tight Newton tolerances."""
    out = []
    for adjoint in ("symplectic", "backprop"):
        k = torch.tensor([0.04, 3e7, 1e4], dtype=F64, requires_grad=True)

        def f(t, y, k=k):
            r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
            return torch.stack([-r1 + r3, r1 - r2 - r3, r2])

        y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
        ys = odeint(
            f,
            y0,
            torch.tensor([0.0, 1e-3, 1.0, 100.0], dtype=F64),
            rtol=rtol,
            atol=1e-10,
            method=method,
            adjoint=adjoint,
            options=dict(first_step=1e-5, newton_rtol=newton, newton_atol=newton * 1e-4),
        )
        out.append((ys.detach(), torch.autograd.grad((ys * torch.arange(1.0, 13).view(4, 3)).sum(),
                                                     (k, y0))))  # fmt: skip
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert _rel(a, b) <= 1e-8


def test_time_branch_needs_adjoint_params_and_then_matches() -> None:
    p = torch.tensor(2.0, dtype=F64, requires_grad=True)
    q = torch.tensor(-1.0, dtype=F64, requires_grad=True)

    def f(t, y):
        return -p * y if float(t) < 0.5 else q * y * y - y

    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    opts = dict(step_size=0.1, **TIGHT)
    with pytest.raises(RuntimeError, match="adjoint_params"):
        torch.autograd.grad(odeint(f, y0, t, method="sdirk2", options=opts).sum(), (p, q))
    ys = odeint(f, y0, t, method="sdirk2", options=opts, adjoint_params=(p, q))
    ref = odeint(f, y0, t, method="sdirk2", options=opts, adjoint="backprop")
    g, g_ref = torch.autograd.grad(ys.sum(), (p, q)), torch.autograd.grad(ref.sum(), (p, q))
    for a, b in zip(g, g_ref, strict=True):
        assert _rel(a, b) <= 1e-10


def test_no_grad_and_y0_without_grad() -> None:
    func = Forced()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        assert not odeint(func, torch.ones(2, dtype=F64), t, method="gl4",
                          options=dict(step_size=0.2)).requires_grad  # fmt: skip
    ys = odeint(func, torch.ones(2, dtype=F64), t, method="gl4", options=dict(step_size=0.2))
    ref = odeint(func, torch.ones(2, dtype=F64), t, method="gl4", options=dict(step_size=0.2),
                 adjoint="backprop")  # fmt: skip
    params = list(func.parameters())
    g, g_ref = torch.autograd.grad(ys.sum(), params), torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        assert _rel(a, b) <= 1e-8


def test_create_graph_is_refused_naming_backprop() -> None:
    k = torch.tensor(1.0, dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -k * y**3, torch.ones(2, dtype=F64, requires_grad=True),
                torch.tensor([0.0, 1.0], dtype=F64), method="sdirk2",
                options=dict(step_size=0.5))  # fmt: skip
    with pytest.raises(ValueError, match="adjoint='backprop'"):
        torch.autograd.grad(ys.sum(), k, create_graph=True)


@pytest.mark.parametrize("method", ["implicit_euler", "kvaerno5"])
def test_odeint_event_with_an_implicit_method_matches_backprop(method: str) -> None:
    out = []
    for adjoint in ("symplectic", "backprop"):
        k = torch.tensor(5.0, dtype=F64, requires_grad=True)
        event_t, sol = odeint_event(
            lambda t, y, k=k: -k * y, torch.ones(1, dtype=F64, requires_grad=True),
            torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] - 0.5, method=method,
            options=_opts(method, **TIGHT), adjoint=adjoint,
        )  # fmt: skip
        out.append((float(event_t.detach()), torch.autograd.grad(event_t + sol[-1].sum(), k)[0]))
    assert out[0][0] == out[1][0]
    assert _rel(out[0][1], out[1][1]) <= 1e-8


# ------------------------------------------------------------------ found by breakd


@pytest.mark.parametrize("per_sample", [False, True])
def test_carried_preconditioner_singular_at_a_new_step_size(per_sample: bool) -> None:
    """Stored stages carry the reverse pass's preconditioner J_p to the previous step, whose
    step size differs: f = a1 y after t = 0.5 with a1 = 8, and steps 0.125 before it, so
    I - 0.125 J_p = 0 exactly while every step's own Newton matrix is regular. The backward
    once raised torch's bare LinAlgError from linalg.inv; now that step's solve uses its own
    Jacobian. Reference: the exact implicit Euler map, prod (1 - h_n a(t_{n+1}))^-1."""
    a = torch.tensor([-1.0, 8.0], dtype=F64, requires_grad=True)

    def f(t, y):  # stiffness switching at t = 0.5: the rate a1 read from t > 0.5 on
        return (a[0] if float(t) <= 0.5 else a[1]) * y

    grid = torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5, 0.5625, 0.625], dtype=F64)
    y0 = torch.tensor([[1.5]], dtype=F64, requires_grad=True)
    ys = odeint(f, y0, grid[[0, -1]], method="implicit_euler", checkpoint="stages",
                options=dict(grid_constructor=lambda *_: grid, per_sample=per_sample),
                adjoint_params=(a,))  # fmt: skip
    exact = y0 / ((1 - 0.125 * a[0]) ** 4 * (1 - 0.0625 * a[1]) ** 2)
    assert _rel(ys[-1].detach(), exact.detach()) <= 1e-14
    g = torch.autograd.grad(ys[-1].sum(), (y0, a))
    g_exact = torch.autograd.grad(exact.sum(), (y0, a))
    for x, y in zip(g, g_exact, strict=True):
        assert _rel(x, y) <= 1e-13


@pytest.mark.parametrize("method", [pytest.param("kvaerno3", marks=pytest.mark.slow), "kvaerno5"])
def test_per_sample_refinement_is_not_failed_by_a_converged_row(method: str) -> None:
    """Rows of very different size (one almost linear): with per_sample each row's
    refinement converges at its own pace, and a row already at rounding level shows
    corrections that no longer shrink. That row's rate once failed the whole stage: 114 of
    the 116 stages (kvaerno5) fell back to a fresh Jacobian (dense: 11). Gradients equal
    the fresh solves' (1e-12) and backprop through converged Newton (1e-8)."""
    k = torch.tensor([1.0, 50.0], dtype=F64, requires_grad=True)

    def f(t, y):
        return -k * y - 10 * y**3 + torch.sin(3 * t)

    t = torch.tensor([0.0, 0.3], dtype=F64)
    grads, fallbacks = {}, {}
    runs = [("symplectic", True, "refine"), ("symplectic", False, "refine"),
            ("symplectic", True, "fresh"), ("backprop", True, "")]  # fmt: skip
    for adjoint, per_sample, solve in runs:
        y0 = torch.tensor([[1e-3, 2e-3], [2.0, -1.5], [0.5, 1.0]], dtype=F64, requires_grad=True)
        stats = SolveStats()
        opts = dict(first_step=0.01, per_sample=per_sample, **TIGHT)
        if solve:
            opts.update(adjoint_solve=solve)
        kw = dict(checkpoint="stages", stats=stats) if adjoint == "symplectic" else {}
        ys = odeint(f, y0, t, method=method, rtol=1e-6, atol=1e-8, options=opts,
                    adjoint=adjoint, **kw)  # fmt: skip
        w = torch.linspace(-1, 1, ys.numel(), dtype=F64).view_as(ys)
        grads[adjoint, per_sample, solve] = torch.autograd.grad((w * ys).sum(), (y0, k))
        fallbacks[per_sample, solve] = stats.n_refine_fallbacks
    assert fallbacks[True, "refine"] <= fallbacks[False, "refine"] + 3  # was 10x as many
    got = grads["symplectic", True, "refine"]
    for a, b, c in zip(got, grads["symplectic", True, "fresh"], grads["backprop", True, ""],
                       strict=True):  # fmt: skip
        assert _rel(a, b) <= 1e-12 and _rel(a, c) <= 1e-8


@pytest.mark.parametrize("method", [pytest.param("kvaerno3", marks=pytest.mark.slow), "kvaerno5"])
def test_carried_preconditioner_holds_only_this_steps_inverses(method: str, monkeypatch) -> None:
    """A smooth adaptive solve carries one Jacobian through its whole reverse pass; the
    preconditioner's inverses are keyed by h a_ii, and it once kept every step size's:
    one B n^2 matrix per reverse step (up to 41 with kvaerno5 here, 601 with kvaerno3). Now
    the inverses of the step just reversed only (one per distinct a_ii: one for Kvaerno)."""
    from symplectic_adjoint.adapters import _torch_implicit

    held = []
    carried = _torch_implicit.TransposedSolves.carried

    def spy(self):
        out = carried(self)
        if out is not None:
            held.append(len(out.factors))
        return out

    monkeypatch.setattr(_torch_implicit.TransposedSolves, "carried", spy)
    k = torch.tensor([1.0, 50.0], dtype=F64, requires_grad=True)
    torch.manual_seed(0)
    y0 = torch.randn(16, 2, dtype=F64, requires_grad=True)
    stats = SolveStats()
    ys = odeint(lambda t, y: -k * y - torch.tanh(y) + torch.sin(3 * t), y0,
                torch.tensor([0.0, 1.0], dtype=F64), method=method, checkpoint="stages",
                options=dict(first_step=0.01, per_sample=True), stats=stats)  # fmt: skip
    torch.autograd.grad(ys[-1].sum(), (y0, k))
    assert stats.n_steps >= 20 and len(held) == stats.n_steps
    assert max(held) == 1


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(linear_solver="gmres", gmres_restart=0), "gmres_restart=0: use a positive int"),
        (dict(linear_solver="gmres", gmres_rtol=-1.0), "gmres_rtol=-1.0"),
        (dict(max_newton_iters=2.5), "max_newton_iters=2.5: use a positive int"),
        (dict(per_sample="no"), "per_sample='no': use True or False"),
        (dict(newton_atol=float("inf")), "newton_atol=inf: both must be finite"),
        (dict(newton_rtol="tight"), "newton_rtol='tight': use a number"),
    ],
)
def test_meaningless_solver_options_are_refused_at_call_time(bad: dict, match: str) -> None:
    """Once: a bare AssertionError inside GMRES (restart 0), an 'INTERNAL ASSERT FAILED'
    from torch.linalg.lstsq (negative rtol), 2.5 iterations quietly made 2, 'no' read as
    True, and an infinite tolerance accepting Newton's first iterate."""
    with pytest.raises(ValueError, match=match):
        odeint(lambda t, y: -(y**3), torch.ones(1, 2, dtype=F64),
               torch.tensor([0.0, 1.0], dtype=F64), method="sdirk2",
               options=dict(step_size=0.25, **bad))  # fmt: skip


def test_integer_options_accept_numpy_and_tensor_integers() -> None:
    np = pytest.importorskip("numpy")
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ref = odeint(lambda t, y: -(y**3), torch.ones(2, dtype=F64), t, method="sdirk2",
                 options=dict(step_size=0.25))  # fmt: skip
    ys = odeint(lambda t, y: -(y**3), torch.ones(2, dtype=F64), t, method="sdirk2",
                options=dict(step_size=0.25, jacobian_chunk_size=np.int64(1),
                             max_newton_iters=torch.tensor(20)))  # fmt: skip
    assert torch.equal(ys, ref)


def _batch_mean(k: torch.Tensor) -> Any:
    return lambda t, y: -k * y + 5.0 * torch.tanh(y.mean(0, keepdim=True)) - y**3


def _last_reads_first(k: torch.Tensor) -> Any:
    """Row 0 reads no other row; the last row reads row 0 (a check of row 0 misses it)."""

    def f(t, y):
        push = torch.zeros_like(y)
        push[-1] = 0.3 * torch.tanh(y[0])
        return -k * y - y**3 + push

    return f


def _neighbours(k: torch.Tensor) -> Any:
    """Each row reads the next one, cyclically (a chain of samples)."""
    return lambda t, y: -k * y - y**3 + 0.2 * torch.roll(y, 1, dims=0)


@pytest.mark.parametrize("field", [_batch_mean, _last_reads_first, _neighbours])
@pytest.mark.parametrize("adjoint", ["symplectic", "backprop"])
@pytest.mark.parametrize("method", ["trbdf2", "radauIIA3", "kvaerno5"])
def test_per_sample_with_a_field_that_mixes_rows_is_refused(method: str, adjoint: str,
                                                            field: Any) -> None:  # fmt: skip
    """A batch mean (or any row reading another) in func breaks per_sample's
    block-diagonal Jacobian. Newton still converged (exact residuals; forward values
    within 3e-11), but the symplectic gradient was 3e-4 off, silently. Now refused at
    call time, naming the fix."""
    k = torch.tensor([1.0, 30.0], dtype=F64, requires_grad=True)
    f = field(k)

    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0], [0.3, 0.3]], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="per_sample.*mixes the rows.*Drop per_sample"):
        odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method, adjoint=adjoint,
               options=_opts(method, per_sample=True))  # fmt: skip


def test_float32_wide_network_converges_at_default_tolerances() -> None:
    """A width-512 MLP in float32 at torchdiffeq's default tolerances: the field's own
    rounding (sums of many larger terms) kept Newton's update at 1.3-1.8 times the
    tolerance floor, and every such stage raised NewtonConvergenceError. The convergence
    scale now holds the rounding floor of ``h a_ii k``; the gradient is as backprop's."""
    gen = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(16, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
              torch.nn.Tanh(), torch.nn.Linear(512, 512), torch.nn.Tanh(),
              torch.nn.Linear(512, 16)]  # fmt: skip
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3.0 / p.shape[-1] ** 0.5)
    y0 = torch.randn(32, 16, generator=gen, requires_grad=True)
    t = torch.tensor([0.0, 0.1])
    out = []
    for adjoint in ("symplectic", "backprop"):
        ys = odeint(lambda t, y: net(y) - 50 * y, y0, t, method="sdirk2", adjoint=adjoint,
                    options=dict(step_size=0.05, per_sample=True))  # fmt: skip
        out.append(
            (ys.detach(), torch.autograd.grad(ys[-1].square().sum(), (y0, *net.parameters())))
        )
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert _rel(a, b) <= 1e-3  # float32, Newton at its (rounding-level) tolerance


# ------------------------------------------------------------------ found by breake (held)


class _SwitchedRate(Forced):
    """Rates that jump at the grid node ``t = 0.5`` (left limit 1x, right limit 30x): a
    first slope at a node and the previous step's last stage read the same branch."""

    def forward(self, t, y):
        r = torch.where(t < 0.5, 1.0, 30.0) * self.rate
        return -r * (y - torch.sin(3 * t)) + torch.tanh(self.lin(y))


class _SharpJacobian(Forced):
    """Linear in ``y`` with a Jacobian that grows 400x within ~0.005 around ``t = 0.33``:
    a preconditioner exact on one stage is far off on the next (the direct refinement
    path must fail its residual check there and fall back)."""

    def forward(self, t, y):
        a = 1 + 400 * torch.sigmoid((t - 0.33) * 2000)
        return -a * self.rate * y + self.lin(y) + torch.sin(5 * t)


def _uneven(func, y0, t):
    s = torch.tensor([0, 0.01, 0.05, 0.2, 0.21, 0.5, 0.77, 1.0], dtype=t.dtype)
    return t[0] + (t[-1] - t[0]) * s


_NODES_AND_INSIDE = torch.tensor([0.0, 0.005, 0.2, 0.3, 0.5, 0.99, 1.0], dtype=F64)


@pytest.mark.parametrize("checkpoint", ["states", "stages", 2])
@pytest.mark.parametrize("field", [_SwitchedRate, _SharpJacobian])
@pytest.mark.parametrize("method", ["trbdf2", "trapezoid"])
def test_joined_stages_with_t_gradient_on_an_uneven_grid(method, field, checkpoint) -> None:
    """Joined first slopes (stage 1 = previous last stage) with outputs at grid nodes and
    inside steps, ``t`` requiring grad, an uneven grid, a field discontinuous in ``t`` at
    a node or with a Jacobian switching within a step: backprop's gradients."""
    _assert_match(method, options=dict(grid_constructor=_uneven, **TIGHT), tol=1e-10,
                  t=_NODES_AND_INSIDE, func=field(), checkpoint=checkpoint)  # fmt: skip


@pytest.mark.parametrize(
    "variant,field",
    [("jump_t", Forced), ("step_t", Forced),
     pytest.param("step_t", _SharpJacobian, marks=pytest.mark.slow),
     pytest.param("jump_t", _SharpJacobian, marks=pytest.mark.slow)],
)  # fmt: skip
def test_kvaerno_joins_across_pinned_steps(variant: str, field: type) -> None:
    """Kvaerno's carried slope joins across step_t points (and not after jump_t ones),
    stored stages carrying the preconditioner, per-sample refinement; the slow cases meet
    a 400x Jacobian switch on the direct refinement path: backprop's gradients."""
    pts = torch.tensor([0.33, 0.5], dtype=F64)
    opts = dict(first_step=0.02, per_sample=True, **{variant: pts}, **TIGHT)
    _assert_match("kvaerno3", options=opts, tol=1e-10, func=field(), checkpoint="stages")


class _NormedField(nn.Module):
    """``-5 y + BatchNorm1d(Linear(y))``: per-sample in eval mode (running statistics),
    mixing the batch's rows in train mode (batch statistics)."""

    def __init__(self, train: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(2, 2).double()
        self.bn = nn.BatchNorm1d(2, momentum=None).double()  # momentum None: stats unchanged
        self.bn.running_mean.fill_(0.1)
        self.bn.running_var.fill_(2.0)
        self.train(train)

    def forward(self, t, y):
        return -5 * y + self.bn(self.lin(y))


@pytest.mark.parametrize("method", ["trbdf2", "kvaerno3"])
def test_per_sample_batchnorm_in_eval_mode_matches_backprop(method: str) -> None:
    """A BatchNorm in eval mode is per-sample: accepted, and backprop's gradients."""
    _assert_match(method, options=_opts(method, per_sample=True, **TIGHT), tol=1e-10,
                  func=_NormedField(train=False), checkpoint="stages")  # fmt: skip


@pytest.mark.parametrize("adjoint", ["symplectic", "backprop"])
def test_per_sample_batchnorm_in_train_mode_is_refused(adjoint: str) -> None:
    """Batch statistics mix the rows: per_sample=True is refused, not a wrong gradient."""
    y0 = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="per_sample"):
        odeint(_NormedField(train=True), y0, torch.tensor([0.0, 0.3], dtype=F64),
               method="trbdf2", options=_opts("trbdf2", per_sample=True),
               adjoint=adjoint)  # fmt: skip


@pytest.mark.parametrize("checkpoint", ["states", "stages"])
@pytest.mark.parametrize("method", ["trbdf2", pytest.param("kvaerno3", marks=pytest.mark.slow)])
def test_tuple_state_with_joined_stages_matches_backprop(method: str, checkpoint: str) -> None:
    """A tuple state through joined first slopes and stored stages (without y_n)."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor([20.0, 0.5], dtype=F64))

        def forward(self, t, y):
            x, v = y
            return -self.k[0] * x + torch.tanh(v), -self.k[1] * v + torch.sin(x) * torch.cos(t)

    out = {}
    for adjoint in ("symplectic", "backprop"):
        func = Pair()
        y0 = (torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True),
              torch.tensor([0.3, 2.0], dtype=F64, requires_grad=True))  # fmt: skip
        extra = dict(checkpoint=checkpoint) if adjoint == "symplectic" else {}
        x, v = odeint(func, y0, torch.tensor([0.0, 0.25, 1.0], dtype=F64), method=method,
                      options=_opts(method, **TIGHT), adjoint=adjoint, **extra)  # fmt: skip
        out[adjoint] = torch.autograd.grad(x.sum() + (v * v).sum(), [*y0, func.k])
    for a, b in zip(out["symplectic"], out["backprop"], strict=True):
        assert _rel(a, b) <= 1e-10


def _event_program(method: str, adjoint: str, A: torch.Tensor) -> tuple:
    """``odeint_event`` of ``y' = y A^T`` on a fixed 0.05 grid until ``y[0, 0] = 0.3``."""
    A = A.clone().requires_grad_(True)
    y0 = torch.tensor([[1.0, -0.4], [0.2, 0.7]], dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
    te, sol = odeint_event(lambda t, y: y @ A.T, y0, t0, event_fn=lambda t, y: y[0, 0] - 0.3,
                           method=method, options=dict(step_size=0.05, **TIGHT),
                           adjoint=adjoint)  # fmt: skip
    loss = 3 * te + (torch.tensor([[1.0, -2.0], [0.5, 1.5]], dtype=F64) * sol[-1]).sum()
    return te.detach(), sol[-1].detach(), torch.autograd.grad(loss, [y0, A, t0])


_EVENT_A = torch.tensor([[-1.0, 0.5], [0.2, -5.0]], dtype=F64)


def test_fixed_grid_event_steps_by_the_float64_step_size() -> None:
    """The fixed-step event loop hands ``dt`` over as the Python float ``step_size``; the
    implicit step read it as float32 (a float64 solve stepped by 0.05000000075: states
    5e-9 off, and the symplectic gradient 3e-6 off backprop's, whose forward it was not).
    The state at the event is implicit Euler's exact map ``(I - hA)^{-1}`` interpolated."""
    te, state, _ = _event_program("implicit_euler", "symplectic", _EVENT_A)
    I2, h = torch.eye(2, dtype=F64), 0.05
    tn, yn = torch.tensor(0.0, dtype=F64), torch.tensor([[1.0, -0.4], [0.2, 0.7]], dtype=F64)
    while True:  # the event loop's chain of nodes t_{n+1} = t_n + h
        y1 = torch.linalg.solve(I2 - h * _EVENT_A, yn.T).T
        if y1[0, 0] <= 0.3:
            break
        tn, yn = tn + h, y1
    expect = yn + (te - tn) / (tn + h - tn) * (y1 - yn)
    assert _rel(state, expect) <= 1e-13


@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2", "trbdf2"])
def test_fixed_grid_event_gradient_matches_backprop(method: str) -> None:
    """Event time, ``t0``, ``y0`` and field gradients through joined stages (trbdf2)."""
    te, state, g = _event_program(method, "symplectic", _EVENT_A)
    te_ref, state_ref, g_ref = _event_program(method, "backprop", _EVENT_A)
    assert te == te_ref and torch.equal(state, state_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert _rel(a, b) <= 1e-10


class _ScriptedField(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.lin = torch.nn.Linear(3, 3).to(F64)
        self.L = torch.nn.Parameter(torch.tensor([1.0, 10.0, 100.0], dtype=F64))
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 3, generator=g, dtype=F64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.L * y + torch.tanh(self.lin(y))


@pytest.mark.parametrize("method,checkpoint", [("trbdf2", "states"), ("kvaerno3", "stages")])
def test_torchscript_module_matches_backprop(method: str, checkpoint: str) -> None:
    """A ``torch.jit.script`` module: its operations are invisible to the read watcher,
    and the first evaluation of an implicit method (with a graph, for the Newton
    Jacobian) returned a tensor whose reads it had not seen; its parameters were then
    dropped as "upstream" of that tensor and refused in the backward pass as unread."""
    y0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=F64)
    _assert_match(method, options=_opts(method, **TIGHT), func=torch.jit.script(_ScriptedField()),
                  y0=y0, t=torch.tensor([0.0, 0.2, 0.4], dtype=F64), checkpoint=checkpoint,
                  tol=1e-9)  # fmt: skip


@pytest.mark.parametrize("adjoint", ["symplectic", "backprop"])
@pytest.mark.parametrize("method", ["implicit_euler", "kvaerno3"])
def test_implicit_method_under_inference_mode_is_refused(method: str, adjoint: str) -> None:
    """Inference mode records no autograd graph, so Newton's Jacobian would be zero: the
    stages silently looser, or a NewtonConvergenceError blaming the step size. Refused
    at call time naming torch.no_grad(), under which the solve runs."""
    y0, t = torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 0.3], dtype=F64)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode.*no_grad"):
        odeint(Forced(), y0, t, method=method, options=_opts(method), adjoint=adjoint)
    with torch.no_grad():
        ys = odeint(Forced(), y0, t, method=method, options=_opts(method, **TIGHT),
                    adjoint=adjoint)  # fmt: skip
    ref = _run(method, "backprop", options=_opts(method, **TIGHT), t=t, y0=y0)[0]
    assert _rel(ys, ref) <= 1e-12
