"""One MoE layer of one micro-batch, forward and backward, in the stage walk's steps.

Autograd would run a layer's backward as one call; the paper runs it in steps (experts on
the GPU and the CPU at the same time, then the gate, then attention), with blocks that may
arrive late. So a layer keeps explicit boundaries: its input `x` is a leaf, the MoE input
`hd` is a detached leaf, and each expert's input is a leaf. The backward then walks the
boundaries by hand:

    dy                     (the gradient of the layer's output y = r + sum_e w_e * out_e)
    experts:  dout_e = w_e * dy[tokens of e]; d w_e = <dy[tokens of e], out_e>;
              out_e.backward(dout_e) -> d in_e (per expert, on the GPU or the CPU)
    gate:     w.backward(d w) -> d hd (and the gate's parameter gradient)
    attention: backward([r, h], [dy, d hd + sum_e scatter(d in_e)]) -> dx

Each piece is the same arithmetic autograd performs on `MoELayer`, so the result equals the
reference model's up to the order of floating-point sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from aptmoe.exec.blocks import FlatParams
from aptmoe.exec.model import attention, expert_backward, expert_forward, gate_probs, gate_weights


@dataclass
class Routing:
    """Which tokens go to which expert in one (layer, micro-batch); built on the host once."""

    ids: torch.Tensor                    # [T, k] expert ids
    counts: tuple[int, ...]              # tokens per expert
    token_index: list[torch.Tensor]      # per expert: its tokens (ascending)
    positions: list[torch.Tensor]        # per expert: its assignments in the flat [T*k] order
    tokens_all: torch.Tensor             # the token_index of every expert, in expert order
    positions_all: torch.Tensor          # the positions of every expert, in expert order

    @classmethod
    def build(cls, ids: torch.Tensor, num_experts: int, device: torch.device) -> Routing:
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        tokens = torch.arange(T).repeat_interleave(k)[order].to(device)
        order = order.to(device)
        return cls(ids.to(device), tuple(counts), list(tokens.split(counts)), list(order.split(counts)),
                   tokens, order)


@dataclass
class CpuPart:
    """An expert computed on the CPU: its input and output there, the output on the device,
    and its pre-activation where a backward will need it (`expert_forward`)."""

    inp: torch.Tensor
    out: torch.Tensor
    out_dev: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass
class LayerRun:
    """The saved state of one layer for one micro-batch (forward, or recompute then backward)."""

    x: torch.Tensor                      # [b, n, d] input (a leaf when `grad`)
    routing: Routing
    heads: int
    grad: bool
    moe: bool = True
    r: torch.Tensor | None = None        # residual stream after attention
    h: torch.Tensor | None = None        # LN2(r): the MoE input, in the graph
    hd: torch.Tensor | None = None       # h detached: [T, d] leaf
    w: torch.Tensor | None = None        # gate weights [T, k] (in the graph)
    w_flat: torch.Tensor | None = None   # their values, flat [T*k]
    gpu_saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)   # (input, pre-act.)
    gpu_out: dict[int, torch.Tensor] = field(default_factory=dict)
    cpu: dict[int, CpuPart] = field(default_factory=dict)
    dw: torch.Tensor | None = None
    dh: torch.Tensor | None = None       # gradient of hd from the experts

    # ------------------------------------------------------------------ forward
    def attention(self, params) -> None:
        with torch.set_grad_enabled(self.grad):
            self.r, self.h = attention(self.x, params, self.heads)
        b, n, d = self.x.shape
        self.hd = self.h.detach().reshape(b * n, d).requires_grad_(self.grad and self.moe)

    def gate(self, wg: torch.Tensor) -> None:
        with torch.set_grad_enabled(self.grad):
            self.w = gate_weights(gate_probs(self.hd, wg), self.routing.ids)
        self.w_flat = self.w.detach().reshape(-1)

    def weights_of(self, e: int) -> torch.Tensor:
        if not self.moe:
            return torch.ones(self.hd.shape[0], dtype=self.hd.dtype, device=self.hd.device)
        return self.w_flat[self.routing.positions[e]]

    def inputs_of(self, e: int) -> torch.Tensor:
        return self.hd.detach()[self.routing.token_index[e]] if self.moe else self.hd.detach()

    def token_index(self, e: int) -> torch.Tensor:
        if self.moe:
            return self.routing.token_index[e]
        return torch.arange(self.hd.shape[0], device=self.hd.device)

    def gpu_expert(self, e: int, w1: torch.Tensor, w2: torch.Tensor) -> None:
        """Expert e on the device, outside autograd (`expert_forward`): what its backward needs is kept."""
        inp = self.inputs_of(e)
        self.gpu_out[e], hidden = expert_forward(inp, w1, w2, keep=self.grad)
        if self.grad:
            self.gpu_saved[e] = (inp, hidden)

    def _outputs(self) -> dict[int, torch.Tensor]:
        outs = {e: o.detach() for e, o in self.gpu_out.items()}
        outs.update((e, p.out_dev.detach()) for e, p in self.cpu.items())
        return outs

    def _all_experts(self, outs: dict[int, torch.Tensor]) -> list[int] | None:
        """The experts with tokens, in id order, when each has its output: then one gather,
        one product and one scatter serve them all (a few kernel launches for the layer
        instead of a few per expert, which is what a small layer's host time was made of)."""
        busy = [e for e, c in enumerate(self.routing.counts) if c]
        return busy if self.moe and len(outs) == len(busy) and all(e in outs for e in busy) else None

    def output(self) -> torch.Tensor:
        """y = r + sum_e w_e * out_e scattered to its tokens (a value: gradients go by hand)."""
        b, n, d = self.x.shape
        y = self.r.detach().reshape(b * n, d).clone()
        outs = self._outputs()
        busy = self._all_experts(outs)
        if busy is not None:
            w = self.w_flat[self.routing.positions_all].unsqueeze(-1)
            y.index_add_(0, self.routing.tokens_all, torch.cat([outs[e] for e in busy]) * w)
            return y.view(b, n, d)
        for e in sorted(outs):
            y.index_add_(0, self.token_index(e), outs[e] * self.weights_of(e).unsqueeze(-1))
        return y.view(b, n, d)

    # ------------------------------------------------------------------ backward
    def start_backward(self, dy: torch.Tensor) -> None:
        self.dy = dy
        self.dy2 = dy.reshape(-1, dy.shape[-1])
        self.dh = torch.zeros_like(self.hd)
        if self.moe:
            self.dw = torch.zeros_like(self.w_flat)

    def output_grads(self) -> dict[int, torch.Tensor]:
        """d out_e for every expert with tokens (and d w), for all of them at once where it can."""
        outs = self._outputs()
        busy = self._all_experts(outs)
        if busy is None:
            return {e: self.output_grad_of(e) for e, c in enumerate(self.routing.counts) if c}
        dy = self.dy2[self.routing.tokens_all]
        pos = self.routing.positions_all
        self.dw[pos] = (dy * torch.cat([outs[e] for e in busy])).sum(-1)
        dout = dy * self.w_flat[pos].unsqueeze(-1)
        return dict(zip(busy, dout.split([self.routing.counts[e] for e in busy])))

    def output_grad_of(self, e: int) -> torch.Tensor:
        """d out_e = w_e * dy[tokens of e]; also fills d w_e = <dy[tokens of e], out_e>."""
        dy_e = self.dy2[self.token_index(e)]
        if self.moe:
            out = self.gpu_out[e] if e in self.gpu_out else self.cpu[e].out_dev
            self.dw[self.routing.positions[e]] = (dy_e * out.detach()).sum(-1)
        return dy_e * self.weights_of(e).unsqueeze(-1)

    def gpu_expert_backward(self, e: int, dout: torch.Tensor, params: FlatParams) -> None:
        """Expert e's backward by hand (`expert_backward`) into its block's flat gradient:
        written by the step's first backward of the block, added to after."""
        inp, hidden = self.gpu_saved.pop(e)
        first = params.start_grad()
        dx = expert_backward(inp, hidden, dout, *params.flat_views(), *params.grad_views(), first=first)
        self.dh.index_add_(0, self.token_index(e), dx)

    def add_input_grad(self, e: int, grad: torch.Tensor) -> None:
        self.dh.index_add_(0, self.token_index(e), grad)

    def gate_backward(self) -> None:
        torch.autograd.backward(self.w, self.dw.view_as(self.w))

    def attention_backward(self) -> torch.Tensor:
        dh = self.dh if self.hd.grad is None else self.dh + self.hd.grad
        torch.autograd.backward([self.r, self.h], [self.dy, dh.view_as(self.h)])
        return self.x.grad
