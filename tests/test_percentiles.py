"""Percentiles the collector serves: within the data, and marked as estimates.

A Nova 34 control plane showed p99 104 s for a single 60.07 s request, p50
90 s for a 60 s timeout and p50 375 ms for a 291 ms cast: interpolation
within a bucket went beyond what was observed. These drive a Collector with
real Recorders' snapshots (the agent's series types, compiled or Python).
"""

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from commlens.exporters import collector as collector_mod
from commlens.exporters import graph
from commlens.exporters import prometheus
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import wire

CONDUCTOR_CALL = ("nova-conductor", "nova-api", "conductor", "build_instances", "ok")
CAST = ("nova-compute", "nova-conductor", "compute", "build_and_run_instance", "ok")
WAIT = ("nova-api", "conductor", "build_instances")


def _collector(*recorders):
    collector = collector_mod.Collector()
    for recorder in recorders:
        assert collector.ingest(json.dumps(recorder.snapshot(1.0))) == "accepted"
    return collector


def _edge(collector, client, server):
    (edge,) = [e for e in collector.graph()["edges"]
               if (e["client"], e["server"]) == (client, server)]
    return edge


def test_a_single_request_is_its_own_every_percentile():
    conductor = recorder_mod.Recorder("nova-conductor")
    conductor.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 60.07)
    conductor.inc(metrics.RPC_RECEIVED, CONDUCTOR_CALL[:4] + ("call",))
    api = recorder_mod.Recorder("nova-api")
    api.inc(metrics.RPC_SENT, WAIT + ("call",))
    api.observe(metrics.RPC_REPLY_WAIT, WAIT + ("ok",), 60.07)
    edge = _edge(_collector(conductor, api), "nova-api", "nova-conductor")
    for prefix in ("", "ok_"):
        for name in ("p50", "p99"):
            assert edge[f"{prefix}{name}_seconds"] == pytest.approx(60.07), prefix + name
            assert edge[f"{prefix}{name}_range_seconds"] == [60.07, 60.07]
            assert edge[f"{prefix}{name}_estimated"] is False


def test_timeouts_just_past_the_bound_stay_at_the_timeout():
    # oslo.messaging's rpc_response_timeout of 60 s: no reply, the caller
    # gives up a little after 60 s. Nobody answered: the edge's latency is
    # the caller's wait.
    api = recorder_mod.Recorder("nova-api")
    for seconds in (60.01, 60.02, 60.03, 60.05):
        api.inc(metrics.RPC_SENT, WAIT + ("call",))
        api.observe(metrics.RPC_REPLY_WAIT, WAIT + ("timeout",), seconds)
        api.inc(metrics.RPC_CALL_ERRORS, WAIT + ("timeout", "MessagingTimeout"))
        api.inc(metrics.SERVICE_GRAPH_REQUESTS, ("nova-api", "conductor",
                                                 metrics.MESSAGING_SYSTEM))
        api.inc(metrics.SERVICE_GRAPH_FAILED, ("nova-api", "conductor",
                                               metrics.MESSAGING_SYSTEM))
    edge = _edge(_collector(api), "nova-api", "conductor")
    assert 60.01 <= edge["p50_seconds"] <= 60.05
    assert edge["p50_range_seconds"] == [60.01, 60.05] and edge["p50_estimated"] is True
    assert edge["p99_seconds"] <= 60.05


def test_a_291_ms_cast_is_291_ms_in_the_methods_table_and_on_the_edge():
    compute = recorder_mod.Recorder("nova-compute")
    compute.observe(metrics.RPC_SERVER_HOPS, CAST, 0.291)
    collector = _collector(compute)
    assert _edge(collector, "nova-conductor", "nova-compute")["p50_seconds"] == \
        pytest.approx(0.291)


def test_an_estimate_says_so_and_stays_within_what_was_observed():
    conductor = recorder_mod.Recorder("nova-conductor")
    for seconds in (0.3, 0.35, 0.4, 0.45):  # one bucket: (0.25, 0.5]
        conductor.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, seconds)
    edge = _edge(_collector(conductor), "nova-api", "nova-conductor")
    assert edge["p50_range_seconds"] == [0.3, 0.45] and edge["p50_estimated"] is True
    assert 0.3 <= edge["p50_seconds"] <= 0.45 and 0.3 <= edge["p99_seconds"] <= 0.45


def test_the_methods_table_marks_its_estimates():
    api = recorder_mod.Recorder("nova-api")
    for seconds in (0.02, 0.03, 0.2, 0.3):
        api.inc(metrics.RPC_SENT, WAIT + ("call",))
        api.observe(metrics.RPC_REPLY_WAIT, WAIT + ("ok",), seconds)
    conductor = recorder_mod.Recorder("nova-conductor")
    conductor.inc(metrics.RPC_RECEIVED, CONDUCTOR_CALL[:4] + ("call",), 4)
    collector = _collector(api, conductor)
    (row,) = collector.edge_details("nova-api", "nova-conductor", "rpc")["methods"]
    low, high = row["p99_range_seconds"]
    assert (low, high) == (0.25, 0.3) and row["p99_estimated"] is True
    assert low <= row["p99_seconds"] <= high


def test_no_calls_no_percentiles():
    assert graph.percentiles(graph.Latency()) == {
        "p50_seconds": None, "p50_range_seconds": None, "p50_estimated": None,
        "p99_seconds": None, "p99_range_seconds": None, "p99_estimated": None}


def test_beyond_the_last_bound_the_largest_value_is_the_limit():
    counts = [0] * len(metrics.LATENCY_BUCKETS) + [2]
    assert graph.quantile(0.99, graph.Latency(counts, 2000.0, 2400.0))[1:] == (2000.0, 2400.0)
    # An agent that does not say: at least the last bound, and no more known.
    assert graph.quantile(0.99, graph.Latency(counts)) == (1800.0, 1800.0, None)


def test_buckets_have_bounds_at_openstack_timeouts():
    for timeout in (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0):
        assert timeout in metrics.LATENCY_BUCKETS
    conductor = recorder_mod.Recorder("nova-conductor")
    conductor.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 250.0)
    text = prometheus.render(_collector(conductor))[0].decode()
    les = [s.labels["le"] for family in text_string_to_metric_families(text)
           if family.name == metrics.RPC_PROCESSING.name
           for s in family.samples if s.name.endswith("_bucket")]
    assert les[-4:] == ["300.0", "600.0", "1800.0", "+Inf"]


def _processing(collector):
    return collector.merged()[1][(metrics.RPC_PROCESSING.name, CONDUCTOR_CALL[:1]
                                  + CONDUCTOR_CALL[2:])]


def test_the_collector_keeps_the_extremes_of_all_processes():
    one, two = recorder_mod.Recorder("nova-conductor"), recorder_mod.Recorder("nova-conductor")
    one.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 0.2)
    two.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 7.0)
    two.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 0.9)
    collector = _collector(one, two)
    assert _processing(collector)[2:] == [0.2, 7.0]
    one.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 0.05)  # a new smallest
    collector.ingest(json.dumps(one.snapshot(1.0)))
    counts, total, low, high = _processing(collector)
    assert (sum(counts), low, high) == (4, 0.05, 7.0)
    assert total == pytest.approx(8.15)


def _previous_format_snapshot(counts, total):
    """What an agent of the previous wire version ships."""
    return json.dumps({
        "format": wire.SNAPSHOT_FORMAT_1, "seq": 1, "interval": 1.0, "final": False,
        "process": {"id": "old-agent", "service": "nova-conductor", "pid": 1},
        "counters": [], "gauges": [],
        "histograms": [[metrics.SERVICE_GRAPH_SERVER_SECONDS.name,
                        ["nova-api", "nova-conductor", metrics.MESSAGING_SYSTEM], counts, total]]})


def test_an_agent_of_the_previous_wire_format_is_still_read():
    old_bounds = wire.SNAPSHOT_1_LATENCY_BUCKETS
    counts = [0] * (len(old_bounds) + 1)
    counts[old_bounds.index(0.5)] = 3
    counts[-1] = 2  # above 120 s: where, it did not say
    collector = collector_mod.Collector()
    assert collector.ingest(_previous_format_snapshot(counts, 601.0)) == "accepted"
    merged = collector.merged()[1][(metrics.SERVICE_GRAPH_SERVER_SECONDS.name,
                                    ("nova-api", "nova-conductor", metrics.MESSAGING_SYSTEM))]
    new_counts, total, low, high = merged
    assert len(new_counts) == len(metrics.LATENCY_BUCKETS) + 1
    assert new_counts[metrics.LATENCY_BUCKETS.index(0.5)] == 3
    assert new_counts[-1] == 2 and (total, low, high) == (601.0, None, None)
    # With a current agent beside it, the extremes are not known: no clamping.
    current = recorder_mod.Recorder("nova-conductor")
    current.observe(metrics.RPC_SERVER_HOPS, CONDUCTOR_CALL, 0.3)
    collector.ingest(json.dumps(current.snapshot(1.0)))
    edge = _edge(collector, "nova-api", "nova-conductor")
    assert edge["p50_range_seconds"] == [0.25, 0.5] and edge["p50_estimated"] is True
    # A histogram of the previous shape in the current format is refused.
    assert collector.ingest(json.dumps({
        "format": wire.SNAPSHOT_FORMAT, "seq": 1, "interval": 1.0,
        "process": {"id": "confused", "service": "x", "pid": 2}, "counters": [], "gauges": [],
        "histograms": [[metrics.RPC_PROCESSING.name, ["x", "t", "m", "ok"],
                        counts, 1.0]]})) == "accepted"
    assert collector.invalid_series == 1


@pytest.mark.parametrize("low, high", [(0.5, 0.1), (-1.0, 1.0), ("0.1", 1.0), (0.1, None)])
def test_extremes_that_cannot_be_are_refused_with_their_series(low, high):
    collector = collector_mod.Collector()
    counts = [1] + [0] * len(metrics.LATENCY_BUCKETS)
    collector.ingest(json.dumps({
        "format": wire.SNAPSHOT_FORMAT, "seq": 1, "interval": 1.0,
        "process": {"id": "p", "service": "x", "pid": 2}, "counters": [], "gauges": [],
        "histograms": [[metrics.RPC_PROCESSING.name, ["x", "t", "m", "ok"],
                        counts, 0.001, low, high]]}))
    assert collector.invalid_series == 1 and collector.merged()[1] == {}
