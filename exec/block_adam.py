"""Adam over one block's host buffer, chunk by chunk, one torch call per chunk.

The executor updates a block's parameters in chunks (aptmoe.memory.adam_chunks) on its CPU
worker thread while the rank's compute thread issues GPU work. Every torch call lets go of the
GIL and must take it back; with the compute thread in Python almost all the time, a thread that
wants the GIL back waits until the holder is forced to drop it (sys.getswitchinterval(), 5 ms
by default). `torch.optim.Adam.step()` makes several such calls per chunk (the step counters'
increment, the fused kernel, the capture check), and on the one-H200 runs of 2026-11-29 a
4 M-parameter chunk took 1.6-2.3 ms beside the issuing thread against 1.15 ms calibrated. Here a block's chunks share one
step counter, advanced once per step by the thread that hands the chunks out, so that a chunk
is one call: the fused kernel torch's own `Adam(fused=True)` runs, with the same arguments, so
the results are the same bits. A torch without the CPU kernel (before 2.4) gets
`torch.optim.Adam` per chunk, as before.

On a GPU (a resident plan's blocks, the model's ends) it is the same fused call on the GPU's
tensors. That also keeps `torch.optim` out of the executor: an optimizer's constructor imports
torch._dynamo (and sympy and FSDP through it), 1.2 s on the 2-core machine and part of the
3.4 s that a one-GPU H200 rank spent compiling Python source while it built
(docs/validation-h200-v8/build-profile.log), in every schedule's processes.
"""

from __future__ import annotations

import torch

BETAS = (0.9, 0.999)           # torch.optim.Adam's defaults, which the reference uses too
EPS = 1e-8


def _has_fused_cpu() -> bool:
    try:
        p, g = torch.zeros(1), torch.zeros(1)
        torch._fused_adam_([p], [g], [torch.zeros(1)], [torch.zeros(1)], [], [torch.ones(())],
                           amsgrad=False, lr=1e-3, beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.0, eps=EPS,
                           maximize=False)
        return True
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


FUSED_CPU = _has_fused_cpu()


def _fused_for(chunks: list[torch.Tensor]) -> bool:
    """Whether torch has the fused kernel for these chunks' device (CUDA's since torch 2.0)."""
    if all(not c.is_cuda for c in chunks):
        return FUSED_CPU
    return all(c.is_cuda for c in chunks) and hasattr(torch, "_fused_adam_")


def make_adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """`torch.optim.Adam` with torch's fused kernel where this torch has it for the device,
    else the plain loop (the GPU's ends, and chunks on a torch without the CPU kernel)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=BETAS, eps=EPS, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=BETAS, eps=EPS, foreach=False)


class BlockAdam:
    """Adam over the chunks of one host buffer: `begin_step()` once per step, then
    `step_chunk(i, grad)` for each chunk, from any thread, in any order."""

    def __init__(self, chunks: list[torch.Tensor], lr: float, fused: bool | None = None) -> None:
        self.chunks, self.lr = chunks, lr
        self.fused = _fused_for(chunks) if fused is None else fused
        if self.fused:
            # as torch keeps state["step"] for its fused kernel: a float32 scalar on the device
            self.step = torch.zeros((), dtype=torch.float32, device=chunks[0].device if chunks else None)
            self.exp_avg = [torch.zeros_like(c) for c in chunks]
            self.exp_avg_sq = [torch.zeros_like(c) for c in chunks]
        else:
            self.opts = [make_adam([c], lr) for c in chunks]

    def begin_step(self) -> None:
        if self.fused:
            with torch.no_grad():
                self.step += 1

    def step_chunk(self, i: int, grad: torch.Tensor) -> None:
        chunk = self.chunks[i]
        if self.fused:
            with torch.no_grad():           # a chunk may be a leaf that requires grad (calibration)
                torch._fused_adam_([chunk], [grad], [self.exp_avg[i]], [self.exp_avg_sq[i]], [], [self.step],
                                   amsgrad=False, lr=self.lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.0,
                                   eps=EPS, maximize=False)
            return
        chunk.grad = grad
        self.opts[i].step()
        chunk.grad = None
