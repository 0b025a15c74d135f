"""symplectic-adjoint: exact gradients of neural ODEs at minimal memory.

Public names are resolved lazily so that ``import symplectic_adjoint`` needs only
NumPy: ``odeint`` imports torch (and torchdiffeq) on first use, ``SymplecticAdjoint``
imports jax (and diffrax, equinox).
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import TABLEAUX, ButcherTableau, TableauError, get_tableau

__version__ = "0.1.0"

_LAZY = {
    "odeint": ("symplectic_adjoint.adapters.torchdiffeq", "odeint"),
    "odeint_event": ("symplectic_adjoint.adapters.torchdiffeq", "odeint_event"),
    "SolveStats": ("symplectic_adjoint.adapters.torchdiffeq", "SolveStats"),
    "SymplecticAdjoint": ("symplectic_adjoint.adapters.diffrax", "SymplecticAdjoint"),
}

__all__ = [
    "ButcherTableau",
    "TABLEAUX",
    "TableauError",
    "get_tableau",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'symplectic_adjoint' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
