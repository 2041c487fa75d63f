"""Plan actions: printed forms, parse(str(a)) == a, and the micro-batch rule of each kind."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptmoe.plan.actions import Action, B, Block, BlockKind, F, Kind

blocks = st.one_of(
    st.none(),
    st.builds(Block.attn, st.integers(0, 10_000)),
    st.builds(Block.gate, st.integers(0, 10_000)),
    st.builds(Block.expert_of, st.integers(0, 10_000), st.integers(0, 1_000)),
)


@st.composite
def actions(draw) -> Action:
    kind = draw(st.sampled_from(list(Kind)))
    mb = draw(st.integers(0, 10_000)) if kind.takes_mb else None
    return Action(draw(st.integers(0, 10_000)), kind, mb, draw(blocks))


@settings(max_examples=300, deadline=None)
@given(actions())
def test_parse_inverts_str(a: Action) -> None:
    text = str(a)
    assert Action.parse(text) == a
    assert Action.parse(f"  {text}\n") == a          # surrounding whitespace is tolerated
    assert hash(Action.parse(text)) == hash(a)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips_with_and_without_block(kind: Kind) -> None:
    # "LF" must not be read as "L" + "F", "SB" not as "S" + "B", ...
    mb = 3 if kind.takes_mb else None
    for block in (None, Block.attn(12), Block.gate(12), Block.expert_of(12, 3)):
        a = Action(7, kind, mb, block)
        assert Action.parse(str(a)) == a


@pytest.mark.parametrize("action, text", [
    (F(2, 0), "2F0"),
    (B(3, 1), "3B1"),
    (Action(5, Kind.LOAD_F), "5LF"),
    (Action(5, Kind.LOAD_F, block=Block.expert_of(12, 3)), "5LF@12:e3"),
    (Action(2, Kind.FWD, 0, Block.attn(12)), "2F0@12:a"),
    (Action(2, Kind.FWD, 0, Block.gate(12)), "2F0@12:g"),
    (Action(3, Kind.RECV_B, 1), "3RB1"),
    (Action(0, Kind.UPDATE), "0U"),
    (Action(1, Kind.DROP_B), "1DB"),
    (Action(4, Kind.SEND_F, 15), "4SF15"),
    (Action(11, Kind.LOAD_B, block=Block.attn(40)), "11LB@40:a"),
])
def test_printed_forms(action: Action, text: str) -> None:
    assert str(action) == text
    assert Action.parse(text) == action


def test_at_and_whole() -> None:
    a = F(2, 0)
    narrowed = a.at(Block.expert_of(12, 3))
    assert str(narrowed) == "2F0@12:e3"
    assert narrowed.whole == a
    assert a.whole is a


@pytest.mark.parametrize("text", [
    "", "F0", "2", "2X0", "2F", "2LF0", "0U3", "2F0@", "2F0@12", "2F0@12:x", "2F0@12:e",
    "2F0@12:a3", "2F0@:a", "-1F0", "2 F0", "2F0;", "2f0", "2F0@12:e3x", "5LF@12:g1",
])
def test_bad_strings_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Action.parse(text)


def test_parse_error_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match="2F0"):
        Action.parse("nonsense")


def test_takes_mb_is_exactly_the_per_micro_batch_kinds() -> None:
    assert {k for k in Kind if k.takes_mb} == {Kind.FWD, Kind.BWD, Kind.SEND_F, Kind.RECV_F,
                                              Kind.SEND_B, Kind.RECV_B}


@pytest.mark.parametrize("kind", [k for k in Kind if k.takes_mb])
def test_micro_batch_kinds_need_a_micro_batch(kind: Kind) -> None:
    with pytest.raises(ValueError, match="needs"):
        Action(0, kind)


@pytest.mark.parametrize("kind", [k for k in Kind if not k.takes_mb])
def test_stage_kinds_take_no_micro_batch(kind: Kind) -> None:
    with pytest.raises(ValueError, match="takes no"):
        Action(0, kind, 0)


def test_kind_given_as_its_letter_is_normalised() -> None:
    assert Action(2, "F", 0) == F(2, 0)
    assert Action(2, "F", 0).kind is Kind.FWD


def test_block_needs_expert_index_exactly_for_experts() -> None:
    with pytest.raises(ValueError):
        Block(1, BlockKind.EXPERT)
    with pytest.raises(ValueError):
        Block(1, BlockKind.ATTN, 0)
    assert Block(1, "e", 2) == Block.expert_of(1, 2)


def test_actions_are_hashable_values() -> None:
    s = {F(0, 0), F(0, 0), Action.parse("0F0"), B(0, 0)}
    assert s == {F(0, 0), B(0, 0)}
    with pytest.raises(AttributeError):
        F(0, 0).stage = 1  # type: ignore[misc]
