"""The shared step sequence of a stage's pass, and the order it tells the policy things."""

from __future__ import annotations

import numpy as np

from aptmoe.plan.actions import Block
from aptmoe.policy import Placement
from aptmoe.stage_walk import RunBlocks, RunExperts, backward_walk, forward_walk


class Recorder:
    """A policy stand-in that logs calls and places expert 0 on the GPU, the rest on the CPU."""

    def __init__(self):
        self.calls = []

    def predicted_counts(self, stage, layer, mb, counts):
        self.calls.append(("predicted", layer, mb))

    def gate_counts(self, stage, layer, mb, counts):
        self.calls.append(("gate", layer, mb))
        return Placement((0,), (1, 2))

    def backward_placement(self, stage, layer):
        self.calls.append(("bwd", layer))
        return Placement((0, 1), (2,))

    def forward_placement(self, layer, mb):
        return Placement((0,), (1, 2))


COUNTS = np.array([[[5, 3, 0]], [[4, 0, 2]]])      # [layers=2, mb=1, E=3]


def _drive(walk):
    """Run a walk the way a back-end does: each step, then resume (the policy learns meanwhile)."""
    return [step for step in walk]


def test_forward_tells_the_policy_at_the_moments_the_system_learns():
    p = Recorder()
    steps = _drive(forward_walk(3, 0, (0, 1), p, COUNTS, COUNTS, moe=True))
    assert p.calls == [("predicted", 0, 0), ("gate", 0, 0), ("predicted", 1, 0), ("gate", 1, 0)]
    assert [type(s) for s in steps] == [RunBlocks, RunExperts, RunBlocks, RunExperts]
    assert steps[0].blocks == (Block.attn(0), Block.gate(0)) and steps[0].pass_ == "F"
    # experts without tokens run nowhere: layer 0's expert 2 and layer 1's expert 1 have none
    assert (steps[1].gpu, steps[1].cpu) == ((0,), (1,))
    assert (steps[3].gpu, steps[3].cpu) == ((0,), (2,))


def test_backward_recomputes_forward_then_walks_layers_in_reverse():
    p = Recorder()
    steps = _drive(backward_walk(3, 0, (0, 1), p, COUNTS, moe=True, recompute=True))
    cats = [(type(s).__name__, s.cat, getattr(s, "layer", None)) for s in steps]
    assert cats == [("RunBlocks", "recompute", None), ("RunExperts", "recompute", 0),
                    ("RunBlocks", "recompute", None), ("RunExperts", "recompute", 1),
                    ("RunExperts", "backward", 1), ("RunBlocks", "backward", None),
                    ("RunExperts", "backward", 0), ("RunBlocks", "backward", None)]
    # recompute: expert 2 ran forward on the CPU, so its activations are in host memory
    assert steps[3].cpu == () and steps[1].cpu == ()
    assert steps[5].blocks == (Block.gate(1), Block.attn(1))            # gate, then attention


def test_dense_and_resident_passes_need_no_policy():
    steps = _drive(forward_walk(0, 0, (0,), None, COUNTS[:, :, :1], COUNTS[:, :, :1], moe=False))
    assert steps[0].blocks == (Block.attn(0),) and (steps[1].gpu, steps[1].cpu) == ((0,), ())
