"""`adam_chunks`: the CPU update's jobs cover a block exactly, each no longer than a chunk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aptmoe.memory import ADAM_CHUNK_PARAMS, adam_chunks


@given(st.integers(0, 10**7), st.integers(1000, 10**7))
def test_chunks_tile_the_block(n: int, chunk: int) -> None:
    parts = adam_chunks(n, chunk)
    assert sum(hi - lo for lo, hi in parts) == n
    assert all(0 < hi - lo <= chunk for lo, hi in parts)
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert (parts[0][0] if parts else 0) == 0
    assert len(parts) == -(-n // chunk)


def test_an_moe_s_expert_is_two_chunks() -> None:
    assert len(adam_chunks(2 * 1024 * 4096)) == 2 and ADAM_CHUNK_PARAMS == 1 << 22
    with pytest.raises(ValueError):
        adam_chunks(-1)
