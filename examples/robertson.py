"""Fit Robertson's stiff chemical kinetics to noisy data with the symplectic adjoint.

    y1' = -k1 y1 + k3 y2 y3,   y2' = k1 y1 - k3 y2 y3 - k2 y2^2,   y3' = k2 y2^2,

true rates ``k = (0.04, 3e7, 1e4)``, ``y(0) = (1, 0, 0)``, observed at log-spaced times in
``[1e-4, 1e5]`` with 0.1% multiplicative noise. The rates are log-parametrised, started
a factor ~1.5-2 off, and fitted by L-BFGS on the gradients of ``odeint(...,
method="kvaerno5", adjoint="symplectic")`` (exact for the discrete solve, one graph of
the tiny field alive at a time). Run ``python examples/robertson.py`` (measured: 17
loss/gradient evaluations, 35 s on one CPU core, every rate within 0.06%) or ``--quick``
for a smoke test of a few seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from symplectic_adjoint import odeint

TRUE_K = (0.04, 3e7, 1e4)


class Robertson(torch.nn.Module):
    def __init__(self, log_k: torch.Tensor) -> None:
        super().__init__()
        self.log_k = torch.nn.Parameter(log_k)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k1, k2, k3 = self.log_k.exp().unbind()
        y1, y2, y3 = y.unbind(-1)
        r1, r2, r3 = k1 * y1, k2 * y2 * y2, k3 * y2 * y3
        return torch.stack([-r1 + r3, r1 - r3 - r2, r2], dim=-1)


def solve(func: Robertson, t: torch.Tensor, adjoint: str = "symplectic") -> torch.Tensor:
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=t.dtype)
    t0 = torch.cat([torch.zeros(1, dtype=t.dtype), t])
    ys = odeint(func, y0, t0, rtol=1e-5, atol=1e-10, method="kvaerno5", adjoint=adjoint,
                options=dict(first_step=1e-6))  # fmt: skip
    return ys[1:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few iterations, short horizon")
    parser.add_argument("--iters", type=int, default=15, help="L-BFGS iterations")
    parser.add_argument(
        "--adjoint",
        choices=("symplectic", "backprop"),
        default="symplectic",
        help="gradient method ('backprop': autograd through the Newton iterations)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dt = torch.float64
    t_end, n_obs, iters = (1e2, 12, 2) if args.quick else (1e5, 40, args.iters)
    t = torch.logspace(-4, torch.log10(torch.tensor(t_end)).item(), n_obs, dtype=dt)

    with torch.no_grad():
        truth = solve(Robertson(torch.tensor(TRUE_K, dtype=dt).log()), t)
    data = truth * (1 + 1e-3 * torch.randn_like(truth))
    scale = data.abs().amax(dim=0)  # y2 is ~1e-5: weigh the components alike

    func = Robertson(torch.tensor(TRUE_K, dtype=dt).log() + torch.tensor([0.5, -0.4, 0.6]))
    opt = torch.optim.LBFGS(func.parameters(), lr=1.0, max_iter=iters,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)  # fmt: skip
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = (((solve(func, t, args.adjoint) - data) / scale) ** 2).mean()
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    elapsed = time.perf_counter() - start
    k = func.log_k.detach().exp()
    rel = (k / torch.tensor(TRUE_K, dtype=dt) - 1).abs()
    for name, got, true, r in zip(("k1", "k2", "k3"), k.tolist(), TRUE_K, rel.tolist(),
                                  strict=True):  # fmt: skip
        print(f"{name}: fitted {got:.6g}, true {true:.6g}, relative error {r:.2e}")
    print(f"{calls} loss/gradient evaluations in {elapsed:.1f} s")
    return {"k": k, "rel_error": rel, "calls": calls, "seconds": elapsed}


if __name__ == "__main__":
    main()
