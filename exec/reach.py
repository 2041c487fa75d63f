"""How far a GPU rank's issuing thread may run ahead of its GPU (no torch here: the CLI's
help names it before torch is imported).

The thread issues a block's kernels and goes on to the next; the GPU runs them in order. When
the compute stream waits for a message, every block issued meanwhile waits in the driver's
queue, and once the queue is full the driver blocks the next call until the GPU frees room.
The call that blocked was a marker's record, and torch's Event.record keeps the GIL: in the
regime's Mobius on two H200s (S, 16 experts, --gpu-memory 40, 8 GB/s) the main thread sat
in cudaEventRecordWithFlags for 28-197 ms at a time, and every other thread of the rank with
it (torch.profiler, docs/measured/session29).
"""

# Blocks the issuing thread may issue beyond the last one the GPU has finished. The driver's
# queue was full with 151-232 GPU operations pending on the compute stream; a block makes
# about 6 (18,145 launches, memsets and copies over one step's 3,000 blocks) and 2-3 markers
# besides: 16 blocks stay well short of it.
AHEAD_BLOCKS = 16
