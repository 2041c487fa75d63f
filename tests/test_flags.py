"""The seed artifact's command line, mapped onto RunConfig (DESIGN §5)."""

from __future__ import annotations

import shlex

import pytest

from aptmoe.config import ConfigError, Pipeline, RunConfig
from aptmoe.flags import (ARTIFACT_PRESETS, add_cluster_flags, add_seed_flags, config_from_args, make_parser,
                          pipelines_of, str2bool)

SEED_LINE = ("--is_moe=True --num_training_steps=50 --model_config=S --num_experts=16 --gini=0.3 "
             "--topo=C1+G2 --pipeline=APTMoE")


def _parser():
    p = make_parser("aptmoe-test", "flags under test")
    add_seed_flags(p)
    add_cluster_flags(p)
    return p


def parse(line: str, **kw) -> RunConfig:
    return config_from_args(_parser().parse_args(shlex.split(line)), **kw)


def test_seed_demo_line() -> None:
    cfg = parse(SEED_LINE)
    m, t, s = cfg.model, cfg.train, cfg.schedule
    assert (m.num_layers, s.num_stages, t.batch_size, t.num_chunks, m.seq_length) == (32, 8, 128, 4, 128)
    assert (m.num_experts, cfg.popularity.gini, m.is_moe) == (16, 0.3, True)
    assert (m.embedding_dim, m.hidden_dim, m.num_heads) == (1024, 4096, 32)
    assert s.pipeline is Pipeline.APTMOE and cfg.cluster.topo == "C1+G2"
    assert t.num_training_steps == 50 and t.num_warmup_steps == 2 and t.seed == 42
    assert cfg.world_size == 4 and cfg.micro_batches == 4 and cfg.micro_batch_size == 32
    assert m.name == "MoE-S-16"
    assert not s.fwd_only and not s.inter_stage_only


def test_space_separated_flags_are_the_same() -> None:
    assert parse(SEED_LINE.replace("=", " ", ).replace("--is_moe True", "--is_moe=True")) == parse(SEED_LINE)


def test_artifact_defaults_without_flags() -> None:
    cfg = parse("")
    # --model_config defaults to S, --is_moe to False (dense), --pipeline to GPipe
    assert cfg.model.num_layers == 32 and not cfg.model.is_moe and cfg.model.num_experts == 1
    assert cfg.schedule.pipeline is Pipeline.GPIPE and cfg.schedule.num_stages is None
    assert cfg.popularity.gini == 1.0          # one FFN takes every token


@pytest.mark.parametrize("size", ["M", "L"])
def test_artifact_presets_m_and_l(size: str) -> None:
    cfg = parse(f"--is_moe=True --model_config={size} --num_experts=8 --gini=0.3 --pipeline=Mobius")
    pre = ARTIFACT_PRESETS[size]
    assert cfg.model.embedding_dim == pre["embedding_dim"] and cfg.model.hidden_dim == pre["hidden_dim"]
    assert cfg.train.batch_size == pre["batch_size"] and cfg.schedule.num_stages == 8


def test_table_i_model_uses_partition_search() -> None:
    cfg = parse("--model_config MoE-S-16 --pipeline Mobius --gini 0.2")
    assert cfg.model.num_layers == 64 and cfg.model.num_experts == 16 and cfg.model.is_moe
    assert cfg.schedule.num_stages is None           # chosen by the partition search
    assert cfg.train.batch_size == 128 and cfg.micro_batches == cfg.world_size == 4
    assert parse("--model_config MoE-L-8 --gini 0.2").train.batch_size == 64


def test_explicit_flags_override_presets() -> None:
    cfg = parse(SEED_LINE + " --num_layers 16 --num_stages 4 --batch_size 32 --num_chunks 8 --seq_length 64 "
                "--embedding_dim 512 --hidden_dim 1024 --num_heads 8 --seed 3 --num_warmup_steps 0")
    m, t = cfg.model, cfg.train
    assert (m.num_layers, cfg.schedule.num_stages, t.batch_size, t.num_chunks, m.seq_length) == (16, 4, 32, 8, 64)
    assert (m.embedding_dim, m.hidden_dim, m.num_heads, t.seed, t.num_warmup_steps) == (512, 1024, 8, 3, 0)
    cfg = parse("--model_config MoE-S-16 --num_layers 32 --num_experts 8 --batch_size 64 --num_stages 8 --gini 0.3 "
                "--pipeline Mobius")
    assert (cfg.model.num_layers, cfg.model.num_experts, cfg.train.batch_size, cfg.schedule.num_stages) == (32, 8, 64, 8)
    assert cfg.model.name == "MoE-S-8"


def test_preset_stage_count_that_no_longer_divides_falls_back_to_search() -> None:
    cfg = parse(SEED_LINE + " --num_layers 12")
    assert cfg.schedule.num_stages is None


def test_gpipe_ignores_preset_stages() -> None:
    cfg = parse(SEED_LINE.replace("APTMoE", "GPipe"))
    assert cfg.schedule.pipeline is Pipeline.GPIPE and cfg.schedule.num_stages is None
    with pytest.raises(ConfigError, match="GPipe"):
        parse(SEED_LINE.replace("APTMoE", "GPipe") + " --num_stages 8")   # explicit: checked


def test_pipeline_and_gpus_from_the_entry_point() -> None:
    cfg = parse(SEED_LINE, pipeline="Mobius", gpus=2)
    assert cfg.schedule.pipeline is Pipeline.MOBIUS and cfg.world_size == 2 and cfg.micro_batches == 4


def test_pipeline_lists() -> None:
    """`--pipeline all`, a comma-separated list (in the paper's order, once each), or one."""
    def of(text: str) -> list[str]:
        return pipelines_of(_parser().parse_args(["--pipeline", text]))

    assert of("all") == ["GPipe", "GPipeOffload", "Mobius", "APTMoE"]
    assert of("aptmoe, Mobius,APTMoE") == ["Mobius", "APTMoE"]
    assert of("GPipeOffload") == ["GPipeOffload"]
    assert pipelines_of(_parser().parse_args([])) == ["GPipe"]
    with pytest.raises(ConfigError, match="'Mobus' is unknown"):
        of("APTMoE,Mobus")
    with pytest.raises(ConfigError, match="names no schedule"):
        of(" , ")
    # GPipe in a list takes one stage per GPU, as with all, whatever the preset says
    line = SEED_LINE.replace("--pipeline=APTMoE", "--pipeline=GPipe,APTMoE") + " --num_stages 8"
    cfg = parse(line, pipeline="GPipe")
    assert cfg.schedule.num_stages is None


def test_aptmoe_flags() -> None:
    cfg = parse(SEED_LINE + " --gpus 2 --gpu-memory 80 --link-bandwidth 12.5 --cores-per-socket 32 --pageable "
                "--fwd_only --inter_stage_only --max-copies-in-flight 3 --dtype bf16 --persistence 0.5 "
                "--predictor-accuracy 0.64")
    assert cfg.world_size == 2 and cfg.cluster.gpu_memory_bytes == 80 * 10**9
    assert cfg.cluster.link_bandwidth_GBps == 12.5 and cfg.cluster.cores_per_socket == 32
    assert not cfg.schedule.pinned and cfg.schedule.fwd_only and cfg.schedule.inter_stage_only
    assert cfg.schedule.max_copies_in_flight == 3 and cfg.model.dtype == "bf16"
    assert cfg.popularity.persistence == 0.5 and cfg.popularity.predictor_accuracy == 0.64
    assert parse(SEED_LINE + " --fwd_only=False").schedule.fwd_only is False


@pytest.mark.parametrize("text, value", [("True", True), ("true", True), ("1", True), ("False", False),
                                         ("no", False), ("OFF", False)])
def test_str2bool(text: str, value: bool) -> None:
    assert str2bool(text) is value


@pytest.mark.parametrize("line", [
    "--is_moe=maybe", "--num_stages abc", "--gini high", "--fwd_only=perhaps", "--no_such_flag 1",
    "--batch_size 1.5", "--host-cores some", "--host-cores -1", "--gpus 0", "--nodes 0", "--cores-per-socket 0",
])
def test_bad_flag_values_exit_2_with_one_line(line: str, capsys) -> None:
    with pytest.raises(SystemExit) as ex:
        _parser().parse_args(shlex.split(line))
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "usage:" not in err


@pytest.mark.parametrize("line, needle", [
    ("--pipeline Foo", "--pipeline 'Foo'"),
    ("--topo C2+G8", "--topo"),
    ("--model_config XL", "XL"),
    ("--model_config MoE-S-16 --is_moe=False", "--is_moe=False"),
    (SEED_LINE.replace("--gini=0.3", "--gini=0.01"), "--gini 0.01"),
    (SEED_LINE + " --num_stages 7", "--num_stages 7"),
    (SEED_LINE + " --num_chunks 256", "--num_chunks 256"),
    (SEED_LINE + " --num_experts 0", "num_experts"),
    ("--model_config MoE-S-16 --num_experts 0", "num_experts"),
    ("--model_config MoE-S-16 --num_layers 0", "num_layers"),
    (SEED_LINE + " --top_k 32", "top_k"),
    ("--gini 0.3", "--is_moe=True"),                  # a dense model has no popularity to set
    ("--is_moe=False --gini 1.5", "dense"),
])
def test_bad_values_raise_config_error(line: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(line)
    assert needle in str(err.value)


def test_host_cores_flag_takes_a_number_or_auto() -> None:
    assert parse("--host-cores 2").cluster.host_cores == 2
    assert parse("--host-cores auto --topo C1+G2").cluster.host_cores == 2      # 28 cores / 2 GPUs: 14 a rank
    assert parse("--host-cores auto --topo C1+G4 --cores-per-socket 12").cluster.host_cores == 0   # 3 a rank
    assert parse("").cluster.host_cores == 2            # auto is the default (measured: docs/validation-h200-hostcores)
    assert parse("--host-cores 0").cluster.host_cores == 0
