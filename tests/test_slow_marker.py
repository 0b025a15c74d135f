"""The ``slow`` marker (root ``conftest.py``): deselected by default, run by ``--runslow``
(with the rest) or by a ``-m`` expression that names it, as written."""

from __future__ import annotations

import pathlib

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (pathlib.Path(__file__).resolve().parents[1] / "conftest.py").read_text()


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    slow: longer-running checks\n")
    pytester.makepyfile(
        """
        import pytest

        def test_quick():
            pass

        @pytest.mark.slow
        def test_long():
            pass

        @pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow)])
        def test_matrix(n):
            pass
        """
    )
    return pytester


@pytest.mark.parametrize(
    "args,passed,deselected",
    [
        ((), 2, 2),
        (("--runslow",), 4, 0),
        (("-m", "slow"), 2, 2),
        (("-m", "not slow"), 2, 2),
        (("-m", "slow", "-k", "matrix"), 1, 3),
    ],
)
def test_slow_tests_deselected_unless_asked_for(
    suite: pytest.Pytester, args: tuple, passed: int, deselected: int
) -> None:
    suite.runpytest_inprocess(*args).assert_outcomes(passed=passed, deselected=deselected)
