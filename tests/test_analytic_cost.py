"""The roofline cost source: formulas, presets against their references, caps and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aptmoe.analytic_cost import (AnalyticCost, AnalyticHardware, a800_pcie_hardware, h200_hardware,
                                  hardware_preset)
from aptmoe.config import ConfigError, ModelConfig, moe_model
from aptmoe.costs import CostSource, LinkSpec

S8 = moe_model("S", 8)
TINY = ModelConfig(embedding_dim=64, hidden_dim=256, num_heads=4, num_layers=2, num_experts=4, seq_length=16)


@pytest.fixture(params=[a800_pcie_hardware, h200_hardware], ids=["a800", "h200"])
def hw(request) -> AnalyticHardware:
    return request.param()


def test_it_is_a_cost_source(hw):
    cost = AnalyticCost(S8, hw)
    assert isinstance(cost, CostSource)
    assert hw.name in cost.name


def test_flop_counts():
    cost = AnalyticCost(TINY, a800_pcie_hardware())
    d, h, L, E = 64, 256, 16, 4
    assert cost.flops("e", 10) == 2 * 10 * 2 * d * h
    assert cost.flops("a", 32) == 2 * 32 * 4 * d * d + 2 * 2 * 32 * L * d
    assert cost.flops("g", 32) == 2 * 32 * d * E


def test_gpu_time_is_a_roofline(hw):
    cost = AnalyticCost(S8, hw)
    # One token: weight-bound, the expert's 33.5 MB read from HBM.
    assert cost.gpu_s("e", 1, "fwd") == pytest.approx(hw.gpu_launch_s + cost.bytes_touched("e", 1) / (hw.gpu_hbm_GBps * 1e9))
    assert cost.bytes_touched("e", 1) >= S8.block_bytes("e")
    # Many tokens: compute-bound at the fp32 rate.
    n = 8192
    assert cost.gpu_s("e", n, "fwd") == pytest.approx(hw.gpu_launch_s + cost.flops("e", n) / (hw.gpu_tflops_fp32 * 1e12))
    for kind in "aeg":
        assert cost.gpu_s(kind, 512, "bwd") == pytest.approx(2 * cost.gpu_s(kind, 512, "fwd"))
        assert cost.gpu_s(kind, 0, "fwd") == 0.0
        assert cost.gpu_s(kind, 1024, "fwd") > cost.gpu_s(kind, 8, "fwd") > 0


def test_bf16_uses_the_bf16_rates(hw):
    bf = AnalyticCost(S8.with_(dtype="bf16"), hw)
    n = 1 << 16
    assert bf.gpu_s("e", n, "fwd") == pytest.approx(hw.gpu_launch_s + bf.flops("e", n) / (hw.gpu_tflops_bf16 * 1e12))
    assert bf.cpu_expert_s(n, "fwd", 4) == pytest.approx(
        hw.cpu_expert_overhead_s + bf.flops("e", n) / (hw.cpu_gflops_per_core_bf16 * 1e9 * 4))
    assert bf.bytes_touched("e", 0) == S8.block_bytes("e") // 2


def test_cpu_expert_time(hw):
    cost = AnalyticCost(S8, hw)
    assert cost.cpu_expert_s(0, "fwd", 4) == 0.0
    t1, t4 = cost.cpu_expert_s(1000, "fwd", 1), cost.cpu_expert_s(1000, "fwd", 4)
    assert t1 == pytest.approx(hw.cpu_expert_overhead_s + cost.flops("e", 1000) / (hw.cpu_gflops_per_core_fp32 * 1e9))
    assert t4 - hw.cpu_expert_overhead_s == pytest.approx((t1 - hw.cpu_expert_overhead_s) / 4)
    assert cost.cpu_expert_s(1000, "bwd", 4) == pytest.approx(2 * t4)


def test_a800_preset_against_the_paper_artifact():
    # Artifact lookup table (reference/a800-paper-testbed.json): one MoE-S expert forward on
    # the CPU takes 0.197 ms for 1 token and 0.1187 s for 8192 tokens (28 cores, we assume).
    cost = AnalyticCost(S8, a800_pcie_hardware())
    assert cost.cpu_expert_s(1, "fwd", 28) == pytest.approx(0.197e-3, rel=0.1)
    assert cost.cpu_expert_s(8192, "fwd", 28) == pytest.approx(0.1187, rel=0.1)
    # Pinned Gen4: a 33.5 MB expert in ~1.35 ms (the artifact's pageable 3.2 ms is ~2.4x that).
    assert cost.h2d().time_s(S8.block_bytes("e")) == pytest.approx(1.35e-3, rel=0.01)


@pytest.mark.parametrize("size, tokens, dtype, cpu_ms, gpu_ms", [
    ("S", 4096, "fp32", 76.66, 1.412),
    ("M", 4096, "fp32", 251.0, 5.484),
    ("M", 4096, "bf16", 85.6, 0.372),
    ("L", 4096, "bf16", 263.7, 1.237),
])
def test_h200_preset_against_the_probe(size, tokens, dtype, cpu_ms, gpu_ms):
    # reference/h200-host-probe.json, expert FFN forward, 16 threads.
    cost = AnalyticCost(moe_model(size, 8, dtype=dtype), h200_hardware())
    assert cost.cpu_expert_s(tokens, "fwd", 16) * 1e3 == pytest.approx(cpu_ms, rel=0.25)
    assert cost.gpu_s("e", tokens, "fwd") * 1e3 == pytest.approx(gpu_ms, rel=0.25)


def test_h200_links_against_the_probe():
    cost = AnalyticCost(S8, h200_hardware())
    assert cost.h2d().time_s(8 * 2**20) == pytest.approx(8 * 2**20 / 52.22e9, rel=0.03)
    assert cost.h2d().time_s(512 * 2**20) == pytest.approx(512 * 2**20 / 55.24e9, rel=0.02)
    assert [cost.root_GBps(n) for n in (1, 2, 3, 4)] == [55.0, 110.0, 165.0, 200.0]
    assert cost.p2p(True).GBps == 380.0


def test_link_cap(hw):
    capped = AnalyticCost(S8, hw, link_cap_GBps=5.0)
    assert capped.h2d() == LinkSpec(hw.h2d.latency_s, 5.0)
    assert capped.d2h().GBps == 5.0
    assert capped.root_GBps(4) == min(20.0, hw.root_GBps)
    assert "@5GBps" in capped.name
    # A cap above the native link changes nothing.
    assert AnalyticCost(S8, hw, link_cap_GBps=1e4).h2d() == hw.h2d
    # p2p is not a host link: not capped.
    assert capped.p2p(False) == hw.p2p_inter


def test_adam(hw):
    cost = AnalyticCost(S8, hw)
    assert cost.adam_cpu_s(10**9, 10) == pytest.approx(1e9 / (hw.cpu_adam_params_per_s_per_core * 10))
    assert cost.adam_gpu_s(10**9) == pytest.approx(1e9 / hw.gpu_adam_params_per_s)
    assert cost.adam_cpu_s(0, 1) == 0.0


def test_dense_model_has_no_gate_cost():
    dense = ModelConfig(is_moe=False, num_experts=1)
    assert AnalyticCost(dense, a800_pcie_hardware()).gpu_s("g", 128, "fwd") == 0.0


def test_presets_by_name():
    assert hardware_preset("h200") == h200_hardware()
    with pytest.raises(ConfigError, match="a800-pcie, h200"):
        hardware_preset("v100")


@pytest.mark.parametrize("change, match", [
    ({"gpu_tflops_fp32": 0.0}, "gpu_tflops_fp32 must be positive"),
    ({"gpu_launch_s": -1.0}, "gpu_launch_s must be >= 0"),
    ({"h2d": LinkSpec(0.0, 0.0)}, "h2d needs GBps > 0"),
])
def test_hardware_validates(change, match):
    with pytest.raises(ConfigError, match=match):
        a800_pcie_hardware().with_(**change)


@pytest.mark.parametrize("call, match", [
    (lambda c: c.gpu_s("x", 1, "fwd"), "block kind 'x'"),
    (lambda c: c.gpu_s("e", 1, "forward"), "fwd, bwd"),
    (lambda c: c.gpu_s("e", -1, "fwd"), "tokens must be"),
    (lambda c: c.cpu_expert_s(1, "fwd", 0), "threads must be"),
    (lambda c: c.root_GBps(0), "gpus_sharing"),
    (lambda c: c.adam_cpu_s(-5, 1), "num_params"),
])
def test_bad_calls_say_what_to_change(call, match):
    with pytest.raises(ConfigError, match=match):
        call(AnalyticCost(S8, a800_pcie_hardware()))


def test_bad_cap():
    with pytest.raises(ConfigError, match="link cap"):
        AnalyticCost(S8, a800_pcie_hardware(), link_cap_GBps=0.0)


def test_core_imports_neither_torch_nor_simpy():
    code = ("import sys, aptmoe.analytic_cost, aptmoe.affinity; "
            "bad = {'torch', 'simpy'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
