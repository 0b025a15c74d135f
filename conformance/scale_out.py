"""Scale-out checks with the engines users already run, as standalone programs.

``python -m conformance.scale_out ddp``
    PyTorch DistributedDataParallel, gloo backend, two CPU processes (spawned, on a
    free localhost port), each with half of the ``mlp`` case's batch, one training step
    with ``adjoint="symplectic"``; compares the all-reduced parameter gradients with one
    process on the whole batch.

``python -m conformance.scale_out jax``
    JAX on two host devices (needs ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
    before jax starts, which is why this runs in its own process): the batch is placed
    with a ``NamedSharding`` across a one-axis mesh and the jitted gradient (with
    ``SymplecticAdjoint``) is partitioned by the compiler along the batch, the
    parameter gradients all-reduced; compares with the unsharded solve. (``shard_map``
    around diffrax fails inside diffrax/equinox's own loops in jax 0.10, with
    RecursiveCheckpointAdjoint as well, so the compiler-partitioned form is used.)

Both print one JSON line (``rel_err``, sizes, or ``skip`` with a reason); the suite
asserts on it. The loss is the ``mlp`` case's ``sum_k <w_k, y(t_k)>`` averaged over
the batch (DDP averages gradients over processes), solved on the constant grid ``h``
so that the steps do not depend on how the batch is split.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from typing import Any

import numpy as np

from conformance.backends import worst_rel_err
from conformance.cases import CASES_BY_NAME, SOLVERS_BY_NAME

CASE = CASES_BY_NAME["mlp"]
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -------------------------------------------------------------------- PyTorch DDP


def _torch_step(rows: slice, ddp: bool, adjoint: str) -> dict[str, np.ndarray]:
    """One backward pass of the batch-mean loss on ``rows`` of the batch."""
    import torch
    import torchdiffeq

    from conformance.backends.torch_backend import FieldModule, loss_of, odeint_ours

    class ODEBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.func = FieldModule(CASE, torch.float64, "cpu")

        def forward(self, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kw: dict[str, Any] = {"method": "rk4", "options": {"step_size": CASE.h}}
            if adjoint == "backprop":
                return torchdiffeq.odeint(self.func, y0, t, **kw)
            return odeint_ours(self.func, y0, t, "states", **kw)

    block = ODEBlock()
    model = torch.nn.parallel.DistributedDataParallel(block) if ddp else block
    y0 = torch.tensor(CASE.y0[rows], dtype=torch.float64)
    t = torch.tensor(CASE.t, dtype=torch.float64)
    ys = model(y0, t)
    n = y0.shape[0]
    (loss_of(ys, (CASE.weights[:, rows],)) / n).backward()
    return {k: p.grad.detach().numpy().copy() for k, p in block.func.params.items()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        per = CASE.y0.shape[0] // WORLD
        grads = _torch_step(slice(rank * per, (rank + 1) * per), ddp=True, adjoint="symplectic")
        part = os.path.join(out_dir, f"rank{rank}.part.npz")
        np.savez(part, **grads)
        os.replace(part, os.path.join(out_dir, f"rank{rank}.npz"))  # whole file or none
        # Both ranks leave together: tearing gloo down while the peer still has a
        # collective in flight aborts the process ("terminate called without an
        # active exception"), seen about one run in three without this barrier.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ddp() -> dict[str, Any]:
    import torch.multiprocessing as mp

    from conformance.backends.torch_backend import ours_available

    reason = ours_available()
    if reason is not None:
        return {"skip": reason}
    assert CASE.y0.shape[0] % WORLD == 0
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"rank{r}.npz") for r in range(WORLD)]
        try:
            mp.spawn(_ddp_worker, args=(_free_port(), tmp), nprocs=WORLD, join=True)
        except mp.ProcessExitedException:
            # gloo can still abort in its teardown after the barrier (seen under heavy
            # load: "terminate called without an active exception"); the gradients were
            # written before it. A rank that died earlier wrote nothing: re-raise.
            if not all(os.path.exists(f) for f in files):
                raise
        ranks = [dict(np.load(f)) for f in files]
    whole = _torch_step(slice(None), ddp=False, adjoint="symplectic")
    backprop = _torch_step(slice(None), ddp=False, adjoint="backprop")
    return {
        "world_size": WORLD,
        "rel_err": worst_rel_err(ranks[0], whole)[0],
        "ranks_differ": worst_rel_err(ranks[1], ranks[0])[0],
        "rel_err_vs_backprop": worst_rel_err(whole, backprop)[0],
    }


# ------------------------------------------------------------------ JAX sharding


def run_jax() -> dict[str, Any]:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from conformance.backends.jax_backend import make_loss, ours_available

    reason = ours_available()
    if reason is not None:
        return {"skip": reason}
    devices = jax.devices()
    if len(devices) < WORLD:
        return {"n_devices": len(devices), "shards": 0, "rel_err": float("inf")}
    loss = make_loss(CASE, SOLVERS_BY_NAME["dopri5@h"], "float64", "states")
    n = CASE.y0.shape[0]

    def batch_mean_grad(p: dict, y0: jax.Array, w: jax.Array) -> dict:
        return jax.grad(lambda p: loss(p, y0, (w,))[0] / n)(p)

    p = {k: jnp.asarray(v) for k, v in CASE.params.items()}
    y0, w = jnp.asarray(CASE.y0), jnp.asarray(CASE.weights)
    whole = jax.jit(batch_mean_grad)(p, y0, w)

    mesh = Mesh(np.array(devices[:WORLD]), ("batch",))
    y0_s = jax.device_put(y0, NamedSharding(mesh, P("batch")))
    w_s = jax.device_put(w, NamedSharding(mesh, P(None, "batch")))
    p_r = jax.device_put(p, NamedSharding(mesh, P()))
    # The compiler partitions the solve along the batch (GSPMD); the parameter
    # gradient then needs a cross-device reduction, which shows up in the program.
    step = jax.jit(batch_mean_grad).lower(p_r, y0_s, w_s).compile()
    sharded = step(p_r, y0_s, w_s)
    as_np = lambda g: {k: np.asarray(v) for k, v in g.items()}  # noqa: E731
    return {
        "n_devices": len(devices),
        "shards": len(y0_s.addressable_shards),
        "shard_rows": [int(s.data.shape[0]) for s in y0_s.addressable_shards],
        "rel_err": worst_rel_err(as_np(sharded), as_np(whole))[0],
        "cross_device_reduction": "all-reduce" in step.as_text(),
    }


def main(argv: list[str]) -> int:
    which = argv[1] if len(argv) > 1 else ""
    runners = {"ddp": run_ddp, "jax": run_jax}
    if which not in runners:
        print(f"usage: python -m conformance.scale_out {{{'|'.join(runners)}}}", file=sys.stderr)
        return 2
    print(json.dumps(runners[which]()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
