"""The collector's trace window, chains and history, in process (real SQLite files)."""

import json
import time

from commlens.exporters import chains
from commlens.exporters import collector as collector_mod
from commlens.exporters import history as history_mod
from commlens.exporters import traces
from commlens.tracer import context
from commlens.tracer import wire


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def hop(trace_id, span_id, parent_id=None, service="svc", side="server", protocol="rpc",
        operation="op", error=None, start=None, duration=0.01, request_id=None, **extra):
    return dict({"trace_id": trace_id, "span_id": span_id, "parent_id": parent_id,
                 "service": service, "side": side, "protocol": protocol, "peer": None,
                 "target": "t", "operation": operation, "kind": "call",
                 "outcome": "ok" if error is None else "error", "error": error,
                 "start": time.time() if start is None else start, "duration": duration,
                 "request_id": request_id, "global_request_id": None}, **extra)


def hops_message(*hops):
    return json.dumps({"format": wire.HOPS_FORMAT, "process": {"id": "p", "service": "s"},
                       "hops": list(hops)})


def make_collector(tmp_path=None, clock=None, **window):
    clock = clock or Clock()
    path = str(tmp_path / "history.sqlite") if tmp_path else ":memory:"
    return collector_mod.Collector(
        clock=clock, window=traces.TraceWindow(clock=clock, quiet_seconds=5, **window),
        history=history_mod.History(path))


def error_trace(trace_id):
    """api (500) -> conductor call (remote error) -> conductor (fails) -> network (409)."""
    return [
        hop(trace_id, "a" * 16, None, "nova-api", "server", "http", "POST /servers", "500",
            request_id="req-" + trace_id[:8]),
        hop(trace_id, "b" * 16, "a" * 16, "nova-api", "client", "rpc", "build", "Conflict"),
        hop(trace_id, "c" * 16, "b" * 16, "nova-conductor", "server", "rpc", "build",
            "Conflict"),
        hop(trace_id, "d" * 16, "c" * 16, "nova-conductor", "client", "http", "PUT", "409"),
        hop(trace_id, "e" * 16, "d" * 16, "neutron-server", "server", "http", "PUT /ports",
            "409 PortBindingFailed"),
    ]


def test_hops_out_of_order_and_from_many_messages_assemble_into_one_trace():
    clock = Clock()
    collector = make_collector(clock=clock)
    trace_id = context.new_trace_id()
    hops = error_trace(trace_id)
    for item in reversed(hops):
        assert collector.ingest(hops_message(item)) == "accepted"
        clock.now += 1
    assert collector.sweep() == 0  # still within the quiet period
    clock.now += 6
    assert collector.sweep() == 1
    trace = collector.history.trace(trace_id)
    assert len(trace["hops"]) == 5
    (chain,) = trace["chains"]
    assert chain["origin"]["service"] == "neutron-server"
    assert chain["entry"] == {"service": "nova-api", "protocol": "http",
                              "operation": "POST /servers", "error": "500"}
    assert collector.history.trace("req-" + trace_id[:8])["trace_id"] == trace_id


def test_a_late_hop_reopens_its_trace_and_counts_the_chain_once(tmp_path):
    clock = Clock()
    collector = make_collector(tmp_path, clock)
    trace_id = context.new_trace_id()
    hops = error_trace(trace_id)
    collector.ingest(hops_message(*hops[:3]))  # the network side ships late
    clock.now += 10
    collector.sweep()
    (early,) = collector.history.trace(trace_id)["chains"]
    assert early["origin"]["service"] == "nova-conductor"

    collector.ingest(hops_message(*hops[3:]))
    clock.now += 10
    collector.sweep()
    trace = collector.history.trace(trace_id)
    assert len(trace["hops"]) == 5
    (chain,) = trace["chains"]
    assert chain["origin"]["service"] == "neutron-server"
    groups = collector.history.chains(since_seconds=3600)
    assert [g["key"] for g in groups] == [chain["key"]]  # the early shape is replaced
    assert sum(collector.chain_counter.entry_errors.values()) == 2  # one per shape seen


def test_history_survives_a_collector_restart_and_late_hops_still_join(tmp_path):
    clock = Clock()
    first = make_collector(tmp_path, clock)
    trace_id = context.new_trace_id()
    hops = error_trace(trace_id)
    first.ingest(hops_message(*hops[:4]))
    first.stop()  # closes every open trace into the history
    first.history.close()

    second = make_collector(tmp_path, clock)
    assert len(second.history.trace(trace_id)["hops"]) == 4
    second.ingest(hops_message(hops[4]))
    clock.now += 10
    second.sweep()
    trace = second.history.trace(trace_id)
    assert len(trace["hops"]) == 5
    assert trace["chains"][0]["origin"]["service"] == "neutron-server"


def test_bad_hops_are_assembled_where_possible_and_counted_where_not():
    clock = Clock()
    collector = make_collector(clock=clock)
    trace_id = context.new_trace_id()
    cycle_a = hop(trace_id, "1" * 16, "2" * 16, error="Boom")
    cycle_b = hop(trace_id, "2" * 16, "1" * 16, error="Boom")
    orphan = hop(trace_id, "3" * 16, "f" * 16, error="Lost", service="orphan")
    duplicate = hop(trace_id, "3" * 16, None, service="impostor")
    self_parent = hop(trace_id, "4" * 16, "4" * 16, error="Self")
    absurd = hop(trace_id, "5" * 16, None, start=1e300, duration=-5, error="When")
    nan = hop(trace_id, "6" * 16, None, duration=float("nan"))
    garbage = [
        {"trace_id": "not hex" * 5, "span_id": "1" * 16},
        hop("z" * 32, "1" * 16),
        hop(trace_id, "short"),
        hop(trace_id, "7" * 16, side="sideways"),
        hop(trace_id, "8" * 16, service=""),
        hop(trace_id, "9" * 16, operation=["not", "a", "string"]),
        "not a hop", None, 42,
    ]
    body = hops_message(cycle_a, cycle_b, orphan, duplicate, self_parent, absurd, *garbage)
    assert collector.ingest(body) == "accepted"
    assert collector.ingest(json.dumps({"format": wire.HOPS_FORMAT,
                                        "hops": "not a list"})) == "malformed"
    # NaN is not JSON: the message is refused whole (and counted), so no
    # non-finite number ever reaches the API's JSON.
    assert collector.ingest(hops_message(nan)) == "malformed"
    assert collector.invalid_hops == len(garbage)
    assert collector.window.hop_outcomes["duplicate"] == 1

    clock.now += 10
    assert collector.sweep() == 1
    trace = collector.history.trace(trace_id)
    assert {h["span_id"] for h in trace["hops"]} == {c * 16 for c in "12345"}
    assert next(h for h in trace["hops"] if h["span_id"] == "3" * 16)["service"] == "orphan"
    when = next(h for h in trace["hops"] if h["span_id"] == "5" * 16)
    assert when["start"] is None and when["duration"] is None
    origins = {c["origin"]["error"] for c in trace["chains"]}
    assert {"Lost", "Self", "When"} <= origins


def test_memory_is_bounded_by_the_window_not_by_traffic():
    clock = Clock()
    collector = make_collector(clock=clock, max_open_traces=100, max_hops_per_trace=3)
    for i in range(1000):
        collector.ingest(hops_message(hop("%032x" % (i + 1), "%016x" % 1)))
    assert len(collector.window) == 100
    assert collector.window.closed["window_full"] == 900
    big = "%032x" % 5000
    collector.ingest(hops_message(*[hop(big, "%016x" % (s + 1)) for s in range(10)]))
    assert collector.window.hop_outcomes["trace_full"] == 7
    collector.sweep()
    assert collector.history.size() == 901  # the big trace pushed one more out early


def test_history_is_pruned_by_age_and_count(tmp_path):
    now = [5000.0]
    history = history_mod.History(str(tmp_path / "h.sqlite"), max_age_seconds=100,
                                  max_traces=3, clock=lambda: now[0])
    for i in range(5):
        trace_id = "%032x" % (i + 1)
        history.save([(trace_id, [hop(trace_id, "a" * 16, request_id=f"req-{i}")], [])])
        now[0] += 1
    history.prune()
    assert history.size() == 3
    assert history.trace("req-0") is None and history.trace("req-4") is not None
    now[0] += 1000
    history.prune()
    assert history.size() == 0


def test_the_chain_metric_keeps_its_first_series_and_sums_the_rest_as_other():
    counter = chains.ChainCounter(max_series=2)
    for i in range(5):
        trace_id = "%032x" % (i + 1)
        (chain,) = chains.derive([hop(trace_id, "a" * 16, error=f"Error{i}")])
        counter.count(chain)
    assert len(counter.entry_errors) == 3
    assert counter.entry_errors[("other",) * 5] == 3


def test_a_refused_request_alone_is_not_a_chain_but_a_refusal_below_an_error_is():
    trace_id = context.new_trace_id()
    refused = hop(trace_id, "a" * 16, None, "nova-api", "server", "http", "GET /x", "404")
    assert chains.derive([refused]) == []
    below = hop(trace_id, "b" * 16, "a" * 16, "nova-api", "client", "http", "GET", "404")
    failing = hop(trace_id, "a" * 16, None, "nova-api", "server", "http", "GET /x", "500")
    (chain,) = chains.derive([failing, below])
    assert chain["origin"]["error"] == "404"


def test_a_request_id_joins_every_trace_that_carries_it_entry_first_whatever_order_they_closed():
    # nova-compute's work for one boot, split over traces that share the
    # boot's request id (work handed over in a way commlens did not follow).
    request_id = "req-" + context.new_trace_id()[:8]
    api, compute, placement = (context.new_trace_id() for _ in range(3))
    traces = {
        api: [hop(api, "a" * 16, None, "nova-api", "server", "http", "POST /servers",
                  start=100.0, duration=0.5, request_id=request_id),
              hop(api, "b" * 16, "a" * 16, "nova-api", "client", "rpc", "build_instances",
                  start=100.0, request_id=request_id)],
        compute: [hop(compute, "c" * 16, None, "nova-compute", "client", "rpc",
                      "object_action", start=101.0, request_id=request_id),
                  hop(compute, "d" * 16, "c" * 16, "nova-conductor", "server", "rpc",
                      "object_action", start=101.1, request_id=request_id)],
        placement: [hop(placement, "e" * 16, None, "nova-compute", "client", "http", "GET",
                        start=101.0, request_id=request_id)],
    }
    answers = []
    for order in ([api, compute, placement], [placement, compute, api],
                  [compute, api, placement]):
        history = history_mod.History()
        for trace_id in order:
            history.save([(trace_id, traces[trace_id], chains.derive(traces[trace_id]))])
        found = history.trace(request_id)
        found.pop("seen")
        answers.append(found)
    assert answers[0] == answers[1] == answers[2]
    found = answers[0]
    assert found["request_id"] == request_id
    assert found["trace_id"] == api
    # Two roots start at 101.0: the tie is broken by trace id, not by arrival.
    assert found["trace_ids"] == [api] + sorted([compute, placement])
    assert [h["span_id"][0] for h in found["hops"]][:2] == ["a", "b"]
    assert len(found["hops"]) == 5
    assert found["start"] == 100.0 and abs(found["duration"] - 1.11) < 1e-9
    # A trace id still answers with that trace alone.
    assert {h["trace_id"] for h in history.trace(compute)["hops"]} == {compute}


def test_chain_first_and_last_seen_are_when_the_error_happened_not_when_its_trace_closed():
    clock = Clock()
    clock.now = 2_000_000.0
    history = history_mod.History(clock=clock)
    happened = []
    for seconds_ago in (60, 30):
        trace_id = context.new_trace_id()
        hops = error_trace(trace_id)
        for item in hops:
            item["start"] = clock.now - seconds_ago
        hops[-1]["duration"] = 0.25  # the origin: neutron-server's 409
        happened.append(clock.now - seconds_ago + 0.25)
        clock.now += 9  # the trace closes after its quiet period
        history.save([(trace_id, hops, chains.derive(hops))])
    (group,) = history.chains(since_seconds=3600)
    assert (group["first_seen"], group["last_seen"]) == tuple(happened)
    assert group["count"] == 2


def test_a_history_file_from_before_chain_times_opens_and_its_chains_keep_their_close_time(
        tmp_path):
    import sqlite3

    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE trace_chains (
            trace_id TEXT NOT NULL, chain_key TEXT NOT NULL, seen REAL NOT NULL,
            request_id TEXT, PRIMARY KEY (trace_id, chain_key)) WITHOUT ROWID;
        CREATE TABLE chains (chain_key TEXT PRIMARY KEY, chain TEXT NOT NULL);
    """)
    chain = chains.derive(error_trace(context.new_trace_id()))[0]
    db.execute("INSERT INTO chains VALUES (?, ?)", (chain["key"], json.dumps(chain)))
    db.execute("INSERT INTO trace_chains VALUES ('t', ?, ?, NULL)", (chain["key"], 1234.5))
    db.commit()
    db.close()
    history = history_mod.History(path, clock=lambda: 2000.0)
    (group,) = history.chains(since_seconds=3600)
    assert (group["first_seen"], group["last_seen"]) == (1234.5, 1234.5)
