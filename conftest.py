"""Shared pytest configuration.

* JAX runs in float64 where a test asks for it: ``jax_enable_x64`` is switched on once
  here (float32 tests pass explicit dtypes, so they are unaffected).
* JAX's compilation caches are cleared after each test module: every compiled XLA CPU
  executable keeps memory mappings, and the whole suite's few thousand programs in one
  process reach the kernel's per-process mapping limit (``vm.max_map_count``, 65,530
  here), where XLA crashes while loading the next program (a segfault in
  ``backend_compile_and_load``, seen at the suite's last JAX test).
* One intra-op thread for torch keeps the 2-core CI machine responsive and results
  deterministic; tests never time anything.
* Tests marked ``slow`` (the full solver x controller matrices; a cheaper case of every
  feature stays unmarked) are deselected by default. ``--runslow`` runs them with the
  rest; a ``-m`` expression that names ``slow`` (``-m slow``, ``-m "jax and slow"``,
  ``-m "not slow"``) is honoured as written; ``tox -e slow`` runs ``-m slow``.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import re
import sys

import pytest

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _release_jax_executables():
    """After each module: drop JAX's compiled programs (see the module docstring)."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        action="append",
        default=None,
        help="devices to run device-parametrised tests on (default: cpu, plus cuda if seen)",
    )
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run tests marked slow (deselected by default; or select them with -m slow)",
    )


def _slow_selected_explicitly(config: pytest.Config) -> bool:
    """``--runslow``, or a ``-m`` expression that mentions ``slow`` (then pytest's own
    marker selection decides, e.g. ``-m slow`` runs only the slow tests)."""
    if config.getoption("--runslow"):
        return True
    return re.search(r"\bslow\b", config.getoption("markexpr", "") or "") is not None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``slow`` tests unless asked for (see the module docstring)."""
    if _slow_selected_explicitly(config):
        return
    keep, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") is not None else keep).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = keep


@functools.cache
def _torch_sees_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def _jax_sees_gpu() -> bool:
    if importlib.util.find_spec("jax") is None:
        return False
    import jax

    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def available_devices(config: pytest.Config) -> list[str]:
    """Devices for ``device``-parametrised tests: ``cpu`` always, ``cuda`` when torch or
    jax sees a GPU or ``--device cuda`` asks for it (tests skip a backend that lacks it)."""
    requested = config.getoption("--device") or []
    devices = ["cpu"]
    for dev in requested:
        if dev not in devices:
            devices.append(dev)
    if "cuda" not in devices and (_torch_sees_cuda() or _jax_sees_gpu()):
        devices.append("cuda")
    return devices


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise a ``device`` argument over :func:`available_devices`, unless the test
    parametrises ``device`` itself."""
    if "device" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        names = names.split(",") if isinstance(names, str) else names
        if "device" in [n.strip() for n in names]:
            return
    metafunc.parametrize("device", available_devices(metafunc.config))
