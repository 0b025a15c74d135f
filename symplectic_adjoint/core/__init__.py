"""Framework-agnostic core: tableaux, the RK step and its discrete adjoint, dense output,
and the implicit/IMEX step with its adjoint (:mod:`.implicit_step`).

Imports neither torch nor jax. Array code is written against the array API
(``array_api_compat.array_namespace``); autodiff arrives as an injected VJP callable.
"""

from . import dense, interpolants
from .dense import DenseOutput
from .implicit_methods import (
    ADDITIVE_TABLEAUX,
    IMPLICIT_TABLEAUX,
    AdditiveTableau,
    get_implicit_tableau,
)
from .implicit_step import ImplicitStep, implicit_step, implicit_step_vjp
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
    "ADDITIVE_TABLEAUX",
    "AdditiveTableau",
    "IMPLICIT_TABLEAUX",
    "ImplicitStep",
    "get_implicit_tableau",
    "implicit_step",
    "implicit_step_vjp",
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
