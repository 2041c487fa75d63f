"""Choosing the stage count of the offload schedules (Mobius's partition step).

Mobius cuts the model into more stages than GPUs so that loading the next stage hides
behind computing the current one. Fewer, larger stages mean fewer exposed first loads per
pass but more memory; more, smaller stages expose less at the start but may leave the link
idle if a stage computes faster than the next one loads. We evaluate each even partition
(stages a multiple of the GPUs that divides the layers) with a closed-form estimate of one
rank's step, reject those whose working set does not fit the GPU, and keep the fastest.
The estimate only ranks candidates; the simulator gives the real prediction.
"""

from __future__ import annotations

from aptmoe.config import ConfigError, Pipeline, RunConfig
from aptmoe.costs import CostSource, SharedLinkView
from aptmoe.memory import MemoryModel


def layer_compute_s(cfg: RunConfig, cost: CostSource, direction: str) -> float:
    """One layer, one micro-batch, experts loaded evenly (the popularity-blind view of Mobius)."""
    m, T = cfg.model, cfg.tokens_per_micro_batch
    per_expert = max(1, T * m.top_k // m.num_experts)
    t = cost.gpu_s("a", T, direction) + m.num_experts * cost.gpu_s("e", per_expert, direction)
    if m.is_moe:
        t += cost.gpu_s("g", T, direction)
    return t


def stage_load_s(cfg: RunConfig, cost: CostSource, num_layers: int) -> float:
    m = cfg.model
    # GPUs under one socket load at the same time and share its root (as the policy sees it).
    share_GBps = SharedLinkView(cost, cfg.cluster.gpus_per_socket).h2d().GBps
    return num_layers * m.layer_params * m.dtype_bytes / (share_GBps * 1e9)


def working_set_bytes(cfg: RunConfig, num_stages: int, window: int) -> int:
    mem = MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
    per_stage = list(range(cfg.model.num_layers // num_stages))
    owned_stages = num_stages // cfg.world_size
    # offload schedules recompute from stage-boundary checkpoints (aptmoe.memory)
    return (window * mem.param_bytes(per_stage) + mem.grad_bytes(per_stage)
            + cfg.micro_batches * owned_stages * mem.saved_bytes(per_stage, True)
            + mem.backward_working_bytes(per_stage, True))


def estimate_step_s(cfg: RunConfig, cost: CostSource, num_stages: int, window: int) -> float:
    G, M = cfg.world_size, cfg.micro_batches
    per = cfg.model.num_layers // num_stages
    k = num_stages // G
    load = stage_load_s(cfg, cost, per)
    fwd = M * per * layer_compute_s(cfg, cost, "fwd")
    bwd = M * per * (layer_compute_s(cfg, cost, "bwd") + layer_compute_s(cfg, cost, "fwd"))   # recompute
    passes = [fwd] * (k - 1) + [fwd + bwd] + [bwd] * (k - 1)
    if cfg.schedule.fwd_only:
        passes = [fwd] * k
    # residency i: load may start once residency i - window has finished computing
    load_done, comp_done = [], []
    for i, work in enumerate(passes):
        start_load = max(load_done[-1] if load_done else 0.0,
                         comp_done[i - window] if i >= window else 0.0)
        load_done.append(start_load + load)
        comp_done.append(max(load_done[-1], comp_done[-1] if comp_done else 0.0) + work)
    fill = (G - 1) * (fwd + (0 if cfg.schedule.fwd_only else bwd)) / (M * k)
    return comp_done[-1] + fill


def candidate_stages(cfg: RunConfig) -> list[int]:
    G, L = cfg.world_size, cfg.model.num_layers
    return [S for S in range(G, L + 1, G) if L % S == 0]


def choose_num_stages(cfg: RunConfig, cost: CostSource) -> int:
    window = 1 if cfg.schedule.pipeline is Pipeline.GPIPE_OFFLOAD else 2
    cap = cfg.cluster.gpu_memory_bytes
    fits = [S for S in candidate_stages(cfg) if working_set_bytes(cfg, S, window) <= cap]
    if not fits:
        need = min(working_set_bytes(cfg, S, window) for S in candidate_stages(cfg) or [cfg.world_size])
        raise ConfigError(
            f"{cfg.model.name} does not fit {cap / 1e9:.1f} GB GPUs with any even partition "
            f"(smallest working set {need / 1e9:.1f} GB); use more GPUs, fewer micro-batch tokens "
            f"(--batch_size/--num_chunks) or more layers per stage boundary")
    return min(fits, key=lambda S: (round(estimate_step_s(cfg, cost, S, window), 9), S))
