"""Memory scaling, measured by what autograd keeps (saved-tensor hooks), never by time.

Every tensor autograd saves for a backward pass goes through the pack hook; the hook
counts its bytes as live until autograd drops it. Parameters are excluded (saving
them allocates nothing). Doubling the number of steps must grow the peak of the
symplectic adjoint by exactly the added checkpoints (``N |y|``, or ``N s |y|`` with
stages), while backprop's peak grows by at least one network graph per evaluation.
"""

from __future__ import annotations

import pytest
from torch_support import Field, torch, torchdiffeq

from symplectic_adjoint.adapters.torchdiffeq import odeint


class _Saved:
    """A packed tensor; its bytes count as live until autograd frees it."""

    def __init__(self, meter: _Meter, x: torch.Tensor, nbytes: int) -> None:
        self.meter, self.x, self.nbytes = meter, x, nbytes

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


class _Meter:
    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.live = self.peak = 0

    def pack(self, x: torch.Tensor) -> _Saved:
        nbytes = 0 if x.data_ptr() in self.exclude else x.numel() * x.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        # A detached alias: holding an op's saved output itself would hold its grad_fn,
        # a cycle through the graph that Python cannot collect, so a graph never
        # differentiated (the observed first evaluation's) would count as live forever.
        return _Saved(self, x.detach(), nbytes)

    @staticmethod
    def unpack(saved: _Saved) -> torch.Tensor:
        return saved.x


def _peak_saved_bytes(interface, n_steps: int, **kwargs) -> int:
    field = Field(dim=4, width=32)
    y0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y0.requires_grad_(True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    meter = _Meter({p.data_ptr() for p in field.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        ys = interface(field, y0, t, method="rk4", options=dict(step_size=1.0 / n_steps),
                       **kwargs)  # fmt: skip
        torch.autograd.grad((ys[-1] ** 2).sum(), (y0, *field.parameters()), allow_unused=True)
    del ys
    return meter.peak


def _one_graph_bytes() -> int:
    field = Field(dim=4, width=32)
    y = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    meter = _Meter({p.data_ptr() for p in field.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        out = field(torch.tensor(0.0, dtype=torch.float64), y)
    del out
    return meter.peak


STATE_BYTES = 16 * 4 * 8


@pytest.mark.parametrize(("checkpoint", "per_step"), [("states", 1), ("stages", 4)])
def test_symplectic_memory_grows_only_by_checkpoints(checkpoint, per_step):
    peaks = [_peak_saved_bytes(odeint, n, checkpoint=checkpoint) for n in (8, 16, 32)]
    # Exactly the added checkpoints: y_n (and, with stages, X_2..X_4) per added step.
    assert peaks[1] - peaks[0] == 8 * per_step * STATE_BYTES
    assert peaks[2] - peaks[1] == 16 * per_step * STATE_BYTES
    # Beyond the checkpoints, at most one network graph plus a few stage buffers.
    graph = _one_graph_bytes()
    assert peaks[0] - (8 * per_step + 1) * STATE_BYTES <= graph + 8 * STATE_BYTES


def test_backprop_memory_grows_by_a_graph_per_evaluation():
    peaks = [_peak_saved_bytes(torchdiffeq.odeint, n) for n in (8, 16)]
    graph = _one_graph_bytes()
    assert graph > 4 * STATE_BYTES  # the comparison below is not about checkpoints
    assert peaks[1] - peaks[0] >= 8 * 4 * graph  # 4 evaluations per added rk4 step


def test_budget_memory_is_flat():
    peaks = [_peak_saved_bytes(odeint, n, checkpoint=3) for n in (8, 16, 32)]
    assert peaks[0] == peaks[1] == peaks[2]


def test_solver_is_freed_when_the_forward_returns(monkeypatch):
    """Nothing the backward does not need outlives the forward: torchdiffeq's solver (its
    final y1, f1, stage tensor and interpolation coefficients) is unreachable once the
    solution is returned, while the graph to differentiate it is still alive."""
    import gc
    import weakref

    from symplectic_adjoint.adapters import _torch_record

    solvers: list[weakref.ref] = []
    recording_class = _torch_record.recording_class

    def tracked(method):
        cls = recording_class(method)

        class Tracked(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                solvers.append(weakref.ref(self))

        return Tracked

    monkeypatch.setattr(_torch_record, "recording_class", tracked)
    field = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    for method, options in (("dopri5", {}), ("fehlberg2", {}), ("rk4", {"step_size": 0.1})):
        for checkpoint in ("states", "stages", 2):
            solvers.clear()
            ys = odeint(field, y0, t, method=method, options=options, checkpoint=checkpoint)
            gc.collect()
            assert len(solvers) == 1 and solvers[0]() is None, (method, checkpoint)
            ys.sum().backward()  # the backward runs without it


@pytest.mark.parametrize("method", ["fehlberg2", "adaptive_heun", "dopri5"])
@pytest.mark.parametrize("checkpoint", ["states", "stages"])
def test_saved_tensors_own_their_storage(method, checkpoint):
    """A saved slope is not a view into torchdiffeq's stage tensor of a step (which would
    keep all s slopes of every step alive): every saved tensor's storage is its own size."""
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    field = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)  # slopes kept
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = odeint(field, y0, t, method=method, checkpoint=checkpoint)
    assert saved
    for x in saved:
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    ys.sum().backward()
