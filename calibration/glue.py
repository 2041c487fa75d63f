"""The GPU's work outside the blocks: the profile's GPU curves of kinds "c", "l" and "m".

The executor runs a MoE layer as blocks (attention, gate, each expert) and, between them, work
that belongs to no block (exec/layer.py): after a forward's experts `LayerRun.output` adds
their weighted outputs into the residual stream (a clone, a concatenation, a product, a
scatter-add), and before a backward's experts `start_backward` and `output_grads` split the
output gradient among them (zeroed buffers, a gather, products, a sum). The profile had the
host's time for it (`dispatch.between`, `dispatch.combine`) and none of the GPU's, so the
simulator ran a layer's next block on the GPU as soon as its experts ended. In the ten stored
one-H200 MoE-M GPipe runs (docs/validation-h200-v10- to -v22-fresh), whose host runs ahead of
the GPU, the compute stream went a median 53 us from a forward's last expert to the next
attention and 61 us from a backward's attention to its first expert, about 4.5 ms a step
outside every block, and every one of those steps was predicted fast (a median -2.5%).

Timed here as the blocks are (`cuda_sample`, the stream held first so that only the GPU's time
counts), with the executor's own `LayerRun` over a random routing of T tokens to E experts (top
1; the simulator reads the curve at tokens x top_k, the rows these kernels move), at the
calibration's token grid.

The step's ends likewise (kinds "l" and "m", by width and vocabulary): the last stage's loss
(exec/model.py `lm_loss`: the final norm, the head, the cross-entropy) and the first stage's
token embedding, forward and backward, over a micro-batch's T tokens. The profile had their host
time (`dispatch.action`) and none of the GPU's. In the eleven stored one-H200 MoE-M GPipe cells
of docs/validation-h200-v10- to -v26-fresh whose hosts kept ahead, a forward's end (its last
combine and the loss) took 117-122 us on the compute stream where 39 were predicted, the switch
from a recompute to its backward (the loss again and its backward) 277-288 us against 88, a
backward's end (the embedding's backward) 36-38 against 0 (docs/measured/session41):


    python -m aptmoe.calibration.glue --onto h200-1gpu --out aptmoe/profiles/h200-1gpu.json

`aptmoe-calibrate` measures the same curves in its `gpu` part.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

import torch

from aptmoe.calibration import merge
from aptmoe.calibration.profiler import (GPU_HOLD_S, TORCH_DTYPES, Measured, Options, Sampler, _series,
                                         measure_gpu_ends, measure_gpu_glue, monotone, sizes_for)
from aptmoe.calibration.timing import Reps, cuda_sample
from aptmoe.exec.layer import LayerRun, Routing
from aptmoe.exec.model import lm_loss

PROG = "python -m aptmoe.calibration.glue"


class LayerGlue:
    """One MoE layer's state between its blocks, as the executor holds it, for `tokens`
    tokens routed at random (seeded) to `experts` experts, one each."""

    def __init__(self, d: int, experts: int, dtype: torch.dtype, device: torch.device) -> None:
        self.d, self.experts, self.dtype, self.device = d, experts, dtype, device
        self.gen = torch.Generator().manual_seed(0)

    def run(self, tokens: int) -> LayerRun:
        ids = torch.randint(0, self.experts, (tokens, 1), generator=self.gen)
        routing = Routing.build(ids, self.experts, self.device)
        kw = dict(dtype=self.dtype, device=self.device)
        x = torch.randn(1, tokens, self.d, **kw)
        run = LayerRun(x=x, routing=routing, heads=1, grad=True)
        run.r = torch.randn(1, tokens, self.d, **kw)
        run.hd = torch.randn(tokens, self.d, **kw)
        run.w_flat = torch.rand(tokens, **kw)
        run.gpu_out = {e: torch.randn(c, self.d, **kw) for e, c in enumerate(routing.counts) if c}
        return run


def glue_samplers(block: LayerGlue, tokens: int, sampler: Sampler) -> dict[str, Callable[[], float]]:
    """A sample per direction over a fresh routing each time: fwd, the combine after the
    experts (`output`); bwd, the split of the output gradient before them (`start_backward`,
    `output_grads`)."""
    state: dict[str, object] = {}

    def setup_fwd() -> None:
        state["run"] = block.run(tokens)

    def fwd() -> None:
        state["y"] = state["run"].output()

    def setup_bwd() -> None:
        state["run"] = block.run(tokens)
        state["dy"] = torch.randn(1, tokens, block.d, dtype=block.dtype, device=block.device)

    def bwd() -> None:
        run = state["run"]
        run.start_backward(state["dy"])
        state["douts"] = run.output_grads()

    return {"fwd": sampler(fwd, setup_fwd), "bwd": sampler(bwd, setup_bwd)}


class StepEnds:
    """The step's ends as the executor holds them: a token embedding and the final norm and
    head of a `vocab`-token model `d` wide, their parameters trained (with gradients kept, as
    after the first step), over `tokens` random token ids a sample."""

    def __init__(self, d: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.d, self.vocab, self.dtype, self.device = d, vocab, dtype, device
        self.gen = torch.Generator().manual_seed(0)
        kw = dict(dtype=dtype, device=device)
        self.embedding = torch.randn(vocab, d, **kw).requires_grad_()
        self.norm_w, self.norm_b = torch.ones(d, **kw).requires_grad_(), torch.zeros(d, **kw).requires_grad_()
        self.head = (torch.randn(vocab, d, **kw) / d ** 0.5).requires_grad_()
        for p in (self.embedding, self.norm_w, self.norm_b, self.head):
            p.grad = torch.zeros_like(p)

    def ids(self, tokens: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (1, tokens), generator=self.gen).to(self.device)


def ends_samplers(ends: StepEnds, tokens: int, sampler: Sampler) -> dict[str, Callable[[], float]]:
    """A sample per kind and direction: "l fwd" the loss (exec/model.py `lm_loss` over the stage's
    output), "l bwd" its backward into that output and the head and norm; "m fwd" the embedding
    of the micro-batch's ids, "m bwd" its backward into the table (exec/runtime.py)."""
    state: dict[str, object] = {}

    def setup_loss() -> None:
        state["x"] = torch.randn(1, tokens, ends.d, dtype=ends.dtype, device=ends.device).requires_grad_()
        state["targets"] = ends.ids(tokens)

    def loss() -> torch.Tensor:
        return lm_loss(state["x"], ends.norm_w, ends.norm_b, ends.head, state["targets"])

    def loss_fwd() -> None:
        state["loss"] = loss()

    def setup_loss_bwd() -> None:
        setup_loss()
        with torch.enable_grad():
            state["loss"] = loss()

    def loss_bwd() -> None:
        state["loss"].backward()

    def setup_embed() -> None:
        state["ids"] = ends.ids(tokens)

    def embed_fwd() -> None:
        state["x"] = torch.nn.functional.embedding(state["ids"], ends.embedding)

    def setup_embed_bwd() -> None:
        setup_embed()
        with torch.enable_grad():
            state["x"] = torch.nn.functional.embedding(state["ids"], ends.embedding)
        state["dx"] = torch.randn(1, tokens, ends.d, dtype=ends.dtype, device=ends.device)

    def embed_bwd() -> None:
        state["x"].backward(state["dx"])

    return {"l fwd": sampler(loss_fwd, setup_loss), "l bwd": sampler(loss_bwd, setup_loss_bwd),
            "m fwd": sampler(embed_fwd, setup_embed), "m bwd": sampler(embed_bwd, setup_embed_bwd)}


def _gpu_series(make: Callable[[torch.device], object], samplers, gpu: int, tokens: Sequence[int],
                reps: Reps) -> dict[str, tuple[float, ...]]:
    """Each sampler's seconds at each of `tokens` on GPU `gpu` over what `make` builds there
    (the median of its samples), made non-decreasing as every GPU curve is (`monotone`)."""
    dev = torch.device("cuda", gpu)
    stream = torch.cuda.current_stream(dev)
    with torch.cuda.device(dev), torch.no_grad():
        _, raw, _ = _series(make(dev), tokens, lambda w, s: cuda_sample(w, stream, s, hold_s=GPU_HOLD_S), reps,
                            samplers=samplers)
    return {name: monotone(secs)[0] for name, secs in raw.items()}


def glue_curves(d: int, experts: int, dtype: torch.dtype, gpu: int, tokens: Sequence[int],
                reps: Reps) -> dict[str, tuple[float, ...]]:
    """A layer's glue: each direction's seconds at each of `tokens` on GPU `gpu`."""
    return _gpu_series(lambda dev: LayerGlue(d, experts, dtype, dev), glue_samplers, gpu, tokens, reps)


def ends_curves(d: int, vocab: int, dtype: torch.dtype, gpu: int, tokens: Sequence[int],
                reps: Reps) -> dict[tuple[str, str], tuple[float, ...]]:
    """The step's ends: (kind, direction) -> seconds at each of `tokens` on GPU `gpu`."""
    got = _gpu_series(lambda dev: StepEnds(d, vocab, dtype, dev), ends_samplers, gpu, tokens, reps)
    return {tuple(name.split()): secs for name, secs in got.items()}


KINDS = ("c", "l", "m")          # the GPU's work outside the blocks: this module's curves


def measure(sizes: Sequence[str], experts: int, dtypes: Sequence[str], gpu: int, quick: bool) -> list[dict]:
    """The curves of kinds c, l and m for each model size and dtype on GPU `gpu` (as
    `aptmoe-calibrate`'s gpu part measures them), as profile entries."""
    grid, m = sizes_for(Options(quick=quick)), Measured()
    for size in sizes:
        for dtype in dtypes:
            before = len(m.gpu)
            measure_gpu_glue(size, dtype, grid, gpu, m, experts)
            measure_gpu_ends(size, dtype, grid, gpu, m)
            print(f"d{m.gpu[-1].d} E{experts} {dtype}: " + "; ".join(
                f"{c.kind} {c.direction} {c.seconds[0] * 1e6:.0f}..{c.seconds[-1] * 1e6:.0f} us"
                for c in m.gpu[before:]), file=sys.stderr)
    return [c.to_dict() for c in m.gpu]


def put_curves(gpu: list[dict], curves: list[dict]) -> None:
    """`curves` in place of the profile's curves of the same kind, dims, dtype and direction."""
    key = lambda c: (c["kind"], c["d"], c.get("experts"), c.get("vocab"), c["dtype"], c["direction"])   # noqa: E731
    new = {key(c) for c in curves}
    gpu[:] = [c for c in gpu if c["kind"] not in KINDS or key(c) not in new] + curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="The GPU's work outside the blocks: a layer's between its "
                                "blocks (the combine of its experts' outputs, the split of their gradient; kind c), "
                                "the last stage's loss (kind l) and the first stage's embedding (kind m).")
    p.add_argument("--models", default="S,M,L", help="model sizes whose widths to time (S,M,L)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (8)")
    p.add_argument("--dtypes", default="fp32", help="dtypes (fp32)")
    p.add_argument("--gpu", type=int, default=0, help="the GPU to time on (0)")
    p.add_argument("--quick", action="store_true", help="the quick calibration's token grid and repetitions")
    p.add_argument("--curves-from", metavar="PROFILE",
                   help="take the curves of kinds c, l and m from this profile instead of timing them (a machine of "
                        "the same GPU: the curves are the GPU's time alone)")
    p.add_argument("--onto", required=True, help="the profile (a name or a file) to put the curves onto")
    p.add_argument("--out", required=True, help="where to write the profile with them")
    ns = p.parse_args(argv)
    from aptmoe.calibration.cli import MODEL_SIZES
    sizes = [s.strip() for s in ns.models.split(",") if s.strip()]
    dtypes = [s.strip() for s in ns.dtypes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in MODEL_SIZES] + [t for t in dtypes if t not in TORCH_DTYPES]
    if bad or not sizes or not dtypes or ns.experts < 1:
        print(f"{PROG}: error: --models takes {','.join(MODEL_SIZES)}, --dtypes {','.join(TORCH_DTYPES)} and "
              f"--experts a positive count (got {', '.join(bad) or ns.experts})", file=sys.stderr)
        return 2
    if ns.curves_from is not None:
        from aptmoe.profile import ProfileError, load_profile
        try:
            src = load_profile(ns.curves_from)
        except ProfileError as e:
            print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        curves = [c.to_dict() for c in src.gpu if c.kind in KINDS]
        if not curves:
            print(f"{PROG}: error: {ns.curves_from} has no curves of kinds c, l or m to take (time them on a GPU: "
                  f"drop --curves-from)", file=sys.stderr)
            return 1
        name = f"on {src.hardware.gpu_name}, taken from {src.name}"
    elif not torch.cuda.is_available() or ns.gpu >= torch.cuda.device_count():
        print(f"{PROG}: error: no CUDA GPU {ns.gpu} here: the curves are the GPU's time", file=sys.stderr)
        return 2
    else:
        curves = measure(sizes, ns.experts, dtypes, ns.gpu, ns.quick)
        name = f"on {torch.cuda.get_device_name(ns.gpu)}"
    done = merge.put_onto(PROG, ns.onto, ns.out, "gpu", lambda gpu: put_curves(gpu, curves),
                          f"the GPU's work outside the blocks (kinds c, l, m): {PROG} {name}",
                          shlex.join([*PROG.split(), *(argv or sys.argv[1:])]),
                          "the curves onto (calibrate its gpu part first)")
    if done is None:
        return 1
    print(f"wrote {ns.out}: {ns.onto} with {len(curves)} curves of kinds c, l and m", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
