"""The executor's chunked Adam (exec/block_adam.py) takes the same steps as torch's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from aptmoe.exec.block_adam import FUSED_CPU, BlockAdam, make_adam  # noqa: E402


def _chunks(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, lo = [], 0
    for n in sizes:
        out.append(flat[lo:lo + n])
        lo += n
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_chunks_step_as_one_torch_adam_over_the_block(fused: bool) -> None:
    if fused and not FUSED_CPU:
        pytest.skip("this torch has no fused CPU Adam")
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(1000, generator=g)
    ref = flat.clone().requires_grad_()
    sizes = [400, 400, 200]
    adam = BlockAdam(_chunks(flat, sizes), lr=1e-2, fused=fused)
    opt = torch.optim.Adam([ref], lr=1e-2, fused=True) if fused else torch.optim.Adam([ref], lr=1e-2, foreach=False)
    for step in range(4):
        grad = torch.randn(1000, generator=g)
        if step == 2:
            continue                      # a block unused in a step: neither side moves
        adam.begin_step()
        for i in reversed(range(len(sizes))):            # any order: chunks are independent
            adam.step_chunk(i, _chunks(grad, sizes)[i])
        ref.grad = grad
        opt.step()
    if fused:
        assert torch.equal(flat, ref.detach())           # the same kernel with the same arguments
    else:
        torch.testing.assert_close(flat, ref.detach(), rtol=1e-6, atol=1e-7)


def test_a_chunk_is_one_kernel_call_when_fused() -> None:
    if not FUSED_CPU:
        pytest.skip("this torch has no fused CPU Adam")
    adam = BlockAdam([torch.zeros(8), torch.zeros(8)], lr=1e-3)
    assert adam.fused and not hasattr(adam, "opts")
    adam.begin_step()
    adam.step_chunk(1, torch.ones(8))
    assert float(adam.step) == 1.0
    assert torch.all(adam.chunks[1] < 0) and torch.all(adam.chunks[0] == 0)


def test_make_adam_keeps_torch_defaults() -> None:
    p = torch.zeros(4, requires_grad=True)
    opt = make_adam([p], 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


@pytest.mark.gpu
def test_on_a_gpu_it_is_torchs_fused_adam_to_the_bit() -> None:
    """A resident block and the model's ends: the same fused kernel on the GPU, no torch.optim."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    flat = torch.randn(4096, device=dev, generator=g)
    ref = flat.clone().requires_grad_()
    adam = BlockAdam([flat], lr=1e-2)
    assert adam.fused and adam.step.device.type == "cuda"
    opt = torch.optim.Adam([ref], lr=1e-2, fused=True)
    for _ in range(3):
        grad = torch.randn(4096, device=dev, generator=g)
        adam.begin_step()
        adam.step_chunk(0, grad)
        ref.grad = grad
        opt.step()
    assert torch.equal(flat, ref.detach())


def test_a_run_imports_no_torch_dynamo_and_steps_with_its_objects_frozen() -> None:
    """torch.optim's constructors import torch._dynamo (with sympy and FSDP): 1.2 s here and
    part of a one-GPU H200 rank's 10 s build, in every schedule's processes. The executor's
    optimizers are fused calls of its own. Without those modules' objects full collections of
    the cyclic GC came often enough to double a CPU rank's step, so the run freezes what it
    built (gc.freeze) for its steps, and unfreezes after. What the first backward imports
    (torch.fx's symbolic shapes, with sympy) is imported beside the build and frozen too."""
    import subprocess
    import sys

    if not FUSED_CPU:
        pytest.skip("this torch has no fused CPU Adam: the executor falls back to torch.optim")
    code = """
import gc, os, sys
import tempfile
from pathlib import Path
from aptmoe.exec.cli import make_run_parser, prepare
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
port_file = Path(tempfile.mkdtemp()) / "store.port"
from aptmoe.exec.launch import init_rank, run_pipeline
from aptmoe.exec.runtime import ExecOptions
ns = make_run_parser().parse_args(["--is_moe=True", "--model_config=S", "--embedding_dim", "32", "--hidden_dim", "64",
    "--num_heads", "4", "--num_layers", "2", "--num_stages", "2", "--num_experts", "4", "--batch_size", "4",
    "--num_chunks", "2", "--seq_length", "8", "--gpus", "1", "--topo", "C1+G1", "--device", "cpu",
    "--pipeline", "APTMoE", "--num_warmup_steps", "0", "--num_training_steps", "1"])
cfg, cost, plan = prepare(ns, "APTMoE", False)
frozen, shapes = [], []
def progress(done, total, rep):
    frozen.append(gc.get_freeze_count())
    d = vars(sys.modules["torch.fx.experimental.symbolic_shapes"])
    shapes.append(not any(o is d for o in gc.get_objects()))     # frozen objects are in no generation
res = run_pipeline(init_rank(0, 1, 0, cfg, 60, use_cuda=False, port_file=port_file), cfg, plan, cost, data=None, opts=ExecOptions(timeout_s=60),
                   progress=progress)
print(res["iteration_s"] > 0, "torch._dynamo" in sys.modules, min(frozen) > 1000, gc.get_freeze_count() == 0, all(shapes))
"""
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "True", "True", "True"]
