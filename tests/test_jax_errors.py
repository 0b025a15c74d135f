"""What SymplecticAdjoint refuses, and that it says so at trace time naming an alternative."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
optx = pytest.importorskip("optimistix")

import jax.numpy as jnp  # noqa: E402

from symplectic_adjoint import SymplecticAdjoint  # noqa: E402

pytestmark = pytest.mark.jax

TERM = diffrax.ODETerm(lambda t, y, args: -args * y)
Y0 = jnp.array([1.0, 2.0])


def solve(*, solver=None, terms=TERM, adjoint=None, **kwargs):
    kwargs.setdefault("dt0", 0.1)
    kwargs.setdefault("max_steps", 16)
    return diffrax.diffeqsolve(
        terms,
        solver or diffrax.Tsit5(),
        0.0,
        1.0,
        y0=Y0,
        args=0.5,
        adjoint=adjoint or SymplecticAdjoint(),
        **kwargs,
    )


def test_checkpoint_values():
    assert SymplecticAdjoint().checkpoint == "states"
    assert SymplecticAdjoint(checkpoint="stages").checkpoint == "stages"
    assert SymplecticAdjoint(checkpoint=1).checkpoint == 1
    assert SymplecticAdjoint(checkpoint=30).checkpoint == 30
    for bad in ("state", 0, -2, 2.0, True, None):
        with pytest.raises(ValueError, match="'states'.*'stages'.*int >= 1"):
            SymplecticAdjoint(checkpoint=bad)


@pytest.mark.parametrize(
    "solver, match",
    [
        (diffrax.Sil3(), "Kvaerno3/4/5.*not one of them.*RecursiveCheckpointAdjoint"),
        (diffrax.HalfSolver(diffrax.Euler()), "wrapped solver.*RecursiveCheckpointAdjoint"),
        (diffrax.LeapfrogMidpoint(), "not one.*RecursiveCheckpointAdjoint"),
    ],
    ids=["Sil3", "HalfSolver", "LeapfrogMidpoint"],
)
def test_refused_solvers(solver, match):
    controller = diffrax.ConstantStepSize()
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        controller = diffrax.PIDController(rtol=1e-3, atol=1e-3)
    terms = diffrax.MultiTerm(TERM, TERM) if isinstance(solver, diffrax.Sil3) else TERM
    with pytest.raises(NotImplementedError, match=match):
        solve(solver=solver, terms=terms, stepsize_controller=controller)


def test_refused_sde():
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-2, shape=(2,), key=jax.random.PRNGKey(0))
    terms = diffrax.MultiTerm(TERM, diffrax.ControlTerm(lambda t, y, args: 0.1 * y, bm))
    with pytest.raises(NotImplementedError, match="SDE.*RecursiveCheckpointAdjoint"):
        solve(solver=diffrax.Heun(), terms=terms)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_steps=None), ValueError, "max_steps=None.*checkpoints"),
        (
            # Root-finder events are supported without `steps`/`dense` saves only.
            dict(
                event=diffrax.Event(
                    lambda t, y, args, **kw: y[0] - 0.5,
                    root_finder=optx.Newton(rtol=1e-8, atol=1e-8),
                ),
                saveat=diffrax.SaveAt(steps=True),
            ),
            NotImplementedError,
            "root_finder.*RecursiveCheckpointAdjoint",
        ),
    ],
    ids=["max_steps_none", "event_root_finder"],
)
def test_refused_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        solve(**kwargs)


def test_unsupported_diffrax_version_is_refused_at_import(monkeypatch):
    import importlib

    from symplectic_adjoint.adapters import _diffrax_compat

    assert diffrax.__version__ in _diffrax_compat.SUPPORTED_DIFFRAX
    monkeypatch.setattr(diffrax, "__version__", "0.6.0")
    with pytest.raises(ImportError, match=r"supports diffrax 0\.7\.2.*0\.6\.0 is installed"):
        importlib.reload(_diffrax_compat)
    monkeypatch.undo()
    importlib.reload(_diffrax_compat)  # the module stays importable for later tests


def test_private_names_live_in_one_module():
    import pathlib

    import symplectic_adjoint.adapters as adapters

    folder = pathlib.Path(adapters.__file__).parent
    for path in folder.glob("*.py"):
        if path.name == "_diffrax_compat.py":
            continue
        text = path.read_text()
        for private in ("from diffrax._", "import diffrax._", "equinox.internal"):
            assert private not in text, (path.name, private)
