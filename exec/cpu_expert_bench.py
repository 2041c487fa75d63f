"""One CPU expert's work in a step, as the executor ran it before and runs it now, side by side.

    python -m aptmoe.exec.cpu_expert_bench [--size S] [--tokens 4] [--micro-batches 4] [--repeats 5]

Before: the forward built an autograd graph into leaves whose gradients are views of a flat
buffer, zeroed at the expert's first use in the step (`FlatParams.ensure_grad`); the
backward was `autograd.backward`, which computes each weight gradient into a new tensor and
adds it to the buffer. Now (`expert_forward`/`expert_backward`): the first
micro-batch's weight gradients are written into the buffer, later ones added by the product.
Each sample takes a different expert of a pool larger than the caches (as in a step, where
an expert's weights come from memory), and runs `--micro-batches` forwards and then as many
backwards of `--tokens` tokens each. Prints the median seconds per expert of each way and
their ratio, measured alternately in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aptmoe.config import moe_model
from aptmoe.exec.blocks import FlatParams, initial_flat, param_shapes
from aptmoe.exec.model import expert_backward, expert_forward, expert
from aptmoe.plan.actions import Block, BlockKind

POOL_BYTES = 1 << 30


def expert_pool(size: str, pool_bytes: int = POOL_BYTES) -> tuple[object, list[FlatParams]]:
    """(the model, its experts drawn until they fill `pool_bytes`, at least two): taken in
    turn, each call finds its weights in memory, not in a cache."""
    model = moe_model(size, 8, num_layers=1)
    shapes = param_shapes(model, BlockKind.EXPERT)
    one = sum(torch.Size(s).numel() for s in shapes) * 4
    return model, [FlatParams(initial_flat(model, Block.expert_of(0, 0), seed), shapes)
                   for seed in range(max(2, -(-pool_bytes // one)))]


def before(fp: FlatParams, xs: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
    fp.set_grad(None)
    outs = []
    for x in xs:
        xin = x.detach().requires_grad_(True)
        fp.ensure_grad()
        outs.append((xin, expert(xin, *fp.leaves)))
    for (xin, out), g in zip(outs, gs):
        torch.autograd.backward(out, g)


def after(fp: FlatParams, xs: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
    fp.set_grad(None)
    saved = [(x, expert_forward(x, *fp.flat_views(), keep=True)[1]) for x in xs]
    for (x, h), g in zip(saved, gs):
        first = fp.start_grad()
        expert_backward(x, h, g, *fp.flat_views(), *fp.grad_views(), first=first)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptmoe.exec.cpu_expert_bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("S", "M", "L"), default="S")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    ns = p.parse_args(argv)
    model, pool = expert_pool(ns.size)
    one = pool[0].flat.numel() * pool[0].flat.element_size()
    g = torch.Generator().manual_seed(0)
    d = model.embedding_dim
    xs = [torch.randn(ns.tokens, d, generator=g) for _ in range(ns.micro_batches)]
    gs = [torch.randn(ns.tokens, d, generator=g) for _ in range(ns.micro_batches)]
    times: dict[str, list[float]] = {"before": [], "after": []}
    at = 0
    for _ in range(ns.repeats + 1):                    # the first round warms up
        for name, fn in (("before", before), ("after", after)):
            fp = pool[at % len(pool)]
            at += 1
            t = time.perf_counter()
            fn(fp, xs, gs)
            times[name].append(time.perf_counter() - t)
    b, a = (statistics.median(times[k][1:]) for k in ("before", "after"))
    print(f"MoE-{ns.size} expert ({one / 2**20:.0f} MiB), {ns.micro_batches} micro-batches of {ns.tokens} tokens, "
          f"{torch.get_num_threads()} threads, median of {ns.repeats}:")
    print(f"  before (autograd, zeroed buffer): {b * 1e3:8.2f} ms")
    print(f"  now (by hand, written then added): {a * 1e3:8.2f} ms   ({b / a:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
