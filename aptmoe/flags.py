"""The seed artifact's command-line flags, mapped onto the config dataclasses in one place.

`aptmoe-sim`, `aptmoe-run` and `aptmoe-plan` all accept the artifact's flags with the same
meaning and defaults (``--is_moe=True --model_config=S --num_experts=16 --gini=0.3
--topo=C1+G2 --pipeline=APTMoE``), plus our own (``--gpus``, ``--gpu-memory``, ...).
argparse is enough here: the flags are flat, and torchrun passes them through unchanged.

Presets: ``--model_config S|M|L`` is the artifact's preset (32 layers, 8 stages, its batch,
4 micro-batches, sequence length 128); ``--model_config MoE-S-16`` is the paper's Table I
model (64 layers, the stage count chosen by the partition search, batch 128, or 64 for L).
Explicit flags override either.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aptmoe.config import (
    AHEAD_BLOCKS,
    ClusterConfig,
    ConfigError,
    ModelConfig,
    Pipeline,
    PopularityConfig,
    TOPOLOGIES,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    auto_host_cores,
    model_preset,
    moe_model,
)

# The artifact's presets (reference/a800-paper-testbed.json, "artifact_defaults").
ARTIFACT_PRESETS = {
    "S": dict(embedding_dim=1024, hidden_dim=4096, num_heads=32, num_layers=32, num_stages=8,
              batch_size=128, num_chunks=4, seq_length=128),
    "M": dict(embedding_dim=2048, hidden_dim=8192, num_heads=32, num_layers=32, num_stages=8,
              batch_size=16, num_chunks=4, seq_length=128),
    "L": dict(embedding_dim=4096, hidden_dim=14336, num_heads=32, num_layers=32, num_stages=8,
              batch_size=8, num_chunks=4, seq_length=128),
}
# The artifact's own defaults where no preset sets a value.
ARTIFACT_DEFAULTS = dict(batch_size=64, num_chunks=4, seq_length=128, seed=42, num_layers=24, num_stages=4,
                         embedding_dim=1024, hidden_dim=4096, num_heads=32, num_experts=8,
                         num_warmup_steps=2, num_training_steps=2, pipeline="GPipe", model_config="S",
                         is_moe=False, gini=0.6, topo="C1+G2")


ALL = "all"


def pipelines_of(ns: argparse.Namespace) -> list[str]:
    """`--pipeline all` is the four schedules; a comma-separated list those given, in the
    paper's order; otherwise the one given (GPipe when absent)."""
    if ns.pipeline is not None and ns.pipeline.strip().lower() == ALL:
        return [p.value for p in Pipeline]
    asked = {Pipeline.parse(t.strip()) for t in (ns.pipeline or "GPipe").split(",") if t.strip()}
    if not asked:
        raise ConfigError(f"--pipeline {ns.pipeline!r} names no schedule; use one of "
                          f"{', '.join(p.value for p in Pipeline)}, a comma-separated list of them, or all")
    return [p.value for p in Pipeline if p in asked]


def str2bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def number_list(cast: Callable[[str], float], what: str) -> Callable[[str], list]:
    """An argparse `type`: comma-separated numbers (`cast` each), one line naming `what` if not."""
    def parse(text: str) -> list:
        try:
            return [cast(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}, comma-separated") from None
    return parse


def positive_number(what: str) -> Callable[[str], float]:
    """An argparse `type`: a number above 0, one line naming `what` if not."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number ({what})") from None
        if not 0 < x < float("inf"):
            raise argparse.ArgumentTypeError(f"{text}: {what} must be above 0")
        return x
    return parse


def whole_number(unit: str, minimum: int = 1) -> Callable[[str], int]:
    """An argparse `type`: a whole number of `unit`s, `minimum` or more."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {unit}s") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n}: at least {minimum} {unit}{'' if minimum == 1 else 's'}")
        return n
    return parse


def core_list(text: str) -> list[int]:
    """An argparse `type`: cores as `taskset -c` writes them (`0-3,8,10-11`), in order, once each."""
    cores: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cores.extend(c for c in range(first, last + 1) if c not in cores)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give cores like 0-3,8 (ascending ranges of core numbers)") from None
    return cores


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on bad flags."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_seed_flags(p: argparse.ArgumentParser) -> None:
    """The artifact's flags. Defaults are None so that presets can tell what was given."""
    g = p.add_argument_group("seed artifact flags")
    for name, typ, help_ in [
        ("batch_size", int, "global batch in sequences (artifact 64; a preset overrides)"),
        ("num_chunks", int, "micro-batches per step (artifact 4)"),
        ("seq_length", int, "tokens per sequence (128)"),
        ("seed", int, "random seed (42)"),
        ("num_layers", int, "Transformer layers (artifact 24; a preset overrides)"),
        ("num_stages", int, "pipeline stages (artifact 4; a preset overrides)"),
        ("embedding_dim", int, "model width d (1024)"),
        ("hidden_dim", int, "expert FFN width h (4096)"),
        ("num_heads", int, "attention heads (32)"),
        ("num_experts", int, "experts per layer (8)"),
        ("num_warmup_steps", int, "untimed steps first (2)"),
        ("num_training_steps", int, "timed steps (2)"),
    ]:
        g.add_argument(f"--{name}", type=typ, default=None, help=help_)
    g.add_argument("--pipeline", default=None,
                   help="GPipe, GPipeOffload, Mobius or APTMoE, several comma-separated, or all (GPipe)")
    g.add_argument("--model_config", default=None,
                   help="artifact preset S, M, L (32 layers) or a Table I model such as MoE-S-16 (S)")
    g.add_argument("--is_moe", type=str2bool, default=None, help="MoE layers (True) or dense (False, the default)")
    g.add_argument("--fwd_only", type=str2bool, nargs="?", const=True, default=False, help="forward passes only")
    g.add_argument("--inter_stage_only", type=str2bool, nargs="?", const=True, default=False,
                   help="only the inter-stage loading phase")
    g.add_argument("--gini", type=float, default=None, help="target imbalance G = mean_l sum_e p_e^2 (0.6)")
    g.add_argument("--topo", default=None, help="C1+G1, C1+G2 or C1+G4 (C1+G2)")


def _host_cores(text: str) -> int | str:
    """`--host-cores`: a whole number >= 0, or auto (resolved where the device is known)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return whole_number("core", 0)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or auto") from None


def add_cluster_flags(p: argparse.ArgumentParser, *, gpus: bool = True) -> None:
    g = p.add_argument_group("aptmoe flags")
    if gpus:
        g.add_argument("--gpus", type=whole_number("GPU"), default=None, help="GPUs per node (4)")
        g.add_argument("--nodes", type=whole_number("node"), default=1, help="nodes (1)")
    g.add_argument("--top_k", type=int, default=1, help="experts per token (1, as the seed's simulated gate)")
    g.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (fp32)")
    g.add_argument("--gpu-memory", dest="gpu_memory", type=float, default=None,
                   help="GPU memory cap in GB (default: the calibration profile's GPU)")
    g.add_argument("--link-bandwidth", dest="link_bandwidth", type=float, default=None,
                   help="cap on each GPU's host link in GB/s (default: native)")
    g.add_argument("--cores-per-socket", dest="cores_per_socket", type=whole_number("core"), default=None,
                   help="CPU cores of one socket (default: the profile's)")
    g.add_argument("--host-cores", dest="host_cores", type=_host_cores, default="auto",
                   help="cores of each rank kept for its host threads, out of the CPU experts' and Adam's "
                        "reach: a number, or auto, the default (2 on GPU ranks with 8 or more cores, 1 with 4-7, "
                        "0 on the executor's CPU ranks); 0: every core does CPU work, as in the paper")
    g.add_argument("--pageable", action="store_true", help="host parameters in pageable memory")
    g.add_argument("--persistence", type=float, default=0.73,
                   help="overlap of the least-used half of experts between iterations (0.73)")
    g.add_argument("--predictor-accuracy", dest="predictor_accuracy", type=float, default=0.85,
                   help="per-token accuracy of the predictor gate (0.85)")
    g.add_argument("--popularity-replay", dest="popularity_replay", default=None,
                   help="CSV of recorded token counts (iteration,layer,microbatch,expert,tokens)")
    g.add_argument("--recompute", default="auto", choices=("auto", "none", "all", "except_last"),
                   help="activation checkpointing at stage boundaries (auto: except_last for GPipe, "
                        "as torchgpipe; all for the offload schedules)")
    g.add_argument("--max-copies-in-flight", dest="max_copies_in_flight", type=int, default=2,
                   help="copies launched on the load stream at once (2)")
    g.add_argument("--ahead-blocks", dest="ahead_blocks", type=int, default=AHEAD_BLOCKS,
                   help=f"blocks a GPU rank's issuing thread may issue beyond the last one its GPU has finished "
                        f"({AHEAD_BLOCKS}; 0: no bound, the executor before 2026-12-01). Unbounded, it filled the "
                        "driver's queue while the GPU waited for a message, and the next marker's record then "
                        "blocked in the driver with the GIL held, stopping the rank's other threads")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help text does not already give one and it says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or text.rstrip().endswith(")"):
            return text
        return super()._get_help_string(action)


# How the CUDA driver loads the executor's kernels (its CUDA_MODULE_LOADING). Lazy, torch's
# default, loads each kernel at its first call: an expert GEMM of a token count not met before
# picks a kernel not loaded yet, and that one call stalls. In session 22's L2 G0.6 runs the
# first 9-token expert backward took 72.6 ms against 0.7 predicted, once per run; eager loading
# (session 23) took the stalls away, and GPipe's error from -13.4% to -3.5%.
KERNEL_LOADINGS = ("lazy", "eager")


def add_kernel_loading_flag(g, default: str | None, why: str) -> None:
    """`--kernel-loading` on a parser or group: `default` (None: the environment's
    CUDA_MODULE_LOADING, unset meaning lazy), `why` the reason for it in the help."""
    g.add_argument("--kernel-loading", dest="kernel_loading", choices=KERNEL_LOADINGS, default=default,
                   help="when the CUDA driver loads the executor's GPU kernels: eager, all at start (some "
                        "seconds more start-up and the modules' GPU memory); lazy, each at its first call "
                        f"(a new expert token count can stall that one call tens of ms, once per run). {why}")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, formatter_class=HelpFormatter)


def _pick(ns, name, preset: dict):
    v = getattr(ns, name, None)
    if v is not None:
        return v
    if name in preset:
        return preset[name]
    return ARTIFACT_DEFAULTS[name]


def config_from_args(ns: argparse.Namespace, *, pipeline: str | None = None, gpus: int | None = None,
                     gpu_memory_bytes: int = 40 * 10**9, cores_per_socket: int = 28,
                     intra_node_link: str = "pcie") -> RunConfig:
    """Build and validate the RunConfig; hardware defaults come from the calibration profile."""
    name = ns.model_config or ARTIFACT_DEFAULTS["model_config"]
    pipe = Pipeline.parse(pipeline or ns.pipeline or ARTIFACT_DEFAULTS["pipeline"])
    n_gpus = gpus if gpus is not None else (getattr(ns, "gpus", None) or 4)
    is_moe = ns.is_moe if ns.is_moe is not None else ARTIFACT_DEFAULTS["is_moe"]
    if name in ARTIFACT_PRESETS:
        preset = dict(ARTIFACT_PRESETS[name])
        experts = _pick(ns, "num_experts", preset) if is_moe else 1
        model = ModelConfig(
            name=f"{'MoE-' if is_moe else 'Dense-'}{name}{f'-{experts}' if is_moe else ''}",
            embedding_dim=_pick(ns, "embedding_dim", preset), hidden_dim=_pick(ns, "hidden_dim", preset),
            num_heads=_pick(ns, "num_heads", preset), num_layers=_pick(ns, "num_layers", preset),
            num_experts=experts, top_k=ns.top_k if is_moe else 1, seq_length=_pick(ns, "seq_length", preset),
            dtype=ns.dtype, is_moe=is_moe)
    else:
        if not is_moe and ns.is_moe is not None:
            raise ConfigError(f"--model_config {name} is an MoE model; drop --is_moe=False or use S, M or L")
        base = model_preset(name)
        size = name.split("-")[1]
        preset = dict(batch_size=64 if size == "L" else 128, num_chunks=n_gpus * (getattr(ns, "nodes", 1) or 1),
                      seq_length=128, num_stages=None)
        model = moe_model(size, ns.num_experts if ns.num_experts is not None else base.num_experts,
                          num_layers=ns.num_layers if ns.num_layers is not None else base.num_layers,
                          **{k: v for k, v in dict(embedding_dim=ns.embedding_dim, hidden_dim=ns.hidden_dim,
                                                    num_heads=ns.num_heads).items() if v is not None},
                          top_k=ns.top_k, seq_length=_pick(ns, "seq_length", preset), dtype=ns.dtype)
    stages = _pick(ns, "num_stages", preset)
    if pipe is Pipeline.GPIPE and (ns.num_stages is None or len(pipelines_of(ns)) > 1):
        stages = None                       # GPipe: one stage per GPU, whatever the preset or `all` (or a list) says
    elif stages is not None and ns.num_stages is None and model.num_layers % stages:
        stages = None                       # a preset's stage count that no longer fits: search instead
    topo = ns.topo or ARTIFACT_DEFAULTS["topo"]
    sockets = ns.cores_per_socket or cores_per_socket
    host = getattr(ns, "host_cores", "auto")
    if host == "auto":                      # as aptmoe-run on GPU ranks (it resolves it again for its machine)
        host = auto_host_cores(sockets // TOPOLOGIES.get(topo, 1), on_gpu=True)
    cluster = ClusterConfig(
        nodes=getattr(ns, "nodes", 1) or 1, gpus_per_node=n_gpus, topo=topo, cores_per_socket=sockets,
        gpu_memory_bytes=int(ns.gpu_memory * 1e9) if ns.gpu_memory else gpu_memory_bytes,
        intra_node_link=intra_node_link, link_bandwidth_GBps=ns.link_bandwidth, host_cores=host)
    train = TrainConfig(batch_size=_pick(ns, "batch_size", preset), num_chunks=_pick(ns, "num_chunks", preset),
                        num_warmup_steps=_pick(ns, "num_warmup_steps", {}),
                        num_training_steps=_pick(ns, "num_training_steps", {}), seed=_pick(ns, "seed", {}))
    schedule = ScheduleConfig(pipeline=pipe, num_stages=stages, fwd_only=bool(ns.fwd_only),
                              inter_stage_only=bool(ns.inter_stage_only),
                              max_copies_in_flight=ns.max_copies_in_flight, pinned=not ns.pageable,
                              recompute=getattr(ns, "recompute", "auto"),
                              ahead_blocks=getattr(ns, "ahead_blocks", AHEAD_BLOCKS))
    gini = ns.gini if ns.gini is not None else ARTIFACT_DEFAULTS["gini"]
    if not model.is_moe:
        if ns.gini is not None:             # silently dropped, it would make a what-if of G a dense model's
            raise ConfigError(f"--gini {ns.gini:g} sets the experts' popularity and this model is dense; "
                              "add --is_moe=True (or a MoE --model_config such as MoE-S-16), or drop --gini")
        gini = 1.0                          # one FFN takes every token
    popularity = PopularityConfig(gini=gini, persistence=ns.persistence,
                                  predictor_accuracy=ns.predictor_accuracy, replay=ns.popularity_replay)
    return RunConfig(model=model, cluster=cluster, train=train, schedule=schedule, popularity=popularity)
