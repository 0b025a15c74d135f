"""Builders that pose a :class:`~conformance.cases.Case` in one backend and solve it.

Every builder returns a :class:`Result` of plain NumPy arrays, so that the suite
compares backends without knowing any of them. ``torch_backend`` and ``jax_backend``
import their framework at module import; the suite imports them through
``pytest.importorskip`` so that a single-backend environment skips the other one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["Result", "grad_keys", "rel_err", "standin", "unavailable", "worst_rel_err"]

#: Set to 1 to replace our adjoints by the host library's backprop while developing the
#: harness before an adapter exists (never in CI: "ours" then *is* the reference).
STANDIN_ENV = "SYMPLECTIC_CONFORMANCE_STANDIN"


def standin() -> bool:
    """Whether the stand-in for our adjoints is switched on (see :data:`STANDIN_ENV`)."""
    return os.environ.get(STANDIN_ENV) == "1"


@functools.cache
def unavailable(name: str) -> str | None:
    """``None`` if ``symplectic_adjoint.<name>`` imports (or the stand-in is on), else
    the reason it does not; the suite skips our side of a backend on a reason."""
    if standin():
        return None
    try:
        getattr(importlib.import_module("symplectic_adjoint"), name)
    except Exception as exc:  # any failure of the adapter's import is a reason to skip
        return f"symplectic_adjoint.{name} unavailable: {exc!r}"
    return None


@dataclasses.dataclass(frozen=True)
class Result:
    """Forward outputs and gradients of the case loss ``sum_k <w_k, y(t_k)>``.

    Arguments:
        ys: stacked outputs per state leaf, shape ``(len(t), *leaf.shape)``.
        grads: gradients by :func:`grad_keys` name (initial state leaves, parameters).
        steps: accepted step sizes, where the backend records them (torch).
        n_accepted: number of accepted steps, where the backend counts them (JAX).
    """

    ys: tuple[np.ndarray, ...]
    grads: dict[str, np.ndarray]
    steps: tuple[float, ...] | None = None
    n_accepted: int | None = None


def grad_keys(n_leaves: int, params: Sequence[str]) -> list[str]:
    """Names of the gradients: ``y0`` (or ``y0.0``, ``y0.1``... for a tuple state), then
    ``p.<name>`` for each parameter."""
    ys = ["y0"] if n_leaves == 1 else [f"y0.{i}" for i in range(n_leaves)]
    return ys + [f"p.{k}" for k in params]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` in float64 (``||a - b||`` when ``b`` is exactly zero)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        raise AssertionError(f"shape mismatch {a64.shape} vs {b64.shape}")
    den = float(np.linalg.norm(b64))
    num = float(np.linalg.norm(a64 - b64))
    return num / den if den > 0 else num


def worst_rel_err(
    got: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    ref: Mapping[str, np.ndarray] | Sequence[np.ndarray],
) -> tuple[float, str]:
    """Largest per-entry relative error and the entry's name (key or index).

    Each gradient (each output leaf) is compared on its own, so a small parameter
    cannot hide behind a large one.
    """
    if isinstance(ref, Mapping):
        assert isinstance(got, Mapping)
        if set(got) != set(ref):
            raise AssertionError(f"different gradient names: {sorted(got)} vs {sorted(ref)}")
        pairs = [(k, got[k], ref[k]) for k in ref]
    else:
        if len(got) != len(ref):
            raise AssertionError(f"{len(got)} outputs vs {len(ref)}")
        pairs = [(str(i), g, r) for i, (g, r) in enumerate(zip(got, ref, strict=True))]
    errs = [(rel_err(g, r), k) for k, g, r in pairs]
    return max(errs)
