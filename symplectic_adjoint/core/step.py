"""One explicit Runge--Kutta step and its discrete adjoint, for any array-API namespace.

The forward kernel evaluates::

    X_i = y_n + h * sum_{j<i} a_ij k_j,    k_i = f(i, X_i),
    y_{n+1} = y_n + h * sum_i b_i k_i,     err = h * sum_i (b_i - bhat_i) k_i.

The stage function ``f(i, X)`` is supplied by the adapter, which knows the stage time
``t_n + c_i h`` (and any perturbation of it) and the parameters; the kernel only does
linear algebra, so it runs unchanged on NumPy, torch, JAX and array-api-strict arrays.

The reverse kernel (:func:`rk_step_vjp`) is the discrete adjoint of that map, the
recursion of README, How it works; Matsubara, Miyatake & Yaguchi, NeurIPS 2021::

    for i = s, ..., 1:
        kbar_i = h b_i lam + h sum_{j>i} a_ji Xbar_j  (+ extra cotangent on k_i)
        Xbar_i, tau_i = VJP of f at stage i with cotangent kbar_i
    lam_n = lam + sum_i Xbar_i  (+ extra cotangent on y_n)
    tbar_n = sum_i tau_i
    hbar = sum_i b_i <lam, k_i> + sum_i <Xbar_i, sum_j a_ij k_j> + sum_i c_i tau_i

Only one stage's VJP is live at a time, which is what keeps memory at one network
graph. With ``Lambda_i = kbar_i / (h b_i)`` this is the symplectic partner method of
:mod:`symplectic_adjoint.core.partner`; written in ``kbar`` it needs no division by
``b_i``, so stages with ``b_i = 0`` are handled like any other. A stage whose
cotangent is structurally zero (``b_i = 0``, no later stage reads it, and no extra
cotangent) needs no VJP and is skipped: no network call.

Structural zeros are represented by ``None`` throughout, never by testing array
values, so the kernels trace under ``jax.jit`` and never synchronise a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .tableau import ButcherTableau

__all__ = [
    "RKStep",
    "StepVJP",
    "add",
    "lincomb",
    "rk_step",
    "rk_step_vjp",
    "stage_input",
    "sub",
    "vdot",
]

Array = Any
StageFn = Callable[[int, Array], Array]
#: ``vjp(i, X_i, kbar_i, carry) -> (Xbar_i, tau_i, carry)``; ``tau_i`` is the cotangent
#: of the stage time (or ``None`` when the adapter does not track time gradients) and
#: ``carry`` is whatever the adapter accumulates (parameter cotangents, a count).
StageVJP = Callable[[int, Array, Array, Any], tuple[Array, Any, Any]]


class RKStep(NamedTuple):
    """Result of :func:`rk_step`."""

    y1: Array
    error: Array | None  # None for methods without an embedded pair
    X: list[Array]  # stage inputs X_1..X_s
    k: list[Array]  # stage slopes k_1..k_s


class StepVJP(NamedTuple):
    """Result of :func:`rk_step_vjp`."""

    y0_bar: Array  # cotangent on y_n
    k1_bar: Array | None  # cotangent on an externally supplied k_1 (FSAL), else None
    t_bar: Any  # cotangent on t_n (None if the VJP returns no time cotangents)
    h_bar: Any  # cotangent on h (None unless requested and time cotangents exist)
    carry: Any


def lincomb(base: Array | None, scale: Any, coeffs: Sequence[float], vecs: Sequence) -> Array:
    """``base + scale * sum_j coeffs[j] * vecs[j]``, skipping zero coefficients and ``None``.

    ``scale`` multiplies the sum once (one rounding, like the host libraries). Returns
    ``base`` unchanged (possibly ``None``) when every term vanishes.
    """
    acc = None
    for cj, vj in zip(coeffs, vecs, strict=False):
        if cj == 0 or vj is None:
            continue
        term = vj * cj if cj != 1 else vj
        acc = term if acc is None else acc + term
    if acc is None:
        return base
    acc = acc * scale if not (isinstance(scale, (int, float)) and scale == 1) else acc
    return acc if base is None else base + acc


def vdot(x: Array, y: Array) -> Array:
    """Sum of the elementwise product (a 0-d array in the arrays' namespace)."""
    return _xp(x).sum(x * y)


def _xp(x: Array):
    import array_api_compat

    return array_api_compat.array_namespace(x)


def add(a: Any, b: Any) -> Any:
    """``a + b`` where ``None`` is a structural zero (``None + None`` is ``None``).

    Every cotangent sum in the kernels and adapters goes through this: a ``None`` must
    never drop the other operand, and no array is created for a zero.
    """
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def sub(a: Any, b: Any) -> Any:
    """``a - b`` where ``None`` is a structural zero (see :func:`add`)."""
    if b is None:
        return a
    return -b if a is None else a - b


def stage_input(tableau: ButcherTableau, i: int, y0: Array, h: Any, k: Sequence) -> Array:
    """The stage input ``X_i = y_n + h sum_{j<i} a_ij k_j`` (0-based ``i``; explicit rows).

    The one place the stage recompute is written: the forward kernel, the adapters'
    reverse sweeps (recomputing stages from a checkpoint) and replays all call it, so a
    recomputed ``X_i`` is bitwise the forward one (same terms, same order, one rounding
    of ``h``). ``k`` may be longer than ``i`` (only ``k[:i]`` is read) and hold ``None``
    for slopes that are structurally zero.
    """
    return lincomb(y0, h, tableau.a[i][:i], k[:i])


def rk_step(
    tableau: ButcherTableau,
    f: StageFn,
    y0: Array,
    h: Any,
    *,
    k1: Array | None = None,
    check: bool = True,
) -> RKStep:
    """Take one explicit Runge--Kutta step.

    Arguments:
        tableau: an explicit tableau (checked).
        f: stage function ``f(i, X_i) -> k_i`` (``i`` is 0-based).
        y0: state ``y_n``, any array-API array.
        h: step size (Python float or 0-d array of ``y0``'s namespace).
        k1: first slope if already known (FSAL reuse); then ``f(0, y0)`` is not called.
        check: validate the tableau first (adapters validate once per solve and pass
            ``False`` to keep the check out of the per-step path).

    Returns:
        :class:`RKStep` with ``y1``, the embedded error estimate (``None`` for fixed-step
        methods), and the lists of stage inputs ``X`` and slopes ``k``.
    """
    if check:
        tableau.validate()
    b = tableau.b
    X: list[Array] = []
    k: list[Array] = []
    for i in range(tableau.stages):
        Xi = stage_input(tableau, i, y0, h, k)
        X.append(Xi)
        k.append(k1 if (i == 0 and k1 is not None) else f(i, Xi))
    y1 = lincomb(y0, h, b, k)
    err = None
    if tableau.b_error is not None:
        err = lincomb(None, h, tableau.b_error, k)
        if err is None:
            err = y0 * 0
    return RKStep(y1=y1, error=err, X=X, k=k)


def rk_step_vjp(
    tableau: ButcherTableau,
    vjp: StageVJP,
    y1_bar: Array | None,
    X: Sequence[Array],
    h: Any,
    *,
    k: Sequence[Array] | None = None,
    k_bar: Sequence[Array | None] | None = None,
    y0_bar: Array | None = None,
    k1_given: bool = False,
    carry: Any = None,
    need_h_bar: bool = False,
    check: bool = True,
) -> StepVJP:
    """Discrete adjoint of :func:`rk_step` (the reverse stage recursion).

    Arguments:
        tableau: the explicit tableau of the forward step.
        vjp: ``vjp(i, X_i, kbar_i, carry) -> (Xbar_i, tau_i, carry)``: the VJP of the
            stage function at stage ``i`` (only called where ``kbar_i`` is nonzero).
        y1_bar: cotangent on ``y_{n+1}`` (``None`` for zero).
        X: stage inputs of the forward step (recomputed or stored).
        h: the step size used forward.
        k: stage slopes; needed only for ``need_h_bar``.
        k_bar: extra cotangents on each ``k_i`` (interpolated outputs, the FSAL slope
            carried into the next step), ``None`` entries for zero.
        y0_bar: extra cotangent on ``y_n`` (e.g. an output interpolated in this step).
        k1_given: ``k_1`` was supplied to the forward step rather than computed from
            ``y_n``; its cotangent is then returned as ``k1_bar`` for the caller to pass
            to whatever produced it, and stage 1 is not differentiated here.
        carry: initial accumulator handed to ``vjp``.
        need_h_bar: also return the cotangent on ``h`` (needs ``k`` and time cotangents).
        check: validate the tableau first (see :func:`rk_step`).

    Returns:
        :class:`StepVJP`.

    Structural zeros: a stage whose ``Xbar_i`` is ``None`` (``f`` does not read ``X_i``)
    may still have a time cotangent ``tau_i`` (``f`` reads ``t``); every sum below adds
    each term on its own, so a ``None`` never drops another term.
    """
    if check:
        tableau.validate()
    s = tableau.stages
    a, b, c = tableau.a, tableau.b, tableau.c
    Xbar: list[Array | None] = [None] * s
    tau: list[Any] = [None] * s
    kbars: list[Array | None] = [None] * s
    k1_bar = None
    for i in reversed(range(s)):
        extra = None if k_bar is None else k_bar[i]
        kb = lincomb(None, h, [a[j][i] for j in range(i + 1, s)], Xbar[i + 1 :])
        if y1_bar is not None and b[i] != 0:
            lam_term = y1_bar * (h * b[i]) if isinstance(h, (int, float)) else y1_bar * b[i] * h
            kb = add(kb, lam_term)
        kb = add(kb, extra)
        kbars[i] = kb
        if kb is None:
            continue  # structurally zero: no network call
        if i == 0 and k1_given:
            k1_bar = kb
            continue
        Xbar[i], tau[i], carry = vjp(i, X[i], kb, carry)

    lam = y1_bar
    for xb in Xbar:
        lam = add(lam, xb)
    lam = add(lam, y0_bar)
    if lam is None:
        lam = X[0] * 0

    t_bar = None
    for ti in tau:
        t_bar = add(t_bar, ti)

    h_bar = None
    if need_h_bar:
        if k is None:
            raise ValueError("rk_step_vjp: need_h_bar=True requires the stage slopes k")
        if y1_bar is not None:
            for i in range(s):
                if b[i] != 0:
                    h_bar = add(h_bar, vdot(y1_bar, k[i]) * b[i])
        for i in range(s):
            # X_i = y_n + h sum_j a_ij k_j and t_i = t_n + c_i h: two independent terms
            # (a field that ignores y has Xbar_i = None but still a time cotangent).
            if Xbar[i] is not None:
                inc = lincomb(None, 1.0, a[i][:i], k[:i])
                if inc is not None:
                    h_bar = add(h_bar, vdot(Xbar[i], inc))
            if tau[i] is not None and c[i] != 0:
                h_bar = add(h_bar, tau[i] * c[i])
    return StepVJP(y0_bar=lam, k1_bar=k1_bar, t_bar=t_bar, h_bar=h_bar, carry=carry)
