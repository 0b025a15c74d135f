"""``python -m symplectic_adjoint bench``: sweep steps and solvers over every peer.

PyTorch: torchdiffeq backprop, torchdiffeq ``odeint_adjoint``, ours (``"states"``,
``"stages"``, a budget of ``c`` states). JAX: diffrax ``RecursiveCheckpointAdjoint``
(default and ``checkpoints=N``), ``BacksolveAdjoint``, ``DirectAdjoint``, ours. Columns:
peak memory (DESIGN.md section 5), median time per gradient, ratios to the backend's
reference, gradient error against the exact reference in float32 and float64.

Writes ``results.md`` (Markdown tables), ``results.json`` and one PNG per backend
(memory and time versus N) to ``--out``. ``--quick`` runs tiny sizes (a CI smoke test).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from . import report

_REFERENCE = {"torch": "backprop", "jax": "RecursiveCheckpoint(N)"}


def _progress(enabled: bool):
    """A one-line progress printer: a tqdm bar's description when on a TTY."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return (lambda msg: print(msg, file=sys.stderr, flush=True)), lambda: None
    bar = tqdm(desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)

    def tick(msg: str) -> None:
        bar.set_description(msg)
        bar.update(1)

    return tick, bar.close


def _available(backend: str) -> bool:
    need = {"torch": ("torch", "torchdiffeq"), "jax": ("jax", "diffrax", "equinox")}[backend]
    return all(importlib.util.find_spec(m) is not None for m in need)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m symplectic_adjoint bench",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--backend", choices=["torch", "jax", "all"], default="all")
    parser.add_argument("--steps", type=int, nargs="+", help="step counts N to sweep")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (median, >= 5)")
    parser.add_argument("--budget", type=int, nargs="*", default=[10],
                        help="checkpoint budgets c to include (states kept)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--width", type=int, help="torch MLP width (default: the protocol's)")
    parser.add_argument("--batch", type=int, help="torch batch (default: the protocol's)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 5 and not args.quick:
        parser.error("--repeats must be at least 5 (median of >= 5 runs)")

    backends = ["torch", "jax"] if args.backend == "all" else [args.backend]
    backends = [b for b in backends if _available(b)]
    if not backends:
        parser.error("neither torch+torchdiffeq nor jax+diffrax is installed")
    repeats = 2 if args.quick else args.repeats
    budgets = [2] if args.quick and args.budget == [10] else args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    tick, close = _progress(not args.no_progress and sys.stderr.isatty())

    tables, all_rows = [], []
    try:
        for backend in backends:
            if backend == "torch":
                from .torch_bench import BATCH, WIDTH, measure

                steps = args.steps or ([4, 8] if args.quick else [50, 100, 200])
                rows = measure(steps=steps, repeats=repeats, dopri5=True,
                               budgets=budgets, device=args.device,
                               width=args.width or WIDTH, batch=args.batch or BATCH,
                               progress=tick)  # fmt: skip
            else:
                from .jax_bench import measure

                steps = args.steps or ([4] if args.quick else [50, 100, 200, 400])
                rows = measure(steps=steps, repeats=repeats, quick=args.quick,
                               budgets=budgets, progress=tick)  # fmt: skip
            all_rows += rows
            ref = _REFERENCE[backend]
            kind = rows[0]["memory_kind"] if rows else ""
            table = report.markdown(rows, reference=ref)
            tables.append(f"### {backend} (memory: {kind})\n\n{table}")
            report.plot(rows, args.out / f"{backend}.png", title=f"{backend}: memory and time")
    finally:
        close()

    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    kind = "quick" if args.quick else "full"
    header = f"Benchmark ({kind}), {machine}, python {platform.python_version()}"
    text = f"{header}\n\n" + "\n\n".join(tables) + "\n"
    (args.out / "results.md").write_text(text)
    report.write_json(all_rows, args.out / "results.json",
                      meta=dict(quick=args.quick, machine=machine, repeats=repeats))  # fmt: skip
    print(text)
    print(f"wrote {args.out / 'results.md'}, results.json and "
          + ", ".join(f"{b}.png" for b in backends))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
