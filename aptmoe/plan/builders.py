"""Schedule builders: pure functions from a config to a `Plan`.

All four schedules run in GPipe order: every micro-batch forward through a stage, then the
next stage; after the last forward, the backward in reverse. They differ in where stages
live and how their parameters arrive:

* GPipe: one stage per GPU, parameters, gradients and Adam states resident; nothing moves
  over the host link during a step. Activations are checkpointed at stage boundaries for
  every micro-batch but the last, as torchgpipe (the GPipe the paper ran) does by default.
* GPipeOffload: GPipe's contiguous stage-to-GPU mapping, each GPU's share cut into smaller
  stages, loaded and run one by one (one stage resident at a time).
* Mobius: stage s on GPU s mod G (cross mapping); a GPU prefetches the next stage it owns
  while it computes the current one (two stages resident at most); every block is loaded.
* APTMoE: Mobius's placement and residency; which blocks are copied, in which order, and
  which experts run on the CPU are decided at run time by `aptmoe.policy.AptmoePolicy`.

A GPU's sequence of stage residencies (forward stages ascending, then backward stages
descending; its last stage stays for both passes) is what the load stream walks: residency
k may begin loading once residency k - window has been dropped.
"""

from __future__ import annotations

from aptmoe.config import ConfigError, Pipeline, RunConfig
from aptmoe.costs import CostSource
from aptmoe.plan.actions import Action, Kind
from aptmoe.plan.plan import STREAMS, Plan, Stage


def even_layers(num_layers: int, num_stages: int) -> list[tuple[int, ...]]:
    if num_layers % num_stages:
        raise ConfigError(f"{num_stages} stages do not divide {num_layers} layers")
    per = num_layers // num_stages
    return [tuple(range(s * per, (s + 1) * per)) for s in range(num_stages)]


def _residencies(owned: list[int], fwd_only: bool) -> list[tuple[int, str]]:
    """(stage, pass) in the order the rank holds them; pass "F", "B" or "FB"."""
    if fwd_only:
        return [(s, "F") for s in owned]
    seq = [(s, "F") for s in owned[:-1]] + [(owned[-1], "FB")]
    return seq + [(s, "B") for s in reversed(owned[:-1])]


def _recompute_mode(cfg: RunConfig, resident: bool) -> str:
    mode = cfg.schedule.recompute
    if cfg.schedule.fwd_only:
        return "none"                       # nothing to go back to
    if mode == "auto":
        return "except_last" if resident else "all"
    return mode


def _build(cfg: RunConfig, *, pipeline: Pipeline, stage_rank: list[int], layers: list[tuple[int, ...]],
           window: int, policy: str, resident: bool) -> Plan:
    G, M = cfg.world_size, cfg.micro_batches
    S = len(layers)
    fwd_only = cfg.schedule.fwd_only
    stages = tuple(Stage(s, stage_rank[s], layers[s]) for s in range(S))
    programs: list[dict[str, list[Action]]] = [{k: [] for k in STREAMS} for _ in range(G)]
    deps: dict[Action, list[Action]] = {}

    def dep(a: Action, *on: Action) -> None:
        deps.setdefault(a, []).extend(on)

    def add(rank: int, stream: str, a: Action) -> Action:
        programs[rank][stream].append(a)
        return a

    owned = {r: [s for s in range(S) if stage_rank[s] == r] for r in range(G)}

    # -- compute and net streams, in GPipe order per rank
    for r in range(G):
        for s in owned[r]:
            for m in range(M):
                f = Action(s, Kind.FWD, m)
                if s > 0:
                    if stage_rank[s - 1] != r:
                        recv = add(r, "net", Action(s, Kind.RECV_F, m))
                        dep(recv, Action(s - 1, Kind.SEND_F, m))
                        dep(f, recv)
                    else:
                        dep(f, Action(s - 1, Kind.FWD, m))
                add(r, "compute", f)
                if s < S - 1 and stage_rank[s + 1] != r:
                    dep(add(r, "net", Action(s, Kind.SEND_F, m)), f)
            if not resident and (fwd_only or s != owned[r][-1]):
                add(r, "compute", Action(s, Kind.DROP_F))
        if fwd_only:
            continue
        for s in reversed(owned[r]):
            for m in range(M):
                b = Action(s, Kind.BWD, m)
                if s < S - 1:
                    if stage_rank[s + 1] != r:
                        recv = add(r, "net", Action(s, Kind.RECV_B, m))
                        dep(recv, Action(s + 1, Kind.SEND_B, m))
                        dep(b, recv)
                    else:
                        dep(b, Action(s + 1, Kind.BWD, m))
                add(r, "compute", b)
                if s > 0 and stage_rank[s - 1] != r:
                    dep(add(r, "net", Action(s, Kind.SEND_B, m)), b)

    # -- load, offload and update streams
    for r in range(G):
        if not fwd_only:
            for s in reversed(owned[r]):
                last_b = Action(s, Kind.BWD, M - 1)
                if resident:
                    dep(add(r, "compute", Action(s, Kind.UPDATE)), last_b)
                    continue
                off = add(r, "offload", Action(s, Kind.OFFLOAD))
                dep(off, last_b)
                add(r, "offload", Action(s, Kind.DROP_B))
                # The update follows the offload block by block (both back-ends wait for each
                # block's gradient to reach the host), so it starts with the offload, not after it.
                dep(add(r, "cpu", Action(s, Kind.UPDATE)), last_b)
        if resident:
            continue
        drops: list[Action] = []
        for k, (s, pss) in enumerate(_residencies(owned[r], fwd_only)):
            load = add(r, "load", Action(s, Kind.LOAD_B if pss == "B" else Kind.LOAD_F))
            if k >= window:
                dep(load, drops[k - window])
            drops.append(Action(s, Kind.DROP_F if pss == "F" else Kind.DROP_B))
            first_use = Action(s, Kind.BWD if pss == "B" else Kind.FWD, 0)
            dep(first_use, load)

    return Plan(pipeline=pipeline.value, num_ranks=G, micro_batches=M, stages=stages, programs=programs,
                deps={a: tuple(v) for a, v in deps.items()}, policy=policy, resident=resident,
                fwd_only=fwd_only, inter_stage_only=cfg.schedule.inter_stage_only,
                recompute=_recompute_mode(cfg, resident))


def gpipe(cfg: RunConfig) -> Plan:
    G = cfg.world_size
    return _build(cfg, pipeline=Pipeline.GPIPE, stage_rank=list(range(G)),
                  layers=even_layers(cfg.model.num_layers, G), window=1, policy="resident", resident=True)


def gpipe_offload(cfg: RunConfig, num_stages: int) -> Plan:
    G = cfg.world_size
    per_rank = num_stages // G
    return _build(cfg, pipeline=Pipeline.GPIPE_OFFLOAD, stage_rank=[s // per_rank for s in range(num_stages)],
                  layers=even_layers(cfg.model.num_layers, num_stages), window=1, policy="stage",
                  resident=False)


def mobius(cfg: RunConfig, num_stages: int) -> Plan:
    G = cfg.world_size
    return _build(cfg, pipeline=Pipeline.MOBIUS, stage_rank=[s % G for s in range(num_stages)],
                  layers=even_layers(cfg.model.num_layers, num_stages), window=2, policy="stage",
                  resident=False)


def aptmoe(cfg: RunConfig, num_stages: int) -> Plan:
    plan = mobius(cfg, num_stages)
    plan.pipeline = Pipeline.APTMOE.value
    plan.policy = "aptmoe"
    return plan


def build_plan(cfg: RunConfig, cost: CostSource | None = None) -> Plan:
    """The plan for `cfg.schedule.pipeline`; the stage count comes from the config or,
    for the offload schedules, from the partition search (which needs a cost source)."""
    from aptmoe.plan.partition import choose_num_stages

    p = cfg.schedule.pipeline
    if p is Pipeline.GPIPE:
        plan = gpipe(cfg)
    else:
        S = cfg.schedule.num_stages
        if S is None:
            if cost is None:
                raise ConfigError(f"{p.value} needs --num_stages or a cost source to choose it")
            S = choose_num_stages(cfg, cost)
        plan = {Pipeline.GPIPE_OFFLOAD: gpipe_offload, Pipeline.MOBIUS: mobius,
                Pipeline.APTMOE: aptmoe}[p](cfg, S)
    plan.meta.update(model=cfg.model.name, layers=cfg.model.num_layers, experts=cfg.model.num_experts,
                     gini=cfg.popularity.gini, topo=cfg.cluster.topo)
    return plan
