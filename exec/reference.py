"""The plain single-process PyTorch reference the executor must equal (issue 5, §9).

`MoEModel` trained by ordinary autograd: the same data (`source.batch(step)`), the same
routing per (layer, micro-batch) as every rank builds it (`routing_from_counts` with
`routing_generator`), the loss averaged over micro-batches, and Adam per parameter tensor.
No pipeline, no offload, no CPU experts: whatever the executor does to schedule the work,
its losses and parameters must come out the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from aptmoe.exec.model import MoEModel, routing_from_counts, routing_generator

from aptmoe.config import RunConfig
from aptmoe.popularity import popularity_from_config


@dataclass
class ReferenceRun:
    losses: list[list[float]]                  # per step, per micro-batch
    params: dict[str, torch.Tensor]            # block or end name -> flat parameters after training


def block_params(model: MoEModel) -> dict[str, torch.Tensor]:
    """Every block's parameters flattened in `params()` order, keyed by the block's printed name,
    plus the ends: the form the executor saves its parameters in."""
    out = {str(b): torch.cat([p.detach().reshape(-1) for p in model.block_module(b).params()]).cpu()
           for b in model.blocks()}
    out.update(embedding=model.embedding.detach().cpu().reshape(-1), norm_w=model.norm.weight.detach().cpu(),
               norm_b=model.norm.bias.detach().cpu(), head=model.head.detach().cpu().reshape(-1))
    return out


def train_reference(cfg: RunConfig, source, steps: int, *, device: str = "cpu") -> ReferenceRun:
    m = cfg.model
    model = MoEModel(m, seed=cfg.train.seed, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=False)
    pop = popularity_from_config(cfg)
    M, b, T = cfg.micro_batches, cfg.micro_batch_size, cfg.tokens_per_micro_batch
    losses = []
    for i in range(steps):
        counts = pop.iteration(i).counts
        batch = source.batch(i, cfg.train.batch_size).to(device)
        opt.zero_grad(set_to_none=True)
        step_losses = []
        for mb in range(M):
            routing = [routing_from_counts(counts[layer, mb], T, m.top_k,
                                           routing_generator(cfg.train.seed, i, layer, mb), device=device)
                       if m.is_moe else None for layer in range(m.num_layers)]
            loss = model(batch[mb * b:(mb + 1) * b], routing)
            (loss / M).backward()
            step_losses.append(float(loss))
        opt.step()
        losses.append(step_losses)
    return ReferenceRun(losses, block_params(model))
