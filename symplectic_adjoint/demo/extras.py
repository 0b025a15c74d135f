"""Optional dependencies of the demo, the benchmark and the examples, checked up front.

``import symplectic_adjoint`` needs only NumPy; PyTorch, JAX, matplotlib, tqdm and
scikit-learn come with the package's extras (``[torch]``, ``[jax]``, ``[demo]``). A
program that needs one of them checks before it does any work and, when something is
missing, stops with one message naming the extra to install, instead of a traceback
(or a traceback after minutes of work)::

    from symplectic_adjoint.demo.extras import requirements

    with requirements("examples/odenet_digits.py", "torch", "torchdiffeq", "sklearn"):
        import torch
        from sklearn.datasets import load_digits

Only the standard library is imported here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["BACKENDS", "PROVIDED_BY", "install_hint", "missing", "require", "requirements"]

#: Importable module -> (the distribution pip installs, the extra of symplectic-adjoint
#: that brings it).
PROVIDED_BY: dict[str, tuple[str, str]] = {
    "torch": ("torch", "torch"),
    "torchdiffeq": ("torchdiffeq", "torch"),
    "jax": ("jax", "jax"),
    "diffrax": ("diffrax", "jax"),
    "equinox": ("equinox", "jax"),
    "scipy": ("scipy", "jax"),  # a dependency of jax
    "matplotlib": ("matplotlib", "demo"),
    "tqdm": ("tqdm", "demo"),
    "sklearn": ("scikit-learn", "demo"),
}

#: What each backend of the demo and the benchmark imports.
BACKENDS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "torchdiffeq"),
    "jax": ("jax", "diffrax", "equinox"),
}

_EXTRA_ORDER = ("torch", "jax", "demo")


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (not installed), in order.

    Looks for each module without importing it (``importlib.util.find_spec``), so checking
    for torch or jax costs nothing.
    """
    absent = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # e.g. sys.modules[name] is None
            found = False
        if not found:
            absent.append(name)
    return absent


def install_hint(modules: Iterable[str]) -> str:
    """The pip command that installs ``modules`` through the package's extras."""
    extras = {PROVIDED_BY[m][1] for m in modules if m in PROVIDED_BY}
    spec = ",".join(e for e in _EXTRA_ORDER if e in extras)
    return (
        f'pip install "symplectic-adjoint[{spec}]"\n'
        f'    (from a clone: python -m pip install -c constraints.txt -e ".[{spec}]")'
    )


def _message(program: str, absent: list[str], alternative: str | None) -> str:
    names = [PROVIDED_BY.get(m, (m, ""))[0] for m in absent]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    verb = "is" if len(names) == 1 else "are"
    lines = [f"{program} needs {listed}, which {verb} not installed. Install with:"]
    lines.append(f"    {install_hint(absent)}")
    if alternative:
        lines.append(alternative)
    return "\n".join(lines)


def require(program: str, *modules: str, alternative: str | None = None) -> None:
    """Stop ``program`` (``SystemExit``, status 1) if any of ``modules`` is not installed.

    The message names every missing module, the extra that brings it and, when given,
    ``alternative`` (e.g. "or run the JAX version: ...").
    """
    absent = missing(modules)
    if absent:
        raise SystemExit(_message(program, absent, alternative))


@contextmanager
def requirements(program: str, *modules: str) -> Iterator[None]:
    """Turn an ``ImportError`` inside the block into :func:`require`'s message.

    For a script's imports: the first import that fails stops the script with a message
    that names all of ``modules`` that are missing. An ``ImportError`` of anything else
    (a broken installation) propagates unchanged.
    """
    try:
        yield
    except ImportError as error:
        top = (error.name or "").partition(".")[0]
        absent = missing([*modules, *([top] if top in PROVIDED_BY else [])])
        if not absent:
            raise
        raise SystemExit(_message(program, list(dict.fromkeys(absent)), None)) from None
