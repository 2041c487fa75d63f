"""Blocks as flat parameter buffers: what the executor stores, copies and updates.

A block's parameters live in one contiguous 1-D tensor (in the order of the block module's
`params()`), so loading a block is one host-to-GPU copy, offloading its gradient one copy
back, and its Adam update one fused call. `views` cuts a flat buffer into the shaped
tensors the block functions of `aptmoe.exec.model` take; views of a leaf that requires grad
carry their gradients into the leaf's flat `.grad`.

`initial_flat` builds a block exactly as `MoEModel` initialises it (same per-block
generator), so the executor starts from the reference model's parameters bit for bit.
"""

from __future__ import annotations

import math

import torch
from aptmoe.exec.model import (
    TORCH_DTYPES,
    AttentionBlock,
    ExpertBlock,
    GateBlock,
    block_generator,
)

from aptmoe.config import ModelConfig
from aptmoe.plan.actions import Block, BlockKind

Shapes = tuple[tuple[int, ...], ...]


def param_shapes(model: ModelConfig, kind: BlockKind) -> Shapes:
    """Shapes of a block's parameters in `params()` order."""
    d, h, E = model.embedding_dim, model.hidden_dim, model.num_experts
    if kind is BlockKind.ATTN:
        return ((d, d),) * 4 + ((d,),) * 4
    if kind is BlockKind.GATE:
        return ((E, d),)
    return ((h, d), (d, h))


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def views(flat: torch.Tensor, shapes: Shapes) -> tuple[torch.Tensor, ...]:
    """The shaped parameters inside a flat buffer (views: no copy, gradients flow to `flat`)."""
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[at:at + n].view(s))
        at += n
    return tuple(out)


def block_module(model: ModelConfig, block: Block, seed: int, *, device=None) -> torch.nn.Module:
    """The block as `MoEModel(model, seed=seed)` would initialise it."""
    kw = dict(device=device, dtype=TORCH_DTYPES[model.dtype], generator=block_generator(seed, block))
    d = model.embedding_dim
    if block.kind is BlockKind.ATTN:
        return AttentionBlock(d, model.num_heads, **kw)
    if block.kind is BlockKind.GATE:
        return GateBlock(d, model.num_experts, model.top_k, **kw)
    return ExpertBlock(d, model.hidden_dim, **kw)


@torch.no_grad()
def initial_flat(model: ModelConfig, block: Block, seed: int) -> torch.Tensor:
    """The block's initial parameters as one flat CPU tensor in the model's dtype."""
    m = block_module(model, block, seed)
    return torch.cat([p.reshape(-1) for p in m.params()])


class FlatParams:
    """A block's flat buffer seen as its shaped parameters, each a leaf of its own.

    The leaves share the flat buffer's storage, and their gradients are views of one flat
    gradient buffer (`ensure_grad`), which autograd accumulates into in place: so a block's
    gradient is still one tensor to offload and one to update. Shaped views of a single
    leaf would do the same with less code, but autograd then reassembles every view's
    gradient into a zeroed buffer of the whole block: measured on the CPU, an MoE-S expert's
    backward took 109 ms that way against 41 ms with leaves (forward 22 ms either way).
    """

    # The plain views and the gradient's views are made once per buffer, not per call: an
    # expert's forward or backward on a few tokens costs the host tens of microseconds, and
    # slicing its buffers again took 4 us of the 18 of a CPU rank's expert forward.
    __slots__ = ("flat", "shapes", "leaves", "grad", "_plain", "_grad_views")

    def __init__(self, flat: torch.Tensor, shapes: Shapes) -> None:
        self.flat = flat.detach()
        self.shapes = shapes
        self.leaves = tuple(v.requires_grad_(True) for v in views(self.flat, shapes))
        self.grad: torch.Tensor | None = None
        self._plain: tuple[torch.Tensor, ...] | None = None
        self._grad_views: tuple[torch.Tensor, ...] | None = None

    def ensure_grad(self) -> None:
        """Give the leaves gradient buffers (zeros) before a graph that will reach them is built."""
        if self.grad is None:
            self.set_grad(torch.zeros_like(self.flat))

    def start_grad(self, buffer: torch.Tensor | None = None) -> bool:
        """For code that writes its own gradients (`expert_backward`): give the block a
        gradient buffer if it has none, `buffer` (kept by the caller from step to step) or a
        new uninitialised one. True if it was just given, so the caller writes the gradient
        rather than adding to it (no zero-fill)."""
        if self.grad is not None:
            return False
        self.set_grad(torch.empty_like(self.flat) if buffer is None else buffer)
        return True

    def flat_views(self) -> tuple[torch.Tensor, ...]:
        """The parameters as plain views of the flat buffer (outside autograd: code that
        computes its own gradients, such as the CPU experts, reads these)."""
        if self._plain is None:
            self._plain = views(self.flat, self.shapes)
        return self._plain

    def grad_views(self) -> tuple[torch.Tensor, ...]:
        assert self._grad_views is not None, "no gradient buffer yet"
        return self._grad_views

    def set_grad(self, grad: torch.Tensor | None) -> None:
        self.grad = grad
        self._grad_views = views(grad, self.shapes) if grad is not None else None
        for leaf, g in zip(self.leaves, self._grad_views or [None] * len(self.leaves)):
            leaf.grad = g

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()
