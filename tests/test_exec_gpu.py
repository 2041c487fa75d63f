"""The executor on GPUs (NCCL): the same reference equality as on the CPU, and the link cap.
Skipped where there is no CUDA GPU; run on the device machine (`pytest -m gpu`)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from exec_helpers import run_and_compare  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_all_schedules_equal_the_reference_on_gpus(tmp_path, gpus) -> None:
    """On one GPU too: the device's experts run outside autograd (expert_backward), and a
    one-GPU machine is the kind most often lent."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    checked = run_and_compare(tmp_path, ["--pipeline", "all", "--gpus", str(gpus), "--num_stages", str(2 * gpus),
                                         "--num_layers", str(2 * gpus), "--link-bandwidth", "0.05"], cuda=True)
    for name, c in checked.items():
        a = c["agreement"]
        assert a.within(1e-5), f"{name}: loss {a.loss:.2e}, params {a.params:.2e} ({a.worst_param})"
    assert checked["APTMoE"]["result"]["metrics"]["cpu/expert_share"] > 0
    # CUDA's and NCCL's threads too: none may run where it can stall a CPU worker (exec/cores.py)
    for name, c in checked.items():
        assert all(t["loose"] == 0 for t in c["result"]["threads"]), (name, c["result"]["threads"])


def test_capped_copy_takes_bytes_over_cap() -> None:
    """N bytes host -> GPU through a capped link land after N / cap and within 1 ms more (the
    pacing thread's wake, the waiter's and its CUDA event's: 220-480 us at 16 GB/s on the
    one-H200 host, session 12), and copies queued on one stream go back to back: eight land
    within 5% of eight slots."""
    import time

    from aptmoe.exec.device import Device
    from aptmoe.exec.link import Link

    dev = Device("cuda:0")
    stream = dev.new_stream()
    src = torch.randn((64 << 20) // 4).pin_memory()          # 64 MiB
    dst = torch.empty_like(src, device="cuda")
    for cap in (4.0, 8.0, 16.0):
        link = Link(cap, dev)
        try:
            link.wait(link.copy(dst, src, stream))           # warm
            t = time.perf_counter()
            link.wait(link.copy(dst, src, stream))
            took = time.perf_counter() - t
            want = src.numel() * 4 / (cap * 1e9)
            assert want <= took < want + 1e-3, f"cap {cap} GB/s: {took * 1e3:.2f} ms, want {want * 1e3:.2f} ms"
            part = src[:(16 << 20) // 4]                      # 16 MiB
            t = time.perf_counter()
            landings = [link.copy(dst[:part.numel()], part, stream) for _ in range(8)]
            for landing in landings:
                link.wait(landing)
            took = time.perf_counter() - t
            want = 8 * part.numel() * 4 / (cap * 1e9)
            assert 0.999 * want <= took < 1.05 * want, f"cap {cap} GB/s, 8 queued: {took * 1e3:.2f} ms, want {want * 1e3:.2f} ms"
            assert torch.equal(dst.cpu(), src)
        finally:
            link.close()


def test_a_capped_offload_lands_block_by_block_not_when_the_whole_stage_has_run() -> None:
    """A stage's offload queues every block's GPU -> host copy at once on one stream, as
    exec/runtime.py's _offload does. At 8 GB/s the first 64 MiB block's bytes have passed after
    8.4 ms; it must be there then, though the 2 GiB queued behind it take about 40 ms to run at
    the machine's rate (session 28: the first Adam of a capped L4 stage came 79-91 ms after the
    backward, not 34, while the waits took a marker recorded when the copy landed)."""
    import time

    from aptmoe.exec.device import Device
    from aptmoe.exec.link import Link

    dev = Device("cuda:0")
    stream = dev.new_stream()
    first = torch.randn((64 << 20) // 4, device="cuda")
    rest = [torch.randn((256 << 20) // 4, device="cuda") for _ in range(8)]
    hosts = [torch.empty(t.shape, pin_memory=True) for t in [first, *rest]]
    torch.cuda.synchronize()                     # the tensors are made on the default stream
    link = Link(8.0, dev)
    try:
        link.wait(link.copy(hosts[0], first, stream))                    # warm
        t = time.perf_counter()
        landings = [link.copy(h, g, stream) for h, g in zip(hosts, [first, *rest])]
        link.wait(landings[0])
        took = time.perf_counter() - t
        want = first.numel() * 4 / 8e9
        assert took < want + 3e-3, f"the first block was there after {took * 1e3:.1f} ms, its bytes after {want * 1e3:.1f}"
        for landing in landings[1:]:
            link.wait(landing)
        assert torch.equal(hosts[0], first.cpu())
    finally:
        link.close()


def test_eager_kernel_loading_reaches_the_ranks(tmp_path, monkeypatch) -> None:
    """--kernel-loading eager is in the ranks' driver: they record it, and their CUDA context
    holds every kernel module (more GPU memory outside torch's allocator than a lazy rank's,
    which has loaded only the kernels it called)."""
    import json

    from aptmoe.exec.cli import main as run_main
    from exec_helpers import TINY

    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)     # restored after the test
    outside = {}
    for mode in ("lazy", "eager"):
        out = tmp_path / mode
        assert run_main([*TINY, "--pipeline", "GPipe", "--gpus", "1", "--num_stages", "1", "--num_layers", "2",
                         "--kernel-loading", mode, "--no-plot", "--out", str(out)]) == 0
        res = json.loads((out / "results.json").read_text())["schedules"]["GPipe"]
        assert res["kernel_loading"] == mode
        outside[mode] = res["gpu_bytes_outside_allocator"][0]
    print(f"GPU bytes outside torch's allocator after the steps: {outside}")      # pytest -s shows it
    assert outside["eager"] > outside["lazy"] + (16 << 20), outside
