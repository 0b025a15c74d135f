"""Command line: ``python -m symplectic_adjoint {demo,bench} [options]``.

The same program is installed as the ``symplectic-adjoint`` console script.
``demo`` trains a small continuous normalizing flow with the symplectic adjoint and
compares its gradient, memory and time with backprop and the continuous adjoint;
``bench`` sweeps step counts and solvers over every peer and writes tables and plots.
Each subcommand has its own ``--help``; ``--version`` prints the package version.
"""

from __future__ import annotations

import importlib
import os
import sys

from . import __version__

_COMMANDS = {
    "demo": ("symplectic_adjoint.demo.cli", "train a neural ODE (CNF) and compare adjoints"),
    "bench": ("symplectic_adjoint.bench.cli", "benchmark memory/time/exactness against peers"),
}


def _prog() -> str:
    """How the program was called: ``python -m symplectic_adjoint`` or the console script."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name in {"__main__.py", "-c"}:
        return "python -m symplectic_adjoint"
    return name


def _usage(prog: str) -> str:
    lines = [
        f"usage: {prog} {{demo,bench}} [options]",
        f"       {prog} --version",
        "",
        "commands:",
    ]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", f"'{prog} demo --help' and '{prog} bench --help' list the options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage(prog))
        return 0
    if argv[0] in {"-V", "--version"}:
        print(f"symplectic-adjoint {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage(prog)}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest, prog=f"{prog} {command}") or 0)


if __name__ == "__main__":
    sys.exit(main())
