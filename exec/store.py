"""The rendezvous of ranks that one process of ours spawned on this machine.

A port picked in the parent (bind to port 0, read it, close) and bound again in rank 0
seconds later is a race: in between, the kernel may hand that port to any other socket. On
nvidia-h200-x2 (2026-11-29) an A/B's ninth launch lost it that way, and rank 0 died with
EADDRINUSE before its process group started. Here rank 0 listens on a port the kernel picks
and keeps, and tells the other ranks which through a file; nothing can take the port between
the pick and the listen.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from aptmoe.atomic import write_text_atomic

HOST = "127.0.0.1"


def local_store(rank: int, world: int, port_file: Path, timeout_s: float) -> dist.TCPStore:
    """Rank 0: a store on a port of the kernel's choosing, published (atomically) in
    `port_file`; the others: connected to it once the file is there. `port_file` must not
    exist before the launch (a stale one would send the others to an old port)."""
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        # wait_for_workers=False: the others cannot connect before they have read the file
        store = dist.TCPStore(HOST, 0, world, True, timeout, wait_for_workers=False)
        write_text_atomic(port_file, f"{store.port}\n")
        return store
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 did not publish its store's port in {port_file} within "
                               f"{timeout_s:g} s (did rank 0 fail? its log says why)")
        time.sleep(0.01)
    return dist.TCPStore(HOST, int(port_file.read_text()), world, False, timeout)


__all__ = ["HOST", "local_store"]
