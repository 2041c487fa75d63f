"""The shared trace schema: Chrome Trace Event JSON in microseconds."""

from __future__ import annotations

import json
import re

import pytest

from aptmoe.plan.plan import STREAMS
from aptmoe.trace import CATEGORIES, TRACE_STREAMS, US_PER_S, Trace, TraceError, write_json_atomic


def sample() -> Trace:
    tr = Trace(source="sim", meta={"pipeline": "APTMoE", "model": "MoE-S-8"})
    tr.add("2F0", 0, "compute", 1.25, 1.75, "forward", stage=2, mb=0)
    tr.add("5LF@12:e3", 1, "load", 0.0, 0.004096, "load-inter-expert", layer=12, experts=[3], bytes=33554432,
           phase="inter-expert")
    tr.add("2F0@12:e3", 1, "cpu", 2.0, 2.5, "cpu-expert", layer=12, experts=[3])
    tr.add("3RB1", 1, "net", 3.0, 3.000001, "recv")
    return tr


def test_round_trip_through_a_file(tmp_path) -> None:
    tr = sample()
    path = tmp_path / "trace.json"
    tr.save(path)
    back = Trace.load(path)
    assert back.source == "sim" and back.meta == tr.meta
    assert [(e.name, e.rank, e.stream, e.cat, e.args) for e in back.events] == \
        [(e.name, e.rank, e.stream, e.cat, e.args) for e in tr.events]
    for a, b in zip(back.events, tr.events):
        assert a.start_s == pytest.approx(b.start_s, abs=1e-9)
        assert a.end_s == pytest.approx(b.end_s, abs=1e-9)
    assert back.to_chrome() == tr.to_chrome()
    assert not list(tmp_path.glob(".*.tmp"))          # the atomic write left no temporary file


def test_times_are_microseconds() -> None:
    tr = Trace(source="real")
    tr.add("0F0", 0, "compute", 2.0, 2.5, "forward")
    ev = [e for e in tr.to_chrome()["traceEvents"] if e["ph"] == "X"]
    assert ev == [{"name": "0F0", "cat": "forward", "ph": "X", "pid": 0, "tid": STREAMS.index("compute"),
                   "ts": 2_000_000, "dur": 500_000, "args": {"source": "real"}}]
    assert US_PER_S == 1_000_000
    assert tr.to_chrome()["otherData"]["time_unit"] == "us"
    assert Trace.from_chrome(tr.to_chrome()).events[0].dur_s == 0.5


def test_metadata_rows_name_every_rank_and_stream() -> None:
    d = sample().to_chrome()
    meta = [e for e in d["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert procs == {0: "rank 0", 1: "rank 1"}
    assert threads == {(r, i): s for r in (0, 1) for i, s in enumerate(TRACE_STREAMS)}
    assert d["otherData"]["schema"] == "aptmoe-trace/1" and d["otherData"]["source"] == "sim"
    xs = [e for e in d["traceEvents"] if e["ph"] == "X"]
    assert all(e["args"]["source"] == "sim" for e in xs)
    assert all(e["cat"] in CATEGORIES for e in xs)
    assert json.loads(json.dumps(d)) == d


def test_summary_properties() -> None:
    tr = sample()
    assert tr.num_ranks == 2
    assert tr.span_s() == pytest.approx(3.000001)
    assert Trace(source="sim").span_s() == 0.0 and Trace(source="sim").num_ranks == 0


@pytest.mark.parametrize("text", ["{not json", "\x00\xff", "[]", '{"events": []}',
                                  '{"traceEvents": [{"ph": "X", "name": "0F0"}]}',
                                  '{"traceEvents": [{"ph": "X", "name": "0F0", "pid": 0, "tid": 99, "ts": 0, "dur": 1}]}',
                                  '{"traceEvents": [], "otherData": {"time_unit": "ms"}}'])
def test_corrupt_files_are_trace_errors(tmp_path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(TraceError):
        Trace.load(path)


def test_missing_file_is_a_trace_error(tmp_path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        Trace.load(tmp_path / "nope.json")


def test_failed_atomic_write_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "out.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
def test_a_compressed_trace_loads_like_a_plain_one_and_a_corrupt_one_is_a_one_line_error(tmp_path, suffix) -> None:
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".xz": lzma.compress}[suffix]
    tr = Trace("real", meta={"pipeline": "Mobius"})
    tr.add("0F0", 0, "compute", 0.0, 1.5, "forward")
    tr.save(tmp_path / "t.json")
    packed = tmp_path / f"t.json{suffix}"
    packed.write_bytes(compress((tmp_path / "t.json").read_bytes()))
    assert Trace.load(packed).events == Trace.load(tmp_path / "t.json").events
    (tmp_path / "t.json").unlink()              # the plain name of a packed trace reads it
    assert Trace.load(tmp_path / "t.json").events == tr.events
    for bad, data in ((f"bad.json{suffix}", b"not compressed"), (f"cut.json{suffix}", packed.read_bytes()[:-12])):
        (tmp_path / bad).write_bytes(data)
        with pytest.raises(TraceError, match=re.escape(f"trace file {tmp_path / bad} is not JSON: ")) as err:
            Trace.load(tmp_path / bad)
        assert "\n" not in str(err.value)
    with pytest.raises(TraceError, match="does not exist"):
        Trace.load(tmp_path / "none.json")


def test_a_run_s_trace_is_found_plain_then_gz_then_xz(tmp_path) -> None:
    from aptmoe.trace import run_trace

    assert run_trace(tmp_path, "Mobius") is None
    for suffix in (".xz", ".gz", ""):           # each form added takes precedence over the ones before
        (tmp_path / f"trace-Mobius.json{suffix}").write_bytes(b"")
        assert run_trace(tmp_path, "Mobius") == tmp_path / f"trace-Mobius.json{suffix}"
    assert run_trace(tmp_path, "APTMoE") is None


def test_an_event_belongs_to_the_run_of_its_action_that_started_last() -> None:
    from aptmoe.trace import action_runs

    t = Trace("real")
    for s in range(3):                          # one action under one name, once a step
        t.add("0F0", 0, "compute", s * 1.0, s * 1.0 + 0.5, "forward")
    t.add("0F0", 1, "compute", 0.2, 0.4, "forward")                  # the same name on another rank
    run_of = action_runs(t)
    t.add("0F0@3:e1", 0, "compute", 1.1, 1.2, "forward")
    t.add("0F0@3:cpu", 0, "cpu-jobs", 2.0, 2.3, "cpu-job")           # starts with its action's run
    t.add("0F0@3:a", 1, "compute", 0.1, 0.15, "forward")             # before its rank's first run
    assert [run_of(e) for e in t.events[-3:]] == [("0F0", 1), ("0F0", 2), ("0F0", -1)]
