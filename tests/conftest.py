"""Shared helpers for the core tests: tiny configurations that build in microseconds.

Test modules import them directly (`from conftest import make_tiny_config`): hypothesis
strategies need plain functions, not fixtures.
"""

from __future__ import annotations

from aptmoe.config import ClusterConfig, ModelConfig, Pipeline, PopularityConfig, RunConfig, ScheduleConfig, TrainConfig
from aptmoe.memory import MemoryModel


def make_tiny_config(pipeline: str | Pipeline = "Mobius", *, ranks: int = 2, stages: int | None = 4,
                     micro_batches: int = 2, layers: int | None = None, experts: int = 4, fwd_only: bool = False,
                     inter_stage_only: bool = False, width: int = 64, seq_length: int = 8,
                     gpu_memory_bytes: int = 40 * 10**9, recompute: str = "auto") -> RunConfig:
    """A small MoE run: `layers` defaults to one per stage, micro-batches of 2 sequences."""
    pipeline = Pipeline.parse(pipeline) if isinstance(pipeline, str) else pipeline
    if pipeline is Pipeline.GPIPE:
        stages = ranks if stages is None else stages
    if layers is None:
        layers = stages if stages is not None else 4 * ranks
    return RunConfig(
        model=ModelConfig(name="tiny", embedding_dim=width, hidden_dim=2 * width, num_heads=4, num_layers=layers,
                          num_experts=experts, seq_length=seq_length),
        cluster=ClusterConfig(gpus_per_node=ranks, topo="C1+G1", gpu_memory_bytes=gpu_memory_bytes),
        train=TrainConfig(batch_size=2 * micro_batches, num_chunks=micro_batches),
        schedule=ScheduleConfig(pipeline=pipeline, num_stages=stages, fwd_only=fwd_only,
                                inter_stage_only=inter_stage_only, recompute=recompute),
        popularity=PopularityConfig(gini=0.5 if experts >= 2 else 1.0),
    )


def memory_of(cfg: RunConfig) -> MemoryModel:
    return MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
