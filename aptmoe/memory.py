"""GPU-memory arithmetic for plans: parameters, gradients, optimizer states, activations.

Activations (a decision both back-ends follow). GPipe checkpoints as torchgpipe does by
default: every micro-batch but the last keeps only its stage input (`Plan.recompute`).
The offload schedules keep only each stage's input per micro-batch (a checkpoint of T x d)
and recompute the stage's forward at the start of its backward. We recompute rather than
offload because offloading would put activation traffic on the host link, the very
resource APTMoE is scheduling, while recomputation uses GPU time that is idle whenever
loading is the bottleneck; and because the paper's M and L models cannot keep a quarter
of their activations (35-43 GB at batch 128) on a 40 GB GPU beside two stages. CPU
experts keep their forward activations in host memory and are not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

from aptmoe.config import ModelConfig


@dataclass(frozen=True)
class MemoryModel:
    model: ModelConfig
    tokens_per_micro_batch: int
    micro_batch_size: int

    def stage_params(self, layers: tuple[int, ...] | list[int]) -> int:
        return len(layers) * self.model.layer_params

    def param_bytes(self, layers) -> int:
        return self.stage_params(layers) * self.model.dtype_bytes

    def grad_bytes(self, layers) -> int:
        return self.param_bytes(layers)

    def adam_bytes(self, layers) -> int:
        """Two fp32 moments per parameter (GPipe keeps them on the GPU)."""
        return 8 * self.stage_params(layers)

    def activation_bytes_per_layer(self) -> int:
        """Tensors one layer saves for its backward, for one micro-batch (an estimate)."""
        m, T, b = self.model, self.tokens_per_micro_batch, self.micro_batch_size
        d, h, L, k = m.embedding_dim, m.hidden_dim, m.seq_length, m.top_k
        attn = 6 * T * d + 2 * b * m.num_heads * L * L   # norms, q, k, v, context, out; scores, probs
        gate = T * m.num_experts + T * d if m.is_moe else 0
        experts = k * T * (2 * d + 2 * h)                 # dispatched input, hidden pre/post act, output
        return (attn + gate + experts) * m.dtype_bytes

    def activation_bytes(self, layers) -> int:
        return len(layers) * self.activation_bytes_per_layer()

    def saved_bytes(self, layers, recompute: bool) -> int:
        """Kept on the GPU from a stage's forward of one micro-batch to its backward."""
        return self.boundary_bytes() if recompute else self.activation_bytes(layers)

    def backward_working_bytes(self, layers, recompute: bool) -> int:
        """Extra during one backward: the recomputed activations of that micro-batch."""
        return self.activation_bytes(layers) if recompute else 0

    def boundary_bytes(self) -> int:
        """One micro-batch's activations (or their gradients) between two stages."""
        return self.tokens_per_micro_batch * self.model.embedding_dim * self.model.dtype_bytes


# The CPU optimizer works through a block's parameters in chunks of this many. An expert
# that the GPU waits for can start only when the Adam chunk running on the rank's cores
# ends (a running job is not preempted), so the chunk bounds that wait: about 3.5 ms at
# the 1.2 Gparam/s fused CPU Adam of one H200 rank's 16 cores, where a whole MoE-S expert
# block (8.4 M parameters) held the cores for 7-12 ms in the executor's trace.
ADAM_CHUNK_PARAMS = 1 << 22


def adam_chunks(num_params: int, chunk: int = ADAM_CHUNK_PARAMS) -> list[tuple[int, int]]:
    """[start, stop) ranges covering a block's flat parameters, each at most `chunk` long."""
    if num_params < 0 or chunk < 1:
        raise ValueError(f"need num_params >= 0 and chunk >= 1; got {num_params}, {chunk}")
    return [(a, min(a + chunk, num_params)) for a in range(0, num_params, chunk)]
