"""The model the executor trains, as plain torch modules placed block by block (issue 5, §2).

A GPT-like MoE Transformer (DESIGN §1, paper Table I). Per layer, three kinds of *blocks*
(`aptmoe.plan.actions.Block`), the unit of loading and placement:

- ``a`` `AttentionBlock`: LayerNorm, Q/K/V projections, causal softmax(QK^T/sqrt(dh))V per
  head, output projection, residual, and the second LayerNorm that feeds the MoE;
  ``4 d^2 + 4 d`` parameters (`ModelConfig.attn_params`).
- ``g`` `GateBlock`: softmax(x Wg^T) and its top-k; ``d E`` parameters.
- ``e`` `ExpertBlock`: relu(x W1^T) W2^T; ``2 d h`` parameters.

No linear layer has a bias (the paper's parameter count has none). `calibration/profiler.py`
times these very modules, so the calibrated block times are the executor's.

A layer computes (pre-LN, residual around each sub-layer)::

    r = x + Attn(LN1(x))          # AttentionBlock returns (r, LN2(r))
    h = LN2(r)
    y = r + sum_{e in topk(t)} w_{t,e} Expert_e(h_t)      # per token t

The MoE is written as `dispatch` / `combine`, so that a runtime can run each expert
separately, on the GPU or the CPU, and put the results back in token order.

**Routing override** (`routing_from_counts`). The schedules are driven by the expert
popularity simulator (`aptmoe.popularity`), which replaces the gate's choice of experts, as
the seed artifact's simulated gate does. The executor then routes tokens by given expert ids
whose per-expert counts equal the simulator's exactly; the gate still runs, and its softmax
probabilities of the *assigned* experts weight the expert outputs, so the gate keeps
receiving gradients. Gate weights, with or without the override: top-1 uses the raw
probability p_{t,e} (as Switch Transformer; a renormalised single weight would be the
constant 1 and the gate would get no gradient); top-k > 1 renormalises the k probabilities
to sum to 1 (as Mixtral).

Initialisation is deterministic: every block draws its weights from its own CPU generator
seeded by (seed, block), so one block can be (re)built alone on any rank, on any device, and
equals the same block of the whole model.

Token order: a micro-batch of B sequences of L tokens is T = B*L tokens, row-major
(sequence, then position); routing tensors are [T, k] in that order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aptmoe.config import ModelConfig
from aptmoe.plan.actions import Block, BlockKind

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- seeding


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts' printed forms; the same in every process and Python
    run (unlike `hash`), so ranks agree without communicating."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def block_generator(seed: int, block: Block | str) -> torch.Generator:
    """The CPU generator that initialises `block` (or a named non-block part) of a model."""
    return torch.Generator().manual_seed(stable_seed("init", seed, block))


@torch.no_grad()
def _normal_(p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """p ~ N(0, std^2), drawn in fp32 and rounded to p's dtype; with a generator, drawn on
    the generator's device (CPU), so the values do not depend on where p lives."""
    if p.is_meta:
        return
    device = p.device if generator is None else generator.device
    w = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=device)
    p.copy_(w.mul_(std))


def _empty(*shape: int, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


# --------------------------------------------------------------------------- blocks


class AttentionBlock(nn.Module):
    """Pre-LN attention sub-layer and the LayerNorm that feeds the MoE.

    forward(x [b, n, d]) -> (r, h): r = x + Wo·Attn(LN1(x)) (the residual stream) and
    h = LN2(r) (the MoE input), both [b, n, d]. Attention is causal, per head
    softmax(Q K^T / sqrt(dh)) V, in torch's fused scaled_dot_product_attention. Inputs are
    whole sequences.
    """

    def __init__(self, d: int, heads: int, *, device=None, dtype=None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"{heads} heads do not divide the width {d}")
        self.d, self.heads = d, heads
        kw = dict(device=device, dtype=dtype)
        self.ln1 = nn.LayerNorm(d, **kw)
        self.wq, self.wk, self.wv, self.wo = (_empty(d, d, **kw) for _ in range(4))
        self.ln2 = nn.LayerNorm(d, **kw)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Fan-in scaling keeps activations at unit size: bf16 must not overflow, nor softmax saturate.
        for w in (self.wq, self.wk, self.wv, self.wo):
            _normal_(w, 1 / math.sqrt(self.d), generator)
        self.ln1.reset_parameters()
        self.ln2.reset_parameters()

    def params(self) -> tuple[torch.Tensor, ...]:
        """The parameters in `attention`'s order (also the order of a flat block buffer)."""
        return (self.wq, self.wk, self.wv, self.wo, self.ln1.weight, self.ln1.bias, self.ln2.weight, self.ln2.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attention(x, self.params(), self.heads)


def attention(x: torch.Tensor, params: Sequence[torch.Tensor], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`AttentionBlock`'s computation on explicit parameters (wq, wk, wv, wo, ln1 weight and
    bias, ln2 weight and bias): the executor runs blocks from flat buffers through this, so
    the module, the executor and the profiler run the very same kernels."""
    wq, wk, wv, wo, ln1_w, ln1_b, ln2_w, ln2_b = params
    b, n, d = x.shape
    dh = d // heads
    h = F.layer_norm(x, (d,), ln1_w, ln1_b)

    def split(w: torch.Tensor) -> torch.Tensor:
        return F.linear(h, w).view(b, n, heads, dh).transpose(1, 2)

    q, k, v = split(wq), split(wk), split(wv)
    # softmax(QK^T / sqrt(dh) + causal mask) V in one fused call: the same arithmetic as the
    # plain form to ~1e-7 relative, fewer kernels to launch and no n x n scores kept for the
    # backward.
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
    r = x + F.linear(ctx, wo)
    return r, F.layer_norm(r, (d,), ln2_w, ln2_b)


def gate_probs(x: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    """softmax(x Wg^T): the gate's probabilities [T, E]."""
    return F.linear(x, wg).softmax(-1)


def gate_weights(probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """[T, k] weights of the chosen experts from the gate's probabilities [T, E]: the raw
    probability for k = 1, renormalised over the token's k experts for k > 1."""
    w = probs.gather(-1, expert_ids)
    return w if w.shape[-1] == 1 else w / w.sum(-1, keepdim=True)


class GateBlock(nn.Module):
    """logits = x Wg^T (no bias), softmax, top-k.

    forward(x [T, d], expert_ids=None) -> (expert_ids [T, k] long, weights [T, k]). With
    `expert_ids` given (the routing override), those experts are used and weighted by the
    gate's probabilities for them (`gate_weights`)."""

    def __init__(self, d: int, num_experts: int, top_k: int = 1, *, device=None, dtype=None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in [1, {num_experts}]")
        self.d, self.num_experts, self.top_k = d, num_experts, top_k
        self.wg = _empty(num_experts, d, device=device, dtype=dtype)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _normal_(self.wg, 1 / math.sqrt(self.d), generator)

    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.wg,)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return gate_probs(x, self.wg)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probs(x)
        if expert_ids is None:
            expert_ids = p.topk(self.top_k, dim=-1).indices
        else:
            expert_ids = _check_ids(expert_ids, x.shape[0], self.top_k, self.num_experts).to(p.device)
        return expert_ids, gate_weights(p, expert_ids)


class ExpertBlock(nn.Module):
    """relu(x W1^T) W2^T, W1 [h, d], W2 [d, h], no biases; forward(x [n, d]) -> [n, d]."""

    def __init__(self, d: int, h: int, *, device=None, dtype=None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d, self.h = d, h
        self.w1 = _empty(h, d, device=device, dtype=dtype)
        self.w2 = _empty(d, h, device=device, dtype=dtype)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _normal_(self.w1, 1 / math.sqrt(self.d), generator)
        _normal_(self.w2, 1 / math.sqrt(self.h), generator)

    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.w1, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expert(x, self.w1, self.w2)


def expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """relu(x W1^T) W2^T: `ExpertBlock`'s computation on explicit parameters."""
    return F.linear(F.relu(F.linear(x, w1)), w2)


# An expert runs its backward by hand rather than through autograd, on the CPU and the GPU.
# On the CPU an expert's weights are read from memory for a few tokens, so its time is the
# bytes it moves, and autograd moves three times too many: its weight gradients need a
# zeroed buffer (a memset the size of the weights at the expert's first use in a step: 6 ms
# of a 7.5 ms forward for MoE-M on the H200 host) and are computed into a new tensor that is
# then added into that buffer (read, read, write). By hand, the first micro-batch's weight
# gradients are written straight into the block's flat gradient and later ones are added
# there by the product itself (addmm_). On the GPU the bytes are cheap but the host is not:
# one autograd call per expert hands work to the engine's device thread and back, and small
# experts wait for their host (the H200 matrix: MoE-S blocks at 2-4x their kernel time).
# Same arithmetic as autograd's (linear and relu backward).


def expert_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                       keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(relu(x W1^T) W2^T, the pre-activation x W1^T if `keep`: what the backward needs with x)."""
    with torch.no_grad():
        h = F.linear(x, w1)
        return F.linear(F.relu(h), w2), (h if keep else None)


def expert_backward(x: torch.Tensor, h: torch.Tensor, dout: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        g1: torch.Tensor, g2: torch.Tensor, first: bool) -> torch.Tensor:
    """d x of `expert_forward`; its weight gradients written into (first) or added to g1, g2."""
    with torch.no_grad():
        a = F.relu(h)
        dh = (dout @ w2) * (h > 0)
        if first:
            torch.mm(dout.t(), a, out=g2)
            torch.mm(dh.t(), x, out=g1)
        else:
            g2.addmm_(dout.t(), a)
            g1.addmm_(dh.t(), x)
        return dh @ w1


# --------------------------------------------------------------------------- dispatch / combine


class ExpertInput(NamedTuple):
    """One expert's share of a micro-batch: which tokens, their inputs and gate weights."""

    token_index: torch.Tensor   # [n_e] long, positions in 0..T-1, ascending
    inputs: torch.Tensor        # [n_e, d]
    weights: torch.Tensor       # [n_e]


def _check_ids(expert_ids: torch.Tensor, T: int, k: int | None, num_experts: int) -> torch.Tensor:
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or (k is not None and expert_ids.shape[1] != k):
        want = f"[{T}, {k}]" if k is not None else f"[{T}, k]"
        raise ValueError(f"expert ids must be {want} (tokens, experts per token); got {list(expert_ids.shape)}")
    if expert_ids.dtype != torch.long:
        expert_ids = expert_ids.long()
    if expert_ids.numel() and not (0 <= int(expert_ids.min()) and int(expert_ids.max()) < num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}); got {int(expert_ids.min())}.."
                         f"{int(expert_ids.max())}")
    return expert_ids


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (the counts the loading policy is told after the gate)."""
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts)


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, gate_weights: torch.Tensor, num_experts: int,
             counts: Sequence[int] | None = None) -> list[ExpertInput]:
    """Splits tokens x [T, d] by expert: entry e holds the tokens routed to expert e (in token
    order), their inputs (gathered from x, differentiable) and their gate weights.

    Without `counts` (tokens per expert, as the host already knows them under the routing
    override), the ids are checked and counted on the host: a device sync."""
    T = x.shape[0]
    if counts is None:
        expert_ids = _check_ids(expert_ids, T, None, num_experts)
    elif expert_ids.dim() != 2 or expert_ids.shape[0] != T or len(counts) != num_experts \
            or sum(counts) != expert_ids.numel():
        raise ValueError(f"expert ids {list(expert_ids.shape)} and counts {list(counts)} do not describe "
                         f"{T} tokens over {num_experts} experts")
    expert_ids = expert_ids.to(x.device, torch.long)
    k = expert_ids.shape[1]
    if gate_weights.shape != expert_ids.shape:
        raise ValueError(f"gate weights {list(gate_weights.shape)} must match expert ids {list(expert_ids.shape)}")
    flat = expert_ids.reshape(-1)
    tokens = torch.arange(T, device=x.device).repeat_interleave(k)
    order = torch.argsort(flat, stable=True)
    sizes = expert_counts(flat, num_experts).tolist() if counts is None else [int(c) for c in counts]
    token_index = tokens[order].split(sizes)
    weights = gate_weights.reshape(-1).to(x.device)[order].split(sizes)
    return [ExpertInput(t, x.index_select(0, t), w) for t, w in zip(token_index, weights)]


def combine(outputs: Sequence[torch.Tensor | None], dispatch_info: Sequence[ExpertInput], T: int, d: int, *,
            device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [T, d] with y[t] = sum over token t's experts e of w_{t,e} * outputs[e][row of t].

    `outputs[e]` is expert e's result on `dispatch_info[e].inputs` ([n_e, d], any device; None
    allowed for an expert without tokens). Each is scattered, weighted, to its own tokens
    (index_add_): never concatenated in expert order. y lives on `device` (default: the
    dispatched tokens' device) in `dtype` (default: the dispatched inputs' dtype)."""
    if len(outputs) != len(dispatch_info):
        raise ValueError(f"{len(outputs)} expert outputs for {len(dispatch_info)} experts")
    if not dispatch_info:
        raise ValueError("combine needs at least one expert")
    ref = dispatch_info[0]
    device = ref.token_index.device if device is None else torch.device(device)
    dtype = ref.inputs.dtype if dtype is None else dtype
    y = torch.zeros(T, d, device=device, dtype=dtype)
    for e, (out, info) in enumerate(zip(outputs, dispatch_info)):
        n = info.token_index.numel()
        if n == 0:
            continue
        if out is None or tuple(out.shape) != (n, d):
            got = None if out is None else list(out.shape)
            raise ValueError(f"expert {e} has {n} tokens: its output must be [{n}, {d}], got {got}")
        w = info.weights.to(device=device, dtype=dtype).unsqueeze(-1)
        y.index_add_(0, info.token_index.to(device), out.to(device=device, dtype=dtype) * w)
    return y


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def run_experts(experts: Sequence[nn.Module], info: Sequence[ExpertInput]) -> list[torch.Tensor | None]:
    """Each expert on its tokens, on the expert's own device (GPU or CPU); None if it has none."""
    outs: list[torch.Tensor | None] = []
    for expert, part in zip(experts, info):
        if part.token_index.numel() == 0:
            outs.append(None)
        else:
            outs.append(expert(part.inputs.to(_device_of(expert))))
    return outs


# --------------------------------------------------------------------------- routing override


def routing_from_counts(counts_row, T: int, top_k: int, generator: torch.Generator | None = None, *,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Expert ids [T, k] whose per-expert counts equal `counts_row` [E] exactly.

    As the popularity simulator lays them out: the T*k assignments, expert by expert, fill
    k passes over the tokens (assignment j goes to token j mod T, column j // T); as no expert
    has more than T assignments, each token gets k distinct experts. Tokens are then shuffled
    by a permutation drawn from `generator` (a CPU generator; the same seed gives the same
    routing). `counts_row` must be non-negative integers summing to T*k, each at most T:
    one micro-batch of one layer of `IterationCounts.counts`."""
    c = np.asarray(counts_row.tolist() if isinstance(counts_row, torch.Tensor) else counts_row)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts must be one row [E]; got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.equal(np.mod(c, 1), 0)):
            raise ValueError(f"counts must be integers; got {c.tolist()}")
        c = c.astype(np.int64)
    if T < 1 or not 1 <= top_k <= c.size:
        raise ValueError(f"need T >= 1 and 1 <= top_k <= {c.size}; got T={T}, top_k={top_k}")
    if (c < 0).any() or int(c.sum()) != T * top_k or int(c.max()) > T:
        raise ValueError(f"counts {c.tolist()} must be non-negative, sum to T*k = {T}*{top_k} = {T * top_k} "
                         f"and be at most T = {T} each (a token takes k distinct experts)")
    flat = torch.repeat_interleave(torch.arange(c.size), torch.tensor(c.tolist(), dtype=torch.long))
    ids = flat.view(top_k, T).t()                                   # [T, k]: column j = pass j
    perm = torch.randperm(T, generator=generator)
    ids = ids[perm].contiguous()
    return ids if device is None else ids.to(device)


def routing_generator(seed: int, iteration: int, layer: int, micro_batch: int) -> torch.Generator:
    """The generator for one (iteration, layer, micro-batch) routing: the same on every rank."""
    return torch.Generator().manual_seed(stable_seed("routing", seed, iteration, layer, micro_batch))


# --------------------------------------------------------------------------- layer and model


class MoELayer(nn.Module):
    """Attention, gate and experts of one layer; forward(x [b, n, d], expert_ids=None).

    Dense (`moe=False`): no gate, the single FFN takes every token with weight 1. With
    `seed` given, each block is initialised from its own generator (`block_generator`), as
    block `layer` of a model."""

    def __init__(self, d: int, h: int, heads: int, num_experts: int = 1, top_k: int = 1, *, moe: bool = True,
                 layer: int = 0, seed: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if not moe and (num_experts != 1 or top_k != 1):
            raise ValueError("a dense layer has one FFN: num_experts and top_k must be 1")
        kw = dict(device=device, dtype=dtype)

        def gen(block: Block) -> torch.Generator | None:
            return None if seed is None else block_generator(seed, block)

        self.layer, self.num_experts, self.top_k = layer, num_experts, top_k
        self.attn = AttentionBlock(d, heads, generator=gen(Block.attn(layer)), **kw)
        self.gate = GateBlock(d, num_experts, top_k, generator=gen(Block.gate(layer)), **kw) if moe else None
        self.experts = nn.ModuleList(ExpertBlock(d, h, generator=gen(Block.expert_of(layer, e)), **kw)
                                     for e in range(num_experts))

    @property
    def is_moe(self) -> bool:
        return self.gate is not None

    def moe(self, h: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE sub-layer on tokens h [T, d] (no residual)."""
        if self.gate is None:
            if expert_ids is not None:
                raise ValueError("a dense layer takes no routing")
            return self.experts[0](h)
        ids, w = self.gate(h, expert_ids)
        info = dispatch(h, ids, w, self.num_experts)
        return combine(run_experts(self.experts, info), info, h.shape[0], h.shape[1])

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        r, h = self.attn(x)
        return r + self.moe(h.reshape(b * n, d), expert_ids).view(b, n, d)


@torch.no_grad()
def init_ends(embedding: torch.Tensor | None, norm_w: torch.Tensor | None, norm_b: torch.Tensor | None,
              head: torch.Tensor | None, seed: int) -> None:
    """The parameters outside the blocks, initialised in place (None: not held here): the
    embedding ~ N(0, 1), the head ~ N(0, 1/d), the final LayerNorm at (1, 0). Each from its
    own generator, so a pipeline's first and last stages can build their share alone."""
    if embedding is not None:
        _normal_(embedding, 1.0, block_generator(seed, "embedding"))
    if head is not None:
        _normal_(head, 1 / math.sqrt(head.shape[-1]), block_generator(seed, "head"))
    if norm_w is not None:
        norm_w.fill_(1.0)
    if norm_b is not None:
        norm_b.zero_()


def lm_loss(x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, head: torch.Tensor,
            targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the final norm and head over x [b, n, d], in fp32."""
    logits = F.linear(F.layer_norm(x, (x.shape[-1],), norm_w, norm_b), head)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class MoEModel(nn.Module):
    """Token embedding, `num_layers` MoELayers, final LayerNorm, LM head; next-token loss.

    Non-block parameters (embedding, final norm, head: `resident_parameters`) stay with
    the first and last stage; every block's parameters are reached by `block_module`.
    No positional embedding (ModelConfig counts none); the causal mask orders tokens."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 42, device=None) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        d, V = cfg.embedding_dim, cfg.vocab_size
        kw = dict(device=device, dtype=TORCH_DTYPES[cfg.dtype])
        self.embedding = _empty(V, d, **kw)
        self.layers = nn.ModuleList(
            MoELayer(d, cfg.hidden_dim, cfg.num_heads, cfg.num_experts, cfg.top_k, moe=cfg.is_moe,
                     layer=i, seed=seed, **kw) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, **kw)
        self.head = _empty(V, d, **kw)                      # logits = x head^T: the d x vocab map
        self._reset_resident()

    def _reset_resident(self) -> None:
        init_ends(self.embedding, self.norm.weight, self.norm.bias, self.head, self.seed)

    def reset_parameters(self) -> None:
        """Every parameter back to its seeded initial value."""
        self._reset_resident()
        for b in self.blocks():
            self.init_block(b)

    def init_block(self, block: Block) -> None:
        self.block_module(block).reset_parameters(block_generator(self.seed, block))

    # --- blocks

    def blocks(self) -> Iterator[Block]:
        """Every block, layer by layer: attention, gate (MoE only), experts."""
        for i, layer in enumerate(self.layers):
            yield Block.attn(i)
            if layer.is_moe:
                yield Block.gate(i)
            for e in range(len(layer.experts)):
                yield Block.expert_of(i, e)

    def block_module(self, block: Block) -> nn.Module:
        if not 0 <= block.layer < len(self.layers):
            raise KeyError(f"block {block}: the model has layers 0..{len(self.layers) - 1}")
        layer = self.layers[block.layer]
        if block.kind is BlockKind.ATTN:
            return layer.attn
        if block.kind is BlockKind.GATE:
            if layer.gate is None:
                raise KeyError(f"block {block}: a dense model has no gate")
            return layer.gate
        if not 0 <= block.expert < len(layer.experts):
            raise KeyError(f"block {block}: layer {block.layer} has experts 0..{len(layer.experts) - 1}")
        return layer.experts[block.expert]

    def block_parameters(self, block: Block) -> list[nn.Parameter]:
        return list(self.block_module(block).parameters())

    def resident_parameters(self) -> list[nn.Parameter]:
        """The parameters outside every block: embedding, final norm, head."""
        return [self.embedding, *self.norm.parameters(), self.head]

    # --- pieces of the forward pass, for a pipeline runtime

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.embedding(inputs, self.embedding)

    def forward_layers(self, x: torch.Tensor, layers: Iterable[int],
                       routing: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """x through the given layers; `routing` is indexed by layer (the whole model's list)."""
        for i in layers:
            x = self.layers[i](x, None if routing is None else routing[i])
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.head)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the micro-batch, computed in fp32."""
        return lm_loss(x, self.norm.weight, self.norm.bias, self.head, targets)

    def forward(self, tokens: torch.Tensor, routing: Sequence[torch.Tensor | None] | None = None, *,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of `tokens`. Without `targets`, tokens are [B, L+1] sequences (as `aptmoe.exec.data`
        gives them): inputs tokens[:, :-1], targets tokens[:, 1:]. With `targets` [B, L], tokens are
        the inputs [B, L]. `routing`: None (the gate chooses) or one entry per layer, each None or
        expert ids [B*L, k] (`routing_from_counts`)."""
        if targets is None:
            tokens, targets = tokens[:, :-1], tokens[:, 1:]
        if routing is not None and len(routing) != len(self.layers):
            raise ValueError(f"routing has {len(routing)} entries for {len(self.layers)} layers")
        x = self.forward_layers(self.embed(tokens), range(len(self.layers)), routing)
        return self.loss(x, targets)
