"""Conformance-suite bookkeeping: a one-line summary of what was checked.

Each test item of the suite carries ``backend``, ``case`` and ``device`` parameters
(where they apply); the summary counts the distinct values among the checks that ran
and the passed / failed / skipped checks, e.g.::

    conformance: 9 cases x 3 backends (jax, numpy, torch) x 1 device(s) (cpu):
    1234 checks passed, 0 failed, 5 skipped
"""

from __future__ import annotations

import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent
_AXES = ("case", "backend", "device")
_params: dict[str, dict[str, str]] = {}
_outcomes: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in pathlib.Path(item.fspath).parents:
            callspec = getattr(item, "callspec", None)
            params = dict(callspec.params) if callspec is not None else {}
            _params[item.nodeid] = {k: str(params[k]) for k in _AXES if k in params}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _params:
        return
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped and _outcomes.get(report.nodeid) != "failed":
        _outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed:
        _outcomes.setdefault(report.nodeid, "passed")


def summary_line() -> str | None:
    """The summary, or ``None`` when no conformance check ran."""
    if not _outcomes:
        return None
    ran = [_params[n] for n, o in _outcomes.items() if o != "skipped"]
    seen = {axis: sorted({p[axis] for p in ran if axis in p}) for axis in _AXES}
    counts = {
        o: sum(1 for v in _outcomes.values() if v == o) for o in ("passed", "failed", "skipped")
    }
    cases, backends, devices = seen["case"], seen["backend"], seen["device"]
    return (
        f"conformance: {len(cases)} cases \u00d7 {len(backends)} backends ({', '.join(backends)}) "
        f"\u00d7 {len(devices)} device(s) ({', '.join(devices)}): "
        f"{counts['passed']} checks passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's reporter type
    line = summary_line()
    if line is not None:
        terminalreporter.write_sep("-", "conformance summary")
        terminalreporter.write_line(line)
