"""GPU-memory arithmetic for plans: parameters, gradients, optimizer states, activations.

Activations of a stage stay on the GPU from its forward to its backward (they are not
offloaded or recomputed): the stage's parameters are what streams over the link, and
adding activation traffic to the constrained link would compete with exactly the loads
APTMoE schedules. The simulator and the executor both follow this choice; the estimate
below is what the plan validator checks against capacity.
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

    def boundary_bytes(self) -> int:
        """One micro-batch's activations (or their gradients) between two stages."""
        return self.tokens_per_micro_batch * self.model.embedding_dim * self.model.dtype_bytes
