"""Shared by the executor's CPU and GPU tests: a tiny run of all four schedules through
`aptmoe-run` (its own process launch, gloo or NCCL), checked against the reference."""

from __future__ import annotations

import json
from pathlib import Path

from aptmoe.exec.cli import main as run_main
from aptmoe.exec.cli import make_run_parser, prepare
from aptmoe.exec.data import make_source
from aptmoe.exec.reference import agreement, load_saved_params, train_reference

TINY = ["--is_moe=True", "--model_config=S", "--embedding_dim", "32", "--hidden_dim", "64", "--num_heads", "4",
        "--num_layers", "4", "--num_stages", "4", "--num_experts", "4", "--batch_size", "4", "--num_chunks", "2",
        "--seq_length", "8", "--gini", "0.5", "--topo", "C1+G1", "--num_warmup_steps", "0",
        "--num_training_steps", "3", "--lr", "1e-3", "-q"]


def run_and_compare(tmp: Path, extra: list[str], *, cuda: bool) -> dict[str, dict]:
    """Runs `aptmoe-run` with TINY + extra; returns per schedule its result and agreement."""
    out = tmp / "run"
    argv = [*TINY, *extra, "--out", str(out), "--save-params"]
    assert run_main(argv) == 0
    results = json.loads((out / "results.json").read_text())["schedules"]
    ns = make_run_parser().parse_args(argv)
    checked = {}
    for name, res in results.items():
        cfg, _, _ = prepare(ns, name, cuda)
        source = make_source(None, cfg.model.seq_length, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
        ref = train_reference(cfg, source, cfg.train.num_warmup_steps + cfg.train.num_training_steps)
        checked[name] = {"result": res, "agreement": agreement(ref, res["losses"], load_saved_params(out, name))}
    return checked
