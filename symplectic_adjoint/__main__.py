"""Command line: ``python -m symplectic_adjoint {demo,bench} [options]``.

``demo`` trains a small continuous normalizing flow with the symplectic adjoint and
compares its gradient, memory and time with backprop and the continuous adjoint;
``bench`` sweeps step counts and solvers over every peer and writes tables and plots.
Each subcommand has its own ``--help``.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "demo": ("symplectic_adjoint.demo", "train a neural ODE (CNF) and compare adjoints"),
    "bench": ("symplectic_adjoint.bench.cli", "benchmark memory/time/exactness against peers"),
}


def _usage() -> str:
    lines = ["usage: python -m symplectic_adjoint {demo,bench} [options]", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
