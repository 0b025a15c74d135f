"""``python -m symplectic_adjoint bench``: sweep step counts over every peer.

PyTorch: torchdiffeq backprop, torchdiffeq ``odeint_adjoint``, ours (``"states"``,
``"stages"``, a budget of ``c`` states). JAX: diffrax ``RecursiveCheckpointAdjoint``
(``checkpoints=N``, the backprop reference, and the default), ``BacksolveAdjoint``,
``DirectAdjoint``, ours. Columns: peak memory (README, measurement protocol), median time per
gradient, ratios to backprop, gradient error against backprop in float32 and float64.

Writes ``results.md`` and ``results.json`` to ``--out`` as soon as each backend is
measured, then one PNG per backend (memory and time versus N) when matplotlib is
installed: a missing plotting library never costs the measurements.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..demo import extras
from ..demo.progress import Progress, choose_mode
from . import protocol, report

PROG = "python -m symplectic_adjoint bench"

#: Printed under each backend's table: what "backprop" is there.
REFERENCE_NOTE = {
    "torch": "backprop = torchdiffeq.odeint (reverse mode through every stage of every step)",
    "jax": "backprop = diffrax.RecursiveCheckpointAdjoint(checkpoints=N) (reverse mode "
    "through the solver loop, one checkpoint per step; diffrax's reference gradient)",
}


def _steps(values: Sequence[int]) -> str:
    return " ".join(map(str, values))


def _parser(prog: str) -> argparse.ArgumentParser:
    p = protocol
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Measure the symplectic adjoint against its peers (torchdiffeq, diffrax): "
        "peak memory, median time per gradient and gradient error, with backprop as the "
        "reference. Writes results.md, results.json and one plot per backend.",
        epilog=f"Problems: torch, an MLP 16-{p.TORCH_WIDTH}-{p.TORCH_WIDTH}-16 (tanh) on a batch "
        f"of {p.TORCH_BATCH}, rk4 on [0, 1] plus one dopri5 case (tol 1e-6, [0, 10]); jax, "
        f"Tsit5 on y {p.JAX_BATCH}x{p.JAX_DIM} with an MLP of width {p.JAX_WIDTH}. --quick "
        "takes about 10 s (torch) and 20-45 s (jax) on a 2-core machine.",
    )
    add = parser.add_argument
    add(
        "--backend",
        choices=["torch", "jax", "all"],
        default="all",
        help="which adapters to measure; 'all' measures those installed (default: all)",
    )
    add(
        "--ode-steps",
        dest="steps",
        type=int,
        nargs="+",
        metavar="N",
        help=f"ODE step counts N to sweep (default: {_steps(p.TORCH_STEPS)} for torch, "
        f"{_steps(p.JAX_STEPS)} for jax; with --quick {_steps(p.QUICK_TORCH_STEPS)} and "
        f"{_steps(p.QUICK_JAX_STEPS)})",
    )
    add("--steps", dest="steps", type=int, nargs="+", help=argparse.SUPPRESS)  # old name
    add(
        "--repeats",
        type=int,
        default=p.REPEATS,
        metavar="R",
        help=f"timed runs per method, the median is reported; at least 5 "
        f"(default: {p.REPEATS}; with --quick {p.QUICK_REPEATS})",
    )
    add(
        "--budget",
        type=int,
        nargs="*",
        default=None,
        metavar="C",
        help="checkpoint budgets c (states kept) to measure besides 'states' and 'stages'; "
        f"none if given without values (default: {_steps(p.BUDGETS)}; with --quick "
        f"{_steps(p.QUICK_BUDGETS)})",
    )
    add(
        "--width",
        type=int,
        default=p.TORCH_WIDTH,
        metavar="W",
        help=f"torch MLP width (default: {p.TORCH_WIDTH})",
    )
    add(
        "--batch",
        type=int,
        default=p.TORCH_BATCH,
        metavar="B",
        help=f"torch batch size (default: {p.TORCH_BATCH})",
    )
    add("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    add(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="output folder (default: bench-out)",
    )
    add(
        "--suite",
        choices=["default", "stiff", "budget", "features"],
        default="default",
        help="default: the sweep above; stiff: Kvaerno5 (jax, issue 13) and trbdf2/kvaerno5 "
        f"(torch, issue 14) on a stiff MLP field mlp(y) - {p.STIFF_DECAY:g} y, state "
        f"{p.STIFF_BATCH}x{p.STIFF_DIM}, N = {_steps(p.STIFF_STEPS)}; budget (torch, issue 16): "
        f"checkpoint={p.BUDGET_C} against 'states' at N = {_steps(p.BUDGET_STEPS)}, replays "
        "against the binomial formula; features (jax, issue 12): XLA temp memory of the "
        f"gradient through a root-finder Event and through SaveAt(dense=True) + sol.evaluate "
        f"at N = {_steps(p.FEATURE_STEPS)} (compile only, no timing). Writes "
        "results-SUITE.md/.json (default: default)",
    )
    add("--quick", action="store_true", help="tiny sizes and 2 repeats: a smoke test in seconds")
    add(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (by default a bar on a terminal, else a line per run)",
    )
    return parser


def _backends(choice: str, prog: str) -> list[str]:
    """The backends to measure; stops with an install hint when a chosen one is missing."""
    absent = {b: extras.missing(mods) for b, mods in extras.BACKENDS.items()}
    if choice != "all":
        other = "jax" if choice == "torch" else "torch"
        alternative = (
            f"or measure the {other} adapter, which is installed: {prog} --backend {other}"
            if not absent[other]
            else None
        )
        extras.require(f"{prog} --backend {choice}", *absent[choice], alternative=alternative)
        return [choice]
    present = [b for b, gone in absent.items() if not gone]
    if not present:
        raise SystemExit(
            f"{prog} has nothing to measure: the torch and the jax adapters are not installed "
            f"({', '.join(absent['torch'] + absent['jax'])} missing). Install either or both:\n"
            f"    {extras.install_hint(absent['torch'] + absent['jax'])}"
        )
    for b in (b for b, gone in absent.items() if gone):
        print(f"skipping the {b} adapter: {', '.join(absent[b])} not installed; to include it:\n"
              f"    {extras.install_hint(absent[b])}", file=sys.stderr)  # fmt: skip
    return present


def _measure(backend: str, args: argparse.Namespace, tick: Callable[[str], None]) -> list[dict]:
    """One backend's rows (imports that backend's bench module)."""
    p = protocol
    quick = args.quick
    repeats = p.QUICK_REPEATS if quick else args.repeats
    budgets = args.budget if args.budget is not None else (p.QUICK_BUDGETS if quick else p.BUDGETS)
    if args.suite == "stiff" and backend == "torch":
        from .torch_suites import measure_stiff

        # Quick runs measure memory in-process (tiny N: the profiler's events are small).
        return measure_stiff(steps=args.steps or (p.QUICK_STIFF_STEPS if quick else p.STIFF_STEPS),
                             repeats=repeats, progress=tick, isolate=not quick)  # fmt: skip
    if args.suite == "stiff":
        from .jax_bench import measure_stiff as measure_jax_stiff

        steps = args.steps or (p.QUICK_STIFF_STEPS if quick else p.STIFF_STEPS)
        return measure_jax_stiff(steps=steps, repeats=repeats, quick=quick, progress=tick)
    if args.suite == "features":
        from .jax_bench import measure_features

        steps = args.steps or (p.QUICK_FEATURE_STEPS if quick else p.FEATURE_STEPS)
        return measure_features(steps=steps, quick=quick, progress=tick)
    if args.suite == "budget":
        from .torch_suites import measure_budget

        steps = args.steps or (p.QUICK_BUDGET_STEPS if quick else p.BUDGET_STEPS)
        return measure_budget(steps=steps, budget=budgets[0] if budgets else p.BUDGET_C,
                              repeats=repeats, progress=tick)  # fmt: skip
    if backend == "torch":
        from .torch_bench import measure

        steps = args.steps or (p.QUICK_TORCH_STEPS if quick else p.TORCH_STEPS)
        return measure(steps=steps, repeats=repeats, dopri5=True, budgets=budgets,
                       device=args.device, width=args.width, batch=args.batch,
                       progress=tick)  # fmt: skip
    from .jax_bench import measure

    steps = args.steps or (p.QUICK_JAX_STEPS if quick else p.JAX_STEPS)
    return measure(steps=steps, repeats=repeats, quick=quick, budgets=budgets, progress=tick)


#: Per suite and backend: (reference label in the table header, note under the table).
SUITE_NOTES = {
    ("stiff", "jax"): ("RCA(N)", "reference = diffrax.RecursiveCheckpointAdjoint(checkpoints=N); "
                       "Kvaerno5, constant steps 1/N on [0, 1], optimistix.Newton (rtol = atol = "
                       "1e-6 in float32, 1e-10 for the float64 error, measured at the smallest N "
                       "only), SaveAt(t1=True), each row of the state its own vmapped solve"),
    ("stiff", "torch"): ("backprop", "reference = adjoint='backprop' (autograd through the "
                         "Newton iterations); float64, per_sample=True (block-diagonal Jacobian), "
                         f"simplified Newton at newton_rtol = newton_atol = "
                         f"{protocol.STIFF_NEWTON_TOL:g}, constant steps 1/N on [0, 1] (trbdf2 "
                         "step_size, kvaerno5 held at h); error f64 against backprop"),
    ("features", "jax"): ("RCA(N)", "reference = diffrax.RecursiveCheckpointAdjoint("
                          "checkpoints=N); Tsit5, constant steps 1/N, float32, compile only: "
                          "event = terminating diffrax.Event with a real-valued cond_fn and "
                          "optimistix.Newton root finder; dense = SaveAt(dense=True) and a loss "
                          "on sol.evaluate at 101 times (the dense output itself, held by every "
                          "adjoint, dominates both columns)"),
    ("budget", "torch"): ("states", "reference = checkpoint='states'; memory: profiler peak of "
                          "one gradient (forward + backward); time: the backward alone; "
                          "replayed = SolveStats.n_replayed_steps, formula = "
                          "binomial_forward_steps(N, c) - (N - 1); float64"),
}  # fmt: skip


def _stem(suite: str) -> str:
    return "results" if suite == "default" else f"results-{suite}"


def _write(out: Path, tables: list[str], rows: list[dict], meta: dict[str, Any]) -> str:
    """Write results[-SUITE].md and .json (what was measured so far); return the Markdown."""
    kind = "quick" if meta["quick"] else "full"
    suite = meta.get("suite", "default")
    header = (
        f"Benchmark ({kind}, suite {suite}), {meta['machine']}, python {platform.python_version()}"
    )
    text = f"{header}\n\n" + "\n\n".join(tables) + "\n"
    (out / f"{_stem(suite)}.md").write_text(text)
    report.write_json(rows, out / f"{_stem(suite)}.json", meta=meta)
    return text


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.repeats < 5 and not args.quick:
        parser.error("--repeats must be at least 5 (median of >= 5 runs)")
    only = {"budget": "torch", "features": "jax"}  # suites measured in one adapter
    backends = _backends(only.get(args.suite, args.backend), prog)
    plots = not extras.missing(["matplotlib"])
    if not plots:
        print("matplotlib is not installed: writing the tables only, no plots. For the plots:\n"
              f"    {extras.install_hint(['matplotlib'])}", file=sys.stderr)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    meta = dict(quick=args.quick, machine=machine,
                repeats=protocol.QUICK_REPEATS if args.quick else args.repeats,
                suite=args.suite)  # fmt: skip

    tables: list[str] = []
    all_rows: list[dict] = []
    mode = choose_mode(enabled=not args.no_progress)
    with Progress("bench", mode=mode, every=0, unit="run") as bar:
        for backend in backends:
            rows = _measure(backend, args, lambda msg: bar.update(status=msg))
            all_rows += rows
            kind = rows[0]["memory_kind"] if rows else ""
            ref, note = SUITE_NOTES.get(
                (args.suite, backend), ("backprop", REFERENCE_NOTE[backend])
            )
            title = backend if args.suite == "default" else f"{backend}, suite {args.suite}"
            tables.append(f"### {title} (memory: {kind})\n\n"
                          f"{report.markdown(rows, reference=ref)}\n\n{note}")  # fmt: skip
            text = _write(args.out, tables, all_rows, meta)  # saved before anything can fail
    print(text)
    stem = _stem(args.suite)
    written = [args.out / f"{stem}.md", args.out / f"{stem}.json"]
    for backend in backends if plots else []:
        path = args.out / (
            f"{backend}.png" if args.suite == "default" else f"{backend}-{args.suite}.png"
        )
        try:
            rows = [r for r in all_rows if r["backend"] == backend]
            report.plot(rows, path, title=f"{backend}: memory and time")
        except Exception as error:  # a plot never costs the tables
            print(f"could not draw {path}: {error!r}", file=sys.stderr)
        else:
            written.append(path)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
