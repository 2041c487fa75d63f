"""`aptmoe-plan`: print the validated plan of a configuration (the seed's flags).

    aptmoe-plan --is_moe=True --model_config=S --num_experts=16 --gini=0.3 --topo=C1+G2 --pipeline=APTMoE
    aptmoe-plan ... --grid          # the unit-time rank-by-step grid as well
    aptmoe-plan ... --json plan.json
"""

from __future__ import annotations

import sys

from aptmoe.config import ConfigError
from aptmoe.flags import (
    add_cluster_flags,
    add_seed_flags,
    config_from_args,
    make_parser,
)
from aptmoe.memory import MemoryModel
from aptmoe.plan.builders import build_plan
from aptmoe.plan.plan import PlanError
from aptmoe.plan.validate import format_grid, validate
from aptmoe.profile import ProfileCost, ProfileError, load_profile
from aptmoe.trace import write_json_atomic

PROG = "aptmoe-plan"


def main(argv: list[str] | None = None) -> int:
    p = make_parser(PROG, "Build, validate and print the plan of one schedule.")
    add_seed_flags(p)
    add_cluster_flags(p)
    p.add_argument("--calibration", default="a800-paper", help="profile for the partition search and GPU size")
    p.add_argument("--grid", action="store_true", help="also print the unit-time rank-by-step grid")
    p.add_argument("--json", default=None, help="write the plan as JSON to this file")
    ns = p.parse_args(argv)
    try:
        profile = load_profile(ns.calibration)
        cfg = config_from_args(ns, **profile.cluster_defaults())
        cost = ProfileCost(profile, cfg.model, pinned=cfg.schedule.pinned,
                           link_cap_GBps=cfg.cluster.link_bandwidth_GBps)
        plan = build_plan(cfg, cost)
        mem = MemoryModel(cfg.model, cfg.tokens_per_micro_batch, cfg.micro_batch_size)
        run = validate(plan, memory=mem, capacity_bytes=cfg.cluster.gpu_memory_bytes)
    except (ConfigError, PlanError, ProfileError, ValueError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(plan.describe())
    print(f"valid: {run.steps} unit steps, peak GPU memory per rank (upper bound) "
          + ", ".join(f"{b / 1e9:.1f} GB" for b in run.peak_bytes)
          + f" of {cfg.cluster.gpu_memory_bytes / 1e9:.0f} GB")
    if ns.grid:
        print(format_grid(plan, run.start))
    if ns.json:
        write_json_atomic(ns.json, plan.to_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
