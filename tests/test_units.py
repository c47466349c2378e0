"""Fast tests of the pure parts: context parsing, labels, URLs, settings, merging."""

import bisect
import decimal
import json
import os
import random
import re
import threading

import pytest
from oslo_config import cfg

from commlens.exporters import collector as collector_mod
from commlens.exporters import prometheus
from commlens.tracer import context
from commlens.tracer import hops
from commlens.tracer import implementation
from commlens.tracer import labels
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import settings
from commlens.tracer import shipping
from commlens.tracer import urls
from commlens.tracer import wire
from support import mutations

# The series types of the implementation this run uses (compiled, or the
# Python twin on an install without a compiler or with COMMLENS_PUREPYTHON).
_speedups = implementation.module("speedups")

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- trace context -------------------------------------------------------

def test_valid_traceparent_is_parsed():
    assert context.parse_traceparent(VALID) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)


@pytest.mark.parametrize("value", [
    None, 42, "", "garbage", VALID.upper(), VALID + "-extra",
    "ff" + VALID[2:], "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", "x" * 100000,
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Injected: 1",
])
def test_invalid_traceparent_is_refused(value):
    assert context.parse_traceparent(value) is None


def test_traceparent_parsing_follows_the_w3c_rule():
    def by_the_rule(value):
        # Version 00 is exactly 55 characters; later versions may add fields.
        version = re.match(r"([0-9a-f]{2})-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", value)
        if not version or version[1] == "ff" or (version[1] == "00" and len(value) != 55):
            return None
        if value[3:35] == "0" * 32 or value[36:52] == "0" * 16:
            return None
        return value[3:35], value[36:52], int(value[53:55], 16) & 1 == 1

    rng = random.Random(7)
    zeros = "00-" + "0" * 32 + "-" + "0" * 16 + "-00"
    for _ in range(5000):
        value = list(rng.choice([VALID, zeros]))
        for _ in range(rng.randrange(4)):
            value[rng.randrange(55)] = rng.choice("0123456789abcdefF-z ")
        value = "".join(value) + rng.choice(["", "", "-", "-0a", "x"])
        assert context.parse_traceparent(value) == by_the_rule(value), value


def test_malformed_traceparent_starts_a_new_trace_and_is_reported():
    ctx, valid = context.child_of_incoming("zz")
    assert not valid and context.parse_traceparent(ctx.traceparent())
    ctx, valid = context.child_of_incoming(None)
    assert valid
    ctx, valid = context.child_of_incoming(VALID)
    assert valid and ctx.trace_id == VALID[3:35] and ctx.parent_id == VALID[36:52]


SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("baggage, sender", [
    (f"commlens.service=nova-api;kind=call;span={SPAN}", ("nova-api", "call")),
    (f"a=1,commlens.service=nova-conductor;kind=cast;span={SPAN}, b=2",
     ("nova-conductor", "cast")),
    # read only in the order with_baggage_sender writes it
    (f"commlens.service=nova-conductor;span={SPAN};kind=cast", (None, None)),
    # forwarded by a service that is not instrumented by commlens: stale
    ("commlens.service=nova-api;kind=call;span=1111111111111111", (None, None)),
    ("commlens.service=nova-api", (None, None)),
    (f"xcommlens.service=evil;span={SPAN}", (None, None)),
    (f'commlens.service=evil"}} 1;span={SPAN}', (None, None)),
    (f"commlens.service={'x' * 65};span={SPAN}", (None, None)),
    ("commlens.service=a" + "," * 9000, (None, None)),
    (None, (None, None)), (["commlens.service=x"], (None, None)),
])
def test_baggage_names_the_caller_only_when_well_formed_and_current(baggage, sender):
    assert context.parse_baggage_sender(baggage, SPAN) == sender


def test_baggage_member_is_replaced_and_others_kept():
    value = context.with_baggage_sender("k=v,commlens.service=old;span=1", "nova-api",
                                        "cast", SPAN)
    assert value == f"k=v,commlens.service=nova-api;kind=cast;span={SPAN}"
    assert context.parse_baggage_sender(value, SPAN) == ("nova-api", "cast")


def test_outgoing_hop_is_a_child_of_the_hop_being_served():
    parent = context.TraceContext("a" * 32, "b" * 16)
    token = context.set_current(parent)
    try:
        child = context.outgoing()
    finally:
        context.reset_current(token)
    assert (child.trace_id, child.parent_id) == (parent.trace_id, parent.span_id)
    assert context.current() is None


def test_outgoing_hop_without_a_served_hop_starts_a_trace_or_joins_opentelemetry():
    from opentelemetry import trace

    first = context.outgoing()
    assert first.parent_id is None and len(first.trace_id) == 32 and len(first.span_id) == 16
    assert context.parse_traceparent(first.traceparent())
    assert len({context.outgoing().trace_id for _ in range(100)}) == 100

    active = trace.NonRecordingSpan(trace.SpanContext(
        int(VALID[3:35], 16), int(VALID[36:52], 16), is_remote=False,
        trace_flags=trace.TraceFlags(1)))
    with trace.use_span(active):
        child = context.outgoing()
    assert (child.trace_id, child.parent_id) == (VALID[3:35], VALID[36:52])


# -- labels and URLs ------------------------------------------------------

@pytest.mark.parametrize("raw, label", [
    ("build_instances", "build_instances"), ("select_destinations", "select_destinations"),
    ("bad method", "invalid"), ("x" * 200, "invalid"), (None, "invalid"),
    ({"a": 1}, "invalid"), ("ünïcode", "invalid"),
])
def test_method_labels_are_identifiers_or_invalid(raw, label):
    assert labels.method(raw) == label


def test_redact_hides_every_host_credentials():
    url = "rabbit://nova:s3cret@h1:5672,nova:s3cret@h2:5672/nova?ssl=1"
    assert "s3cret" not in urls.redact(url) and "h2:5672" in urls.redact(url)
    assert "pw" not in urls.redact("amqp://us@er:pw@host/")


def test_our_query_parameters_are_split_from_the_broker_url():
    url, ours = urls.split_query("amqp://h/?exchange=x&heartbeat=5&queue=q", urls.OUR_QUERY)
    assert ours == {"exchange": "x", "queue": "q"} and url == "amqp://h/?heartbeat=5"


@pytest.mark.parametrize("url", ["", "nowhere", "kafka://x", None])
def test_unusable_export_url_is_a_clear_error(url):
    with pytest.raises(shipping.ExportUrlError):
        shipping.make_transport(url)


# -- settings -------------------------------------------------------------

def test_config_file_wins_over_environment_which_wins_over_defaults(monkeypatch):
    monkeypatch.setenv("COMMLENS_SERVICE_NAME", "from-env")
    monkeypatch.setenv("COMMLENS_SHIP_INTERVAL", "7")
    monkeypatch.delenv("COMMLENS_HOP_SAMPLE_RATIO")
    conf = cfg.ConfigOpts()
    conf([])
    settings.register_opts(conf)
    conf.set_override("service_name", "from-config", group="commlens")
    loaded = settings.load(conf)
    assert loaded.service_name == "from-config"
    assert loaded.ship_interval == 7.0
    assert loaded.hop_sample_ratio == settings.DEFAULTS["hop_sample_ratio"]


def test_service_name_defaults_to_the_program_name():
    assert settings.program_service_name("/usr/bin/nova-conductor") == "nova-conductor"
    assert settings.program_service_name("") == "unknown"


def test_bad_environment_value_is_logged_and_replaced(monkeypatch, caplog):
    monkeypatch.setenv("COMMLENS_SHIP_INTERVAL", "soon")
    assert settings.load(None).ship_interval == settings.DEFAULTS["ship_interval"]
    assert "COMMLENS_SHIP_INTERVAL" in caplog.text


# -- recorder -------------------------------------------------------------

def test_series_beyond_the_cap_fold_into_other(monkeypatch):
    monkeypatch.setattr(recorder_mod, "MAX_SERIES_PER_METRIC", 3)
    rec = recorder_mod.Recorder("svc")
    for i in range(10):
        rec.inc(metrics.RPC_SENT, ("svc", "topic", f"m{i}", "call"))
    sent = [c for c in rec.snapshot(1)["counters"] if c[0] == metrics.RPC_SENT.name]
    assert len(sent) == 4
    assert ["commlens_rpc_sent_total", ["svc", "other", "other", "other"], 7] in sent


def test_updates_from_many_threads_are_all_counted():
    # inc and observe take no lock (tracer/_speedups.c): each is atomic.
    rec = recorder_mod.Recorder("svc")
    labels = ("svc", "topic", "m", "call")
    waits = ("svc", "topic", "m", "ok")

    def work():
        for _ in range(20000):
            rec.inc(metrics.RPC_SENT, labels)
            rec.observe(metrics.RPC_REPLY_WAIT, waits, 0.002)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = rec.snapshot(1)
    assert [metrics.RPC_SENT.name, list(labels), 160000] in snapshot["counters"]
    (counts, total, low, high), = [h[2:] for h in snapshot["histograms"]
                                   if h[0] == metrics.RPC_REPLY_WAIT.name]
    assert low == high == 0.002
    assert counts[bisect.bisect_left(metrics.LATENCY_BUCKETS, 0.002)] == sum(counts) == 160000
    assert total == pytest.approx(320.0)


@pytest.mark.parametrize("seconds", [-1.0, 0.0, 0.001, 0.0010001, 0.75, 1.0, 120.0, 121.0,
                                     float("inf"), float("nan")])
def test_a_duration_lands_in_the_bucket_of_prometheus_le(seconds):
    # The first bucket whose upper bound is >= the value, +Inf last.
    histogram = _speedups.Histogram(metrics.LATENCY_BUCKETS)
    histogram.observe(seconds)
    counts, total, low, high = histogram.read()
    assert low == high == seconds or seconds != seconds
    assert counts.index(1) == bisect.bisect_left(metrics.LATENCY_BUCKETS, seconds)
    assert len(counts) == len(metrics.LATENCY_BUCKETS) + 1 and sum(counts) == 1
    assert total == seconds or seconds != seconds


def test_series_refuse_what_would_run_code_or_break_their_buckets():
    counter = _speedups.Counter()
    counter.inc()
    counter.inc(2)
    counter.inc(0.5)
    assert counter.value == 3.5
    with pytest.raises(TypeError):
        counter.inc("1")
    with pytest.raises(TypeError):
        counter.inc(decimal.Decimal(1))  # its __add__ is code: not atomic
    with pytest.raises(ValueError):
        _speedups.Histogram((1.0, 0.5))
    with pytest.raises(ValueError):
        _speedups.Histogram((1, 2))
    rec = recorder_mod.Recorder("svc")
    with pytest.raises(TypeError):
        rec.observe(metrics.RPC_REPLY_WAIT, ("svc", "t", "m", "ok"), "slow")
    with pytest.raises(TypeError):
        rec.inc(metrics.RPC_SENT, ("svc", "t", "m", "call"), "1")
    snapshot = rec.snapshot(1)  # bad input made no series
    assert snapshot["histograms"] == [] and snapshot["counters"] == []


def test_trace_context_fields_and_defaults():
    ctx = context.TraceContext()
    assert (ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled, ctx.child_failed,
            ctx.service) == (None, None, None, True, False, None)
    ctx = context.TraceContext("a" * 32, None, "b" * 16, sampled=False)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == ("a" * 32, "b" * 16, False)
    ctx.child_failed = True
    ctx.service = "nova-api"
    assert ctx.traceparent().startswith("00-" + "a" * 32 + "-") and ctx.span_id
    with pytest.raises(AttributeError):
        ctx.anything_else = 1  # no __dict__: the compiled layout is the whole object


def test_waiting_calls_finish_once_even_when_released_twice():
    rec = recorder_mod.Recorder("svc")
    token = rec.call_started(("svc", "t", "m"))
    rec.release_calls([token])
    rec.call_finished(token)
    gauges = rec.snapshot(1)["gauges"]
    assert ["commlens_rpc_waiting_replies", ["svc", "t", "m"], 0] in gauges


def test_snapshot_ships_the_sums_of_the_finest_series_and_not_the_series():
    rec = recorder_mod.Recorder("nova-api")
    rest = ("nova-api", "novaclient", "GET", "/v2.1/servers/{id}", "200")
    rec.observe(metrics.HTTP_SERVER_HOPS, rest, 0.002)
    rec.observe(metrics.HTTP_SERVER_HOPS, rest, 0.003)
    rec.observe(metrics.HTTP_SERVER_HOPS, rest[:4] + ("503",), 2.0)
    rpc = ("nova-api", "nova-compute", "nova-api", "ping", "error")
    rec.observe(metrics.RPC_SERVER_HOPS, rpc, 0.5)
    rec.observe(metrics.RPC_REPLY_WAIT, ("nova-api", "conductor", "build", "ok"), 0.02)
    rec.observe(metrics.RPC_REPLY_WAIT, ("nova-api", "conductor", "get", "timeout"), 60.0)
    rec.observe(metrics.HTTP_CLIENT_DURATION, ("nova-api", "neutron", "POST", "ok"), 0.1)
    rec.observe(metrics.HTTP_CLIENT_DURATION, ("nova-api", "neutron", "GET", "failed"), 0.3)
    snapshot = rec.snapshot(1)
    counters = {(name, tuple(labels)): value for name, labels, value in snapshot["counters"]}
    histograms = {(name, tuple(labels)): (sum(counts), total)
                  for name, labels, counts, total, _low, _high in snapshot["histograms"]}
    assert not [n for n, _ in {**counters, **histograms} if "internal" in n]
    assert counters[(metrics.HTTP_REQUESTS.name, rest)] == 2
    assert counters[(metrics.HTTP_REQUESTS.name, rest[:4] + ("503",))] == 1
    assert histograms[(metrics.HTTP_DURATION.name,
                       ("nova-api", "GET", "/v2.1/servers/{id}", "ok"))] == (2, 0.005)
    assert histograms[(metrics.HTTP_DURATION.name,
                       ("nova-api", "GET", "/v2.1/servers/{id}", "error"))] == (1, 2.0)
    rest_edge = ("novaclient", "nova-api", "")
    rpc_edge = ("nova-compute", "nova-api", metrics.MESSAGING_SYSTEM)
    assert counters[(metrics.SERVICE_GRAPH_REQUESTS.name, rest_edge)] == 3
    assert counters[(metrics.SERVICE_GRAPH_FAILED.name, rest_edge)] == 1
    assert histograms[(metrics.SERVICE_GRAPH_SERVER_SECONDS.name, rest_edge)] == (3, 2.005)
    assert histograms[(metrics.RPC_PROCESSING.name,
                       ("nova-api", "nova-api", "ping", "error"))] == (1, 0.5)
    assert counters[(metrics.SERVICE_GRAPH_REQUESTS.name, rpc_edge)] == 1
    assert counters[(metrics.SERVICE_GRAPH_FAILED.name, rpc_edge)] == 1
    assert histograms[(metrics.SERVICE_GRAPH_CLIENT_SECONDS.name,
                       ("nova-api", "conductor", metrics.MESSAGING_SYSTEM))] == (2, 60.02)
    assert histograms[(metrics.SERVICE_GRAPH_CLIENT_SECONDS.name,
                       ("nova-api", "neutron", ""))] == (2, 0.4)
    # Counted directly too (a timed-out call): the sum lands on it.
    rec.inc(metrics.SERVICE_GRAPH_REQUESTS, rpc_edge)
    again = {(name, tuple(labels)): value for name, labels, value in rec.snapshot(1)["counters"]}
    assert again[(metrics.SERVICE_GRAPH_REQUESTS.name, rpc_edge)] == 2


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25, 0.5, 0.999, 1.0])
def test_hop_sampling_keeps_the_traces_whose_ids_fall_below_the_ratio(ratio):
    rec = recorder_mod.Recorder("svc", hop_sample_ratio=ratio)
    edges = ["0" * 24 + "%08x" % n for n in (0, 1, 0x28f5c28, 0x28f5c29, 0x7fffffff,
                                               0x80000000, 0xffbe76c8, 0xffffffff)]
    for trace_id in edges + [context.new_trace_id() for _ in range(2000)]:
        in_sample = int(trace_id[-8:], 16) < ratio * 2 ** 32
        assert rec.keeps_hop(trace_id, 0.0, False) == in_sample, trace_id
        assert rec.keeps_hop(trace_id, 0.0, True)  # failed: always


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_a_first_hop_without_ids_is_sampled_at_the_same_ratio(ratio):
    # Its ids were never drawn: it made no call, so its trace is that hop alone.
    rec = recorder_mod.Recorder("svc", hop_sample_ratio=ratio)
    kept = sum(rec.keeps_hop(None, 0.0, False) for _ in range(4000))
    assert abs(kept / 4000 - ratio) < 0.03
    assert rec.keeps_hop(None, 0.0, True) and rec.keeps_hop(None, 5.0, False)


def test_a_hop_draws_its_ids_when_first_needed():
    root = context.TraceContext()
    assert (root.trace_id, root.span_id) == (None, None)
    token = context.set_current(root)
    try:
        child = context.outgoing()
    finally:
        context.reset_current(token)
    # The child's parent is the root, whose ids are drawn now and kept.
    assert len(root.trace_id) == 32 and len(root.span_id) == 16
    assert (child.trace_id, child.parent_id) == (root.trace_id, root.span_id)
    joined, valid = context.child_of_incoming(VALID)
    assert valid and joined.span_id is None
    hop = hops.make_hop(joined, service="s", side=hops.SERVER, protocol=hops.HTTP,
                        peer=None, target="t", operation="o", kind="GET", outcome="ok",
                        error=None, start=0.0, duration=0.0)
    assert hop["trace_id"] == VALID[3:35] and hop["parent_id"] == VALID[36:52]
    assert len(hop["span_id"]) == 16 and hop["span_id"] == joined.span_id


def test_hop_buffer_is_bounded_and_counts_what_it_drops():
    rec = recorder_mod.Recorder("svc", max_pending_hops=5)
    for i in range(8):
        rec.add_hop({"trace_id": str(i)})
    snapshot = rec.snapshot(1)
    assert [h["trace_id"] for h in snapshot["hops"]] == ["3", "4", "5", "6", "7"]
    assert ["commlens_agent_records_dropped_total", ["svc", "hop_buffer_full"], 3] \
        in snapshot["counters"]


# -- collector state ------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _snapshot(process_id, seq, sent, waiting, final=False, interval=1.0):
    return json.dumps({
        "format": wire.SNAPSHOT_FORMAT, "seq": seq, "interval": interval,
        "final": final, "process": {"id": process_id, "service": "svc", "pid": 1},
        "counters": [["commlens_rpc_sent_total", ["svc", "t", "m", "call"], sent]],
        "histograms": [["commlens_rpc_reply_wait_seconds", ["svc", "t", "m", "ok"],
                        [1] + [0] * len(metrics.LATENCY_BUCKETS), 0.001, 0.001, 0.001]],
        "gauges": [["commlens_rpc_waiting_replies", ["svc", "t", "m"], waiting]],
    })


def _sent_and_waiting(collector):
    counters, _, gauges = collector.merged()
    return (counters.get(("commlens_rpc_sent_total", ("svc", "t", "m", "call")), 0),
            gauges.get(("commlens_rpc_waiting_replies", ("svc", "t", "m")), 0))


def test_processes_are_summed_and_a_silent_one_loses_its_gauges_not_its_counts():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock)
    assert collector.ingest(_snapshot("a", 1, 10, 4)) == "accepted"
    assert collector.ingest(_snapshot("b", 1, 5, 2)) == "accepted"
    assert _sent_and_waiting(collector) == (15, 6)
    clock.now += 2
    collector.ingest(_snapshot("b", 2, 6, 0))
    clock.now += 2  # "a" silent for 4 intervals: expired
    assert _sent_and_waiting(collector) == (16, 0)
    assert [p["id"] for p in collector.processes()] == ["b"]


def test_final_snapshot_retires_at_once_and_stale_ones_are_ignored():
    collector = collector_mod.Collector(clock=Clock())
    collector.ingest(_snapshot("a", 2, 10, 1))
    assert collector.ingest(_snapshot("a", 1, 3, 9)) == "stale"
    collector.ingest(_snapshot("a", 3, 12, 0, final=True))
    assert _sent_and_waiting(collector) == (12, 0)
    assert collector.processes() == []


@pytest.mark.parametrize("body, outcome", [
    (b"\xff", "malformed"), (b"{", "malformed"), (b"[]", "foreign"),
    (b'{"format": "x"}', "foreign"),
    (json.dumps({"format": wire.SNAPSHOT_FORMAT, "process": {"id": ""},
                 "seq": 1, "interval": 1}).encode(), "malformed"),
    (json.dumps({"format": wire.SNAPSHOT_FORMAT, "process": {"id": "p"},
                 "seq": "1", "interval": 1}).encode(), "malformed"),
])
def test_collector_classifies_bad_messages(body, outcome):
    collector = collector_mod.Collector()
    assert collector.ingest(body) == outcome
    assert collector.message_counts() == {outcome: 1}


def test_exposition_uses_the_contract_names():
    collector = collector_mod.Collector(clock=Clock())
    collector.ingest(_snapshot("a", 1, 3, 1))
    text = prometheus.render(collector)[0].decode()
    assert 'commlens_rpc_sent_total{kind="call",method="m",service="svc",target="t"} 3.0' in text
    assert 'commlens_rpc_waiting_replies{method="m",service="svc",target="t"} 1.0' in text
    assert 'commlens_rpc_reply_wait_seconds_bucket{le="0.001",method="m",outcome="ok",' \
           'service="svc",target="t"} 1.0' in text


def test_collector_keeps_only_sane_hops_and_service_names():
    collector = collector_mod.Collector(clock=Clock())
    body = json.loads(_snapshot("a", 1, 1, 0))
    body["process"]["service"] = 'evil"}\n'
    body["hops"] = [{"trace_id": "a" * 32, "span_id": "b" * 16, "service": "svc",
                     "side": "server", "protocol": "rpc", "extra": "dropped",
                     "duration": 0.1},
                    {"trace_id": "a" * 32, "span_id": "c" * 16, "service": "svc",
                     "side": "sideways", "protocol": "rpc"},
                    {"trace_id": "c" * 32, "service": {"nested": 1}},
                    {"trace_id": "d" * 32, "operation": "x" * 10000},
                    "not a hop"]
    assert collector.ingest(json.dumps(body)) == "accepted"
    assert [h["trace_id"] for h in collector.hops] == ["a" * 32]
    assert "extra" not in collector.hops[0]
    assert collector.processes()[0]["service"] == "invalid"


def test_stamp_outgoing_adopts_only_the_active_opentelemetry_span():
    from opentelemetry import trace

    stale = {"traceparent": VALID}
    ctx = context.stamp_outgoing(stale, "nova-api", "notification")
    assert ctx.span_id != VALID[36:52] and stale["traceparent"] == ctx.traceparent()
    assert context.parse_baggage_sender(stale["baggage"], ctx.span_id) == (
        "nova-api", "notification")

    active = trace.NonRecordingSpan(trace.SpanContext(
        int(VALID[3:35], 16), int(VALID[36:52], 16), is_remote=False,
        trace_flags=trace.TraceFlags(1)))
    injected = {"traceparent": VALID}
    with trace.use_span(active):
        ctx = context.stamp_outgoing(injected, "nova-api", "call")
    assert (ctx.trace_id, ctx.span_id) == (VALID[3:35], VALID[36:52])
    assert injected["traceparent"] == VALID


@pytest.mark.parametrize("served", [
    None,  # the first hop of a new trace
    ("a" * 32, "b" * 16, True), ("a" * 32, None, False),  # span id not drawn yet
    (None, None, True),  # a first hop that made no call yet
])
@pytest.mark.parametrize("carrier", [
    {"request_id": "req-1"},  # the compiled case...
    {"baggage": "vendor=x"}, {"traceparent": VALID},  # ...and the ones in Python
])
def test_stamp_outgoing_compiled_and_in_python_agree(served, carrier):
    # The compiled common case (tracer/_speedups.c) must stamp what the
    # Python one does; the two share only the id generator.
    stamped = []
    for stamp in (context.stamp_outgoing, context._stamp_outgoing_in_python):
        parent = None if served is None else context.TraceContext(*served[:2], None, served[2])
        token = context.set_current(parent)
        try:
            out = dict(carrier)
            ctx = stamp(out, "nova-api", "cast")
        finally:
            context.reset_current(token)
        assert out["traceparent"] == ctx.traceparent()
        assert context.parse_traceparent(out["traceparent"]) == (
            ctx.trace_id, ctx.span_id, served is None or served[2])
        assert context.parse_baggage_sender(out["baggage"], ctx.span_id) == ("nova-api", "cast")
        if parent is not None:
            assert (ctx.trace_id, ctx.parent_id) == (parent.trace_id, parent.span_id)
            assert parent.span_id and parent.trace_id  # drawn for the child
        stamped.append((out.keys(), out["baggage"].replace(ctx.span_id, "SPAN"),
                        ctx.parent_id is None, ctx.sampled, ctx.service, ctx.child_failed))
    assert stamped[0] == stamped[1]



@pytest.mark.parametrize("service, kind", [("nova-api", "cast"), ("növa-api", "call"),
                                           ("nova-api", "cäst"), ("", "")])
def test_stamp_outgoing_writes_any_service_and_kind_as_the_python_twin_does(service, kind):
    # The compiled stamping builds ASCII values directly and anything else
    # by concatenation (tracer/_speedups.c, ascii_join): both as in Python.
    for stamp in (context.stamp_outgoing, context._stamp_outgoing_in_python):
        out = {}
        ctx = stamp(out, service, kind)
        assert out["traceparent"] == "00-%s-%s-01" % (ctx.trace_id, ctx.span_id)
        assert out["baggage"] == context.with_baggage_sender(None, service, kind, ctx.span_id)

def test_ids_are_hex_unique_and_differ_in_a_forked_child():
    ids = [context.new_trace_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids[:1000])
    assert re.fullmatch("[0-9a-f]{16}", context.new_span_id())
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(writer, context.new_trace_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    # Without a new seed after fork, the child would draw the parent's next id.
    assert os.read(reader, 64).decode() != context.new_trace_id()
    os.close(reader)
    os.close(writer)


class _Message:
    """A driver's incoming RPC message, as the RPC server sees it."""

    def __init__(self, ctxt, method="build_instances", orig_msg_id=None):
        self.ctxt = ctxt
        self.message = {"method": method, "args": {}}
        self.msg_id = "m-1"
        self.orig_msg_id = orig_msg_id
        self.replies = []

    def acknowledge(self):
        pass

    def reply(self, reply=None, failure=None):
        self.replies.append((reply, failure))

    def requeue(self):
        pass


class _Listener:
    batch_size, batch_timeout, prefetch_size = 1, None, -1


@pytest.fixture(scope="module")
def rpc_listener():
    import oslo_messaging as om

    from commlens.middleware import rpc_driver

    transport = om.get_rpc_transport(cfg.ConfigOpts(), url="commlens+fake://")
    yield rpc_driver._InstrumentedListener(_Listener(), transport._driver, "conductor",
                                           notifications=False)
    transport.cleanup()


def test_received_context_compiled_and_in_python_agree(rpc_listener):
    # middleware/_rpc_receive.c reads the common contexts itself and leaves
    # the rest to rpc_driver._received: both must read every context alike.
    member = "commlens.service=nova-api;kind=call;span=" + VALID[36:52]
    contexts = [{}, {"traceparent": VALID}, {"traceparent": VALID, "baggage": member},
                {"baggage": member}, {"traceparent": VALID, "baggage": "vendor=1," + member},
                {"traceparent": VALID, "baggage": member.replace("call", "poke")},
                {"msg_id": "x"}, {"traceparent": None, "baggage": None}]
    contexts += [{"traceparent": t} for t in mutations(VALID, 2000)]
    contexts += [{"traceparent": VALID, "baggage": b} for b in mutations(member, 2000)]
    driver = rpc_listener._driver
    for ctxt in contexts:
        for orig_msg_id in (None, "reply-to-me"):
            compiled = rpc_listener._receiver.wrap(_Message(dict(ctxt), orig_msg_id=orig_msg_id))
            ctx, caller, method, kind = driver._received(
                _Message(dict(ctxt), orig_msg_id=orig_msg_id), "conductor", False)
            assert (compiled.ctx.trace_id, compiled.ctx.parent_id, compiled.ctx.sampled,
                    compiled.ctx.service, compiled.caller, compiled.method, compiled.kind) == (
                ctx.trace_id, ctx.parent_id, ctx.sampled, ctx.service, caller, method,
                kind), ctxt


def test_an_incoming_message_is_timed_from_dispatch_to_reply(rpc_listener):
    recorder = rpc_listener._driver._recorder
    inner = _Message({"traceparent": VALID}, method="select_destinations")
    incoming = rpc_listener._wrap(inner)
    assert (incoming.ctxt, incoming.message, incoming.msg_id) == (
        inner.ctxt, inner.message, inner.msg_id)
    assert incoming.orig_msg_id is None  # what else the server reads: the inner one's
    incoming.acknowledge()
    assert context.current() is incoming.ctx  # calls made now are its children
    incoming.reply({"ok": 1})
    incoming.reply({"ok": 1})  # passed on again, recorded once
    assert context.current() is None
    assert inner.replies == [({"ok": 1}, None)] * 2
    done = [h for h in recorder.snapshot(1)["histograms"]
            if h[0] == metrics.RPC_PROCESSING.name and "select_destinations" in h[1]]
    assert sum(done[0][2]) == 1  # counted once


def test_compiled_paths_count_their_own_errors_and_never_raise_them(rpc_listener, monkeypatch):
    # A failure inside commlens (here: building a hop record, which every
    # failed request or message gets) is handed to Python, counted as
    # dropped "recording_error", and goes no further: the service's call,
    # reply and response are as they would be without commlens.
    import oslo_messaging as om

    from commlens.middleware import wsgi

    def broken_hop(*args, **kwargs):
        raise RuntimeError("commlens bug")

    recorder = rpc_listener._driver._recorder

    def recording_errors():
        return sum(value for name, labels, value in recorder.snapshot(1)["counters"]
                   if name == metrics.AGENT_DROPPED.name and labels[1] == "recording_error")

    monkeypatch.setattr(hops, "make_hop", broken_hop)
    before = recording_errors()

    call = rpc_listener._driver._sends.begin(om.Target(topic="conductor"), {}, {"method": "m"},
                                             True)
    assert call.end(om.MessagingTimeout("late")) is None

    inner = _Message({})
    incoming = rpc_listener._wrap(inner)
    incoming.acknowledge()
    incoming.reply(failure=ValueError("endpoint failed"))
    (reply, failure), = inner.replies  # passed on as the server gave it
    assert reply is None and isinstance(failure, ValueError)

    def app(environ, start_response):
        start_response("500 Internal Server Error", [("Content-Length", "4")])
        return [b"oops"]

    middleware = wsgi.CommlensMiddleware(app, http_outbound="false")
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/broken"},
                      lambda status, headers, exc_info=None: None)
    assert list(body) == [b"oops"]
    body.close()

    assert recording_errors() == before + 3
