"""Cross-backend conformance: every case, solver, dtype and device against its references.

References, strongest first:

* the exact oracle of the linear ODE (:func:`~conformance.backends.numpy_backend.linear_oracle`);
* the host library's exact backprop on the same accepted steps (torchdiffeq with the
  first step pinned, diffrax ``RecursiveCheckpointAdjoint``);
* the other framework on the same case (same weights, same constant steps);
* the NumPy core reference (core kernels, hand-written VJPs).

Stiff cases run the implicit solvers (torch: every implicit method, against backprop
through its Newton iterations, the NumPy core reference and the linear oracle; JAX:
ImplicitEuler and Kvaerno3/4/5, against RecursiveCheckpointAdjoint and torch on the same
grid). Time gradients (d/dt0, d/dt1) are compared per host and across hosts; so are
terminating events (event time and state at the event; gradients per host, and against
the NumPy core reference with each host's convention for the event time's slope).

Relative error per gradient entry: at most 1e-10 in float64 (the method is exact for
the discrete solve, so only rounding separates it from backprop) and 1e-4 in float32.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

from conformance.backends import Result, worst_rel_err
from conformance.cases import (
    CASES_BY_NAME,
    EVENT_CASES_BY_NAME,
    EVENT_PLAN,
    JAX_SLOW,
    JAX_STAGES,
    SOLVERS_BY_NAME,
    TIME_GRIDS,
    TIME_PLAN,
    Case,
    Solver,
    jax_plan,
    torch_plan,
)

TOL = {"float64": 1e-10, "float32": 1e-4}
CHECKPOINTS = ("states", "stages")
ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ plumbing


def backend_module(name: str) -> ModuleType:
    """The builder of a backend, or a skip where its framework is not installed."""
    if name == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("torchdiffeq")
        from conformance.backends import torch_backend

        return torch_backend
    if name == "jax":
        pytest.importorskip("jax")
        pytest.importorskip("diffrax")
        from conformance.backends import jax_backend

        return jax_backend
    raise ValueError(name)


def _require_device(backend: str, device: str) -> None:
    if device == "cpu":
        return
    if backend == "torch":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("torch sees no CUDA device")
    elif backend == "jax":
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            pytest.skip("jax sees no GPU")


@functools.cache
def _solve(backend: str, case: str, solver: str, dtype: str, device: str, mode: str) -> Result:
    module = backend_module(backend)
    return module.solve(CASES_BY_NAME[case], SOLVERS_BY_NAME[solver], dtype, device, mode)


def _ready(backend: str, device: str, mode: str) -> None:
    """Skip unless the backend, the device and (for our modes) our adapter are there."""
    module = backend_module(backend)
    _require_device(backend, device)
    if mode != "host":
        reason = module.ours_available()
        if reason is not None:
            pytest.skip(reason)


def result(backend: str, case: str, solver: str, dtype: str, device: str, mode: str) -> Result:
    """Outputs and gradients of one configuration (computed once per session)."""
    _ready(backend, device, mode)
    return _solve(backend, case, solver, dtype, device, mode)


def assert_close(got: dict | tuple, ref: dict | tuple, dtype: str, what: str) -> None:
    err, where = worst_rel_err(got, ref)
    tol = TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} in {where!r} exceeds {tol:.0e}"


def _id(*parts: str) -> str:
    return "-".join(parts)


def _plan(backend: str) -> list[tuple[Case, Solver, str]]:
    return torch_plan() if backend == "torch" else jax_plan()


def _marks(jax_involved: bool, case: Case, solver: Solver) -> list:
    """``slow`` for the JAX configurations of :data:`~conformance.cases.JAX_SLOW`."""
    return [pytest.mark.slow] if jax_involved and (case.name, solver.name) in JAX_SLOW else []


def _modes(backend: str, case: Case, solver: Solver) -> tuple[str, ...]:
    if backend == "jax" and (case.name, solver.name) not in JAX_STAGES:
        return ("states",)
    return CHECKPOINTS


def _ours_params() -> Iterator:
    for backend in ("torch", "jax"):
        for case, solver, dtype in _plan(backend):
            for mode in _modes(backend, case, solver):
                yield pytest.param(
                    backend, case.name, solver.name, dtype, mode,
                    id=_id(backend, case.name, solver.name, dtype, mode),
                    marks=_marks(backend == "jax", case, solver),
                )  # fmt: skip


OURS = list(_ours_params())
SIGNATURE = "backend,case,solver,dtype,checkpoint"


# --------------------------------------------------------------- against the host


@pytest.mark.parametrize(SIGNATURE, OURS)
def test_forward_matches_host_library(
    backend: str, case: str, solver: str, dtype: str, checkpoint: str, device: str
) -> None:
    """Our solve returns the outputs the host library computes (same steps, same
    interpolation at the output times)."""
    ours = result(backend, case, solver, dtype, device, checkpoint)
    host = result(backend, case, solver, dtype, device, "host")
    assert_close(ours.ys, host.ys, dtype, "outputs vs host library")


@pytest.mark.parametrize(SIGNATURE, OURS)
def test_gradient_matches_host_backprop(
    backend: str, case: str, solver: str, dtype: str, checkpoint: str, device: str
) -> None:
    """Gradients w.r.t. the initial state and every parameter equal exact backprop
    through the host library on the same accepted steps."""
    ours = result(backend, case, solver, dtype, device, checkpoint)
    host = result(backend, case, solver, dtype, device, "host")
    assert_close(ours.grads, host.grads, dtype, "gradient vs host backprop")


def _step_params() -> Iterator:
    for p in OURS:
        backend, case, solver, dtype, mode = p.values
        if SOLVERS_BY_NAME[solver].grid != "fixed":
            yield p


@pytest.mark.parametrize(SIGNATURE, list(_step_params()))
def test_accepted_steps_match_host(
    backend: str, case: str, solver: str, dtype: str, checkpoint: str, device: str
) -> None:
    """Our solve accepts the same steps as the host library: torch reports them through
    ``callback_accept_step`` (README, How it works), diffrax counts them in ``sol.stats``."""
    ours = result(backend, case, solver, dtype, device, checkpoint)
    host = result(backend, case, solver, dtype, device, "host")
    if backend == "torch":
        assert host.steps, "torchdiffeq reported no accepted step"
        assert ours.steps is not None and len(ours.steps) == len(host.steps), (
            f"{len(ours.steps or ())} steps reported through callback_accept_step, "
            f"torchdiffeq accepted {len(host.steps)}"
        )
        np.testing.assert_allclose(ours.steps, host.steps, rtol=1e-12)
    else:
        assert ours.n_accepted == host.n_accepted


def _constant_step_params() -> Iterator:
    for backend in ("torch", "jax"):
        for case, solver, dtype in _plan(backend):
            if solver.grid == "forced" or (backend == "jax" and solver.constant_steps):
                yield pytest.param(
                    backend, case.name, solver.name, dtype,
                    id=_id(backend, case.name, solver.name, dtype),
                    marks=_marks(backend == "jax", case, solver),
                )  # fmt: skip


@pytest.mark.parametrize("backend,case,solver,dtype", list(_constant_step_params()))
def test_host_takes_constant_steps_of_h(
    backend: str, case: str, solver: str, dtype: str, device: str
) -> None:
    """Harness check: the constant-step configurations really take n = |t1 - t0| / h
    steps of exactly h (torchdiffeq held there by first_step = max_step = h and loose
    tolerances), so the two libraries integrate on the same grid."""
    host = result(backend, case, solver, dtype, device, "host")
    c = CASES_BY_NAME[case]
    if backend == "torch":
        assert host.steps == (c.h,) * c.n_steps
    else:
        assert host.n_accepted == c.n_steps


# ---------------------------------------------------------------- exact oracle


def _oracle_params() -> Iterator:
    for backend in ("torch", "jax"):
        for case, solver, dtype in _plan(backend):
            if case.oracle and solver.constant_steps:
                for mode in ("host", *_modes(backend, case, solver)):
                    yield pytest.param(
                        backend, case.name, solver.name, dtype, mode,
                        id=_id(backend, case.name, solver.name, dtype, mode),
                        marks=_marks(backend == "jax", case, solver),
                    )  # fmt: skip


@pytest.mark.parametrize(SIGNATURE, list(_oracle_params()))
def test_linear_ode_matches_exact_oracle(
    backend: str, case: str, solver: str, dtype: str, checkpoint: str, device: str
) -> None:
    """y' = A y: outputs and gradients (y0 and A) equal the closed form through
    R(hA); the host library itself (``checkpoint="host"``) is checked too, which
    validates the oracle and the constant-step set-up."""
    from conformance.backends.numpy_backend import linear_oracle

    got = result(backend, case, solver, dtype, device, checkpoint)
    exact = linear_oracle(CASES_BY_NAME[case], SOLVERS_BY_NAME[solver])
    assert_close(got.ys, exact.ys, dtype, "outputs vs oracle")
    assert_close(got.grads, exact.grads, dtype, "gradient vs oracle")


# ------------------------------------------------------------ across frameworks


def _cross_params() -> Iterator:
    for case, solver, dtype in jax_plan():
        if solver.constant_steps and solver.torch_method is not None:
            for mode in ("host", *_modes("jax", case, solver)):
                yield pytest.param(
                    case.name, solver.name, dtype, mode,
                    id=_id(case.name, solver.name, dtype, mode),
                    marks=_marks(True, case, solver),
                )  # fmt: skip


@pytest.mark.parametrize("case,solver,dtype,checkpoint", list(_cross_params()))
def test_torch_and_jax_agree(
    case: str, solver: str, dtype: str, checkpoint: str, device: str
) -> None:
    """Same weights, same constant steps: the PyTorch and JAX outputs and gradients
    agree (``checkpoint="host"`` compares torchdiffeq with diffrax themselves)."""
    t = result("torch", case, solver, dtype, device, checkpoint)
    j = result("jax", case, solver, dtype, device, checkpoint)
    assert_close(t.ys, j.ys, dtype, "torch vs jax outputs")
    assert_close(t.grads, j.grads, dtype, "torch vs jax gradient")


# ------------------------------------------------------------ NumPy core reference


def _numpy_params() -> Iterator:
    for host in ("torch", "jax"):
        for case, solver, dtype in _plan(host):
            if dtype == "float64" and solver.constant_steps and case.numpy_vjp:
                yield pytest.param(
                    "numpy", host, case.name, solver.name,
                    id=_id("numpy", host, case.name, solver.name),
                    marks=_marks(host == "jax", case, solver),
                )  # fmt: skip


@pytest.mark.parametrize("backend,host,case,solver", list(_numpy_params()))
def test_numpy_core_reference_matches_host(
    backend: str, host: str, case: str, solver: str, device: str
) -> None:
    """The core kernels driven from NumPy with hand-written VJPs reproduce the host
    library's outputs and backprop gradients (float64, constant steps). Implicit solvers:
    the core ``implicit_step``/``implicit_step_vjp`` with the core's reference Newton and
    dense row-wise Jacobians, against the host's backprop through its own Newton (for the
    torch-only tableaux -- trbdf2, Gauss, Radau... -- this and the linear oracle are the
    references)."""
    from conformance.backends.numpy_backend import solve_core

    if device != "cpu":
        pytest.skip("NumPy runs on the host only")
    ref = result(host, case, solver, "float64", device, "host")
    got = solve_core(CASES_BY_NAME[case], SOLVERS_BY_NAME[solver])
    assert_close(got.ys, ref.ys, "float64", "core outputs vs host")
    assert_close(got.grads, ref.grads, "float64", "core gradient vs host")


# ------------------------------------------------------------------ time gradients


@functools.cache
def _solve_times(backend: str, case: str, solver: str, device: str, mode: str, grid: str):
    module = backend_module(backend)
    c, s = CASES_BY_NAME[case], SOLVERS_BY_NAME[solver]
    return module.solve_times(c, s, "float64", device, mode, grid)


def time_result(backend: str, case: str, solver: str, device: str, mode: str, grid: str):
    """Outputs and gradients (``t0``, ``t1`` included) of a time-gradient configuration."""
    _ready(backend, device, mode)
    return _solve_times(backend, case, solver, device, mode, grid)


def _time_marks(backends: tuple[str, ...], mode: str, solver: str, slow: bool) -> list:
    return [pytest.mark.slow] if slow else []


def _time_host_params() -> Iterator:
    for case, solver, slow in TIME_PLAN:
        for backend in ("torch", "jax"):
            for grid in TIME_GRIDS:
                yield pytest.param(
                    backend, case, solver, grid,
                    id=_id(backend, case, solver, grid),
                    marks=_time_marks((backend,), "states", solver, slow),
                )  # fmt: skip


@pytest.mark.parametrize("backend,case,solver,grid", list(_time_host_params()))
def test_time_gradients_match_host_backprop(
    backend: str, case: str, solver: str, grid: str, device: str
) -> None:
    """Gradients w.r.t. ``t0`` and ``t1`` (the fixed grid is built from them), ``y0`` and the
    parameters equal the host's own backprop, on the host's own grid (``"step"``: each
    host's semantics, not comparable across hosts) and on the uniform grid."""
    ours = time_result(backend, case, solver, device, "states", grid)
    host = time_result(backend, case, solver, device, "host", grid)
    assert np.any(host.grads["t0"] != 0) and np.any(host.grads["t1"] != 0)
    assert_close(ours.ys, host.ys, "float64", "outputs vs host library")
    assert_close(ours.grads, host.grads, "float64", "gradient (t0, t1 included) vs host")


def _time_cross_params() -> Iterator:
    for case, solver, slow in TIME_PLAN:
        for mode in ("host", "states"):
            yield pytest.param(
                case, solver, mode,
                id=_id(case, solver, mode),
                marks=_time_marks(("torch", "jax"), mode, solver, slow),
            )  # fmt: skip


@pytest.mark.parametrize("case,solver,checkpoint", list(_time_cross_params()))
def test_time_gradients_torch_and_jax_agree(
    case: str, solver: str, checkpoint: str, device: str
) -> None:
    """On the uniform grid ``t0 + (t1 - t0) n / N`` (torch ``grid_constructor``, diffrax
    ``dt0 = (t1 - t0) / N``) d/dt0 and d/dt1 are the same function's derivatives in both
    hosts and agree to 1e-10 (``checkpoint="host"``: torchdiffeq vs diffrax themselves)."""
    t = time_result("torch", case, solver, device, checkpoint, "uniform")
    j = time_result("jax", case, solver, device, checkpoint, "uniform")
    assert_close(t.ys, j.ys, "float64", "torch vs jax outputs")
    assert_close(t.grads, j.grads, "float64", "torch vs jax gradient (t0, t1 included)")


# ------------------------------------------------------------------ events


@functools.cache
def _solve_event(backend: str, case: str, solver: str, device: str, mode: str) -> Result:
    module = backend_module(backend)
    return module.solve_event(EVENT_CASES_BY_NAME[case], SOLVERS_BY_NAME[solver], "float64",
                              device, mode)  # fmt: skip


def event_result(backend: str, case: str, solver: str, device: str, mode: str) -> Result:
    """``(t*, y(t*))`` and the gradients of an event configuration (float64)."""
    _ready(backend, device, mode)
    return _solve_event(backend, case, solver, device, mode)


def _event_host_params() -> Iterator:
    for case, solver, slow in EVENT_PLAN:
        for backend in ("torch", "jax"):
            # A JAX mode costs a compile: "stages" only in the slow run.
            for mode in CHECKPOINTS:
                marks = [pytest.mark.slow] if slow or (backend, mode) == ("jax", "stages") else []
                yield pytest.param(
                    backend, case, solver, mode,
                    id=_id(backend, case, solver, mode), marks=marks,
                )  # fmt: skip


@pytest.mark.parametrize("backend,case,solver,checkpoint", list(_event_host_params()))
def test_event_matches_host_backprop(
    backend: str, case: str, solver: str, checkpoint: str, device: str
) -> None:
    """A terminating event located by root finding on the interpolant: the event time
    ``t*``, the state ``y(t*)`` and the gradients of ``w_t t* + <w_y, y(t*)>`` w.r.t.
    ``y0`` and the parameters equal the host's own backprop (torch: ``odeint_event``
    through ``torchdiffeq.odeint``; JAX: ``diffrax.Event`` under
    ``RecursiveCheckpointAdjoint``)."""
    ours = event_result(backend, case, solver, device, checkpoint)
    host = event_result(backend, case, solver, device, "host")
    ev = EVENT_CASES_BY_NAME[case]
    t_star = float(host.ys[0][0])
    assert ev.case.t[0] + ev.case.h < t_star < ev.t_end - ev.case.h, "no event inside the span"
    assert_close(ours.ys, host.ys, "float64", "event time and state vs host library")
    assert_close(ours.grads, host.grads, "float64", "event gradient vs host backprop")


def _event_cross_params() -> Iterator:
    for case, solver, slow in EVENT_PLAN:
        if solver != "dopri5@h":  # the only method with the same interpolant in both hosts
            continue
        for mode in ("host", "states"):
            yield pytest.param(
                case, solver, mode, id=_id(case, solver, mode),
                marks=[pytest.mark.slow] if slow else [],
            )  # fmt: skip


@pytest.mark.parametrize("case,solver,checkpoint", list(_event_cross_params()))
def test_event_torch_and_jax_agree(case: str, solver: str, checkpoint: str, device: str) -> None:
    """Same constant steps, same interpolant (dopri5's quartic fit through the midpoint),
    both root finders converged to 1e-13: torch and JAX find the same event time and the
    same state there (1e-10; measured 2.4e-14).

    Their *gradients* are not the same function, so they are checked per host only
    (:func:`test_event_matches_host_backprop`): torchdiffeq's ``odeint_event`` reroutes
    the event-time gradient with the vector field, ``dy*/dt* = f(t*, y*)`` (the exact
    flow's slope), while diffrax differentiates the computation it ran, the interpolant's
    slope ``I'(t*)``. On this case ``|f - I'| / |f| = 3.4e-7`` at ``t*``, and the two
    gradients differ by 1.2e-7 relative: the interpolation defect, not an error of
    either adjoint."""
    t = event_result("torch", case, solver, device, checkpoint)
    j = event_result("jax", case, solver, device, checkpoint)
    assert t.steps is not None and j.n_accepted == len(t.steps), "different step counts"
    assert set(t.steps) == {EVENT_CASES_BY_NAME[case].case.h}, "torch left the grid of h"
    assert_close(t.ys, j.ys, "float64", "torch vs jax event time and state")


def _event_numpy_params() -> Iterator:
    for case, solver, slow in EVENT_PLAN:
        for host in ("torch", "jax"):
            yield pytest.param(
                "numpy", host, case, solver, id=_id("numpy", host, case, solver),
                marks=[pytest.mark.slow] if slow else [],
            )  # fmt: skip


@pytest.mark.parametrize("backend,host,case,solver", list(_event_numpy_params()))
def test_event_numpy_core_reference_matches_host(
    backend: str, host: str, case: str, solver: str, device: str
) -> None:
    """The event from the core kernels in NumPy (hand-written VJPs, Newton on the core
    interpolant, the implicit function theorem for ``t*``) reproduces each host's event
    time, state and backprop gradients, with the event time's slope taken as that host
    takes it (torch ``f(t*, y*)``, JAX ``I'(t*)``; see
    :func:`~conformance.backends.numpy_backend.solve_event_core`). Measured: torch
    3e-14 (its bisection stops at 1e-13), JAX 6e-15."""
    from conformance.backends.numpy_backend import solve_event_core

    if device != "cpu":
        pytest.skip("NumPy runs on the host only")
    ref = event_result(host, case, solver, device, "host")
    got = solve_event_core(EVENT_CASES_BY_NAME[case], SOLVERS_BY_NAME[solver], host)
    assert got.steps is not None
    assert len(got.steps) == (len(ref.steps) if ref.steps is not None else ref.n_accepted)
    assert_close(got.ys, ref.ys, "float64", "core event time and state vs host")
    assert_close(got.grads, ref.grads, "float64", "core event gradient vs host backprop")


# ------------------------------------------------------------------ scale-out


def _run_scale_out(which: str, timeout: float = 120.0, env: dict | None = None) -> dict:
    """Run ``python -m conformance.scale_out <which>`` and return its JSON report."""
    proc = subprocess.run(
        [sys.executable, "-m", "conformance.scale_out", which],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"scale-out {which} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1])
    if report.get("skip"):
        pytest.skip(report["skip"])
    return report


@pytest.mark.parametrize("backend", ["torch"])
def test_ddp_two_processes_match_one_process(backend: str) -> None:
    """PyTorch DistributedDataParallel (gloo, 2 CPU processes, half the batch each)
    with ``adjoint="symplectic"`` gives the parameter gradients of one process on the
    whole batch (float64, <= 1e-12 relative)."""
    backend_module("torch")
    report = _run_scale_out("ddp")
    assert report["world_size"] == 2
    assert report["rel_err"] <= 1e-12, report


@pytest.mark.parametrize("backend", ["jax"])
def test_jax_batch_sharded_over_two_devices_matches_unsharded(backend: str) -> None:
    """JAX on two host devices with the batch sharded across them (NamedSharding)
    gives the gradient of the unsharded solve (float64, <= 1e-12 relative)."""
    backend_module("jax")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    report = _run_scale_out("jax", env={"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"})
    assert report["n_devices"] == 2
    assert report["shards"] == 2, "the batch was not split across the two devices"
    assert report["rel_err"] <= 1e-12, report
