"""The one version check both hosts' compat modules run before importing private names."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["require_version"]


def require_version(
    host: str, installed: str, supported: Sequence[str], *, why: str, alternative: str = ""
) -> None:
    """Raise ``ImportError`` unless ``installed`` is one of ``supported``.

    The message names the host, the supported and the installed versions, why the adapter
    depends on them (``why``) and what to install, plus ``alternative`` when given.
    """
    if installed in supported:
        return
    fix = f"install {host}=={supported[-1]}" + (f", or {alternative}" if alternative else "")
    raise ImportError(
        f"symplectic_adjoint supports {host} {' or '.join(supported)} ({why}), but {host} "
        f"{installed} is installed: {fix}"
    )
