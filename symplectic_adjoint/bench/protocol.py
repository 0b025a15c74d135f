"""The benchmark's problem sizes (README, measurement protocol), importable without torch or jax.

The command line shows them as defaults; :mod:`.torch_bench` and :mod:`.jax_bench` build
their problems from them.
"""

from __future__ import annotations

#: PyTorch: MLP 16 -> WIDTH -> WIDTH -> 16 (tanh), a batch of BATCH states, rk4 with these
#: step counts on [0, 1], plus one dopri5 case at tolerance 1e-6 on [0, 10].
TORCH_WIDTH, TORCH_BATCH = 64, 128
TORCH_STEPS = (50, 100, 200)
#: JAX: Tsit5 with constant steps, y of shape BATCH x DIM, MLP width WIDTH.
JAX_BATCH, JAX_DIM, JAX_WIDTH = 256, 32, 128
JAX_STEPS = (50, 100, 200, 400)
#: Checkpoint budgets c (states kept) measured besides "states" and "stages".
BUDGETS = (10,)
#: Timed runs per method (median); the protocol asks for at least 5.
REPEATS = 7
#: ``--quick``: a smoke test in seconds.
QUICK_TORCH_STEPS, QUICK_JAX_STEPS, QUICK_BUDGETS, QUICK_REPEATS = (4, 8), (4,), (2,), 2

#: ``--suite stiff`` (issues 13 and 14): a stiff neural ODE ``f(y) = mlp(y) - STIFF_DECAY y``
#: on a state of STIFF_BATCH x STIFF_DIM, MLP STIFF_DIM -> STIFF_WIDTH -> STIFF_WIDTH ->
#: STIFF_DIM (tanh) applied row-wise, on [0, 1].
STIFF_BATCH, STIFF_DIM, STIFF_WIDTH, STIFF_DECAY = 64, 8, 64, 1000.0
STIFF_STEPS = (50, 200, 800)
#: torch: Newton's relative and absolute tolerance (float64; both methods, all N).
STIFF_NEWTON_TOL = 1e-10
#: jax: the stiff suite's budget row, ``SymplecticAdjoint(checkpoint=STIFF_JAX_BUDGET)``
#: (the same ``c`` at every N: memory flat in N, replays growing with it).
STIFF_JAX_BUDGET = 40
#: ``--suite budget`` (issue 16): ``checkpoint=BUDGET_C`` at large N on a tiny field.
BUDGET_C, BUDGET_DIM = 10, 16
BUDGET_STEPS = (1279, 2559, 5119, 10239, 20000)
#: ``--suite features`` (issue 12, jax): the event and dense-output programs at N steps
#: (the protocol's Tsit5 field; the memory target is stated at N = 400).
FEATURE_STEPS = (400,)
QUICK_STIFF_STEPS, QUICK_BUDGET_STEPS, QUICK_FEATURE_STEPS = (4,), (40,), (8,)
