"""The plan: per rank, ordered programs per stream, plus explicit dependencies.

A stream runs its program in order, one action at a time. An action also waits for its
explicit dependencies (other streams, other ranks). Both back-ends walk the same plan; what
a plan cannot fix in advance (which blocks of a stage to copy, which experts run on the CPU)
is asked of the loading policy at run time (`aptmoe.policy`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from aptmoe.plan.actions import SENDS, Action, Kind

STREAMS = ("compute", "load", "offload", "cpu", "net")

# Where each kind of action runs (UPDATE is placed per plan: CPU for the offload schedules,
# the GPU for GPipe, which keeps its optimizer on the device).
STREAM_OF = {
    Kind.FWD: "compute", Kind.BWD: "compute", Kind.DROP_F: "compute",
    Kind.LOAD_F: "load", Kind.LOAD_B: "load",
    Kind.OFFLOAD: "offload", Kind.DROP_B: "offload",
    Kind.SEND_F: "net", Kind.RECV_F: "net", Kind.SEND_B: "net", Kind.RECV_B: "net",
}


class PlanError(ValueError):
    """A plan that breaks an ordering, matching or memory rule; the message shows where."""


@dataclass(frozen=True)
class Stage:
    index: int
    rank: int
    layers: tuple[int, ...]


@dataclass
class Plan:
    """Plain data: prints, serializes (JSON) and compares."""

    pipeline: str
    num_ranks: int
    micro_batches: int
    stages: tuple[Stage, ...]
    programs: list[dict[str, list[Action]]]
    deps: dict[Action, tuple[Action, ...]]
    policy: str                      # "resident" | "stage" | "aptmoe"
    resident: bool = False           # GPipe: parameters live on the GPU; nothing is loaded
    fwd_only: bool = False
    inter_stage_only: bool = False
    # Activation checkpointing: "none" keeps every activation until its backward; "all"
    # keeps each stage's input and recomputes its forward in the backward; "except_last"
    # does so for every micro-batch but the last (torchgpipe's default, for GPipe).
    recompute: str = "none"
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def rank_of(self, stage: int) -> int:
        return self.stages[stage].rank

    def stages_of(self, rank: int) -> list[int]:
        return [s.index for s in self.stages if s.rank == rank]

    def actions(self) -> Iterator[tuple[int, str, Action]]:
        for rank, streams in enumerate(self.programs):
            for stream in STREAMS:
                for a in streams.get(stream, ()):
                    yield rank, stream, a

    def recomputes(self, mb: int) -> bool:
        """Whether micro-batch `mb` keeps only stage checkpoints and recomputes in backward."""
        return self.recompute == "all" or (self.recompute == "except_last" and mb != self.micro_batches - 1)

    def deps_of(self, action: Action) -> tuple[Action, ...]:
        return self.deps.get(action, ())

    def sends_by_producer(self, rank: int) -> dict[Action, list[Action]]:
        """The rank's sends by the one action that computes what they carry, in the net
        program's order: the thread that runs that action posts them right after it (the
        executor's `_post_through`; the simulator charges that thread's clock for them)."""
        out: dict[Action, list[Action]] = {}
        for a in self.programs[rank].get("net", ()):
            deps = self.deps_of(a)
            if a.kind in SENDS and len(deps) == 1:
                out.setdefault(deps[0], []).append(a)
        return out

    # ------------------------------------------------------------------ printing
    def describe(self) -> str:
        """A per-rank view, like the seed artifact's action lists."""
        lines = [f"{self.pipeline}: {self.num_stages} stages on {self.num_ranks} ranks, "
                 f"{self.micro_batches} micro-batches, policy={self.policy}"
                 + (", fwd_only" if self.fwd_only else "")
                 + (", inter_stage_only" if self.inter_stage_only else "")
                 + (f", recompute={self.recompute}" if self.recompute != "none" else "")]
        for st in self.stages:
            lines.append(f"  stage {st.index}: rank {st.rank}, layers {st.layers[0]}-{st.layers[-1]}")
        for rank, streams in enumerate(self.programs):
            lines.append(f"rank {rank}:")
            for stream in STREAMS:
                prog = streams.get(stream, [])
                if prog:
                    lines.append(f"  {stream:8s} " + " ".join(map(str, prog)))
        return "\n".join(lines)

    __str__ = describe

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {
            "format": "aptmoe-plan/1",
            "pipeline": self.pipeline, "num_ranks": self.num_ranks,
            "micro_batches": self.micro_batches, "policy": self.policy,
            "resident": self.resident, "fwd_only": self.fwd_only,
            "inter_stage_only": self.inter_stage_only, "recompute": self.recompute, "meta": self.meta,
            "stages": [{"index": s.index, "rank": s.rank, "layers": list(s.layers)} for s in self.stages],
            "programs": [{k: [str(a) for a in v] for k, v in p.items()} for p in self.programs],
            "deps": {str(a): [str(d) for d in ds] for a, ds in sorted(self.deps.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Plan":
        if d.get("format") != "aptmoe-plan/1":
            raise PlanError(f"not an aptmoe plan (format {d.get('format')!r}); expected aptmoe-plan/1")
        return cls(
            pipeline=d["pipeline"], num_ranks=d["num_ranks"], micro_batches=d["micro_batches"],
            stages=tuple(Stage(s["index"], s["rank"], tuple(s["layers"])) for s in d["stages"]),
            programs=[{k: [Action.parse(a) for a in v] for k, v in p.items()} for p in d["programs"]],
            deps={Action.parse(a): tuple(Action.parse(x) for x in ds) for a, ds in d["deps"].items()},
            policy=d["policy"], resident=d["resident"], fwd_only=d["fwd_only"],
            inter_stage_only=d["inter_stage_only"], recompute=d.get("recompute", "none"),
            meta=dict(d.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))
