"""Shared pytest configuration.

* JAX runs in float64 where a test asks for it: ``jax_enable_x64`` is switched on once
  here (float32 tests pass explicit dtypes, so they are unaffected).
* One intra-op thread for torch keeps the 2-core CI machine responsive and results
  deterministic; tests never time anything.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        action="append",
        default=None,
        help="devices to run device-parametrised tests on (default: cpu, plus cuda if seen)",
    )
