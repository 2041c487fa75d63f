"""A roofline `CostSource`: bytes / bandwidth and FLOPs / rate.

Used until a measured calibration file exists (`aptmoe.profile`), and for what-if studies
on hardware nobody has profiled. Every number in the two presets names its source; an
"assumption" is a number we chose, to be replaced by calibration.

FLOP counts (forward; a backward pass costs twice its forward, because it runs both the
input-gradient and the weight-gradient product of every forward matmul, so twice the
FLOPs, bytes and kernel launches):

- expert FFN over n tokens: 2 * n * (2 * d * h)               (two matmuls, d->h->d)
- attention over T tokens in sequences of length L:
  2 * T * 4 * d * d   (Q, K, V, O projections)  +  2 * 2 * T * L * d   (scores, weighted sum)
- gate over T tokens: 2 * T * d * E

GPU time = launch overhead + max(FLOPs / rate, bytes touched / HBM bandwidth); the bytes
touched are the block's weights plus its activations, so small token counts are
weight-bound. CPU expert time = per-call overhead + FLOPs / (per-core rate * threads): the
CPU has no memory term, its overhead absorbs the weight read at small token counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Integral

from aptmoe.config import ConfigError, ModelConfig
from aptmoe.costs import BLOCK_KINDS, DIRECTIONS, KernelTimeOnly, LinkSpec

# Adam on fp32 parameters reads p, g, m, v and writes p, m, v: 7 * 4 bytes per parameter.
_ADAM_BYTES_PER_PARAM = 28


@dataclass(frozen=True)
class AnalyticHardware:
    """Effective (achievable, not peak) rates of one GPU, its host link and its CPU cores."""

    name: str
    gpu_tflops_fp32: float
    gpu_tflops_bf16: float          # also used for fp16 (same tensor-core rate)
    gpu_hbm_GBps: float
    gpu_launch_s: float             # fixed cost of one block call on the GPU
    cpu_gflops_per_core_fp32: float
    cpu_gflops_per_core_bf16: float
    cpu_expert_overhead_s: float    # fixed cost of one expert call on the CPU
    h2d: LinkSpec                   # pinned host-to-GPU, one GPU alone
    d2h: LinkSpec                   # pinned GPU-to-host, one GPU alone
    root_GBps: float                # aggregate host-to-GPU of one socket's PCIe root
    p2p_intra: LinkSpec             # GPU-to-GPU within a node
    p2p_inter: LinkSpec             # GPU-to-GPU across nodes
    cpu_adam_params_per_s_per_core: float
    gpu_adam_params_per_s: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, LinkSpec):
                if not (value.GBps > 0 and value.latency_s >= 0):
                    raise ConfigError(f"hardware {self.name!r}: {f.name} needs GBps > 0 and latency_s >= 0, "
                                      f"got {value}")
            elif f.name == "name":
                continue
            elif f.name.endswith("_s"):
                if not value >= 0:
                    raise ConfigError(f"hardware {self.name!r}: {f.name} must be >= 0 seconds, got {value}")
            elif not value > 0:
                raise ConfigError(f"hardware {self.name!r}: {f.name} must be positive, got {value}")

    def with_(self, **changes) -> "AnalyticHardware":
        return dataclasses.replace(self, **changes)


def a800_pcie_hardware() -> AnalyticHardware:
    """The paper's testbed: A800 40GB PCIe under a PCIe switch, Xeon Gold 6348 (28 cores).

    Sources: datasheet and paper text as summarised in reference/a800-paper-testbed.json;
    the public artifact's profiled lookup table (same file) for the CPU call overhead.
    """
    return AnalyticHardware(
        name="A800-40GB-PCIe",
        # Datasheet FP32 19.5 TFLOP/s at ~60% efficiency. torch leaves TF32 off for matmuls
        # by default, so fp32 runs at the FP32 rate, not TF32's 156.
        gpu_tflops_fp32=0.6 * 19.5,
        # Datasheet BF16 tensor 312 TFLOP/s, same ~60% efficiency.
        gpu_tflops_bf16=0.6 * 312,
        gpu_hbm_GBps=1555,                 # datasheet, HBM2
        # Assumption: a block is a few kernels at ~10 us launch each.
        gpu_launch_s=30e-6,
        # Xeon Gold 6348 (Ice Lake-SP, 2 AVX-512 FMA units): 2.6 GHz * 32 fp32 FLOP/cycle
        # ~= 80 GFLOP/s per core peak, ~50% efficiency. Check: the artifact's table gives
        # 0.119 s for one MoE-S expert over 8192 tokens (137 GFLOP), i.e. ~1.16 TFLOP/s,
        # = 28 cores * 41 GFLOP/s.
        cpu_gflops_per_core_fp32=40.0,
        # Assumption: Ice Lake-SP has neither AVX512_BF16 nor AMX, so bf16 GEMMs go through
        # conversion; take half the fp32 rate.
        cpu_gflops_per_core_bf16=20.0,
        # Artifact lookup table, MoE-S expert forward on 1 token: 0.197 ms, almost all of
        # it fixed cost (the FLOPs take ~15 us).
        cpu_expert_overhead_s=0.18e-3,
        # Datasheet / DESIGN §2: PCIe Gen4 x16 ~25 GB/s usable pinned, latency ~10 us.
        h2d=LinkSpec(latency_s=10e-6, GBps=25.0),
        d2h=LinkSpec(latency_s=10e-6, GBps=25.0),
        # Assumption (DESIGN §2, "shared under a switch"): the GPUs of one socket sit
        # behind a PCIe switch with one Gen4 x16 uplink, so together they get ~25 GB/s.
        root_GBps=25.0,
        # Paper: GPUs talk only through the PCIe switch; ~20 GB/s, latency assumed 10 us.
        p2p_intra=LinkSpec(latency_s=10e-6, GBps=20.0),
        # Paper: InfiniBand HDR 100 Gb/s = 12.5 GB/s; latency assumed (NCCL-level) 15 us.
        p2p_inter=LinkSpec(latency_s=15e-6, GBps=12.5),
        # Assumption: a fused CPU Adam (torch's fused=True, one pass) is memory-bound:
        # 28 bytes per parameter at ~50% of the socket's 204.8 GB/s (8 channels of
        # DDR4-3200 on the Xeon 6348), spread over its 28 cores: ~130 M params/s per core.
        # An unfused foreach Adam makes ~4x the passes. Calibrate.
        cpu_adam_params_per_s_per_core=0.5 * 204.8e9 / _ADAM_BYTES_PER_PARAM / 28,
        # Memory-bound: 28 bytes per parameter at ~50% of HBM bandwidth.
        gpu_adam_params_per_s=0.5 * 1555e9 / _ADAM_BYTES_PER_PARAM,
    )


def h200_hardware() -> AnalyticHardware:
    """The 4x H200 host we can measure (one socket, 64 cores, PCIe Gen5 x16 per GPU, NVLink).

    Sources: reference/h200-host-probe.json (one probe: copies, expert FFN timings with 16
    threads) and the H200 datasheet.
    """
    return AnalyticHardware(
        name="H200",
        # Probe, MoE-L expert over 4096 tokens: 962 GFLOP in 18.8 ms fp32 (~51 TFLOP/s) and
        # 1.24 ms bf16 (~780 TFLOP/s); datasheet dense FP32 67, BF16 989.
        gpu_tflops_fp32=60.0,
        gpu_tflops_bf16=790.0,
        gpu_hbm_GBps=4800,                 # datasheet, HBM3e 4.8 TB/s
        # Probe: the smallest expert-forward GPU time is ~0.045 ms (weight read ~7 us);
        # the rest is launch and synchronisation.
        gpu_launch_s=40e-6,
        # Probe, expert forward on 4096 tokens with 16 threads: fp32 56 (S), 68 (M),
        # 80 (L) GFLOP/s per core; bf16 128 (S), 200 (M), 228 (L). The bf16 figure fits
        # M and L; it makes MoE-S bf16 ~35% too fast.
        cpu_gflops_per_core_fp32=60.0,
        cpu_gflops_per_core_bf16=200.0,
        # Probe, MoE-S expert forward on 1 token: 0.229 ms fp32.
        cpu_expert_overhead_s=0.2e-3,
        # Probe, pinned: 55.2 GB/s at 512 MB; 52.2 GB/s at 8 MB implies ~8 us latency.
        h2d=LinkSpec(latency_s=8e-6, GBps=55.0),
        d2h=LinkSpec(latency_s=8e-6, GBps=55.0),
        # Probe, four GPUs copying host-to-GPU at once: 49+49+50+55 = 203 GB/s.
        root_GBps=200.0,
        # Probe, GPU0 -> GPU1 over NVLink: 383 GB/s; latency assumed 10 us.
        p2p_intra=LinkSpec(latency_s=10e-6, GBps=380.0),
        # Assumption (not probed: one host): InfiniBand NDR 400 Gb/s = 50 GB/s, 15 us.
        p2p_inter=LinkSpec(latency_s=15e-6, GBps=50.0),
        # Assumption, as for the A800 host: fused, memory-bound, ~50% of 12 channels of
        # DDR5-4800 (460 GB/s) over 64 cores.
        cpu_adam_params_per_s_per_core=0.5 * 460e9 / _ADAM_BYTES_PER_PARAM / 64,
        gpu_adam_params_per_s=0.5 * 4800e9 / _ADAM_BYTES_PER_PARAM,
    )


HARDWARE_PRESETS = {"a800-pcie": a800_pcie_hardware, "h200": h200_hardware}


def hardware_preset(name: str) -> AnalyticHardware:
    if name not in HARDWARE_PRESETS:
        raise ConfigError(f"hardware preset {name!r} is unknown; use one of {', '.join(HARDWARE_PRESETS)}")
    return HARDWARE_PRESETS[name]()


def _check_direction(direction: str) -> int:
    """The multiplier of a direction: backward costs twice its forward (module docstring)."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")
    return 1 if direction == "fwd" else 2


def _check_count(what: str, value: int) -> None:
    # numpy integers are fine; bools are a mistake.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {value!r}")


def _check_threads(threads: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, Integral) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")


class AnalyticCost(KernelTimeOnly):      # a roofline has no host: arithmetic alone
    """`CostSource` from a model's dimensions and an `AnalyticHardware`.

    `link_cap_GBps` caps each GPU's host link in both directions (the executor's
    link-bandwidth cap, DESIGN §2); the socket root then carries at most n times the cap.
    """

    def __init__(self, model: ModelConfig, hw: AnalyticHardware, link_cap_GBps: float | None = None) -> None:
        if link_cap_GBps is not None and not link_cap_GBps > 0:
            raise ConfigError(f"link cap must be positive GB/s or None, got {link_cap_GBps}")
        self.model = model
        self.hw = hw
        self.link_cap_GBps = link_cap_GBps
        cap = "" if link_cap_GBps is None else f"@{link_cap_GBps:g}GBps"
        self.name = f"analytic:{hw.name}{cap}"
        self.fallbacks: set[str] = set()      # a roofline has no measured range to fall out of
        low_precision = model.dtype != "fp32"
        self._gpu_flops = 1e12 * (hw.gpu_tflops_bf16 if low_precision else hw.gpu_tflops_fp32)
        self._cpu_flops_per_core = 1e9 * (hw.cpu_gflops_per_core_bf16 if low_precision
                                          else hw.cpu_gflops_per_core_fp32)

    def __repr__(self) -> str:
        return f"AnalyticCost({self.model.name!r}, {self.name!r})"

    # ---- FLOPs and bytes of one forward call

    def flops(self, kind: str, tokens: int) -> float:
        """Forward FLOPs of one block over `tokens` tokens."""
        m = self.model
        d, h, L, E = m.embedding_dim, m.hidden_dim, m.seq_length, m.num_experts
        if kind == "e":
            return 2.0 * tokens * (2 * d * h)
        if kind == "a":
            return 2.0 * tokens * 4 * d * d + 2.0 * 2 * tokens * L * d
        if kind == "g":
            return 2.0 * tokens * d * E if m.gate_params else 0.0
        raise ConfigError(f"block kind {kind!r} is unknown; use one of {', '.join(BLOCK_KINDS)}")

    def bytes_touched(self, kind: str, tokens: int) -> float:
        """HBM bytes of one forward call: the weights, plus activations written and read back."""
        m = self.model
        d, h, L, E = m.embedding_dim, m.hidden_dim, m.seq_length, m.num_experts
        if kind == "e":
            acts = tokens * (2 * d + 2 * h)          # x in, hidden out and back in, y out
        elif kind == "a":
            # x in; q, k, v out and back in; context out and in; output out: ~10 T*d.
            # The score matrix (heads * T * L) is written and read: the paper's artifact does not
            # fuse attention (our executor does; its measured curves replace this roofline).
            acts = 10 * tokens * d + 2 * m.num_heads * tokens * L
        elif kind == "g":
            acts = tokens * (d + E)
        else:
            raise ConfigError(f"block kind {kind!r} is unknown; use one of {', '.join(BLOCK_KINDS)}")
        return float(m.block_bytes(kind) + acts * m.dtype_bytes)

    # ---- CostSource

    def gpu_s(self, kind: str, tokens: int, direction: str) -> float:
        times = _check_direction(direction)
        _check_count("tokens", tokens)
        flops = self.flops(kind, tokens)
        if tokens == 0 or (kind == "g" and flops == 0.0):
            return 0.0                                # nothing is launched
        roofline = max(flops / self._gpu_flops, self.bytes_touched(kind, tokens) / (self.hw.gpu_hbm_GBps * 1e9))
        return times * (self.hw.gpu_launch_s + roofline)

    def cpu_expert_s(self, tokens: int, direction: str, threads: int) -> float:
        times = _check_direction(direction)
        _check_count("tokens", tokens)
        _check_threads(threads)
        if tokens == 0:
            return 0.0
        return times * (self.hw.cpu_expert_overhead_s + self.flops("e", tokens) / (self._cpu_flops_per_core * threads))

    def h2d(self) -> LinkSpec:
        return self.hw.h2d.capped(self.link_cap_GBps)

    def d2h(self) -> LinkSpec:
        return self.hw.d2h.capped(self.link_cap_GBps)

    def root_GBps(self, gpus_sharing: int, direction: str = "h2d") -> float:
        if isinstance(gpus_sharing, bool) or not isinstance(gpus_sharing, Integral) or gpus_sharing < 1:
            raise ConfigError(f"gpus_sharing must be a positive integer, got {gpus_sharing!r}")
        if direction not in ("h2d", "d2h"):
            raise ConfigError(f"direction {direction!r} is unknown; use h2d or d2h")
        link = self.h2d() if direction == "h2d" else self.d2h()
        return min(gpus_sharing * link.GBps, self.hw.root_GBps)

    def p2p(self, same_node: bool) -> LinkSpec:
        return self.hw.p2p_intra if same_node else self.hw.p2p_inter

    def adam_cpu_s(self, num_params: int, threads: int) -> float:
        _check_count("num_params", num_params)
        _check_threads(threads)
        return num_params / (self.hw.cpu_adam_params_per_s_per_core * threads)

    def adam_gpu_s(self, num_params: int) -> float:
        _check_count("num_params", num_params)
        return num_params / self.hw.gpu_adam_params_per_s
