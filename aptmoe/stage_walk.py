"""What one forward or backward of a stage does, step by step: shared by both back-ends.

A stage's pass is a sequence of steps, each run by the back-end (the simulator holds its
resources, the executor runs kernels), with the loading policy told what was learnt at the
moment the real system learns it: the predictor's counts of a layer before the layer runs,
the gate's counts right after the gate, the backward placement when the backward reaches a
layer. Writing this sequence once keeps the two back-ends asking the policy the same
questions in the same order, which is what makes their decisions, and so a prediction and
a measurement, comparable.

Usage (a back-end)::

    for step in forward_walk(stage, mb, layers, policy, counts, moe=...):
        run(step)          # RunBlocks: wait for each block, run it; RunExperts: both sides
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from aptmoe.plan.actions import Block
from aptmoe.policy import LoadingPolicy, Placement


@dataclass(frozen=True)
class RunBlocks:
    """GPU blocks run back to back, each once it is loaded (attention and gate)."""

    blocks: tuple[Block, ...]
    direction: str            # "fwd" or "bwd" (the cost of a recompute is a forward)
    pass_: str                # "F" or "B": which load of the stage serves them
    cat: str                  # trace category: "forward", "backward" or "recompute"


@dataclass(frozen=True)
class RunExperts:
    """One layer's experts: `gpu` on the GPU in the order their weights arrive, `cpu` on the
    CPU from host memory, at the same time; the step ends when both sides are done.
    Experts without tokens are in neither tuple."""

    layer: int
    gpu: tuple[int, ...]
    cpu: tuple[int, ...]
    counts: tuple[int, ...]   # tokens per expert of this micro-batch
    direction: str
    pass_: str
    cat: str


Step = RunBlocks | RunExperts


def _ints(row) -> tuple[int, ...]:
    """Python ints from a numpy row in one C call (this runs per layer per micro-batch)."""
    return tuple(row.tolist()) if hasattr(row, "tolist") else tuple(int(c) for c in row)


def _with_tokens(experts, counts) -> tuple[int, ...]:
    return tuple(e for e in experts if counts[e] > 0)


def _attention_and_gate(layer: int, moe: bool) -> tuple[Block, ...]:
    return (Block.attn(layer), Block.gate(layer)) if moe else (Block.attn(layer),)


def _all_gpu(num_experts: int) -> Placement:
    return Placement(tuple(range(num_experts)), ())


def forward_walk(stage: int, mb: int, layers, policy: LoadingPolicy | None, counts, predicted, *,
                 moe: bool) -> Iterator[Step]:
    """The forward of (stage, mb). `counts`/`predicted`: [layers, micro_batches, E] arrays.

    The predictor of a layer runs one layer ahead (for a stage's first layer, with the
    previous stage, so its counts arrive with the activations)."""
    if policy is not None and moe:
        policy.predicted_counts(stage, layers[0], mb, predicted[layers[0], mb])
    for i, layer in enumerate(layers):
        row = _ints(counts[layer, mb])
        yield RunBlocks(_attention_and_gate(layer, moe), "fwd", "F", "forward")
        if policy is not None and moe:
            placement = policy.gate_counts(stage, layer, mb, counts[layer, mb])
            if i + 1 < len(layers):
                policy.predicted_counts(stage, layers[i + 1], mb, predicted[layers[i + 1], mb])
        else:
            placement = _all_gpu(len(row))
        yield RunExperts(layer, _with_tokens(placement.gpu, row), _with_tokens(placement.cpu, row),
                         row, "fwd", "F", "forward")


def backward_placement(stage: int, layer: int, policy: LoadingPolicy | None, num_experts: int, moe: bool) -> Placement:
    if policy is not None and moe:
        return policy.backward_placement(stage, layer)
    return _all_gpu(num_experts)


def backward_walk(stage: int, mb: int, layers, policy: LoadingPolicy | None, counts, *, moe: bool,
                  recompute: bool) -> Iterator[Step]:
    """The backward of (stage, mb): the forward again from the stage's checkpoint if
    `recompute` (each expert where its backward runs; CPU experts that ran forward on the
    CPU kept their activations in host memory), then the layers in reverse: experts, gate,
    attention."""
    if recompute:
        for layer in layers:
            row = _ints(counts[layer, mb])
            yield RunBlocks(_attention_and_gate(layer, moe), "fwd", "B", "recompute")
            placement = backward_placement(stage, layer, policy, len(row), moe)
            ran = policy.forward_placement(layer, mb) if policy is not None else None
            cpu_again = tuple(e for e in placement.cpu if ran is None or e not in ran.cpu)
            yield RunExperts(layer, _with_tokens(placement.gpu, row), _with_tokens(cpu_again, row),
                             row, "fwd", "B", "recompute")
    for layer in reversed(layers):
        row = _ints(counts[layer, mb])
        placement = backward_placement(stage, layer, policy, len(row), moe)
        yield RunExperts(layer, _with_tokens(placement.gpu, row), _with_tokens(placement.cpu, row),
                         row, "bwd", "B", "backward")
        yield RunBlocks(tuple(reversed(_attention_and_gate(layer, moe))), "bwd", "B", "backward")
