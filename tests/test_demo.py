"""Smoke tests of ``python -m symplectic_adjoint demo`` and of the programs in ``examples/``.

Each runs with ``--quick`` (tiny sizes) and is checked for what a user sees: exit status,
the summary lines, a non-empty PNG, and a gradient that agrees with backprop to rounding
in float64. Nothing here is timed (timings are the demo's output, never an assertion).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
GRAD_ERROR = re.compile(r"gradient rel\. error[^:]*:\s*([0-9.eE+-]+)")


def _grad_error(output: str) -> float:
    match = GRAD_ERROR.search(output)
    assert match, f"no gradient error line in:\n{output}"
    return float(match.group(1))


def _check_summary(output: str, figure_dir: Path, *, methods: list[str]) -> None:
    for label in ("final NLL", "gradient rel. error", "peak memory", "time/iter", "figure"):
        assert label in output, f"missing {label!r} in:\n{output}"
    for method in methods:
        assert method in output
    assert _grad_error(output) <= 1e-10
    # The table's reference is backprop: named in the header, first row, ratios 1.
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("gradient method"))
    assert lines[header].count("/ backprop") == 2, lines[header]
    first = lines[header + 2]
    assert first.startswith("backprop") and re.search(r" 1\.000x .* 1\.00x$", first), first
    pngs = list(figure_dir.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0


def _need(*modules: str) -> None:
    for name in modules:
        pytest.importorskip(name)


def test_demo_cli_torch_quick_shows_progress_in_a_log(tmp_path: Path) -> None:
    """The command CI runs, with its output going to files (not a terminal): each phase is
    announced and training and measuring report progress as lines on stderr."""
    _need("torch", "torchdiffeq", "matplotlib")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "symplectic_adjoint", "demo", "--quick"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_summary(proc.stdout, tmp_path, methods=["symplectic", "backprop", "continuous adjoint"])
    for phase in ("[1/4] training", "[2/4] gradient check", "[3/4] measuring", "[4/4]"):
        assert phase in proc.stdout
    assert re.search(r"^training: 3/3 \(100%\)", proc.stderr, flags=re.M), proc.stderr
    assert re.search(r"^measuring: 4/4 \(100%\)", proc.stderr, flags=re.M), proc.stderr
    assert "USDT" not in proc.stderr and "\r" not in proc.stderr


def test_demo_main_jax_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need("jax", "diffrax", "equinox", "matplotlib")
    from symplectic_adjoint import demo

    argv = ["--backend", "jax", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert demo.main(argv) == 0
    output = capsys.readouterr().out
    _check_summary(output, tmp_path, methods=["symplectic", "RecursiveCheckpoint", "Backsolve"])


def test_quick_keeps_explicit_sizes() -> None:
    from symplectic_adjoint.demo.cli import QUICK, parse_config

    config = parse_config(["--quick", "--iterations", "7", "--backend", "jax"])
    assert config.iterations == 7 and config.solver == "tsit5"
    assert config.batch == QUICK["batch"] and config.quick
    assert parse_config([]).solver == "rk4" and not parse_config([]).quick
    assert parse_config(["--no-progress"]).progress == "off"


@pytest.mark.parametrize(
    ("grad_error", "nll", "status"),
    [(3e-16, 1.8, 0), (1e-6, 1.8, 1), (float("nan"), 1.8, 1), (3e-16, float("nan"), 1)],
)
def test_demo_fails_on_inexact_gradient_or_diverged_loss(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    grad_error: float,
    nll: float,
    status: int,
) -> None:
    from symplectic_adjoint.demo import cli
    from symplectic_adjoint.demo.toy2d import Report

    def fake_run(config: object) -> Report:
        return Report(
            backend="torch", solver="rk4", density="moons", iterations=1, final_nll=nll,
            grad_rel_error=grad_error, grad_reference="backprop", memory_measure="-",
            figure=tmp_path / "cnf.png",
        )  # fmt: skip

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(cli, "check_requirements", lambda config, prog: None)
    # jax: main() itself then imports no framework (run is faked), so any tox env runs it
    assert cli.main(["--backend", "jax", "--quick", "--no-progress"]) == status
    assert ("FAILED" in capsys.readouterr().err) == (status == 1)


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", REPO / "examples" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_cnf_2d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need("torch", "torchdiffeq", "matplotlib")
    assert _example("cnf_2d").main(["--quick", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "NLL" in output and "kept" in output
    assert (tmp_path / "cnf_2d_moons.png").stat().st_size > 0


def test_example_learn_physics(capsys: pytest.CaptureFixture[str]) -> None:
    _need("torch", "torchdiffeq")
    assert _example("learn_physics").main(["--quick", "--adjoint", "symplectic"]) == 0
    output = capsys.readouterr().out
    assert _grad_error(output) <= 1e-10
    for name in ("alpha", "beta", "gamma", "delta", "L-BFGS"):
        assert name in output


def test_example_odenet_digits(capsys: pytest.CaptureFixture[str]) -> None:
    _need("torch", "torchdiffeq", "sklearn")
    assert _example("odenet_digits").main(["--quick"]) == 0
    output = capsys.readouterr().out
    match = re.search(r"test accuracy: ([0-9.]+)", output)
    assert match and 0.0 <= float(match.group(1)) <= 1.0


def test_example_learn_physics_jax(capsys: pytest.CaptureFixture[str]) -> None:
    _need("jax", "diffrax", "equinox", "scipy")
    assert _example("learn_physics_jax").main(["--quick"]) == 0
    output = capsys.readouterr().out
    assert _grad_error(output) <= 1e-10
    for name in ("alpha", "beta", "gamma", "delta", "BFGS"):
        assert name in output


def _run_example(name: str, *argv: str, timeout: float = 120) -> str:
    """Run ``examples/<name>.py`` in a fresh interpreter (as a user would: a JAX script
    sets ``jax_enable_x64`` at import); assert exit status 0 and return its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / f"{name}.py"), *argv], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_example_neural_cde_jax_quick() -> None:
    _need("jax", "diffrax", "equinox")
    stdout = _run_example("neural_cde_jax", "--quick")
    match = re.search(r"difference SymplecticAdjoint vs RCA \(float64\): (\S+)", stdout)
    assert match and float(match.group(1)) <= 1e-10
    assert re.search(r"step +3 +batch loss [0-9.]+ +batch accuracy", stdout)


@pytest.mark.parametrize(
    "argv",
    [pytest.param(["--quick"], id="quick"), pytest.param([], id="full", marks=pytest.mark.slow)],
)
def test_example_robertson_jax_fits_the_rates_with_rca_exact_gradients(argv: list[str]) -> None:
    """The stiff JAX example (Kvaerno5, PIDController): its Jacobian and loss gradient at
    the initial guess agree with RecursiveCheckpointAdjoint's to 1e-8, Levenberg-Marquardt
    converges, and every fitted rate is within 1 % (the script exits 1 otherwise)."""
    _need("jax", "diffrax", "equinox")
    stdout = _run_example("robertson_jax", *argv, timeout=300)
    match = re.search(r"SymplecticAdjoint vs RCA .*: (\S+) \(Jacobian: (\S+)\)", stdout)
    assert match and max(float(match.group(1)), float(match.group(2))) <= 1e-8, stdout
    assert re.search(r"^converged after \d+ accepted steps", stdout, flags=re.M), stdout
    errors = re.findall(r"^k[123] .* ([0-9.eE+-]+)$", stdout, flags=re.M)
    assert len(errors) == 3 and max(map(float, errors)) <= 1e-2, stdout
