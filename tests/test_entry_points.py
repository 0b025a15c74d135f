"""Every program a newcomer runs, in an environment that lacks one of its optional packages.

Each case starts the program in a subprocess whose imports of the named packages fail
(a ``sys.meta_path`` finder raises ``ModuleNotFoundError`` for them, as if they were not
installed) and checks that it stops at once with status 1 and a message naming the extra
to install, not a traceback. The benchmark without matplotlib must still write and print
its tables (its measurements are faked here: the CLI's behaviour is under test, and the
real measurements have their own smoke test in ``test_bench.py``). Also: ``--version``,
the console script, the table headers (backprop is the reference) and progress lines.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Run ``sys.argv[2:]`` (a module with its arguments, or a script) with the packages in
#: ``sys.argv[1]`` (comma-separated) made impossible to import.
_BLOCKING_RUNNER = """
import importlib.abc, runpy, sys

blocked = set(sys.argv[1].split(","))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
target, sys.argv = sys.argv[2], sys.argv[2:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

CASES = [
    # (command after "python", blocked packages, extras the message must name)
    ("-m symplectic_adjoint demo", "torch", {"torch"}),
    ("-m symplectic_adjoint demo", "torchdiffeq", {"torch"}),
    ("-m symplectic_adjoint demo", "matplotlib", {"demo"}),
    ("-m symplectic_adjoint demo --backend jax", "jax", {"jax"}),
    ("-m symplectic_adjoint demo --backend jax", "diffrax", {"jax"}),
    ("-m symplectic_adjoint demo --backend jax", "matplotlib", {"demo"}),
    ("-m symplectic_adjoint bench --quick --backend torch", "torch", {"torch"}),
    ("-m symplectic_adjoint bench --quick --backend jax", "jax,equinox", {"jax"}),
    ("-m symplectic_adjoint bench --quick", "torch,jax", {"torch", "jax"}),
    ("examples/cnf_2d.py --quick", "torch", {"torch"}),
    ("examples/cnf_2d.py --quick", "matplotlib", {"demo"}),
    ("examples/learn_physics.py --quick", "torchdiffeq", {"torch"}),
    ("examples/odenet_digits.py --quick", "sklearn", {"demo"}),
    ("examples/odenet_digits.py --quick", "torch", {"torch"}),
    ("examples/learn_physics_jax.py --quick", "diffrax", {"jax"}),
    ("examples/robertson_jax.py --quick", "diffrax", {"jax"}),
]


def _named_extras(message: str) -> set[str]:
    """The extras of every ``pip install "symplectic-adjoint[...]"`` in ``message``."""
    found = re.findall(r'pip install "symplectic-adjoint\[([a-z,]+)\]"', message)
    return {extra for group in found for extra in group.split(",")}


def _run_without(blocked: str, command: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    args = command.split()
    target = args[1:] if args[0] == "-m" else args
    return subprocess.run(
        [sys.executable, "-c", _BLOCKING_RUNNER, blocked, *target],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("command", "blocked", "extras"), CASES)
def test_missing_package_names_the_extra(command: str, blocked: str, extras: set[str]) -> None:
    proc = _run_without(blocked, command)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "not installed" in proc.stderr
    assert extras <= _named_extras(proc.stderr), proc.stderr


def test_demo_without_torch_points_to_the_jax_backend() -> None:
    from symplectic_adjoint.demo.extras import BACKENDS, missing

    if missing(BACKENDS["jax"]):
        pytest.skip("the hint names the JAX demo only where jax is installed")
    proc = _run_without("torch", "-m symplectic_adjoint demo")
    assert "python -m symplectic_adjoint demo --backend jax" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ bench without matplotlib


def _fake_rows(backend: str) -> list[dict]:
    from symplectic_adjoint.bench.report import add_ratios

    reference = "backprop" if backend == "torch" else "backprop: RecursiveCheckpoint(N)"
    rows = [
        dict(backend=backend, case="rk4", steps=4, method=method, memory_bytes=mib * 2**20,
             memory_kind="fake", time_s=ms / 1e3, error=0.0, error_f64=0.0)
        for method, mib, ms in [(reference, 2.0, 10.0), ("symplectic states", 0.5, 17.0)]
    ]  # fmt: skip
    return add_ratios(rows, reference=reference)


def _block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``names`` impossible to import for the rest of the test (in this process)."""

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
            if name.partition(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    monkeypatch.setattr(sys, "meta_path", [NotInstalled(), *sys.meta_path])
    for module in list(sys.modules):
        if module.partition(".")[0] in names:
            monkeypatch.delitem(sys.modules, module)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bench_without_matplotlib_keeps_its_tables(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from symplectic_adjoint.bench import cli

    _block(monkeypatch, "matplotlib")
    monkeypatch.setattr(cli, "_backends", lambda choice, prog: [backend])
    monkeypatch.setattr(cli, "_measure", lambda b, args, tick: _fake_rows(b))
    out = tmp_path / "bench"
    assert cli.main(["--quick", "--backend", backend, "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "demo" in _named_extras(captured.err)
    for text in (captured.out, (out / "results.md").read_text()):
        assert "| memory / backprop |" in text and "| time / backprop |" in text
        assert "| symplectic states | 0.50 | 0.250 | 17.0 | 1.70 |" in text
    assert (out / "results.json").stat().st_size > 0
    assert not list(out.glob("*.png"))


def test_bench_all_measures_the_installed_backend_and_says_how_to_add_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from symplectic_adjoint.bench import cli

    _block(monkeypatch, "jax", "matplotlib")
    monkeypatch.setattr(cli.extras, "missing", _missing_except_torch(cli.extras.missing))
    measured = []
    monkeypatch.setattr(cli, "_measure", lambda b, args, tick: measured.append(b) or _fake_rows(b))
    assert cli.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert measured == ["torch"]
    assert "skipping the jax adapter" in err and "jax" in _named_extras(err)


def _missing_except_torch(missing):  # noqa: ANN001, ANN202
    """``extras.missing`` that reports torch as installed (the test fakes its measurement)."""
    return lambda modules: [m for m in missing(modules) if m not in ("torch", "torchdiffeq")]


# ------------------------------------------------------------------ the rest of the CLI


def test_version_and_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    import symplectic_adjoint
    from symplectic_adjoint.__main__ import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"symplectic-adjoint {symplectic_adjoint.__version__}"
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    assert 'symplectic-adjoint = "symplectic_adjoint.__main__:main"' in scripts.split("[", 1)[0]


def test_bench_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    from symplectic_adjoint.bench.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    options = text.split("\noptions:\n", 1)[1]
    entries = {e.split()[0]: e for e in re.split(r"\n  (?=--)", options)[1:]}
    for option in ("--backend", "--ode-steps", "--repeats", "--budget", "--width", "--batch",
                   "--device", "--out"):  # fmt: skip
        assert "default: " in entries[option], entries[option]
    assert len(entries["--no-progress"].split()) > 3  # has a help text
    assert "``" not in text and "default: the protocol" not in text


def test_demo_report_header_has_backprop_as_reference() -> None:
    from symplectic_adjoint.demo.toy2d import MethodRow, Report, format_report

    rows = [
        MethodRow("backprop (torchdiffeq.odeint)", 20 * 2**20, 0.025),
        MethodRow("symplectic, checkpoint='states'", 2**20, 0.044),
    ]
    report = Report(
        backend="torch", solver="rk4", density="moons", iterations=1, final_nll=1.8,
        grad_rel_error=1e-16, grad_reference="backprop", memory_measure="-",
        figure=Path("x.png"), rows=rows, notes=["first line\nsecond line"],
    )  # fmt: skip
    lines = format_report(report).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("gradient method"))
    assert lines[header].split() == ["gradient", "method", "peak", "memory", "/", "backprop",
                                     "time/iter", "/", "backprop"]  # fmt: skip
    assert lines[header + 2].split()[-4:] == ["1.000x", "25.0", "ms", "1.00x"]
    assert lines[header + 3].split()[-4:] == ["0.050x", "44.0", "ms", "1.76x"]
    assert lines[header + 4].startswith("Ratios are to backprop")
    assert "note: first line" in lines and "      second line" in lines


def test_progress_lines_without_a_terminal() -> None:
    from symplectic_adjoint.demo.progress import Progress, choose_mode

    assert choose_mode(stream=io.StringIO()) == "lines"
    assert choose_mode(enabled=False) == "off"
    stream = io.StringIO()
    with Progress("training", 4, mode="lines", every=3600, stream=stream) as bar:
        for i in range(4):
            bar.update(status=f"nll={i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the end (updates in between are due later)
    assert lines[0].startswith("training: 1/4 (25%), ") and lines[0].endswith("nll=0")
    assert lines[1].startswith("training: 4/4 (100%), ") and lines[1].endswith("nll=3")
