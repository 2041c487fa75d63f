"""Activations and their gradients between ranks: point-to-point, one channel per direction.

Each ordered pair of ranks that exchanges data gets its own process group (its own NCCL
communicator), used only for messages from the first to the second. On one channel the
sender's order of messages is the receiver's order (both follow the plan's GPipe order),
and a blocked message in one direction can never hold up the other: with a single
communicator per pair, NCCL queues sends and receives of both directions on one stream,
and a receive posted early would stall the sends behind it.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from aptmoe.plan.plan import Plan


def channels(plan: Plan) -> list[tuple[int, int]]:
    """Ordered (src, dst) rank pairs that exchange activations or gradients, sorted."""
    pairs = set()
    for s in range(plan.num_stages - 1):
        a, b = plan.rank_of(s), plan.rank_of(s + 1)
        if a != b:
            pairs.add((a, b))
            if not plan.fwd_only:
                pairs.add((b, a))
    return sorted(pairs)


class PeerChannels:
    """Groups for every channel of a plan; every rank must build it (collective)."""

    def __init__(self, plan: Plan, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.groups: dict[tuple[int, int], object] = {}
        for src, dst in channels(plan):
            # new_group is collective over the whole world, in the same order everywhere.
            g = dist.new_group([src, dst], timeout=timedelta(seconds=timeout_s))
            if rank in (src, dst):
                self.groups[(src, dst)] = g

    def send(self, tensor: torch.Tensor, dst: int):
        return dist.isend(tensor, dst, group=self.groups[(self.rank, dst)])

    def recv(self, tensor: torch.Tensor, src: int):
        return dist.irecv(tensor, src, group=self.groups[(src, self.rank)])
