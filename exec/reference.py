"""The plain single-process PyTorch reference the executor must equal (issue 5, §9).

`MoEModel` trained by ordinary autograd: the same data (`source.batch(step)`), the same
routing per (layer, micro-batch) as every rank builds it (`routing_from_counts` with
`routing_generator`), the loss averaged over micro-batches, and Adam per parameter tensor.
No pipeline, no offload, no CPU experts: whatever the executor does to schedule the work,
its losses and parameters must come out the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
            step_losses.append(float(loss.detach()))
        opt.step()
        losses.append(step_losses)
    return ReferenceRun(losses, block_params(model))


@dataclass
class Agreement:
    """How far an executor run is from the reference: worst relative errors."""

    loss: float          # max over steps and micro-batches of |loss - ref| / |ref|
    params: float        # max over blocks and ends of ||p - ref|| / ||ref|| (ends at zero: absolute)
    worst_param: str

    def within(self, tol: float) -> bool:
        return self.loss <= tol and self.params <= tol


def load_saved_params(folder, pipeline: str) -> dict[str, torch.Tensor]:
    """The parameters `aptmoe-run --save-params` wrote, every rank's merged."""
    files = sorted(Path(folder).glob(f"params-{pipeline}-rank*.pt"))
    if not files:
        raise FileNotFoundError(f"no params-{pipeline}-rank*.pt in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(torch.load(f, map_location="cpu"))
    return out


def agreement(ref: ReferenceRun, losses: list[list[float]], params: dict[str, torch.Tensor]) -> Agreement:
    if len(losses) != len(ref.losses):
        raise ValueError(f"{len(losses)} steps of losses against {len(ref.losses)} of the reference")
    loss_err = max((abs(a - b) / abs(b) for got, want in zip(losses, ref.losses) for a, b in zip(got, want, strict=True)),
                   default=0.0)
    missing = sorted(set(ref.params) - set(params))
    if missing:
        raise ValueError(f"the run saved no parameters for {', '.join(missing[:5])}")
    worst, worst_name = 0.0, ""
    for name, want in ref.params.items():
        diff = (params[name].float() - want.float()).norm().item()
        scale = want.float().norm().item()
        err = diff / scale if scale > 0 else diff
        if err > worst:
            worst, worst_name = err, name
    return Agreement(loss_err, worst, worst_name)
