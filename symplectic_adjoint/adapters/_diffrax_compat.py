"""Every private name of diffrax and equinox the JAX adapter uses, in one place.

The adapter runs diffrax's own loop and replaces its while-loops, so it depends on
internals that diffrax does not promise to keep. They are imported here only, after
checking that the installed diffrax is one the adapter was verified against
(:data:`SUPPORTED_DIFFRAX`); any other version raises an ``ImportError`` naming the
supported ones, rather than risking a silently wrong gradient. Public names
(``diffrax.ButcherTableau``, ``diffrax.SubSaveAt``) are used where diffrax has them.
"""

from __future__ import annotations

import diffrax

from ._host_versions import require_version

#: diffrax versions whose internals the adapter was verified against (its test suite
#: compares gradients with ``RecursiveCheckpointAdjoint`` on them).
SUPPORTED_DIFFRAX = ("0.7.2",)


def check_diffrax_version(version: str) -> None:
    """Raise ``ImportError`` unless ``version`` is in :data:`SUPPORTED_DIFFRAX`."""
    require_version(
        "diffrax",
        version,
        SUPPORTED_DIFFRAX,
        why="SymplecticAdjoint uses diffrax internals",
        alternative="use `adjoint=diffrax.RecursiveCheckpointAdjoint()`",
    )


check_diffrax_version(diffrax.__version__)

# Only after the check: these are private and may move between versions.
import equinox.internal as eqxi  # noqa: E402
from diffrax._adjoint import (  # noqa: E402
    _inner_loop as inner_loop,
)
from diffrax._adjoint import (  # noqa: E402
    _nondiff_solver_controller_state as nondiff_solver_controller_state,
)
from diffrax._adjoint import (  # noqa: E402
    _only_transpose_ys as only_transpose_ys,
)
from diffrax._adjoint import (  # noqa: E402
    _outer_loop as outer_loop,
)
from diffrax._heuristics import is_sde  # noqa: E402
from diffrax._integrate import SaveState  # noqa: E402
from diffrax._saveat import save_y  # noqa: E402
from diffrax._term import WrapTerm  # noqa: E402  (diffeqsolve's direction wrapper)
from equinox.internal import ω  # noqa: E402

while_loop = eqxi.while_loop
buffer_at_set = eqxi.buffer_at_set

__all__ = [
    "WrapTerm",
    "buffer_at_set",
    "SaveState",
    "SUPPORTED_DIFFRAX",
    "check_diffrax_version",
    "inner_loop",
    "is_sde",
    "nondiff_solver_controller_state",
    "only_transpose_ys",
    "outer_loop",
    "save_y",
    "while_loop",
    "ω",
]
