"""``import symplectic_adjoint`` and every ``symplectic_adjoint.core`` module work without
torch or jax, and never import them (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "torchdiffeq", "jax", "jaxlib", "diffrax", "equinox")

# Runs in the child: optionally make every framework import fail, import the package
# and every core module, take a step, and report which framework modules got loaded.
CHILD = """
import importlib, json, pkgutil, sys

FRAMEWORKS = set({frameworks!r})

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FRAMEWORKS:
            raise ImportError(f"blocked by the test: {{name}}")
        return None

if {block!r}:
    sys.meta_path.insert(0, Blocker())

import symplectic_adjoint
import symplectic_adjoint.core as core

modules = [m.name for m in pkgutil.iter_modules(core.__path__, core.__name__ + ".")]
for m in modules:
    importlib.import_module(m)
import numpy as np
step = core.rk_step(core.get_tableau("dopri5"), lambda i, X: -X, np.ones(2), 0.1)
core.rk_step_vjp(core.get_tableau("dopri5"), lambda i, X, kb, c: (-kb, None, c), np.ones(2),
                 step.X, 0.1)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FRAMEWORKS)
print(json.dumps(dict(modules=modules, loaded=loaded)))
"""


def _run_child(block: bool) -> dict:
    code = CHILD.format(frameworks=FRAMEWORKS, block=block)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_imports_with_torch_and_jax_unavailable():
    report = _run_child(block=True)
    assert "symplectic_adjoint.core.step" in report["modules"]
    assert "symplectic_adjoint.core.interpolants" in report["modules"]
    assert report["loaded"] == []


def test_core_modules_never_import_a_framework_even_when_installed():
    assert _run_child(block=False)["loaded"] == []
