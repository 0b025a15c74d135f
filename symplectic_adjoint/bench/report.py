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

__all__ = ["add_ratios", "markdown", "write_json", "plot"]

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


def markdown(rows: Sequence[Row], *, reference: str) -> str:
    """One Markdown table; ratios are to ``reference`` (named in the header)."""
    head = (
        f"| backend | case | N | method | memory (MiB) | memory / {reference} "
        f"| time / gradient (ms) | time / {reference} | error f32 | error f64 |"
    )
    lines = [head, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['case']} | {r['steps']} | {r['method']} "
            f"| {r['memory_bytes'] / 2**20:.2f} | {r['memory_ratio']:.3f} "
            f"| {r['time_s'] * 1e3:.1f} | {r['time_ratio']:.2f} "
            f"| {_fmt_err(r.get('error'))} | {_fmt_err(r.get('error_f64'))} |"
        )
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: Path, *, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str))


def plot(rows: Sequence[Row], path: Path, *, title: str) -> None:
    """Memory and time versus N, one line per method, for each case of ``rows``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(len(cases), 2, figsize=(10, 3.6 * len(cases)), squeeze=False)
    for row_axes, case in zip(axes, cases, strict=True):
        sub = [r for r in rows if r["case"] == case]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["steps"], r) for r in sub if r["method"] == method)
            ns = [n for n, _ in pts]
            row_axes[0].plot(ns, [r["memory_bytes"] / 2**20 for _, r in pts], "o-", label=method)
            row_axes[1].plot(ns, [r["time_s"] * 1e3 for _, r in pts], "o-", label=method)
        for ax, what in zip(row_axes, ("peak memory (MiB)", "time per gradient (ms)"), strict=True):
            ax.set_xlabel("steps N")
            ax.set_ylabel(what)
            ax.set_title(f"{case}: {what}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
