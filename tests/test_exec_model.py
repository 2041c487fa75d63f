"""The executor's model (aptmoe.exec.model) and token sources (aptmoe.exec.data): block
parameter counts, a correct MoE combine, routing that reproduces the popularity simulator's
counts, training signal, dtypes, the byte tokenizer, and the import rule."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings, strategies as st  # noqa: E402

from aptmoe.config import ModelConfig  # noqa: E402
from aptmoe.exec import model as M  # noqa: E402
from aptmoe.exec.data import ByteFileTokens, ByteTokenizer, SyntheticTokens, make_source, split_batch  # noqa: E402
from aptmoe.plan.actions import Block  # noqa: E402
from aptmoe.popularity import PopularityGenerator  # noqa: E402


def tiny(**changes) -> ModelConfig:
    fields = dict(name="tiny", embedding_dim=32, hidden_dim=64, num_heads=4, num_layers=2, num_experts=4,
                  top_k=1, seq_length=16)
    fields.update(changes)
    return ModelConfig(**fields)


def numel(params) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("cfg", [tiny(), tiny(num_experts=8, top_k=2, embedding_dim=48, num_heads=6),
                                 tiny(is_moe=False, num_experts=1)])
def test_block_parameter_counts_match_the_config(cfg: ModelConfig) -> None:
    d, h = cfg.embedding_dim, cfg.hidden_dim
    assert numel(M.AttentionBlock(d, cfg.num_heads).parameters()) == cfg.attn_params
    assert numel(M.GateBlock(d, cfg.num_experts).parameters()) == d * cfg.num_experts
    assert numel(M.ExpertBlock(d, h).parameters()) == cfg.expert_params
    model = M.MoEModel(cfg, seed=1)
    kinds = {"a": cfg.attn_params, "g": cfg.gate_params, "e": cfg.expert_params}
    blocks = list(model.blocks())
    assert len(blocks) == cfg.num_layers * (1 + cfg.is_moe + cfg.num_experts)
    for b in blocks:
        assert numel(model.block_parameters(b)) == kinds[b.kind.value]
        assert model.block_module(b) is not None
    # every parameter belongs to exactly one block or to the resident part
    seen = [id(p) for b in blocks for p in model.block_parameters(b)] + [id(p) for p in model.resident_parameters()]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert numel(model.parameters()) == cfg.num_params          # the final LayerNorm included
    if not cfg.is_moe:
        with pytest.raises(KeyError, match="no gate"):
            model.block_module(Block.gate(0))
    with pytest.raises(KeyError):
        model.block_module(Block.expert_of(0, cfg.num_experts))


def test_init_is_deterministic_per_block() -> None:
    cfg = tiny()
    a, b, c = M.MoEModel(cfg, seed=3), M.MoEModel(cfg, seed=3), M.MoEModel(cfg, seed=4)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), na
    # one block rebuilt alone equals the same block of the whole model
    blk = Block.expert_of(1, 2)
    alone = M.ExpertBlock(cfg.embedding_dim, cfg.hidden_dim, generator=M.block_generator(3, blk))
    assert all(torch.equal(x, y) for x, y in zip(alone.parameters(), a.block_parameters(blk)))
    with torch.no_grad():
        for p in a.block_parameters(blk):
            p.zero_()
    a.init_block(blk)
    assert all(torch.equal(x, y) for x, y in zip(alone.parameters(), a.block_parameters(blk)))


# --------------------------------------------------------------------------- dispatch / combine


def random_routing(T: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])


def artifact_combine(outputs, info) -> torch.Tensor:
    """The seed artifact's bug: expert outputs concatenated in expert order (top-1)."""
    return torch.cat([o * i.weights[:, None] for o, i in zip(outputs, info) if o is not None])


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 12), E=st.integers(1, 6), k_frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_combine_equals_a_per_token_loop(T: int, E: int, k_frac: float, seed: int) -> None:
    k = 1 + int(k_frac * (E - 1))
    d, h = 4, 8
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    experts = [M.ExpertBlock(d, h, dtype=torch.float64, generator=g) for _ in range(E)]
    ids = random_routing(T, E, k, g)
    w = torch.rand(T, k, generator=g, dtype=torch.float64)
    info = M.dispatch(x, ids, w, E)
    assert [int(i.token_index.numel()) for i in info] == M.expert_counts(ids, E).tolist()
    given_counts = M.dispatch(x, ids, w, E, counts=M.expert_counts(ids, E).tolist())
    assert all(torch.equal(a.token_index, b.token_index) for a, b in zip(info, given_counts))
    y = M.combine(M.run_experts(experts, info), info, T, d)
    naive = torch.zeros(T, d, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            naive[t] += w[t, j] * experts[int(ids[t, j])](x[t:t + 1])[0]
    torch.testing.assert_close(y, naive)
    if k == 1:
        wrong = artifact_combine([experts[e](i.inputs) for e, i in enumerate(info)], info)
        is_sorted = bool((ids[1:, 0] >= ids[:-1, 0]).all())
        assert torch.allclose(wrong, y) == is_sorted


def test_combine_catches_the_concatenation_bug() -> None:
    """A fixed unsorted routing: concatenating in expert order puts outputs on wrong tokens."""
    d, E = 4, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, d, generator=g)
    experts = [M.ExpertBlock(d, 8, generator=g) for _ in range(E)]
    ids = torch.tensor([[2], [0], [1], [0], [2]])
    w = torch.rand(5, 1, generator=g)
    info = M.dispatch(x, ids, w, E)
    outs = M.run_experts(experts, info)
    y = M.combine(outs, info, 5, d)
    for t in range(5):
        torch.testing.assert_close(y[t], w[t, 0] * experts[int(ids[t, 0])](x[t:t + 1])[0])
    assert not torch.allclose(artifact_combine(outs, info), y)


def test_combine_checks_its_inputs_and_skips_empty_experts() -> None:
    x = torch.randn(3, 4)
    info = M.dispatch(x, torch.tensor([[1], [1], [1]]), torch.ones(3, 1), 3)
    assert info[0].token_index.numel() == 0 and info[2].inputs.shape == (0, 4)
    y = M.combine([None, torch.ones(3, 4), None], info, 3, 4)
    assert torch.equal(y, torch.ones(3, 4))
    with pytest.raises(ValueError, match="expert 1 has 3 tokens"):
        M.combine([None, None, None], info, 3, 4)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        M.dispatch(x, torch.tensor([[0], [3], [1]]), torch.ones(3, 1), 3)


# --------------------------------------------------------------------------- routing override


@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 8), k_frac=st.floats(0, 1), T=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_routing_from_counts_reproduces_the_counts(E: int, k_frac: float, T: int, seed: int) -> None:
    k = 1 + int(k_frac * (E - 1))
    rng = np.random.default_rng(seed)
    # a random feasible row: T*k assignments, at most T per expert (k passes of a shuffled layout)
    counts = np.zeros(E, dtype=np.int64)
    for _ in range(k):
        pass_counts = rng.multinomial(T, np.ones(E) / E)
        counts += pass_counts
    while counts.max() > T:                       # move the excess to experts with room
        e = int(counts.argmax())
        counts[e] -= 1
        counts[int(np.argmin(counts))] += 1
    ids = M.routing_from_counts(counts, T, k, torch.Generator().manual_seed(seed))
    assert ids.shape == (T, k) and ids.dtype == torch.long
    assert M.expert_counts(ids, E).tolist() == counts.tolist()
    assert all(len(set(row)) == k for row in ids.tolist())
    again = M.routing_from_counts(torch.as_tensor(counts), T, k, torch.Generator().manual_seed(seed))
    assert torch.equal(ids, again)


def test_routing_matches_the_popularity_simulator() -> None:
    cfg = tiny(num_experts=8, top_k=2, seq_length=8)
    mb_tokens = 2 * cfg.seq_length
    pop = PopularityGenerator(num_layers=cfg.num_layers, num_experts=8, micro_batches=2, top_k=2,
                              tokens_per_micro_batch=mb_tokens, target_G=0.3, seed=5)
    counts = pop.iteration(0).counts
    for layer in range(cfg.num_layers):
        for mb in range(2):
            g = M.routing_generator(42, 0, layer, mb)
            ids = M.routing_from_counts(counts[layer, mb], mb_tokens, 2, g)
            assert M.expert_counts(ids, 8).tolist() == counts[layer, mb].tolist()
    a = M.routing_from_counts(counts[0, 0], mb_tokens, 2, M.routing_generator(42, 0, 0, 0))
    b = M.routing_from_counts(counts[0, 0], mb_tokens, 2, M.routing_generator(42, 0, 0, 1))
    assert not torch.equal(a, b)                   # different micro-batches, different shuffles


@pytest.mark.parametrize("row, T, k, msg", [([3, 1], 3, 1, "sum to"), ([4, 0], 2, 2, "at most"),
                                            ([-1, 3], 2, 1, "non-negative"), ([1.5, 0.5], 2, 1, "integers")])
def test_routing_from_counts_rejects_infeasible_rows(row, T, k, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        M.routing_from_counts(row, T, k)


def test_gate_gets_gradients_under_the_routing_override() -> None:
    for k in (1, 2):
        cfg = tiny(top_k=k)
        model = M.MoEModel(cfg, seed=0)
        tokens = SyntheticTokens(cfg.seq_length, seed=0).batch(0, 2)
        T = 2 * cfg.seq_length
        counts = np.array([T - 3, 1, 1, 1] if k == 1 else [T, T // 2, T // 4, T - T // 2 - T // 4])
        routing = [M.routing_from_counts(counts, T, k, M.routing_generator(0, 0, i, 0)) for i in range(2)]
        loss = model(tokens, routing)
        loss.backward()
        for i in range(cfg.num_layers):
            grad = model.block_module(Block.gate(i)).wg.grad
            assert grad is not None and grad.abs().sum() > 0, (k, i)
        # the override decides the experts; the gate only weights them
        ids, w = model.layers[0].gate(torch.randn(T, cfg.embedding_dim), routing[0])
        assert torch.equal(ids, routing[0]) and M.expert_counts(ids, 4).tolist() == counts.tolist()
        if k > 1:
            torch.testing.assert_close(w.sum(-1), torch.ones(T))


# --------------------------------------------------------------------------- training and dtypes


def test_loss_decreases_on_synthetic_data() -> None:
    """A real signal: the Markov-chain data is learnable far below ln(256), which a model
    that ignores context (the unigram) cannot beat."""
    cfg = tiny(seq_length=32)
    torch.manual_seed(0)
    model = M.MoEModel(cfg, seed=0)
    src = SyntheticTokens(cfg.seq_length, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(50):
        loss = model(src.batch(step, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert first > math.log(256)                   # a random init is worse than uniform
    assert last < math.log(256) - 1.5, losses      # ...and it learns the transitions
    assert last < first - 2.0


def test_dense_model_runs_and_trains_a_step() -> None:
    cfg = tiny(is_moe=False, num_experts=1)
    model = M.MoEModel(cfg, seed=0)
    tokens = SyntheticTokens(cfg.seq_length, seed=1).batch(0, 2)
    loss = model(tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="no routing"):
        model(tokens, [torch.zeros(2 * cfg.seq_length, 1, dtype=torch.long)] * 2)


def test_bf16_forward_runs() -> None:
    cfg = tiny(dtype="bf16", top_k=2)
    model = M.MoEModel(cfg, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    loss = model(SyntheticTokens(cfg.seq_length, seed=0).batch(0, 2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    # bf16 weights are the fp32 model's, rounded
    fp32 = M.MoEModel(cfg.with_(dtype="fp32"), seed=0)
    torch.testing.assert_close(model.head.float(), fp32.head.to(torch.bfloat16).float())


def test_attention_is_causal() -> None:
    attn = M.AttentionBlock(16, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[0, 4:] += 1.0                                # change only the future of position 3
    r1, h1 = attn(x)
    r2, h2 = attn(y)
    torch.testing.assert_close(r1[:, :4], r2[:, :4])
    torch.testing.assert_close(h1[:, :4], h2[:, :4])
    assert not torch.allclose(r1[:, 4:], r2[:, 4:])


def test_forward_with_explicit_targets_matches_the_shifted_form() -> None:
    cfg = tiny()
    model = M.MoEModel(cfg, seed=0)
    batch = SyntheticTokens(cfg.seq_length, seed=0).batch(3, 2)
    inputs, targets = split_batch(batch)
    assert inputs.shape == (2, cfg.seq_length)
    torch.testing.assert_close(model(batch), model(inputs, targets=targets))
    x = model.forward_layers(model.embed(inputs), range(cfg.num_layers))
    torch.testing.assert_close(model.loss(x, targets), model(batch))


# --------------------------------------------------------------------------- data


def test_byte_tokenizer_round_trips_a_file(tmp_path: Path) -> None:
    text = "Mixture of experts, ünïcödé and bytes.\n" * 3
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    raw = path.read_bytes()
    assert ByteTokenizer.decode(ByteTokenizer.encode(text)) == raw
    src = ByteFileTokens(path, 10, seed=0)
    assert src.num_sequences == (len(raw) - 1) // 10
    # the sequences overlap by one byte and cover the file
    joined = b"".join(ByteTokenizer.decode(src.sequence(i)[:-1]) for i in range(src.num_sequences))
    assert raw.startswith(joined) and len(joined) == 10 * src.num_sequences
    batch = src.batch(0, 4)
    assert batch.shape == (4, 11) and batch.dtype == torch.long
    for row in batch:
        assert ByteTokenizer.decode(row) in raw
    assert torch.equal(batch, ByteFileTokens(path, 10, seed=0).batch(0, 4))
    # one epoch visits every sequence once
    firsts = torch.cat([src.batch(s, 1) for s in range(src.num_sequences)])
    assert len({tuple(r.tolist()) for r in firsts}) == src.num_sequences


def test_byte_source_errors_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        ByteFileTokens(empty, 8)
    short = tmp_path / "short.txt"
    short.write_bytes(b"12345678")
    with pytest.raises(ValueError, match="shorter than one sequence.*needs at least 9 bytes"):
        ByteFileTokens(short, 8)
    with pytest.raises(ValueError, match="no such file"):
        make_source(tmp_path / "missing.txt", 8)
    with pytest.raises(ValueError, match="256"):
        make_source(short, 4, vocab_size=512)
    with pytest.raises(ValueError, match="0..255"):
        ByteTokenizer.decode(torch.tensor([1, 300]))


def test_synthetic_tokens_are_seeded() -> None:
    a, b = SyntheticTokens(16, seed=7), SyntheticTokens(16, seed=7)
    assert torch.equal(a.batch(2, 3), b.batch(2, 3))
    assert not torch.equal(a.batch(2, 3), a.batch(3, 3))
    batch = a.batch(0, 4)
    assert batch.shape == (4, 17) and int(batch.min()) >= 0 and int(batch.max()) < 256
    assert isinstance(make_source(None, 16), SyntheticTokens)


# --------------------------------------------------------------------------- import rule


def test_exec_model_does_not_import_simpy(tmp_path: Path) -> None:
    # run outside the checkout, so the installed package is imported (as aptmoe.exec)
    code = ("import json, sys\nimport aptmoe.exec.model, aptmoe.exec.data\n"
            "print(json.dumps('simpy' in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) is False


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_the_cpu_experts_hand_backward_equals_autograd(micro_batches) -> None:
    """Written into the flat gradient at the first micro-batch, added by the product after."""
    from aptmoe.exec.model import expert_backward, expert_forward, expert

    g = torch.Generator().manual_seed(5)
    d, h = 8, 16
    w1, w2 = torch.randn(h, d, generator=g), torch.randn(d, h, generator=g)
    ref1, ref2 = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    flat = torch.full((h * d + d * h,), float("nan"))          # whatever was there: never read at first
    g1, g2 = flat[:h * d].view(h, d), flat[h * d:].view(d, h)
    for i in range(micro_batches):
        x = torch.randn(5 + i, d, generator=g)
        dout = torch.randn(5 + i, d, generator=g)
        out, hidden = expert_forward(x, w1, w2, keep=True)
        xr = x.clone().requires_grad_(True)
        want = expert(xr, ref1, ref2)
        assert torch.allclose(out, want.detach(), atol=1e-6)
        dx = expert_backward(x, hidden, dout, w1, w2, g1, g2, first=i == 0)
        want.backward(dout)
        assert torch.allclose(dx, xr.grad, atol=1e-5)
    assert torch.allclose(g1, ref1.grad, atol=1e-5) and torch.allclose(g2, ref2.grad, atol=1e-5)
    assert expert_forward(x, w1, w2, keep=False)[1] is None
