"""The history's journal, in process (real SQLite files, a real SIGKILL): a
hop message is durable before the intake acknowledges it, a collector killed
takes its open traces back at its next start, a message is forgotten once
every trace it fed is stored, and a hop delivered again is never counted
twice (docs/architecture.md, "A hop is acknowledged once it is durable")."""

import json
import os
import shutil
import signal

from commlens.exporters import collector as collector_mod
from commlens.exporters import history as history_mod
from commlens.exporters import journal as journal_mod
from commlens.exporters import traces
from commlens.tracer import context
from commlens.tracer import wire
from test_trace_assembly import Clock, error_trace, hops_message, make_collector


def _collector(tmp_path, clock=None, **window):
    """A collector on a history file and its journal, as ``commlens collector`` runs."""
    clock = clock or Clock()
    path = str(tmp_path / "history.sqlite")
    return collector_mod.Collector(
        clock=clock, window=traces.TraceWindow(clock=clock, quiet_seconds=5, **window),
        history=history_mod.History(path), journal=journal_mod.Journal(path + ".journal"))


def _journalled(tmp_path):
    """What a collector starting now would read back."""
    return list(journal_mod.Journal(str(tmp_path / "history.sqlite.journal")).read())


def _segments(tmp_path):
    return os.listdir(tmp_path / "history.sqlite.journal")


def _chains_counted(collector):
    return sum(collector.chain_counter.entry_errors.values())


def _killed_after_commit(tmp_path, messages):
    """A collector in a child process takes ``messages``, commits them (what
    the intake does before acknowledging) and is killed with SIGKILL with
    their traces still open."""
    pid = os.fork()
    if pid == 0:
        try:
            collector = _collector(tmp_path)
            for body in messages:
                collector.ingest(body)
            collector.commit()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_collector_killed_with_open_traces_takes_them_back_at_its_next_start(tmp_path):
    trace_ids = [context.new_trace_id() for _ in range(3)]
    hops = [error_trace(t) for t in trace_ids]
    # Hops of one trace in several messages, a message with hops of several traces.
    messages = [hops_message(*hops[0][:2], *hops[1][:3]), hops_message(*hops[0][2:]),
                hops_message(*hops[1][3:], *hops[2])]
    _killed_after_commit(tmp_path, messages)

    clock = Clock()
    collector = _collector(tmp_path, clock)
    assert collector.history.size() == 0  # nothing was stored before the kill
    assert collector.reload() == 3
    assert collector.window.hop_outcomes == {"reloaded": 15}
    clock.now += 10
    assert collector.sweep() == 3
    for trace_id in trace_ids:
        trace = collector.history.trace(trace_id)
        assert len(trace["hops"]) == 5
        assert len(trace["chains"]) == 1
    assert _chains_counted(collector) == 3
    assert _segments(tmp_path) == []  # all stored: all forgotten
    # What is shipped after the restart is journalled after what was read back.
    later = error_trace(context.new_trace_id())
    collector.ingest(hops_message(*later))
    collector.commit()
    assert _journalled(tmp_path) == [(4, hops_message(*later).encode())]


def test_a_message_is_forgotten_only_once_every_trace_it_fed_is_stored(tmp_path):
    clock = Clock()
    collector = _collector(tmp_path, clock)
    first, second = (error_trace(context.new_trace_id()) for _ in range(2))
    collector.ingest(hops_message(*first, *second[:2]))
    collector.commit()
    assert len(collector.journal) == 1
    clock.now += 4
    collector.ingest(hops_message(*second[2:]))  # keeps the second trace open
    collector.commit()
    assert len(collector.journal) == 2
    clock.now += 2
    assert collector.sweep() == 1  # the first trace closed; the message still feeds one
    assert len(collector.journal) == 2
    clock.now += 10
    assert collector.sweep() == 1
    assert len(collector.journal) == 0
    assert _segments(tmp_path) == []


def test_a_message_whose_traces_closed_before_it_was_committed_is_never_written(tmp_path):
    collector = _collector(tmp_path)
    collector.ingest(hops_message(*error_trace(context.new_trace_id())))
    collector.sweep(force=True)
    collector.commit()
    assert len(collector.journal) == 0
    # Nor is one of which no hop was kept.
    collector.ingest(hops_message({"trace_id": "not hex"}))
    collector.commit()
    assert len(collector.journal) == 0


def test_a_redelivered_hop_is_never_counted_twice_without_a_durable_history():
    clock = Clock()
    collector = make_collector(clock=clock)  # in memory: no journal
    assert collector.reload() == 0
    trace_id = context.new_trace_id()
    message = hops_message(*error_trace(trace_id))
    collector.ingest(message)
    collector.commit()  # nothing to write
    collector.ingest(message, redelivered=True)
    assert collector.window.hop_outcomes == {"assembled": 5, "redelivered": 5}
    clock.now += 10
    collector.sweep()
    # Redelivered after its trace was stored: merged by span id, chain not counted again.
    collector.ingest(message, redelivered=True)
    clock.now += 10
    collector.sweep()
    assert _chains_counted(collector) == 1
    assert collector.history.size() == 1
    assert len(collector.history.trace(trace_id)["hops"]) == 5


def test_a_hop_journalled_and_then_redelivered_counts_once(tmp_path):
    """Killed after the journal was written and before the acknowledgement
    reached the broker: the next start reads it back, then the broker
    delivers it again."""
    trace_id = context.new_trace_id()
    message = hops_message(*error_trace(trace_id))
    _killed_after_commit(tmp_path, [message])
    clock = Clock()
    collector = _collector(tmp_path, clock)
    collector.reload()
    collector.ingest(message.encode(), redelivered=True)
    collector.commit()
    assert collector.window.hop_outcomes == {"reloaded": 5, "redelivered": 5}
    clock.now += 10
    collector.sweep()
    assert len(collector.history.trace(trace_id)["hops"]) == 5
    assert _chains_counted(collector) == 1
    assert len(collector.journal) == 0


def test_hops_dropped_from_a_full_trace_hold_no_message(tmp_path):
    clock = Clock()
    collector = _collector(tmp_path, clock, max_hops_per_trace=5)
    hops = error_trace(context.new_trace_id())
    collector.ingest(hops_message(*hops))
    extra = dict(hops[0], span_id="f" * 16)
    collector.ingest(hops_message(extra))  # dropped: trace_full
    collector.commit()
    assert collector.window.hop_outcomes == {"assembled": 5, "trace_full": 1}
    assert len(collector.journal) == 1


def test_a_journal_write_that_fails_is_counted_and_ingest_goes_on(tmp_path):
    collector = _collector(tmp_path)
    shutil.rmtree(collector.journal.directory)  # no segment can be opened
    collector.ingest(hops_message(*error_trace(context.new_trace_id())))
    collector.commit()
    assert collector.history_errors == 1
    assert len(collector.window) == 1
    collector.sweep(force=True)
    assert collector.history.size() == 1


def test_a_snapshot_carrying_hops_journals_them_as_a_hop_message(tmp_path):
    """Agents before hops travelled on their own put them in the snapshot:
    only the hops are journalled, never the snapshot's totals."""
    collector = _collector(tmp_path)
    snapshot = {"format": wire.SNAPSHOT_FORMAT, "process": {"id": "p", "service": "s"},
                "seq": 1, "interval": 5, "hops": error_trace(context.new_trace_id())}
    assert collector.ingest(json.dumps(snapshot)) == "accepted"
    collector.commit()
    ((_number, body),) = _journalled(tmp_path)
    assert json.loads(body) == {"format": wire.HOPS_FORMAT, "hops": snapshot["hops"]}
    again = _collector(tmp_path)
    assert again.reload() == 1
    assert again.window.hop_outcomes == {"reloaded": 5}


def test_a_record_cut_short_ends_its_segment_and_what_came_before_is_read_back(tmp_path):
    directory = str(tmp_path / "journal")
    journal = journal_mod.Journal(directory)
    journal.append([(1, b"first"), (2, "second")])
    journal.close()
    (segment,) = os.listdir(directory)
    with open(os.path.join(directory, segment), "ab") as file:
        file.write(b"\x03\x00\x00")  # the process died in the middle of a header
    again = journal_mod.Journal(directory)
    assert again.next_number == 3
    assert list(again.read()) == [(1, b"first"), (2, b"second")]
    again.append([(3, b"third")])  # never after a cut record: a segment of its own
    assert len(os.listdir(directory)) == 2
    again.forget([1, 2])
    assert len(os.listdir(directory)) == 1
    assert list(journal_mod.Journal(directory).read()) == [(3, b"third")]


def test_segments_rotate_and_one_with_nothing_needed_left_is_deleted(tmp_path):
    directory = str(tmp_path / "journal")
    journal = journal_mod.Journal(directory, segment_bytes=10)
    for number in (1, 2, 3):
        journal.append([(number, b"a message of more than ten bytes")])
    assert len(os.listdir(directory)) == 3
    journal.forget([2])
    assert len(os.listdir(directory)) == 2
    journal.forget([3, 1])
    assert os.listdir(directory) == [] and len(journal) == 0


class _Offered:
    """Where the collector offers hops to export as spans (exporters/otlp.py's
    SpanExport.offer): what it was offered, in order."""

    def __init__(self):
        self.hops = []

    def offer(self, hops):
        self.hops += hops


def test_a_hop_delivered_again_is_exported_as_a_span_once_and_one_read_back_again(tmp_path):
    trace_id = context.new_trace_id()
    hops = error_trace(trace_id)
    collector = make_collector()
    collector.span_export = _Offered()
    collector.ingest(hops_message(*hops[:3]))
    # Delivered again with two hops this process has not seen.
    collector.ingest(hops_message(*hops), redelivered=True)
    assert [h["span_id"] for h in collector.span_export.hops] == [
        h["span_id"] for h in hops]
    # Read back after a kill: the killed process may have died with them
    # queued for export, so they are offered again (backends key spans by id).
    _killed_after_commit(tmp_path, [hops_message(*hops)])
    again = _collector(tmp_path)
    again.span_export = _Offered()
    again.reload()
    assert len(again.span_export.hops) == 5
