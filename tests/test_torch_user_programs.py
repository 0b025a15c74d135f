"""User programs that tried to break ``adjoint="symplectic"`` (float64, tiny problems).

Each test compares against ``torchdiffeq.odeint`` (backprop) on the same accepted steps
(``first_step`` pinned from ``SolveStats``), or expects a clear error. Regressions of
programs that work are guarded here too; known gaps are ``xfail(strict=True)``.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
torchdiffeq = pytest.importorskip("torchdiffeq")
nn = torch.nn

from symplectic_adjoint.adapters.torchdiffeq import SolveStats, odeint, odeint_event  # noqa: E402

TOL = 1e-10
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _relerr(a, b) -> float:
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float(a.norm())


def _loss(ys):
    if isinstance(ys, tuple):
        return sum((y**2).sum() + 0.3 * y.sum() for y in ys)
    return (ys**2).sum() + 0.3 * ys.sum()


def _compare(make, *, method="rk4", options=None, checkpoint="states", ref="torchdiffeq", **kw):
    """``make()`` -> (func, y0, t, wrt); run symplectic and the reference on fresh copies."""
    stats = SolveStats()
    func, y0, t, wrt = make()
    ys = odeint(func, y0, t, method=method, options=dict(options or {}),
                checkpoint=checkpoint, stats=stats, **kw)  # fmt: skip
    got = torch.autograd.grad(_loss(ys), wrt, allow_unused=True)
    opts = dict(options or {})
    if method not in FIXED and stats.first_step is not None:
        opts.setdefault("first_step", stats.first_step)
    func, y0, t, wrt = make()
    if ref == "torchdiffeq":
        ys2 = torchdiffeq.odeint(func, y0, t, method=method, options=opts, **kw)
    else:
        ys2 = odeint(func, y0, t, method=method, options=opts, adjoint="backprop", **kw)
    want = torch.autograd.grad(_loss(ys2), wrt, allow_unused=True)
    flat = (
        (lambda y: torch.cat([x.flatten() for x in y])) if isinstance(ys, tuple) else (lambda y: y)
    )
    assert torch.equal(flat(ys), flat(ys2))
    for g, w in zip(got, want, strict=True):
        assert _relerr(g, w) <= TOL


def _state(t=None, tgrad=False):
    torch.manual_seed(1)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64) if t is None else t
    return y0, t.clone().requires_grad_(tgrad)


# ------------------------------------------------------------------ fixed here


class _Drift(nn.Module):
    """A learned constant velocity: ``forward`` returns the parameter itself."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

    def forward(self, t, y):
        return self.v


@pytest.mark.parametrize(
    ("method", "ref"), [("rk4", "torchdiffeq"), ("dopri5", "torchdiffeq"), ("gl4", "backprop")]
)
def test_func_returning_a_parameter_as_it_is_differentiates_it(method, ref):
    # Was: the parameter passed through no torch function, so it was not discovered and
    # its gradient was silently None.
    def make():
        m = _Drift()
        y0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        return m, y0, torch.linspace(0, 1, 3, dtype=torch.float64), [y0, m.v]

    opts = {"step_size": 0.25} if method in ("rk4", "gl4") else None
    _compare(make, method=method, options=opts, ref=ref)


@pytest.mark.parametrize("checkpoint", ["states", 1])
def test_func_returning_an_encoder_output_as_it_is(checkpoint):
    # Was: refused as "a read its first evaluation did not make".
    def make():
        torch.manual_seed(2)
        w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
        ctx = torch.tanh(w).sum(0).expand(2, 3)
        y0, t = _state()
        return (lambda t, y: ctx), y0, t, [y0, w]

    _compare(make, method="dopri5", checkpoint=checkpoint)


def test_returning_an_unlisted_leaf_only_later_is_refused():
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    ys = odeint(lambda t, y: a if t < 0.5 else b, torch.zeros(3, dtype=torch.float64),
                torch.linspace(0, 1, 3, dtype=torch.float64), method="rk4",
                options={"step_size": 0.25})  # fmt: skip
    with pytest.raises(RuntimeError, match="first evaluation did not read"):
        ys.sum().backward()


def test_parametrize_cached_filled_by_the_forward_solve_is_refused():
    # Was: the cache kept the graph-free value computed inside odeint's forward, and the
    # weight_norm parameters silently got no gradient.
    net = _mlp()
    net[0] = nn.utils.parametrizations.weight_norm(net[0])
    y0, t = _state()
    with nn.utils.parametrize.cached():
        with pytest.raises(ValueError, match="parametrize.cached"):
            odeint(lambda t, y: net(y), y0, t, method="rk4", options={"step_size": 0.25})
        assert not nn.utils.parametrize._cache  # the graph-free values were dropped


def test_parametrize_cached_filled_before_the_call_is_exact():
    def make():
        net = _mlp()
        net[0] = nn.utils.parametrizations.weight_norm(net[0])
        net[0].weight  # noqa: B018  (fills the cache with a graph)
        y0, t = _state()
        return (lambda t, y: net(y)), y0, t, [y0, *net.parameters()]

    with nn.utils.parametrize.cached():
        _compare(make, options={"step_size": 0.25})


# ------------------------------------------------------------------ known gaps


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, t, y):
        self.calls += 1  # module state that changes at every evaluation and is read
        return self.net(y) * (1 + 0.1 * self.calls)


# State func changes in place at every evaluation and reads (a counter buffer, the power
# iteration of spectral_norm in train mode) cannot be replayed per evaluation by the
# backward: refused at the first evaluation, naming the alternatives.
@pytest.mark.parametrize("checkpoint", ["states", "stages", 1])
def test_buffer_changed_at_every_evaluation_and_read_is_refused(checkpoint):
    m = _Counter()
    y0, t = _state()
    with pytest.raises(ValueError, match="changed tensor state in place.*adjoint='backprop'"):
        odeint(m, y0, t, method="rk4", options={"step_size": 0.25}, checkpoint=checkpoint)


def test_spectral_norm_in_train_mode_is_refused_and_works_in_eval_mode():
    net = _mlp()
    net[0] = nn.utils.spectral_norm(net[0])
    y0, t = _state()
    with pytest.raises(ValueError, match="changed tensor state in place.*eval mode"):
        odeint(lambda t, y: net(y), y0, t, method="rk4", options={"step_size": 0.25})
    net.eval()  # the power iteration is frozen: func is a pure function again

    def make():
        y0, t = _state()
        return (lambda t, y: net(y)), y0, t, [y0, *net.parameters()]

    _compare(make, options={"step_size": 0.25})


# ------------------------------------------------------------------ programs that work


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.register_buffer("scale", torch.tensor(0.7, dtype=torch.float64))

    def dynamics(self, t, y):
        return self.net(y) * self.scale


def _forms():
    def closure():
        net = _mlp()
        y0, t = _state()
        return (lambda t, y: net(y)), y0, t, [y0, *net.parameters()]

    def partial():
        net = _mlp()
        y0, t = _state()
        f = functools.partial(lambda n, s, t, y: s * n(y), net, 0.5)
        return f, y0, t, [y0, *net.parameters()]

    def bound_method():
        m = _WithBuffer()
        y0, t = _state()
        return m.dynamics, y0, t, [y0, *m.parameters()]

    def weight_norm():
        net = _mlp()
        net[0] = nn.utils.parametrizations.weight_norm(net[0])
        y0, t = _state()
        return (lambda t, y: net(y)), y0, t, [y0, *net.parameters()]

    def tied():
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64) * 0.3)
        y0, t = _state()
        return (lambda t, y: torch.tanh(y @ w) @ w.T), y0, t, [y0, w]

    def reads_y0():
        net = _mlp()
        y0, t = _state()
        return (lambda t, y: net(y) - y0), y0, t, [y0, *net.parameters()]

    def y0_view_of_read_param():
        net = _mlp()
        torch.manual_seed(3)
        p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        _, t = _state()
        return (lambda t, y: net(y) * p[0]), p[1:3], t, [p, *net.parameters()]

    def functional_call_fast_weights():
        net = _mlp()
        fast = {k: v - 0.1 * v**2 for k, v in net.named_parameters()}
        y0, t = _state()
        f = lambda t, y: torch.func.functional_call(net, fast, (y,))  # noqa: E731
        return f, y0, t, [y0, *net.parameters()]

    def inplace_on_temporaries():
        net = _mlp()
        y0, t = _state()

        def f(t, y):
            h = net[0](y) * 1
            h.clamp_(-1, 1).mul_(2)
            out = net[2](h).clone()
            out[:, 0] = 0
            return out

        return f, y0, t, [y0, *net.parameters()]

    def dropout():
        net, drop = _mlp(), nn.Dropout(0.3)
        y0, t = _state()
        torch.manual_seed(5)
        return (lambda t, y: drop(net(y))), y0, t, [y0, *net.parameters()]

    def batchnorm_train():
        net, bn = _mlp(), nn.BatchNorm1d(3).double()
        y0, t = _state()
        return (lambda t, y: net(bn(y))), y0, t, [y0, *net.parameters(), *bn.parameters()]

    return [closure, partial, bound_method, weight_norm, tied, reads_y0,
            y0_view_of_read_param, functional_call_fast_weights, inplace_on_temporaries,
            dropout, batchnorm_train]  # fmt: skip


@pytest.mark.parametrize("make", _forms(), ids=lambda f: f.__name__)
def test_func_forms(make):
    _compare(make, options={"step_size": 0.25}, checkpoint=1)


def _timed(t=None):
    def make():
        net = _mlp()
        y0, tt = _state(t, tgrad=True)
        return (lambda s, y: net(y) * torch.cos(s)), y0, tt, [y0, tt, *net.parameters()]

    return make


@pytest.mark.parametrize(
    ("method", "options", "checkpoint"),
    [
        ("dopri5", {"jump_t": torch.tensor([1 / 3])}, "states"),
        ("fehlberg2", {"jump_t": torch.tensor([0.41])}, 1),
        ("bosh3", {"step_t": torch.tensor([0.2, 0.7])}, "stages"),
        ("rk4", {"step_size": 0.15, "interp": "cubic"}, 1),
        ("euler", {"step_size": 0.15, "perturb": True}, "states"),
        ("midpoint", {"grid_constructor": lambda f, y0, t: torch.cat(
            [t[:1], t[:1] + (t[-1] - t[0]) * torch.tensor([0.2, 0.5, 0.9]).to(t), t[-1:]])},
         2),
    ],
)  # fmt: skip
def test_time_gradients_with_options(method, options, checkpoint):
    _compare(_timed(), method=method, options=options, checkpoint=checkpoint,
             rtol=1e-5, atol=1e-6)  # fmt: skip


def test_decreasing_times_tuple_state():
    def make():
        net = _mlp()
        y0, t = _state(torch.linspace(1, 0, 3, dtype=torch.float64), tgrad=True)

        def f(s, st):
            o = net(torch.cat(st, -1)) * torch.cos(s)
            return o[:, :1], o[:, 1:]

        return f, (y0[:, :1], y0[:, 1:]), t, [y0, t, *net.parameters()]

    _compare(make, method="dopri5", checkpoint="stages")


def _event_problem():
    net = _mlp()
    torch.manual_seed(1)
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    push = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    y0_first = float(y0.detach()[0])
    return net, y0, t0, (lambda s, y: net(y) + push), (lambda s, y: y[0] - y0_first - 0.5)


def test_odeint_event_gradient_of_event_time():
    grads = []
    stats = SolveStats()
    for solver in ("symplectic", "torchdiffeq"):
        net, y0, t0, f, event_fn = _event_problem()
        if solver == "symplectic":
            et, sol = odeint_event(f, y0, t0, event_fn=event_fn, method="dopri5", stats=stats)
        else:
            opts = {"first_step": stats.first_step}
            et, sol = torchdiffeq.odeint_event(
                f, y0, t0, event_fn=event_fn, method="dopri5", options=opts
            )
        loss = (sol[-1] ** 2).sum() + et**2
        grads.append(torch.autograd.grad(loss, [y0, t0, *net.parameters()]))
    for g, w in zip(*grads, strict=True):
        assert _relerr(g, w) <= TOL
