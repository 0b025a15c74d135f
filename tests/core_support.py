"""Shared pieces of the core tests: array namespaces, a nonlinear test field with a
hand-written VJP, and conversions. Pure array-API code, so the kernels are exercised
exactly as an adapter would drive them."""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import numpy as np
import pytest

from symplectic_adjoint.core import TABLEAUX

#: Every tableau, by name (used for parametrisation ids).
TABLEAU_NAMES = sorted(TABLEAUX)

#: Array namespaces the kernels must run unchanged on; torch only where installed.
XP_NAMES = ["numpy", "array_api_strict", "torch"]


def namespace(name: str) -> Any:
    """The array-API namespace ``name`` (skips the test when it is not installed)."""
    if name == "torch":
        pytest.importorskip("torch")
        return importlib.import_module("array_api_compat.torch")
    if name == "numpy":
        return importlib.import_module("array_api_compat.numpy")
    return pytest.importorskip(name)


def asarray(xp: Any, x: Any) -> Any:
    """``x`` (NumPy or Python scalars) as a float64 array of namespace ``xp``."""
    return xp.asarray(np.asarray(x, dtype=np.float64).tolist(), dtype=xp.float64)


def to_numpy(x: Any) -> np.ndarray:
    """Any namespace's array (or Python number) as a NumPy float64 array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, (np.ndarray, int, float, np.generic)):
        x = np.from_dlpack(x)
    return np.asarray(x, dtype=np.float64)


def rel_err(x: Any, ref: Any) -> float:
    x, ref = to_numpy(x), to_numpy(ref)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


class Params(NamedTuple):
    """Parameters of :func:`field`: ``f(t, y) = tanh(W y + u t + v)``."""

    W: Any
    u: Any
    v: Any


def random_params(xp: Any, d: int, seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    return Params(
        asarray(xp, rng.standard_normal((d, d)) / np.sqrt(d)),
        asarray(xp, rng.standard_normal(d)),
        asarray(xp, 0.3 * rng.standard_normal(d)),
    )


def field(p: Params, t: Any, y: Any) -> Any:
    """A nonlinear, time-dependent vector field with parameters."""
    xp = _ns(y)
    return xp.tanh(p.W @ y + p.u * t + p.v)


def field_vjp(p: Params, t: Any, y: Any, kbar: Any) -> tuple[Any, Params, Any]:
    """``(ybar, Params of cotangents, tbar)`` of :func:`field` with cotangent ``kbar``."""
    xp = _ns(y)
    z = xp.tanh(p.W @ y + p.u * t + p.v)
    g = (1.0 - z * z) * kbar
    d = y.shape[0]
    W_bar = xp.reshape(g, (d, 1)) * xp.reshape(y, (1, d))
    return p.W.T @ g, Params(W_bar, g * t, g), xp.sum(g * p.u)


def stage_fn(p: Params, tableau, t0: float, h: float):
    """The ``f(i, X)`` an adapter would hand to ``rk_step``."""
    return lambda i, X: field(p, t0 + tableau.c[i] * h, X)


def stage_vjp(p: Params, tableau, t0: float, h: float, calls: list | None = None):
    """The ``vjp(i, X, kbar, carry)`` an adapter would hand to ``rk_step_vjp``; the carry
    accumulates the parameter cotangents, ``calls`` records which stages were asked."""

    def vjp(i, X, kbar, carry):
        if calls is not None:
            calls.append(i)
        Xbar, pbar, tau = field_vjp(p, t0 + tableau.c[i] * h, X, kbar)
        if carry is not None:
            pbar = Params(*(a + b for a, b in zip(carry, pbar, strict=True)))
        return Xbar, tau, pbar

    return vjp


def _ns(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(x)
