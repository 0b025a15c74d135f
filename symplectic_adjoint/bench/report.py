"""Benchmark results as rows, and their Markdown table, JSON and plots.

A row is a plain dict: ``backend``, ``case`` (e.g. ``"rk4"``), ``steps`` (accepted
steps N), ``method`` (e.g. ``"symplectic states"``), ``memory_bytes`` (profiler peak on
CPU / CUDA peak on GPU for torch, XLA ``temp_size_in_bytes`` for JAX), ``time_s``
(median per gradient), ``memory_ratio`` and ``time_ratio`` (to the backend's
reference method in the same case: backprop for torch, RecursiveCheckpointAdjoint with
one checkpoint per step for JAX), ``error`` (float32 gradient relative to the reference)
and ``error_f64`` (the same in float64, where exactness is claimed), ``memory_kind``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_ratios", "markdown", "plot", "write_json"]

Row = dict[str, Any]


def add_ratios(rows: list[Row], *, reference: str) -> list[Row]:
    """Fill ``memory_ratio``/``time_ratio`` against ``reference`` within each case and N."""
    refs = {(r["case"], r["steps"]): r for r in rows if r["method"] == reference}
    for r in rows:
        ref = refs.get((r["case"], r["steps"]))
        ok = ref is not None and ref["memory_bytes"] and ref["time_s"]
        r["memory_ratio"] = r["memory_bytes"] / ref["memory_bytes"] if ok else math.nan
        r["time_ratio"] = r["time_s"] / ref["time_s"] if ok else math.nan
    return rows


def _fmt_err(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def _fmt_ms(seconds: float | None) -> str:
    # Memory-only suites (compile, no run) have no time.
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _fmt_ratio(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}"


def markdown(rows: Sequence[Row], *, reference: str = "backprop") -> str:
    """One Markdown table; the ratio columns are to ``reference`` (the rows' ``memory_ratio``
    and ``time_ratio``, filled by :func:`add_ratios`). Rows with ``replayed`` and ``formula``
    (the budget suite) get those two columns too."""
    replays = any("replayed" in r for r in rows)
    head = (
        f"| backend | case | N | method | memory (MiB) | memory / {reference} "
        f"| time / gradient (ms) | time / {reference} | error f32 | error f64 |"
    )
    rule = "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"
    if replays:
        head, rule = head + " replayed | formula |", rule + "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['backend']} | {r['case']} | {r['steps']} | {r['method']} "
            f"| {r['memory_bytes'] / 2**20:.2f} | {r['memory_ratio']:.3f} "
            f"| {_fmt_ms(r.get('time_s'))} | {_fmt_ratio(r.get('time_ratio'))} "
            f"| {_fmt_err(r.get('error'))} | {_fmt_err(r.get('error_f64'))} |"
        )
        if replays:
            line += f" {r.get('replayed', '–')} | {r.get('formula', '–')} |"
        lines.append(line)
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: Path, *, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str))


_PANELS = (("memory_bytes", 2**-20, "peak memory (MiB)"), ("time_s", 1e3, "time per gradient (ms)"))


def plot(rows: Sequence[Row], path: Path, *, title: str) -> None:
    """Memory and time for each case of ``rows``: versus N (log-log, one line per method)
    where a case has several N, one bar per method where it has one (adaptive solves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    # A memory-only suite (compile, no run: time_s None) gets the memory panel alone.
    panels = [pn for pn in _PANELS if all(r.get(pn[0]) is not None for r in rows)]
    fig, axes = plt.subplots(
        len(cases), len(panels), figsize=(5.5 * len(panels), 3.8 * len(cases)), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for row_axes, case in zip(axes, cases, strict=True):
        sub = [r for r in rows if r["case"] == case]
        methods = list(dict.fromkeys(r["method"] for r in sub))
        ns = sorted({r["steps"] for r in sub})
        for ax, (key, scale, what) in zip(row_axes, panels, strict=True):
            if len(ns) == 1:  # one N: bars, one per method (lines would sit on one point)
                values = [next(r[key] for r in sub if r["method"] == m) * scale for m in methods]
                bars = ax.barh(methods, values, color=[f"C{i}" for i in range(len(methods))])
                ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
                ax.invert_yaxis()
                ax.set_xlabel(what)
                ax.set_title(f"{case}, N = {ns[0]}: {what}")
                ax.margins(x=0.2)
                continue
            for method in methods:
                pts = sorted((r["steps"], r[key] * scale) for r in sub if r["method"] == method)
                ax.plot(*zip(*pts, strict=True), "o-", label=method)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(ns)
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("steps N")
            ax.set_ylabel(what)
            ax.set_title(f"{case}: {what}")
            ax.grid(True, which="both", alpha=0.3)
        if len(ns) > 1:
            row_axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
