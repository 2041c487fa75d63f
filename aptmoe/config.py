"""Typed configuration: model, cluster, training and schedule.

Every dataclass validates itself when built and raises `ConfigError` (a `ValueError`)
whose message names the field and says what would work. Presets are functions; the
seed artifact's command-line flags map onto these fields in one place, `aptmoe.flags`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message says what to change."""


class Pipeline(str, Enum):
    GPIPE = "GPipe"
    GPIPE_OFFLOAD = "GPipeOffload"
    MOBIUS = "Mobius"
    APTMOE = "APTMoE"

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        for p in cls:
            if p.value.lower() == text.lower():
                return p
        raise ConfigError(f"--pipeline {text!r} is unknown; use one of {', '.join(p.value for p in cls)}")


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
VOCAB_SIZE = 256        # every model's token ids: a byte-level tokenizer (the executor's synthetic data)
# The unit in which the issuing thread's toll of a capped copy is calibrated and charged
# (calibration/issue_tolls.py `chunk_s`, sim/issuing.py): a capped link woke a thread per
# 4 MiB until session 12; its pacing thread now wakes per landing (exec/link.py), and the
# figure per chunk is whatever capping still costs per byte.
LINK_CHUNK_BYTES = 4 << 20


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-like MoE Transformer as in the paper (Table I): per layer, an attention block
    (MHA with its norms), a gate and E expert FFNs of width h."""

    name: str = "custom"
    embedding_dim: int = field(default=1024, metadata={"help": "model width d"})
    hidden_dim: int = field(default=4096, metadata={"help": "expert FFN width h"})
    num_heads: int = field(default=32, metadata={"help": "attention heads"})
    num_layers: int = field(default=64, metadata={"help": "Transformer layers in the whole model"})
    num_experts: int = field(default=8, metadata={"help": "experts per layer, E"})
    top_k: int = field(default=1, metadata={"help": "experts per token (the seed's simulated gate uses 1)"})
    seq_length: int = field(default=128, metadata={"help": "tokens per sequence"})
    dtype: str = field(default="fp32", metadata={"help": "parameter and activation dtype"})
    is_moe: bool = field(default=True, metadata={"help": "MoE layers (true) or one dense FFN (false)"})
    vocab_size: int = field(default=VOCAB_SIZE, metadata={"help": "token ids; 256 = byte-level tokenizer"})

    def __post_init__(self) -> None:
        _check_positive(self, "embedding_dim", "hidden_dim", "num_heads", "num_layers",
                        "num_experts", "top_k", "seq_length", "vocab_size")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
        if self.embedding_dim % self.num_heads:
            ok = [h for h in _divisors(self.embedding_dim) if h <= 128][-4:]
            raise ConfigError(f"--num_heads {self.num_heads} does not divide --embedding_dim "
                              f"{self.embedding_dim}; try {', '.join(map(str, ok))}")
        if not self.is_moe and (self.num_experts != 1 or self.top_k != 1):
            raise ConfigError("a dense model (--is_moe=False) has one FFN: num_experts and top_k must be 1")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k {self.top_k} is larger than --num_experts {self.num_experts}; "
                              f"use top_k <= {self.num_experts}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # Parameter counts per block. Norm weights are counted with attention; biases are not
    # used (the paper's count 4*d^2 + 2*E*d*h per layer has none).
    @property
    def attn_params(self) -> int:
        d = self.embedding_dim
        return 4 * d * d + 4 * d  # Wq, Wk, Wv, Wo + two LayerNorms (weight, bias)

    @property
    def gate_params(self) -> int:
        return self.embedding_dim * self.num_experts if self.is_moe else 0

    @property
    def expert_params(self) -> int:
        return 2 * self.embedding_dim * self.hidden_dim

    @property
    def layer_params(self) -> int:
        return self.attn_params + self.gate_params + self.num_experts * self.expert_params

    @property
    def embedding_params(self) -> int:
        # token embedding, final LayerNorm and LM head; kept resident by their ranks (small at vocab 256)
        return 2 * self.vocab_size * self.embedding_dim + 2 * self.embedding_dim

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params

    @property
    def paper_params(self) -> int:
        """The paper's Table I formula: layers * (E * 2dh + 4d^2)."""
        d, h = self.embedding_dim, self.hidden_dim
        return self.num_layers * (self.num_experts * 2 * d * h + 4 * d * d)

    def block_bytes(self, kind: str) -> int:
        params = {"a": self.attn_params, "g": self.gate_params, "e": self.expert_params}[kind]
        return params * self.dtype_bytes

    def with_(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Paper Table I: S/M/L widths, 32 heads, 64 layers.
_WIDTHS = {"S": (1024, 4096), "M": (2048, 8192), "L": (4096, 14336)}


def moe_model(size: str, experts: int, *, num_layers: int = 64, **overrides) -> ModelConfig:
    """A Table I model, e.g. ``moe_model("S", 16)`` is MoE-S-16."""
    if size not in _WIDTHS:
        raise ConfigError(f"model size {size!r} is unknown; use S, M or L")
    d, h = _WIDTHS[size]
    fields = dict(name=f"MoE-{size}-{experts}", embedding_dim=d, hidden_dim=h, num_heads=32,
                  num_layers=num_layers, num_experts=experts)
    fields.update(overrides)
    return ModelConfig(**fields)


PAPER_MODELS = ("MoE-S-8", "MoE-S-16", "MoE-S-64", "MoE-M-8", "MoE-M-16", "MoE-L-8")


def model_preset(name: str, **overrides) -> ModelConfig:
    """`MoE-S-16` style names (Table I, 64 layers)."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "MoE" or not parts[2].isdigit():
        raise ConfigError(f"model preset {name!r} is unknown; use MoE-<S|M|L>-<experts>, e.g. MoE-S-16")
    return moe_model(parts[1], int(parts[2]), **overrides)


# --------------------------------------------------------------------------- cluster


TOPOLOGIES = {"C1+G1": 1, "C1+G2": 2, "C1+G4": 4}


def auto_host_cores(cores_per_rank: int, on_gpu: bool) -> int:
    """The cores `--host-cores auto` keeps for a rank's host threads. A GPU rank's main
    thread issues every kernel and its copy and offload threads drive the links; when the
    CPU experts' and Adam's OpenMP threads take every core, those threads queue behind them
    (and behind their spin-waits after each parallel region), and the GPU waits for its host.
    One core for the issuing thread and one for the copy threads, where the rank has cores
    to spare; none on CPU ranks, whose main thread computes with the same pool."""
    if not on_gpu:
        return 0
    return 2 if cores_per_rank >= 8 else 1 if cores_per_rank >= 4 else 0


@dataclass(frozen=True)
class ClusterConfig:
    """GPUs, the CPU sockets that serve them, memories and links.

    `gpus_per_socket` comes from the paper's topology names: `C1+G2` means one CPU socket
    serves two GPUs, which share its PCIe root and its cores (each GPU process is bound to
    cores_per_socket / gpus_per_socket cores).
    """

    nodes: int = 1
    gpus_per_node: int = 4
    topo: str = "C1+G2"
    cores_per_socket: int = 28
    gpu_memory_bytes: int = 40 * 10**9
    host_memory_bytes: int = 1024 * 10**9
    intra_node_link: str = field(default="pcie", metadata={"help": "pcie or nvlink"})
    inter_node_link: str = field(default="ib", metadata={"help": "InfiniBand"})
    link_bandwidth_GBps: float | None = field(
        default=None, metadata={"help": "cap on each GPU's host link (GB/s); None = native"})
    host_cores: int = field(default=0, metadata={
        "help": "cores of each rank kept for its host threads (issuing kernels, copies) and out of "
                "the CPU experts' and Adam's reach; 0 = all cores do CPU work, as in the paper"})

    def __post_init__(self) -> None:
        _check_positive(self, "nodes", "gpus_per_node", "cores_per_socket")
        if self.topo not in TOPOLOGIES:
            raise ConfigError(f"--topo {self.topo!r} is unknown; use one of {', '.join(TOPOLOGIES)}")
        if self.gpus_per_socket > self.gpus_per_node:
            raise ConfigError(
                f"--topo {self.topo} puts {self.gpus_per_socket} GPUs on one socket but a node has "
                f"{self.gpus_per_node}; use a topology with at most {self.gpus_per_node} GPUs per socket "
                f"or more GPUs per node")
        if self.gpus_per_node % self.gpus_per_socket:
            raise ConfigError(f"{self.gpus_per_node} GPUs per node cannot be split into sockets of "
                              f"{self.gpus_per_socket} ({self.topo}); choose --gpus as a multiple of it")
        if self.cores_per_socket < self.gpus_per_socket:
            raise ConfigError(f"{self.cores_per_socket} cores cannot be shared by {self.gpus_per_socket} GPUs")
        if self.gpu_memory_bytes <= 0 or self.host_memory_bytes <= 0:
            raise ConfigError("GPU and host memory must be positive")
        if self.intra_node_link not in ("pcie", "nvlink"):
            raise ConfigError(f"intra_node_link {self.intra_node_link!r} is unknown; use pcie or nvlink")
        if self.link_bandwidth_GBps is not None and not self.link_bandwidth_GBps > 0:
            raise ConfigError(f"--link-bandwidth must be positive GB/s, got {self.link_bandwidth_GBps}")
        if not isinstance(self.host_cores, int) or isinstance(self.host_cores, bool) \
                or not 0 <= self.host_cores < self.cores_per_rank:
            raise ConfigError(f"--host-cores {self.host_cores!r} must be a whole number from 0 to "
                              f"{self.cores_per_rank - 1}: each rank has {self.cores_per_rank} cores and its CPU "
                              f"work needs at least one")

    @property
    def gpus_per_socket(self) -> int:
        return TOPOLOGIES[self.topo]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def cores_per_rank(self) -> int:
        return self.cores_per_socket // self.gpus_per_socket

    @property
    def worker_cores(self) -> int:
        """The cores (and torch threads) that run a rank's CPU experts and Adam."""
        return self.cores_per_rank - self.host_cores

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def socket_of(self, rank: int) -> int:
        """Global socket index: ranks under one socket share its PCIe root and cores."""
        return rank // self.gpus_per_socket


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = field(default=64, metadata={"help": "global batch, in sequences"})
    num_chunks: int | None = field(default=None, metadata={"help": "micro-batches; None = number of GPUs"})
    num_warmup_steps: int = 2
    num_training_steps: int = 2
    seed: int = 42
    lr: float = 1e-4

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "num_training_steps")
        if self.num_chunks is not None:
            _check_positive(self, "num_chunks")
        if self.num_warmup_steps < 0:
            raise ConfigError("--num_warmup_steps must be >= 0")

    def micro_batches(self, world_size: int) -> int:
        return self.num_chunks if self.num_chunks is not None else world_size


# --------------------------------------------------------------------------- popularity


@dataclass(frozen=True)
class PopularityConfig:
    """Controls the expert-popularity simulator that replaces the gate (DESIGN §1)."""

    gini: float = field(default=0.6, metadata={"help": "target G = mean over layers of sum_e p_e^2"})
    persistence: float = field(default=0.73, metadata={
        "help": "expected overlap of the least-used half of experts between consecutive iterations"})
    predictor_accuracy: float = field(default=0.85, metadata={"help": "per-token accuracy of the predictor gate"})
    replay: str | None = field(default=None, metadata={"help": "CSV of recorded token counts to replay"})

    def __post_init__(self) -> None:
        if not 0 < self.gini <= 1:
            raise ConfigError(f"--gini {self.gini} is outside (0, 1]")
        if not 0 <= self.persistence <= 1:
            raise ConfigError(f"persistence {self.persistence} is outside [0, 1]")
        if not 0 <= self.predictor_accuracy <= 1:
            raise ConfigError(f"predictor accuracy {self.predictor_accuracy} is outside [0, 1]")


# --------------------------------------------------------------------------- schedule

RECOMPUTE_MODES = ("auto", "none", "all", "except_last")


# Blocks a GPU rank's issuing thread may issue beyond the last one its GPU has finished. The
# thread issues a block's kernels and goes on to the next while the GPU runs them in order; when
# the compute stream waits for a message, the blocks issued meanwhile wait in the driver's
# queue, and once it is full the driver blocks the next call until the GPU frees room. The
# call that blocked was a marker's record, and torch's Event.record keeps the GIL: in the
# regime's Mobius on two H200s the main thread sat in cudaEventRecordWithFlags for 28-197 ms
# at a time, every other thread of its rank with it (torch.profiler, docs/measured/session29).
# The queue was full with 151-232 GPU operations pending on the compute stream; a block makes
# about 6 (18,145 launches, memsets and copies over one step's 3,000 blocks) and 2-3 markers
# besides: 16 blocks stay well short of it.
AHEAD_BLOCKS = 16


@dataclass(frozen=True)
class ScheduleConfig:
    pipeline: Pipeline = Pipeline.GPIPE
    num_stages: int | None = field(default=None, metadata={
        "help": "pipeline stages; None = GPUs for GPipe, chosen by the cost model for Mobius/APTMoE"})
    fwd_only: bool = field(default=False, metadata={"help": "forward passes only"})
    inter_stage_only: bool = field(default=False, metadata={"help": "only the inter-stage loading phase"})
    max_copies_in_flight: int = field(default=2, metadata={
        "help": "copies launched on the load stream at once (a launched copy cannot be preempted)"})
    pinned: bool = field(default=True, metadata={"help": "host parameters in pinned memory"})
    recompute: str = field(default="auto", metadata={
        "help": "activation checkpointing: auto (except_last for GPipe, all for the offload schedules), "
                "none, all, except_last"})
    ahead_blocks: int = field(default=AHEAD_BLOCKS, metadata={
        "help": "blocks a GPU rank's issuing thread may issue beyond the last one its GPU has finished; 0: no bound"})

    def __post_init__(self) -> None:
        if not isinstance(self.pipeline, Pipeline):
            object.__setattr__(self, "pipeline", Pipeline.parse(str(self.pipeline)))
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"--recompute {self.recompute!r} is unknown; use one of {', '.join(RECOMPUTE_MODES)}")
        if self.num_stages is not None:
            _check_positive(self, "num_stages")
        _check_positive(self, "max_copies_in_flight")
        if not (isinstance(self.ahead_blocks, int) and self.ahead_blocks >= 0):
            raise ConfigError(f"--ahead-blocks {self.ahead_blocks!r} must be a whole number of blocks, 0 or more "
                              "(0: no bound)")


# --------------------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)

    def __post_init__(self) -> None:
        m, c, t, s = self.model, self.cluster, self.train, self.schedule
        G = c.world_size
        M = self.micro_batches
        if M > t.batch_size:
            raise ConfigError(f"--num_chunks {M} is larger than --batch_size {t.batch_size}; "
                              f"use at most {t.batch_size} micro-batches")
        if t.batch_size % M:
            ok = [k for k in _divisors(t.batch_size) if k <= 4 * G][-4:]
            raise ConfigError(f"--batch_size {t.batch_size} is not divisible by {M} micro-batches; "
                              f"try --num_chunks {', '.join(map(str, ok))}")
        lo = 1 / m.num_experts
        hi = 1 / m.top_k
        if m.is_moe and not (lo - 1e-9 <= self.popularity.gini <= hi + 1e-9):
            raise ConfigError(f"--gini {self.popularity.gini} is outside the feasible range "
                              f"[1/E, 1/k] = [{lo:.4g}, {hi:.4g}] for {m.num_experts} experts, top-{m.top_k}")
        S = s.num_stages
        if S is not None:
            if S > m.num_layers:
                raise ConfigError(f"--num_stages {S} is more than --num_layers {m.num_layers}; "
                                  f"use at most {m.num_layers}")
            if m.num_layers % S:
                ok = [k for k in _divisors(m.num_layers) if k % G == 0 and (s.pipeline is not Pipeline.GPIPE or k == G)][:4]
                raise ConfigError(f"--num_stages {S} does not divide --num_layers {m.num_layers}; "
                                  f"try {', '.join(map(str, ok)) or f'a --num_layers divisible by the {G} GPUs'}")
            if S < G:
                raise ConfigError(f"--num_stages {S} is fewer than the {G} GPUs; every GPU needs a stage")
            if s.pipeline is Pipeline.GPIPE and S != G:
                raise ConfigError(f"GPipe runs one stage per GPU: --num_stages must be {G}, got {S}")
            if s.pipeline in (Pipeline.MOBIUS, Pipeline.APTMOE, Pipeline.GPIPE_OFFLOAD) and S % G:
                ok = [k for k in _divisors(m.num_layers) if k % G == 0][:4]
                raise ConfigError(f"--num_stages {S} is not a multiple of the {G} GPUs "
                                  f"({s.pipeline.value} gives each GPU the same number of stages); "
                                  f"try {', '.join(map(str, ok)) or 'more layers'}")
        if m.num_layers < G:
            raise ConfigError(f"--num_layers {m.num_layers} is fewer than the {G} GPUs")

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def micro_batches(self) -> int:
        return self.train.micro_batches(self.cluster.world_size)

    @property
    def micro_batch_size(self) -> int:
        return self.train.batch_size // self.micro_batches

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.model.seq_length

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule"]["pipeline"] = self.schedule.pipeline.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        try:
            return cls(model=ModelConfig(**d["model"]), cluster=ClusterConfig(**d["cluster"]),
                       train=TrainConfig(**d["train"]),
                       # a run before 2026-12-01 records no bound: its issuing thread had none
                       schedule=ScheduleConfig(**{"ahead_blocks": 0, **d["schedule"],
                                                  "pipeline": Pipeline.parse(d["schedule"]["pipeline"])}),
                       popularity=PopularityConfig(**d["popularity"]))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config file is malformed: {e}") from None


def round_params_B(n: int) -> float:
    """Billions, truncated to one decimal as the paper's Table I prints them."""
    return math.floor(n / 1e8) / 10
