"""Plan actions: small immutable values with a compact printed form that parses back.

After `torch.distributed.pipelining.schedules._Action`: ``2F0`` is stage 2's forward of
micro-batch 0. Blocks refine an action to one block of one layer: ``5LF@12:e3`` is the
forward-pass load of expert 3 of layer 12 (a block of stage 5), ``2F0@12:a`` the attention
forward of layer 12 for micro-batch 0. Trace events in both back-ends are named
``str(action)``, so a simulated and a measured timeline line up by name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    FWD = "F"          # forward of a stage for one micro-batch
    BWD = "B"          # backward (input and weight gradients)
    LOAD_F = "LF"      # host -> GPU parameters of a stage for its forward pass
    LOAD_B = "LB"      # ... again for its backward pass (stages are dropped in between)
    DROP_F = "DF"      # free a stage's parameters after its forward pass
    DROP_B = "DB"      # ... after its backward pass
    OFFLOAD = "O"      # GPU -> host gradients of a stage after its backward pass
    SEND_F = "SF"      # activations to the next stage's rank
    RECV_F = "RF"
    SEND_B = "SB"      # activation gradients to the previous stage's rank
    RECV_B = "RB"
    UPDATE = "U"       # optimizer step of a stage's parameters

    @property
    def takes_mb(self) -> bool:
        return self in _MB_KINDS


_MB_KINDS = frozenset({Kind.FWD, Kind.BWD, Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
SENDS = frozenset({Kind.SEND_F, Kind.SEND_B})
RECEIVES = frozenset({Kind.RECV_F, Kind.RECV_B})


class BlockKind(str, Enum):
    ATTN = "a"
    GATE = "g"
    EXPERT = "e"


@dataclass(frozen=True, slots=True, order=True)
class Block:
    """The unit of loading and placement: a layer's attention, its gate, or one expert."""

    layer: int
    kind: BlockKind
    expert: int | None = None
    _hash: int = field(default=0, init=False, repr=False, compare=False)   # see Action

    def __post_init__(self) -> None:
        if not isinstance(self.kind, BlockKind):
            object.__setattr__(self, "kind", BlockKind(self.kind))
        if (self.kind is BlockKind.EXPERT) != (self.expert is not None):
            raise ValueError(f"an expert block needs an expert index, other blocks none: {self!r}")
        object.__setattr__(self, "_hash", hash((self.layer, self.kind.value, self.expert)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.layer}:{self.kind.value}{'' if self.expert is None else self.expert}"

    # The back-ends name blocks millions of times in a large simulation: hand out one
    # shared value per block instead of building a new one each time.
    @staticmethod
    @functools.cache
    def attn(layer: int) -> "Block":
        return Block(layer, BlockKind.ATTN)

    @staticmethod
    @functools.cache
    def gate(layer: int) -> "Block":
        return Block(layer, BlockKind.GATE)

    @staticmethod
    @functools.cache
    def expert_of(layer: int, e: int) -> "Block":
        return Block(layer, BlockKind.EXPERT, int(e))

    @staticmethod
    def of_layer(layer: int, num_experts: int, moe: bool = True) -> list["Block"]:
        """A layer's blocks in forward order: attention, gate (MoE only), experts."""
        return ([Block.attn(layer)] + ([Block.gate(layer)] if moe else [])
                + [Block.expert_of(layer, e) for e in range(num_experts)])

    @staticmethod
    def of_layers(layers, num_experts: int, moe: bool = True) -> list["Block"]:
        """A stage's blocks, layer by layer in forward order (the order offload and update walk)."""
        return [b for layer in layers for b in Block.of_layer(layer, num_experts, moe)]


# Longest kinds first so "LF" is not read as "L" + "F".
_KIND_RE = "|".join(sorted((k.value for k in Kind), key=len, reverse=True))
_ACTION_RE = re.compile(rf"^(\d+)({_KIND_RE})(\d+)?(?:@(\d+):([age])(\d+)?)?$")


@dataclass(frozen=True, slots=True, order=True)
class Action:
    stage: int
    kind: Kind
    mb: int | None = None
    block: Block | None = None
    # Actions key every dependency map of both back-ends; hashing the fields each time
    # was a tenth of a large simulation, so the hash is computed once.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            object.__setattr__(self, "kind", Kind(self.kind))
        if self.kind.takes_mb != (self.mb is not None):
            raise ValueError(f"{self.kind.name} {'needs' if self.kind.takes_mb else 'takes no'} micro-batch")
        object.__setattr__(self, "_hash", hash((self.stage, self.kind.value, self.mb, self.block)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        mb = "" if self.mb is None else str(self.mb)
        blk = "" if self.block is None else f"@{self.block}"
        return f"{self.stage}{self.kind.value}{mb}{blk}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> "Action":
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ValueError(f"cannot parse action {text!r}; expected e.g. 2F0, 5LF, 5LF@12:e3")
        stage, kind, mb, layer, bkind, expert = m.groups()
        block = None
        if layer is not None:
            block = Block(int(layer), BlockKind(bkind), None if expert is None else int(expert))
        return cls(int(stage), Kind(kind), None if mb is None else int(mb), block)

    def at(self, block: Block) -> "Action":
        """The same action narrowed to one block (for traces and per-block loads)."""
        return Action(self.stage, self.kind, self.mb, block)

    @property
    def whole(self) -> "Action":
        return Action(self.stage, self.kind, self.mb) if self.block is not None else self


def F(stage: int, mb: int) -> Action:
    return Action(stage, Kind.FWD, mb)


def B(stage: int, mb: int) -> Action:
    return Action(stage, Kind.BWD, mb)
