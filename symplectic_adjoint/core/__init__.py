"""Framework-agnostic core: tableaux, the RK step and its discrete adjoint, dense output.

Imports neither torch nor jax. Array code is written against the array API
(``array_api_compat.array_namespace``); autodiff arrives as an injected VJP callable.
"""

from . import dense, interpolants
from .dense import DenseOutput
from .interpolants import diffrax_interpolant, torchdiffeq_interpolant
from .methods import TABLEAUX, get_tableau
from .order import (
    check_order,
    measured_order,
    order_conditions_residual,
    stability_polynomial,
    trees,
)
from .partner import partner_identity_residual, symplectic_partner
from .step import RKStep, StepVJP, add, lincomb, rk_step, rk_step_vjp, stage_input, sub, vdot
from .tableau import ButcherTableau, TableauError

__all__ = [
    "ButcherTableau",
    "DenseOutput",
    "RKStep",
    "StepVJP",
    "TABLEAUX",
    "TableauError",
    "add",
    "check_order",
    "dense",
    "diffrax_interpolant",
    "get_tableau",
    "interpolants",
    "lincomb",
    "measured_order",
    "order_conditions_residual",
    "partner_identity_residual",
    "rk_step",
    "rk_step_vjp",
    "stability_polynomial",
    "stage_input",
    "sub",
    "symplectic_partner",
    "torchdiffeq_interpolant",
    "trees",
    "vdot",
]
