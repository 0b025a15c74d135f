"""Every tensor ``func`` reads gets its exact gradient, or a clear error (issue 11).

Each program below hides something from the backward's re-evaluation of ``func``: a
plain function over a module, closures over leaf and non-leaf tensors, plain tensor
attributes, ``functional_call`` weights, random numbers, BatchNorm statistics, autocast,
the time argument. Each runs through ``adjoint="symplectic"`` in three checkpoint modes
and is compared with backprop through ``torchdiffeq.odeint`` on the same grid: forward
to 1e-12, the gradients of every tensor the program reads to 1e-10 (float64).
The refusals are asserted with their messages.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchdiffeq = pytest.importorskip("torchdiffeq")

from torch_support import relerr  # noqa: E402

from symplectic_adjoint.adapters.torchdiffeq import SolveStats, odeint  # noqa: E402

F = torch.nn.functional
D = torch.float64
DIM, BATCH = 3, 4
MODES = ["states", "stages", 2]
FIXED = dict(method="rk4", options=dict(step_size=0.25))
T = (0.0, 0.4, 1.0)  # outputs inside steps: the interpolation's adjoint is exercised too


class Program:
    """A fresh, seeded instance of one user program.

    ``func``, ``y0``, ``t``: the solve. ``wrt``: every leaf tensor the program reads (the
    gradients compared). ``extra()``: a further loss term using the program's tensors
    (e.g. a non-leaf tensor's graph used again after the solve). ``kwargs``: extra
    keywords for our ``odeint`` only. ``state()``: module state to compare after.
    """

    def __init__(self, func, y0, wrt, *, t=T, extra=None, kwargs=None, state=None, **solve):
        self.func, self.y0, self.wrt = func, y0, list(wrt)
        self.t = torch.tensor(t, dtype=D)
        self.extra = extra or (lambda: 0.0)
        self.kwargs = kwargs or {}
        self.state = state or (lambda: [])
        self.solve = {**FIXED, **solve}


def _y0(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, DIM, generator=g, dtype=D).requires_grad_(True)


def _mlp(width=5):
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, width, dtype=D), torch.nn.Tanh(), torch.nn.Linear(width, DIM, dtype=D)
    )


def _leaf(*shape, scale=0.5):
    return (torch.randn(*shape, dtype=D) * scale).requires_grad_(True)


# ----------------------------------------------------------------------- programs


def plain_function_over_module():
    net = _mlp()
    y0 = _y0()
    return Program(lambda t, y: net(y), y0, [y0, *net.parameters()])


def closure_over_leaves():
    w, b = _leaf(DIM, DIM), _leaf(DIM)
    y0 = _y0()
    return Program(lambda t, y: torch.tanh(y @ w + b), y0, [y0, w, b])


def closure_over_nonleaf_encoder():
    enc = torch.nn.Linear(2, DIM * DIM, dtype=D)
    x = _leaf(2)
    w = enc(x).reshape(DIM, DIM)  # its graph must survive our backward: used again below
    y0 = _y0()
    return Program(lambda t, y: torch.tanh(y @ w), y0, [y0, x, *enc.parameters()],
                   extra=lambda: (w**2).sum())  # fmt: skip


class Hyper(torch.nn.Module):
    """A field whose weight is a hypernetwork output stored as a plain attribute."""

    def __init__(self):
        super().__init__()
        self.hyper = torch.nn.Linear(2, DIM * DIM, dtype=D)
        self.lin = torch.nn.Linear(DIM, DIM, dtype=D)
        self.W = None

    def forward(self, t, y):
        return torch.tanh(y @ self.W) + self.lin(y)


def hypernetwork_attribute():
    f = Hyper()
    z = _leaf(2)
    f.W = f.hyper(z).reshape(DIM, DIM)
    y0 = _y0()
    return Program(f, y0, [y0, z, *f.parameters()])


class Scaled(torch.nn.Module):
    """A module with a plain tensor attribute requiring grad (not a Parameter)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(DIM, DIM, dtype=D)
        self.scale = _leaf(DIM)

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * self.scale


def plain_tensor_attribute():
    f = Scaled()
    y0 = _y0()
    return Program(f, y0, [y0, f.scale, *f.parameters()])


class Meta(torch.nn.Module):
    """Meta-learning: the module's own weights replaced by fast weights."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.fast = {k: p * 1.5 - 0.1 for k, p in self.net.named_parameters()}

    def forward(self, t, y):
        return torch.func.functional_call(self.net, self.fast, (y,))


def functional_call_fast_weights():
    f = Meta()
    y0 = _y0()
    return Program(f, y0, [y0, *f.parameters()])


class Dropped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(DIM, 6, dtype=D), torch.nn.Tanh(), torch.nn.Dropout(0.3),
            torch.nn.Linear(6, DIM, dtype=D),
        )  # fmt: skip

    def forward(self, t, y):
        return self.net(y)


def dropout():
    f = Dropped()
    y0 = _y0()
    return Program(f, y0, [y0, *f.parameters()])


def noise_inside_func():
    net = _mlp()
    y0 = _y0()
    return Program(lambda t, y: net(y) + 0.3 * torch.randn_like(y), y0, [y0, *net.parameters()])


class Normed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(DIM, 6, bias=False, dtype=D)  # BN removes a bias
        self.bn = torch.nn.BatchNorm1d(6, dtype=D)
        self.out = torch.nn.Linear(6, DIM, dtype=D)

    def forward(self, t, y):
        return self.out(torch.tanh(self.bn(self.lin(y))))


def batchnorm_train():
    f = Normed()
    y0 = _y0()
    return Program(f, y0, [y0, *f.parameters()],
                   state=lambda: [b.clone() for b in f.bn.buffers()])  # fmt: skip


def time_through_sin():
    y0 = _y0()
    prog = Program(lambda t, y: torch.sin(t) * torch.ones_like(y), y0, [y0])
    prog.t.requires_grad_(True)
    prog.wrt.append(prog.t)
    return prog


def closure_over_y0():
    y0 = _y0()
    net = _mlp()
    return Program(lambda t, y: net(y) - 0.5 * y0, y0, [y0, *net.parameters()])


def autocast_around_the_solve():
    # float32 inside func (autocast lowers float32, never float64), float64 leaves.
    w, b = _leaf(DIM, DIM), _leaf(DIM)
    y0 = _y0()
    return Program(lambda t, y: torch.tanh(F.linear(y.float(), w.float(), b.float())).to(y),
                   y0, [y0, w, b])  # fmt: skip


def listed_parameter_and_its_view():
    f = Scaled()
    y0 = _y0()
    return Program(
        f,
        y0,
        [y0, *f.parameters()],
        kwargs=dict(adjoint_params=[*f.parameters(), f.lin.weight.view(-1)]),
    )


def closure_over_a_view_of_a_listed_parameter():
    p = torch.nn.Parameter(torch.randn(DIM + 1, DIM, dtype=D) * 0.5)
    v = p[:DIM]
    y0 = _y0()
    return Program(lambda t, y: torch.tanh(y @ v), y0, [y0, p], kwargs=dict(adjoint_params=[p, v]))


def branch_read_listed():
    w1, w2 = _leaf(DIM, DIM), _leaf(DIM, DIM)
    y0 = _y0()
    func = lambda t, y: torch.tanh(y @ (w1 if t < 0.5 else w2))  # noqa: E731
    return Program(func, y0, [y0, w1, w2], kwargs=dict(adjoint_params=[w2]))


PROGRAMS = {
    f.__name__: f
    for f in (
        plain_function_over_module, closure_over_leaves, closure_over_nonleaf_encoder,
        hypernetwork_attribute, plain_tensor_attribute, functional_call_fast_weights,
        dropout, noise_inside_func, batchnorm_train, time_through_sin, closure_over_y0,
        autocast_around_the_solve, listed_parameter_and_its_view,
        closure_over_a_view_of_a_listed_parameter, branch_read_listed,
    )
}  # fmt: skip
AUTOCAST = {"autocast_around_the_solve"}


def run(build, solver, *, seed=0, stats=None, **kw):
    """Build the program, solve with ``solver``, return (solution, gradients, state)."""
    torch.manual_seed(seed)
    prog = build()
    torch.manual_seed(seed + 1)  # the random stream func draws from, the same for both
    kwargs = dict(prog.solve)
    if solver is odeint:
        kwargs.update(prog.kwargs, **kw)
        if stats is not None:
            kwargs["stats"] = stats
    elif "first_step" in kw:
        kwargs["options"] = {**kwargs["options"], "first_step": kw["first_step"]}
    if build.__name__ in AUTOCAST:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sol = solver(prog.func, prog.y0, prog.t, **kwargs)
    else:
        sol = solver(prog.func, prog.y0, prog.t, **kwargs)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(sol.shape, generator=g, dtype=D)
    loss = (w * sol).sum() + 0.1 * (sol**2).sum() + prog.extra()
    grads = torch.autograd.grad(loss, prog.wrt, allow_unused=True)
    grads = [
        torch.zeros_like(x) if gx is None else gx for gx, x in zip(grads, prog.wrt, strict=True)
    ]
    return sol.detach(), grads, prog.state()


def assert_matches(build, checkpoint, **kw):
    stats = SolveStats()
    sol, grads, state = run(build, odeint, checkpoint=checkpoint, stats=stats, **kw)
    pin = dict(first_step=stats.first_step) if kw.get("method") == "dopri5" else {}
    ref_sol, ref_grads, ref_state = run(build, torchdiffeq.odeint, **{**kw, **pin})
    assert relerr(sol, ref_sol) <= 1e-12
    errs = [relerr(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    assert max(errs) <= 1e-10, errs
    for a, b in zip(state, ref_state, strict=True):
        assert torch.equal(a, b)  # module state as after backprop's forward alone


@pytest.mark.parametrize("checkpoint", MODES)
@pytest.mark.parametrize("name", PROGRAMS)
def test_every_read_tensor_gets_its_exact_gradient(name, checkpoint):
    assert_matches(PROGRAMS[name], checkpoint)


ADAPTIVE_CASES = [
    "closure_over_nonleaf_encoder", "hypernetwork_attribute", "plain_tensor_attribute",
    "batchnorm_train", "functional_call_fast_weights",
]  # fmt: skip


@pytest.mark.parametrize("checkpoint", MODES)
@pytest.mark.parametrize("name", ADAPTIVE_CASES)
def test_adaptive_dopri5(name, checkpoint):
    def build():
        prog = PROGRAMS[name]()
        prog.solve = dict(method="dopri5", rtol=1e-6, atol=1e-8, options={})
        return prog

    build.__name__ = name
    stats = SolveStats()
    sol, grads, state = run(build, odeint, checkpoint=checkpoint, stats=stats)
    assert stats.n_steps > 2
    ref_sol, ref_grads, _ = run(build, torchdiffeq.odeint, first_step=stats.first_step)
    assert relerr(sol, ref_sol) <= 1e-12
    errs = [relerr(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    assert max(errs) <= 1e-10, errs
    # Module state against backprop's own (unpinned) solve: it selects the first step
    # with the same evaluations.
    _, _, ref_state = run(build, torchdiffeq.odeint)
    for a, b in zip(state, ref_state, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("checkpoint", MODES)
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "tsit5"])
def test_adaptive_random_draws_are_replayed(method, checkpoint):
    """Random numbers under error control: rejected attempts draw too, FSAL slopes and the
    re-evaluation after a jump_t carry their own generator states. ``first_step`` is
    given to both solves (the initial step selection draws as well)."""

    def build():
        net = _mlp()
        y0 = _y0()
        func = lambda t, y: net(y) * (1 + 1e-5 * torch.rand(()))  # noqa: E731
        jump = torch.tensor([0.55], dtype=D)
        return Program(func, y0, [y0, *net.parameters()], method=method, rtol=1e-5,
                       atol=1e-7, options=dict(first_step=0.05, jump_t=jump))  # fmt: skip

    build.__name__ = "random_" + method
    stats = SolveStats()
    sol, grads, _ = run(build, odeint, checkpoint=checkpoint, stats=stats)
    assert stats.n_rejected > 0 or method in ("dopri5", "tsit5")
    ref = torchdiffeq.odeint if method != "tsit5" else _tsit5_backprop
    ref_sol, ref_grads, _ = run(build, ref)
    assert relerr(sol, ref_sol) <= 1e-12
    assert max(relerr(a, b) for a, b in zip(grads, ref_grads, strict=True)) <= 1e-10


def _tsit5_backprop(*args, **kwargs):
    return odeint(*args, adjoint="backprop", **kwargs)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_other_fixed_grid_methods(method):
    for name in ("dropout", "closure_over_nonleaf_encoder", "batchnorm_train"):

        def build(name=name):
            prog = PROGRAMS[name]()
            prog.solve = dict(method=method, options=dict(step_size=0.2))
            return prog

        build.__name__ = name
        assert_matches(build, "states")


# ------------------------------------------------------------- higher order


def _penalty(solver, checkpoint, *, hvp=False):
    torch.manual_seed(0)
    net = _mlp()
    y0 = _y0()
    t = torch.tensor(T, dtype=D)
    kw = dict(FIXED)
    if solver is odeint:
        kw["checkpoint"] = checkpoint
    sol = solver(lambda t, y: net(y), y0, t, **kw)
    loss = (sol**2).sum() + sol.sum()
    params = [y0, *net.parameters()]
    first = torch.autograd.grad(loss, params, create_graph=True)
    if hvp:
        g = torch.Generator().manual_seed(3)
        v = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
        second = sum((a * b).sum() for a, b in zip(first, v, strict=True))
    else:
        second = sum((a**2).sum() for a in first)  # a gradient penalty
    return first, torch.autograd.grad(second, params)


@pytest.mark.parametrize("hvp", [False, True])
@pytest.mark.parametrize("checkpoint", MODES)
def test_create_graph_gives_exact_second_derivatives(checkpoint, hvp):
    first, second = _penalty(odeint, checkpoint, hvp=hvp)
    ref_first, ref_second = _penalty(torchdiffeq.odeint, None, hvp=hvp)
    assert all(a.requires_grad for a in first)
    assert max(relerr(a, b) for a, b in zip(first, ref_first, strict=True)) <= 1e-10
    assert max(relerr(a, b) for a, b in zip(second, ref_second, strict=True)) <= 1e-10


# ------------------------------------------------------------------ refusals


def test_parameter_changed_in_place_before_backward_is_refused():
    for solver in (torchdiffeq.odeint, odeint):  # backprop refuses it too
        net = _mlp()
        y0 = _y0()
        sol = solver(lambda t, y, net=net: net(y), y0, torch.tensor(T, dtype=D), **FIXED)
        with torch.no_grad():
            net[0].weight.add_(0.1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            sol.sum().backward()


@pytest.mark.parametrize("name", ["step_t", "jump_t"])
def test_step_and_jump_times_requiring_grad_are_refused(name):
    options = {name: torch.tensor([0.5], dtype=D, requires_grad=True)}
    with pytest.raises(ValueError, match=rf"options\['{name}'\].detach\(\)"):
        odeint(lambda t, y: -y, _y0(), torch.tensor(T, dtype=D), method="dopri5", options=options)


def test_torch_func_transforms_are_refused_naming_backprop():
    t = torch.tensor(T, dtype=D)
    with pytest.raises(ValueError, match="adjoint='backprop'"):
        torch.func.grad(lambda y: odeint(lambda t, y: -y, y, t, **FIXED).sum())(_y0().detach())


def test_a_read_the_first_evaluation_missed_is_refused():
    w1, w2 = _leaf(DIM, DIM), _leaf(DIM, DIM)
    func = lambda t, y: torch.tanh(y @ (w1 if t < 0.5 else w2))  # noqa: E731
    sol = odeint(func, _y0(), torch.tensor(T, dtype=D), **FIXED)
    with pytest.raises(RuntimeError, match="first evaluation did not read.*adjoint_params"):
        sol.sum().backward()


def test_random_draws_the_first_evaluation_did_not_make_are_refused():
    calls = []

    def func(t, y):
        calls.append(1)
        return -y + (0.1 * torch.randn_like(y) if len(calls) > 1 else 0)

    sol = odeint(func, _y0(), torch.tensor(T, dtype=D), **FIXED)
    with pytest.raises(RuntimeError, match="random numbers"):
        sol.sum().backward()


def test_reading_a_parameter_and_a_tensor_made_from_it_is_refused():
    p = torch.nn.Parameter(torch.randn(DIM, DIM, dtype=D))
    v = p * 2
    with pytest.raises(ValueError, match="count that gradient twice"):
        odeint(lambda t, y: y @ p + y @ v, _y0(), torch.tensor(T, dtype=D), **FIXED)


def test_create_graph_with_time_gradients_is_refused():
    t = torch.tensor(T, dtype=D, requires_grad=True)
    sol = odeint(lambda t, y: -y * t, _y0(), t, **FIXED)
    with pytest.raises(ValueError, match="create_graph.*adjoint='backprop'"):
        torch.autograd.grad(sol.sum(), t, create_graph=True)


# ------------------------------------------------------------- TorchScript reads


@torch.jit.script
def _scripted_field(y: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return -s * y + torch.tanh(y @ w)


def _upstream():
    """An upstream leaf ``z`` and the non-leaf weights made from it outside func."""
    z = _leaf(DIM * DIM + DIM)
    return z, z[: DIM * DIM].reshape(DIM, DIM), z[DIM * DIM :].exp()


SCRIPT_SOLVERS = {"rk4": {}, "trbdf2": dict(method="trbdf2")}


@pytest.mark.parametrize("solver", SCRIPT_SOLVERS)
def test_scripted_function_over_unlisted_upstream_tensors_is_refused(solver):
    """A TorchScript function reading non-leaf tensors made outside func: the read
    watcher does not see them, so they cannot be inputs, and ``autograd.grad(loss, w)``
    would silently miss the solve's part (rk4: even with their leaf listed, as the
    first evaluation had no graph to walk)."""
    z, w, s = _upstream()
    y0 = _y0()
    kwargs = {**FIXED, **SCRIPT_SOLVERS[solver]}
    with pytest.raises(ValueError, match="TorchScript.*adjoint_params"):
        odeint(lambda t, y: _scripted_field(y, w, s), y0, torch.tensor(T, dtype=D),
               adjoint_params=(z,), **kwargs)  # fmt: skip


def scripted_function_over_listed_upstream_tensors():
    z, w, s = _upstream()
    y0 = _y0()
    return Program(lambda t, y: _scripted_field(y, w, s), y0, [y0, z, w, s],
                   kwargs=dict(adjoint_params=(w, s)), extra=lambda: (w**2).sum())  # fmt: skip


class _ScaledScript(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(DIM, DIM, dtype=D) * 0.5)
        self.s = torch.nn.Parameter(torch.rand(DIM, dtype=D) + 0.5)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _scripted_field(y, self.w, self.s)


def scripted_module_inside_a_python_field():
    """A scripted module's output (made by operations the watcher does not see) read by
    a Python operation: it read the module's parameters, not an outside tensor."""
    net = torch.jit.script(_ScaledScript())
    z = _leaf(DIM)
    v = z.exp()
    y0 = _y0()
    return Program(lambda t, y: net(t, y) * v, y0, [y0, z, v, *net.parameters()],
                   kwargs=dict(adjoint_params=tuple(net.parameters())))  # fmt: skip


@pytest.mark.parametrize("checkpoint", ["states", "stages"])
@pytest.mark.parametrize(
    "build", [scripted_function_over_listed_upstream_tensors, scripted_module_inside_a_python_field]
)
def test_scripted_reads_get_their_exact_gradient(build, checkpoint):
    assert_matches(build, checkpoint)


# ------------------------------------------------------------ caller's grad modes


@pytest.mark.parametrize("checkpoint", MODES)
def test_solve_under_inference_mode_matches_torchdiffeq_bitwise(checkpoint):
    """A caller's ``torch.inference_mode()`` (evaluation): the observed first evaluation's
    graph mark made no autograd node there, an AssertionError; now torchdiffeq's values."""
    net = _mlp()
    y0, t = _y0().detach(), torch.tensor(T, dtype=D)
    with torch.inference_mode():
        ys = odeint(lambda t, y: net(y), y0, t, checkpoint=checkpoint, **FIXED)
        ref = torchdiffeq.odeint(lambda t, y: net(y), y0, t, **FIXED)
    assert torch.equal(ys, ref)
