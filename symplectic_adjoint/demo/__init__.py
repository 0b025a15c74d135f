"""The demo of ``python -m symplectic_adjoint demo`` and the pieces the examples reuse.

Modules (importing this package imports none of them):

- :mod:`~symplectic_adjoint.demo.cli`: the command line (``main``, ``parse_config``);
- :mod:`~symplectic_adjoint.demo.toy2d`: framework-free 2-D densities, the density
  figure, the demo's configuration and summary table (NumPy only);
- :mod:`~symplectic_adjoint.demo.cnf_torch`: the continuous normalizing flow in PyTorch
  (``CNF``, ``SolveSpec``, ``log_prob``, ``sample``), trained with
  :func:`symplectic_adjoint.odeint`;
- :mod:`~symplectic_adjoint.demo.cnf_jax`: the same flow in equinox/diffrax with
  :class:`symplectic_adjoint.SymplecticAdjoint`;
- :mod:`~symplectic_adjoint.demo.extras`: up-front checks of the optional dependencies,
  with the extra to install;
- :mod:`~symplectic_adjoint.demo.progress`: progress on a terminal (a bar) and in log
  files (periodic lines).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m symplectic_adjoint demo``; see :func:`symplectic_adjoint.demo.cli.main`."""
    from .cli import main as cli_main

    return cli_main(argv)
