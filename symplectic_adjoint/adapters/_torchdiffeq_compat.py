"""Every private part of torchdiffeq the torch adapter relies on, checked at import.

The adapter runs torchdiffeq's own solver classes and watches them from inside, so it
depends on names torchdiffeq does not export. They are all imported here and nowhere
else in the adapter, and the installed version is checked against the versions these
names were verified with (:data:`SUPPORTED_VERSIONS`); any other version raises an
``ImportError`` naming them, instead of failing later inside a solve.

What the adapter uses besides the names imported below (torchdiffeq 0.2.5):

* solver methods it overrides: ``RKAdaptiveStepsizeODESolver._adaptive_step`` (one
  attempted step from an ``rk_state``), ``FixedGridODESolver._step_func`` (one fixed
  step, returning ``(dy, f0)``), ``integrate_until_event``, and
  ``RKAdaptiveStepsizeODESolver._interp_fit`` (tsit5's dense output);
* solver attributes it reads while recording: ``rk_state`` (``y1``, ``f1``, ``t1``,
  ``dt``), ``tableau.alpha``, ``perturb``, ``grid_constructor``, ``y0``;
* the callbacks torchdiffeq calls on the wrapped field: ``callback_step``,
  ``callback_accept_step``, ``callback_reject_step`` (:data:`CALLBACK_NAMES`);
* ``_PerturbFunc.base_func`` (the field without the time perturbation) and its rule,
  written once here as :func:`perturb_time`.

:data:`TORCHDIFFEQ_SOLVERS` is torchdiffeq's own registry: it is only read, never
changed (the adapter keeps its own name -> class table, see ``_torch_methods``).
"""

from __future__ import annotations

import torch
import torchdiffeq  # type: ignore[import-untyped]

from ._host_versions import require_version

__all__ = [
    "SUPPORTED_VERSIONS",
    "check_version",
    "Perturb",
    "perturb_time",
    "CALLBACK_NAMES",
    "ADJOINT_CALLBACK_NAMES",
    "check_inputs",
    "flat_to_shape",
    "TORCHDIFFEQ_SOLVERS",
    "TorchdiffeqTableau",
    "RKAdaptiveStepsizeODESolver",
    "FixedGridODESolver",
    "RungeKuttaState",
    "compute_error_ratio",
    "optimal_step_size",
]

#: The torchdiffeq versions whose private names the adapter was verified against.
SUPPORTED_VERSIONS = ("0.2.5",)


def check_version(version: str) -> None:
    """Raise ``ImportError`` unless ``version`` is one of :data:`SUPPORTED_VERSIONS`."""
    require_version(
        "torchdiffeq",
        version,
        SUPPORTED_VERSIONS,
        why="the torch adapter runs torchdiffeq's solvers and overrides private methods",
    )


check_version(getattr(torchdiffeq, "__version__", "of unknown version"))

# The private names, imported only after the version check.
from torchdiffeq._impl.misc import (  # type: ignore[import-untyped]  # noqa: E402
    Perturb,
    _all_adjoint_callback_names,
    _all_callback_names,
    _check_inputs,
    _compute_error_ratio,
    _flat_to_shape,
    _optimal_step_size,
)
from torchdiffeq._impl.odeint import (  # type: ignore[import-untyped]  # noqa: E402
    SOLVERS as _SOLVERS,
)
from torchdiffeq._impl.rk_common import (  # type: ignore[import-untyped]  # noqa: E402
    RKAdaptiveStepsizeODESolver,
    _ButcherTableau,
    _RungeKuttaState,
)
from torchdiffeq._impl.solvers import (  # type: ignore[import-untyped]  # noqa: E402
    FixedGridODESolver,
)

#: ``_check_inputs(func, y0, t, rtol, atol, method, options, event_fn, SOLVERS)``.
check_inputs = _check_inputs
#: ``_flat_to_shape(tensor, length, shapes)``: a flat state back to the user's tuple.
flat_to_shape = _flat_to_shape
#: torchdiffeq's ``SOLVERS`` (read only).
TORCHDIFFEQ_SOLVERS = _SOLVERS
#: torchdiffeq's tableau layout: ``alpha`` (nodes without c_1), ``beta``, ``c_sol``, ``c_error``.
TorchdiffeqTableau = _ButcherTableau
#: ``_RungeKuttaState(y1, f1, t0, t1, dt, interp_coeff)``, an adaptive solver's state.
RungeKuttaState = _RungeKuttaState
#: ``_compute_error_ratio(error, rtol, atol, y0, y1, norm)`` and
#: ``_optimal_step_size(dt, ratio, safety, ifactor, dfactor, order)``: the step control
#: the implicit adaptive solvers reuse.
compute_error_ratio = _compute_error_ratio
optimal_step_size = _optimal_step_size
CALLBACK_NAMES = tuple(_all_callback_names)
ADJOINT_CALLBACK_NAMES = tuple(_all_adjoint_callback_names)


def perturb_time(t: torch.Tensor, dtype: torch.dtype, perturb: Perturb) -> torch.Tensor:
    """The time torchdiffeq's ``_PerturbFunc`` hands the field: ``t`` cast to the state's
    real ``dtype``, then one ulp up (``Perturb.NEXT``) or down (``Perturb.PREV``).

    Works elementwise, so the reverse pass computes every step's stage times with it in
    one go; the forward recorder calls it per evaluation.
    """
    t = t.to(dtype)
    if perturb is Perturb.NEXT:
        return torch.nextafter(t, t + 1)
    if perturb is Perturb.PREV:
        return torch.nextafter(t, t - 1)
    return t
