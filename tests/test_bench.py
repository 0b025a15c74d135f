"""Smoke test of ``python -m symplectic_adjoint bench --quick``: the outputs exist and
have the documented structure, and our gradients are exact in float64. Nothing here
looks at a timing."""

from __future__ import annotations

import json

import pytest

from symplectic_adjoint.__main__ import main

EXPECTED = {
    "torch": {"backprop", "odeint_adjoint", "symplectic states", "symplectic stages"},
    "jax": {
        "Symplectic (states)",
        "Symplectic (stages)",
        "backprop: RecursiveCheckpoint(N)",
        "Backsolve",
    },
}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bench_quick_writes_tables_json_and_plots(backend, tmp_path, capfd):
    pytest.importorskip(backend)
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--backend", backend, "--no-progress", "--out", str(out)]) == 0

    captured = capfd.readouterr()
    printed = captured.out
    assert "| backend | case | N | method |" in printed
    assert "| memory / backprop |" in printed and "| time / backprop |" in printed
    assert "USDT" not in captured.err  # the profiler's C++ log lines are silenced
    assert (out / "results.md").read_text().count(f"| {backend} |") >= len(EXPECTED[backend])
    assert (out / f"{backend}.png").stat().st_size > 1000

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert EXPECTED[backend] <= {r["method"] for r in rows}
    assert rows[0]["method"].startswith("backprop") and rows[0]["memory_ratio"] == 1.0
    assert 4 in {r["steps"] for r in rows}
    for r in rows:
        assert r["memory_bytes"] > 0 and r["time_s"] > 0
        if r["method"].lower().startswith("symplectic"):
            # Exact for the discrete solve: float64 agreement with the reference.
            assert r["error_f64"] <= 1e-10, r
    continuous = [r for r in rows if r["method"] in {"odeint_adjoint", "Backsolve"}]
    # The continuous adjoint is not exact: the error column discriminates.
    assert max(r["error_f64"] for r in continuous) > 1e-10


# --suite stiff / --suite budget (issues 13, 14, 16): the tables' headers, reference first.
SUITES = [
    # (suite, backend, reference label in the header, reference method, extra header text)
    ("stiff", "torch", "backprop", "backprop", ""),
    ("stiff", "jax", "RCA(N)", "RecursiveCheckpoint(N)", ""),
    ("budget", "torch", "states", "symplectic states", "| replayed | formula |"),
    # issue 12's event and dense-output memory (compile only): four XLA compiles, ~25 s
    pytest.param("features", "jax", "RCA(N)", "RCA(N)", "", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("suite, backend, ref, first, extra", SUITES)
def test_bench_suite_quick_prints_its_table(suite, backend, ref, first, extra, tmp_path, capfd):
    pytest.importorskip(backend)
    if backend == "jax":
        pytest.importorskip("optimistix")
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--suite", suite, "--backend", backend, "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0

    printed = capfd.readouterr().out
    assert f"| memory / {ref} |" in printed and f"| time / {ref} |" in printed
    assert extra in printed
    rows = json.loads((out / f"results-{suite}.json").read_text())["rows"]
    assert rows[0]["method"] == first and rows[0]["memory_ratio"] == 1.0
    assert {r["backend"] for r in rows} == {backend}
    if suite == "features":  # memory only: one RCA(N) and one symplectic row per feature
        assert [(r["case"], r["method"]) for r in rows] == [
            (f"tsit5 {f}", m) for f in ("event", "dense") for m in ("RCA(N)", "Symplectic (states)")
        ]
        assert all(r["memory_bytes"] > 0 and r["time_s"] is None for r in rows)
    if suite == "budget":  # the fixed grid replays the binomial optimum exactly
        fixed = [r for r in rows if r["case"] == "rk4" and r["method"] != first]
        assert fixed and all(r["replayed"] == r["formula"] for r in fixed)


def test_torch_stiff_memory_in_a_fresh_process_is_the_same_figure():
    """The full torch stiff suite measures each peak in its own process (the profiler's
    memory is not returned to the system); the figure must not depend on that."""
    pytest.importorskip("torch")
    from symplectic_adjoint.bench.torch_suites import isolated, stiff_peak_memory

    here = stiff_peak_memory(4, "trbdf2", "symplectic stages")
    assert here > 0
    assert isolated(stiff_peak_memory, 4, "trbdf2", "symplectic stages") == here
