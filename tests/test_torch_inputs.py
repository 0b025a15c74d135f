"""Unit tests of :mod:`symplectic_adjoint.adapters._torch_inputs` (what func reads)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from symplectic_adjoint.adapters._torch_inputs import (  # noqa: E402
    Cut,
    FuncObserver,
    Inputs,
    Replay,
    RngTape,
    autocast_state,
    check_no_transform,
    check_time_options,
)

CPU = torch.device("cpu")


def observe(func, y, t=None):
    obs = FuncObserver(CPU)
    t = torch.tensor(0.0, dtype=y.dtype) if t is None else t
    with torch.no_grad():
        out = obs(func, t, y)
    return obs, out


def ids(xs):
    return {id(x) for x in xs}


def test_reads_parameters_closures_attributes_and_nonleaf_tensors():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    w = torch.randn(3, 3, requires_grad=True)
    a = torch.randn(3, requires_grad=True)
    v = a * 2  # computed outside func: a non-leaf input
    const = torch.randn(3)  # no grad: not an input

    def func(t, y):
        return net(y) @ w + v + const

    obs, out = observe(func, torch.randn(2, 3))
    assert ids(obs.reads.grad) == ids([*net.parameters(), w, v])
    assert not obs.reads.random and not obs.reads.mutated
    assert out.shape == (2, 3) and not out.requires_grad


def test_reads_functional_call_weights_not_the_module_own():
    net = torch.nn.Linear(3, 3)
    fast = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}
    obs, _ = observe(lambda t, y: torch.func.functional_call(net, fast, (y,)), torch.randn(2, 3))
    assert ids(obs.reads.grad) == ids(fast.values())


def test_tensors_created_inside_and_the_arguments_are_not_inputs():
    y0 = torch.randn(2, 3, requires_grad=True)

    def func(t, y):
        z = torch.zeros(3, requires_grad=True)  # created inside: not an input
        return y * t + z.detach()

    obs, _ = observe(func, y0)
    assert obs.reads.grad == []
    # ... but a closure over y0 reads y0 itself, even when y0 is the argument.
    obs, _ = observe(lambda t, y: y - y0, y0)
    assert ids(obs.reads.grad) == {id(y0)}


def test_mutated_module_state_and_randomness_are_seen():
    bn = torch.nn.BatchNorm1d(3)
    obs, _ = observe(lambda t, y: bn(y), torch.randn(4, 3))
    assert ids(obs.reads.mutated) == ids([bn.running_mean, bn.running_var, bn.num_batches_tracked])
    assert not obs.random
    obs, _ = observe(lambda t, y: y + torch.randn_like(y), torch.randn(4, 3))
    assert obs.random and obs.first_state is not None
    y = torch.randn(4, 3)
    before = torch.get_rng_state()
    with torch.no_grad():
        obs(lambda t, y: y + torch.randn_like(y), torch.tensor(0.0), y)
    assert torch.equal(obs.last_state[0], before)


def test_random_draws_after_a_deterministic_first_evaluation_are_noticed():
    calls = []

    def func(t, y):
        calls.append(1)
        return y + (torch.randn_like(y) if len(calls) > 1 else 0)

    obs, _ = observe(func, torch.randn(3))
    assert not obs.drew_later()
    obs(func, torch.tensor(0.0), torch.randn(3))
    assert obs.drew_later()


def test_inputs_keep_each_tensor_once_listed_first():
    p = torch.nn.Parameter(torch.randn(3))
    w = torch.randn(3, requires_grad=True)
    obs, _ = observe(lambda t, y: y * p + w, torch.randn(3))
    inp = Inputs([p, p], obs.reads)
    assert [id(x) for x in inp.tensors] == [id(p), id(w)]


def test_listed_tensor_read_only_through_a_view_is_left_to_the_view():
    p = torch.nn.Parameter(torch.randn(4))
    v = p[:3]
    obs, _ = observe(lambda t, y: y * v, torch.randn(3))
    inp = Inputs([p, v], obs.reads)
    assert ids(inp.tensors) == {id(v)} and ids(inp.dropped) == {id(p)}


def test_reading_a_tensor_and_one_computed_from_it_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    v = p * 2
    obs, _ = observe(lambda t, y: y * v + p, torch.randn(3))
    with pytest.raises(ValueError, match="count that gradient twice"):
        Inputs([p], obs.reads)


def test_versions_are_checked():
    p = torch.nn.Parameter(torch.randn(3))
    inp = Inputs([p], None)
    inp.record_versions()
    inp.check_versions()
    with torch.no_grad():
        p.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        inp.check_versions()


def test_graph_check_flags_reads_the_probe_missed():
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3))
    base = torch.randn(3, requires_grad=True)
    v = base * 2
    inp = Inputs([p, v], None)
    x = torch.randn(3, requires_grad=True)
    inp.check_graph(torch.tanh(x * p) + v, [x])  # known leaves, non-leaf input not expanded
    with pytest.raises(RuntimeError, match="first evaluation did not read"):
        inp.check_graph(x * p + q, [x])
    with pytest.raises(RuntimeError, match="first evaluation did not read"):
        inp.check_graph(x * p, [])


def test_replay_restores_generators_and_module_state():
    buf = torch.zeros(3)
    tape = RngTape(CPU)
    replay = Replay(autocast_state(CPU), tape, [buf])
    start = tape.get()
    first = torch.randn(2)
    after_first = tape.get()
    with replay.backward():
        buf.add_(5)
        with replay.evaluation(start):
            assert torch.equal(torch.randn(2), first)
    assert torch.equal(buf, torch.zeros(3))
    assert RngTape.same(tape.get(), after_first)


def test_replay_reenters_the_forward_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = autocast_state(CPU)
    replay = Replay(state, None, [])
    a = torch.randn(4, 4)
    with replay.evaluation():
        assert (a @ a).dtype == torch.bfloat16
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        Replay(autocast_state(CPU), None, []).evaluation(),
    ):
        pass
    off = Replay(autocast_state(CPU), None, [])
    with torch.autocast("cpu", dtype=torch.bfloat16), off.evaluation():
        assert (a @ a).dtype == torch.float32


def test_cut_blocks_first_order_and_passes_second_order():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = w * 3  # the "trajectory": depends on w
    gate = Cut.Gate()
    xc = Cut.apply(x, gate)
    out = (xc * w).sum() * (xc**2).sum()
    gate.closed = True
    gw, gx = torch.autograd.grad(out, (w, xc), create_graph=True)
    gate.closed = False
    # partial derivative at fixed x
    xd = x.detach()
    assert torch.allclose(gw, xd * (xd**2).sum())
    # second order: d/dw of sum(gw) goes through x = 3 w
    (h,) = torch.autograd.grad(gw.sum(), w)
    wd = w.detach()
    ref = torch.autograd.functional.jacobian(lambda w_: 3 * w_ * (9 * w_**2).sum(), wd).sum(0)
    assert torch.allclose(h, ref)


def test_option_and_transform_checks():
    check_time_options({"step_t": torch.tensor([0.5])})
    with pytest.raises(ValueError, match=r"options\['jump_t'\].detach\(\)"):
        check_time_options({"jump_t": torch.tensor([0.5], requires_grad=True)})
    check_no_transform()
    with pytest.raises(ValueError, match="adjoint='backprop'"):
        torch.func.grad(lambda y: (check_no_transform(), y.sum())[1])(torch.ones(2))
