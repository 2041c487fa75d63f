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
