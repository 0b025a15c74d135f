"""Framework-agnostic core: tableaux, the RK step and its discrete adjoint, dense output.

Imports neither torch nor jax. Array code is written against the array API
(``array_api_compat.array_namespace``); autodiff arrives as an injected VJP callable.
"""

from . import dense
from .dense import DenseOutput
from .methods import TABLEAUX, get_tableau
from .partner import partner_identity_residual, symplectic_partner
from .step import RKStep, StepVJP, lincomb, rk_step, rk_step_vjp, vdot
from .tableau import ButcherTableau, TableauError

__all__ = [
    "ButcherTableau",
    "DenseOutput",
    "RKStep",
    "StepVJP",
    "TABLEAUX",
    "TableauError",
    "dense",
    "get_tableau",
    "lincomb",
    "partner_identity_residual",
    "rk_step",
    "rk_step_vjp",
    "symplectic_partner",
    "vdot",
]
