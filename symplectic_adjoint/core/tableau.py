"""Butcher tableaux with exact rational coefficients.

A Runge--Kutta method with ``s`` stages advances ``y_n`` by one step of size ``h``::

    X_i = y_n + h * sum_j a_ij k_j,    k_i = f(t_n + c_i h, X_i),
    y_{n+1} = y_n + h * sum_i b_i k_i,
    err     = h * sum_i (b_i - bhat_i) k_i      (embedded pair, when present).

Coefficients are stored as :class:`fractions.Fraction` so that order conditions and
the symplectic-partner identity can be checked exactly; the kernels use the Python
``float`` views (never NumPy scalars, which would promote float32 arrays to float64).
Methods whose published coefficients are decimal approximations (Tsit5, the 8(7)
Dormand--Prince pair) are stored as the exact rationals of those decimals and are
marked ``exact=False``: their order conditions hold to rounding, not identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from functools import cached_property

__all__ = ["ButcherTableau", "TableauError", "frac"]

Number = int | float | str | Fraction


class TableauError(ValueError):
    """A tableau is malformed or cannot be used where it was handed in."""


def frac(x: Number) -> Fraction:
    """Exact rational of ``x``; strings are read as exact decimals (``"0.161"``)."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, float):
        # A float literal is almost always a decimal typed by a person: read it back
        # from its shortest repr so that 0.1 means 1/10, not 3602879701896397/2**55.
        return Fraction(repr(x))
    return Fraction(x)


def _row(values: Sequence[Number]) -> tuple[Fraction, ...]:
    return tuple(frac(v) for v in values)


@dataclasses.dataclass(frozen=True, eq=False)
class ButcherTableau:
    """An explicit (or, for validation only, implicit) Runge--Kutta tableau.

    Arguments:
        name: canonical name (``"dopri5"``).
        a_exact: the full ``s x s`` matrix ``a`` as rationals; explicit methods have
            zeros on and above the diagonal.
        b_exact: the propagated weights ``b``.
        c_exact: the nodes ``c``; consistency requires ``c_i = sum_j a_ij``.
        order: the classical order of the propagated solution.
        bhat_exact: weights of the embedded method (``None`` for fixed-step methods).
        embedded_order: classical order of the embedded method.
        fsal: the last stage is reused as the next step's first slope. For dopri5,
            bosh3, tsit5 and dopri8 it equals ``f(t_{n+1}, y_{n+1})``; for
            ``fehlberg2`` and ``adaptive_heun`` it does not, which couples steps.
        exact: whether the rationals are the method's true coefficients (``False``
            for decimal approximations; order conditions then hold to ~1e-15).
        aliases: other names under which the registry finds this tableau.
    """

    name: str
    a_exact: tuple[tuple[Fraction, ...], ...]
    b_exact: tuple[Fraction, ...]
    c_exact: tuple[Fraction, ...]
    order: int
    bhat_exact: tuple[Fraction, ...] | None = None
    embedded_order: int | None = None
    fsal: bool = False
    exact: bool = True
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_lower(
        cls,
        name: str,
        *,
        c: Sequence[Number],
        a_lower: Sequence[Sequence[Number]],
        b: Sequence[Number],
        order: int,
        bhat: Sequence[Number] | None = None,
        embedded_order: int | None = None,
        fsal: bool = False,
        exact: bool = True,
        aliases: Sequence[str] = (),
    ) -> ButcherTableau:
        """Build an explicit tableau from its strictly lower rows.

        ``a_lower[i - 1]`` holds ``a_i1 .. a_i,i-1`` for stage ``i = 2..s`` (1-based),
        the layout both torchdiffeq (``beta``) and diffrax (``a_lower``) use.
        """
        s = len(b)
        if len(a_lower) != s - 1:
            raise TableauError(f"{name}: {s} weights need {s - 1} rows of a, got {len(a_lower)}")
        a = [[Fraction(0)] * s for _ in range(s)]
        for i, row in enumerate(a_lower, start=1):
            if len(row) != i:
                raise TableauError(f"{name}: row {i + 1} of a must have {i} entries")
            a[i][:i] = _row(row)
        return cls(
            name=name,
            a_exact=tuple(tuple(r) for r in a),
            b_exact=_row(b),
            c_exact=_row(c),
            order=order,
            bhat_exact=None if bhat is None else _row(bhat),
            embedded_order=embedded_order,
            fsal=fsal,
            exact=exact,
            aliases=tuple(aliases),
        )

    def __post_init__(self) -> None:
        s = len(self.b_exact)
        if s == 0:
            raise TableauError(f"{self.name}: a tableau needs at least one stage")
        if len(self.c_exact) != s or len(self.a_exact) != s:
            raise TableauError(f"{self.name}: a, b and c must describe the same {s} stages")
        if any(len(row) != s for row in self.a_exact):
            raise TableauError(f"{self.name}: a must be a square {s}x{s} matrix")
        if self.bhat_exact is not None and len(self.bhat_exact) != s:
            raise TableauError(f"{self.name}: embedded weights must have {s} entries")

    # ----------------------------------------------------------------- structure
    @property
    def stages(self) -> int:
        return len(self.b_exact)

    @cached_property
    def is_explicit(self) -> bool:
        """``a`` is strictly lower triangular (no stage depends on itself or later ones)."""
        return all(
            self.a_exact[i][j] == 0 for i in range(self.stages) for j in range(i, self.stages)
        )

    @property
    def is_adaptive(self) -> bool:
        return self.bhat_exact is not None

    # ------------------------------------------------------------ float views
    @cached_property
    def a(self) -> tuple[tuple[float, ...], ...]:
        """``a`` as Python floats, correctly rounded from the exact rationals."""
        return tuple(tuple(float(x) for x in row) for row in self.a_exact)

    @cached_property
    def b(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.b_exact)

    @cached_property
    def c(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.c_exact)

    @cached_property
    def b_error(self) -> tuple[float, ...] | None:
        """Error weights ``b - bhat``, rounded once from the exact difference."""
        if self.bhat_exact is None:
            return None
        return tuple(float(x - y) for x, y in zip(self.b_exact, self.bhat_exact, strict=True))

    def validate(self, *, explicit: bool = True) -> None:
        """Raise :class:`TableauError` if the tableau cannot drive the explicit kernels.

        Checks that ``a`` is strictly lower triangular (``explicit=True``) and that the
        rows of ``a`` sum to ``c`` (the nodes are where the stages really are).
        """
        if explicit and not self.is_explicit:
            raise TableauError(
                f"{self.name}: tableau is implicit (a has nonzero entries on or above the "
                "diagonal); the symplectic adjoint kernels handle explicit Runge-Kutta "
                "methods only. Use an explicit method such as 'dopri5' or 'tsit5'."
            )
        if self._inconsistent_row is not None:
            raise TableauError(self._inconsistent_row)

    @cached_property
    def _inconsistent_row(self) -> str | None:
        # Cached: the kernels validate on every step, and summing dopri8's rows of large
        # rationals costs ~0.25 ms; the tableau is immutable, so the answer never changes.
        tol = Fraction(0) if self.exact else Fraction(1, 10**14)
        for i, (row, ci) in enumerate(zip(self.a_exact, self.c_exact, strict=True)):
            if abs(sum(row, Fraction(0)) - ci) > tol:
                return (
                    f"{self.name}: row {i + 1} of a sums to {float(sum(row))!r} but "
                    f"c_{i + 1} = {float(ci)!r}; a consistent tableau has c_i = sum_j a_ij"
                )
        return None

    def __repr__(self) -> str:
        kind = f"{self.order}({self.embedded_order})" if self.is_adaptive else f"{self.order}"
        return f"ButcherTableau({self.name!r}, stages={self.stages}, order={kind})"
