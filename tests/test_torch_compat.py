"""torchdiffeq's private names live in one module that checks the installed version, and
our solver registry never touches torchdiffeq's.

A torchdiffeq other than the verified versions must fail at import with an ``ImportError``
naming them; a later torchdiffeq that registers solvers of its own (its master branch has
``tsit5`` and implicit methods) must change neither our name resolution nor its dict.
"""

from __future__ import annotations

import importlib
import sys

import pytest
from torch_support import Field, odeint, torch, torchdiffeq

import symplectic_adjoint.adapters as adapters_pkg
from symplectic_adjoint.adapters import _torch_methods, _torchdiffeq_compat

COMPAT = "symplectic_adjoint.adapters._torchdiffeq_compat"
METHODS_MODULE = "symplectic_adjoint.adapters._torch_methods"
# Names torchdiffeq's master branch registers (not in 0.2.5).
UPSTREAM_NEW = ("tsit5", "implicit_euler", "implicit_midpoint", "trapezoid", "sdirk2",
                "trbdf2", "gl4", "gl6", "radauIIA3", "radauIIA5")  # fmt: skip


def _forget(monkeypatch, *names: str) -> None:
    """Make the next import of ``names`` run the module afresh; restored after the test."""
    for name in names:
        monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(
            adapters_pkg, name.rsplit(".", 1)[1], sys.modules.get(name), raising=False
        )


def test_supported_version_imports():
    assert torchdiffeq.__version__ in _torchdiffeq_compat.SUPPORTED_VERSIONS
    _torchdiffeq_compat.check_version(torchdiffeq.__version__)


@pytest.mark.parametrize("version", ["0.2.4", "0.3.0", "1.0.0"])
def test_other_version_raises_import_error_naming_supported(monkeypatch, version):
    monkeypatch.setattr(torchdiffeq, "__version__", version)
    _forget(monkeypatch, COMPAT)
    with pytest.raises(ImportError, match=rf"supports torchdiffeq 0\.2\.5.*{version}"):
        importlib.import_module(COMPAT)


def test_public_adapter_import_fails_clearly(monkeypatch):
    monkeypatch.setattr(torchdiffeq, "__version__", "0.3.0")
    modules = [m for m in sys.modules if m.startswith("symplectic_adjoint.adapters.") and
               ("torch" in m.rsplit(".", 1)[1])]  # fmt: skip
    _forget(monkeypatch, *modules)
    with pytest.raises(ImportError, match="torchdiffeq 0.3.0 is installed"):
        importlib.import_module("symplectic_adjoint.adapters.torchdiffeq")


def test_missing_version_attribute_raises(monkeypatch):
    monkeypatch.delattr(torchdiffeq, "__version__")
    _forget(monkeypatch, COMPAT)
    with pytest.raises(ImportError, match="unknown version"):
        importlib.import_module(COMPAT)


def test_registry_is_ours_and_torchdiffeq_dict_unchanged():
    theirs = _torchdiffeq_compat.TORCHDIFFEQ_SOLVERS
    before = dict(theirs)
    assert _torch_methods.SOLVERS is not theirs
    assert set(_torch_methods.SOLVERS) == set(_torch_methods.METHODS)
    assert _torch_methods.SOLVERS["tsit5"] is _torch_methods.Tsit5Solver
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    y0 = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    for method in _torch_methods.METHODS:
        options = {"step_size": 0.25} if method in _torch_methods.FIXED_METHODS else {}
        for adjoint in ("symplectic", "backprop"):
            ys = odeint(Field(), y0, t, method=method, options=options, adjoint=adjoint)
            ys.sum().backward()
    assert theirs == before and "tsit5" not in theirs


class _UpstreamSolver:
    """Stands in for a solver a later torchdiffeq registers; must never be constructed."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("torchdiffeq's own registration was used")


def test_upstream_tsit5_does_not_shadow_ours(monkeypatch):
    theirs = _torchdiffeq_compat.TORCHDIFFEQ_SOLVERS
    for name in UPSTREAM_NEW:
        monkeypatch.setitem(theirs, name, _UpstreamSolver)
    snapshot = dict(theirs)
    # Importing our registry with torchdiffeq's already holding these names...
    _forget(monkeypatch, METHODS_MODULE)
    fresh = importlib.import_module(METHODS_MODULE)
    assert fresh.SOLVERS["tsit5"] is fresh.Tsit5Solver
    # Our implicit methods (same names as torchdiffeq's master branch) stay ours too.
    assert all(fresh.SOLVERS[name] is not _UpstreamSolver for name in UPSTREAM_NEW)
    # ... and solving with the registry already imported both keep tsit5 ours.
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    y0 = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    for adjoint in ("symplectic", "backprop"):
        ys = odeint(Field(), y0, t, method="tsit5", adjoint=adjoint)
        ys.sum().backward()
    ys = odeint(Field(), y0, t, method="gl4", options=dict(step_size=0.25))
    assert torch.isfinite(ys).all()
    assert theirs == snapshot
