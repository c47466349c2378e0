"""Change against a baseline (issue 18 item 4): each edge of /api/graph and
each row of a node's methods table carries its rate, error ratio and p99
beside the same figures over the hour before the window, or before an
incident's first chain; null while there is no baseline yet.

Driven by the collector's own clock over snapshots whose numbers are known.
"""

import json

import pytest

from commlens.exporters import change
from commlens.exporters import chains
from commlens.exporters import collector as collector_mod
from commlens.exporters import history as history_mod
from commlens.tracer import metrics
from commlens.tracer import wire
from support import Clock

EDGE = ["nova-api", "nova-conductor", metrics.MESSAGING_SYSTEM]
N_BUCKETS = len(metrics.LATENCY_BUCKETS) + 1
FAST, SLOW = 2, 7  # bucket indexes: 5 ms and 250 ms


class Plane:
    """One RPC edge's cumulative counts, shipped every 5 s by a server process."""

    def __init__(self, collector, clock):
        self.collector, self.clock = collector, clock
        self.requests = self.failed = 0
        self.counts = [0] * N_BUCKETS
        self.total = 0.0
        self.method_requests = 0
        self.seq = 0

    def run(self, seconds, rate, error_ratio=0.0, bucket=FAST):
        """``rate`` requests a second for ``seconds``, a share of them failed."""
        end = self.clock.now + seconds
        owed_failures = 0.0
        while self.clock.now < end:
            self.clock.now += 5
            n = int(round(rate * 5))
            owed_failures += n * error_ratio
            failed = int(owed_failures)
            owed_failures -= failed
            self.requests += n
            self.failed += failed
            self.counts[bucket] += n
            self.total += n * metrics.LATENCY_BUCKETS[bucket]
            self.ship()
            self.collector.sample_graph()

    def ship(self):
        self.seq += 1
        wait = [0] * N_BUCKETS
        wait[FAST] = self.requests - self.failed
        body = {"format": wire.SNAPSHOT_FORMAT, "seq": self.seq, "interval": 5.0,
                "process": {"id": "p-1", "service": "nova-api", "pid": 1},
                "counters": [
                    [metrics.SERVICE_GRAPH_REQUESTS.name, EDGE, self.requests],
                    [metrics.SERVICE_GRAPH_FAILED.name, EDGE, self.failed],
                    [metrics.RPC_SENT.name, ["nova-api", "conductor", "build", "call"],
                     self.requests],
                    [metrics.RPC_RECEIVED.name,
                     ["nova-conductor", "nova-api", "conductor", "build", "call"],
                     self.requests],
                    [metrics.RPC_CALL_ERRORS.name,
                     ["nova-api", "conductor", "build", "remote_error", "Boom"], self.failed]],
                "histograms": [
                    [metrics.SERVICE_GRAPH_SERVER_SECONDS.name, EDGE, list(self.counts),
                     self.total, 0.001, 10.0],
                    [metrics.RPC_REPLY_WAIT.name, ["nova-api", "conductor", "build", "ok"],
                     wait, wait[FAST] * 0.005, 0.001, 10.0]],
                "gauges": []}
        assert self.collector.ingest(json.dumps(body)) == "accepted"


@pytest.fixture
def clock():
    return Clock(1.0e6)


@pytest.fixture
def collector(clock):
    return collector_mod.Collector(clock=clock, wall_clock=clock,
                                   history=history_mod.History(clock=clock))


def _edge(graph):
    (edge,) = [e for e in graph["edges"] if e["client"] == "nova-api"]
    return edge


def test_no_baseline_yet_is_null_and_says_so(collector, clock):
    plane = Plane(collector, clock)
    plane.run(120, rate=1)
    graph = collector.graph(300)
    assert graph["baseline"] is None
    assert _edge(graph)["change"] is None
    rows = collector.node_details("nova-conductor", 300)
    assert rows["baseline"] is None and rows["methods"][0]["change"] is None


def test_an_edge_is_compared_with_the_hour_before_the_window(collector, clock):
    plane = Plane(collector, clock)
    plane.run(1200, rate=2)
    # Now three times the traffic, a tenth of it failing, and slow.
    plane.run(300, rate=6, error_ratio=0.1, bucket=SLOW)
    graph = collector.graph(300)
    baseline = graph["baseline"]
    assert baseline["ends_at"] == change.WINDOW_START
    assert 1100 <= baseline["seconds"] <= 1260
    assert 300 <= baseline["to_seconds_ago"] <= 360
    edge = _edge(graph)
    found = edge["change"]
    assert found["rate"]["baseline"] == pytest.approx(2.0, rel=0.05)
    assert found["rate"]["ratio"] == pytest.approx(3.0, rel=0.1)
    assert found["error_ratio"]["baseline"] == 0
    assert found["error_ratio"]["difference"] == pytest.approx(0.1, abs=0.01)
    assert found["p99_seconds"]["baseline"] <= 0.005
    assert found["p99_seconds"]["ratio"] > 10
    assert found["confident"] is True and found["baseline_requests"] >= 2000
    # A node's methods table says the same of each method.
    (row,) = collector.node_details("nova-conductor", 300)["methods"]
    assert row["change"]["rate"]["ratio"] == pytest.approx(3.0, rel=0.1)
    assert row["change"]["error_ratio"]["baseline"] == 0


def test_a_short_baseline_is_not_confident(collector, clock):
    plane = Plane(collector, clock)
    plane.run(420, rate=2)
    found = _edge(collector.graph(300))["change"]
    assert found is not None and found["confident"] is False


def test_during_an_incident_the_baseline_ends_before_its_first_chain(collector, clock):
    plane = Plane(collector, clock)
    plane.run(1800, rate=2)
    # The incident starts: errors for 20 minutes, chains all along.
    started = clock.now
    plane.run(600, rate=2, error_ratio=0.5)
    _chain_at(collector, started + 1)
    plane.run(600, rate=2, error_ratio=0.5)
    _chain_at(collector, clock.now - 2)
    graph = collector.graph(300)
    baseline = graph["baseline"]
    assert baseline["ends_at"] == change.FIRST_CHAIN
    assert clock.now - started <= baseline["to_seconds_ago"] <= clock.now - started + 65
    # The baseline is before the fault: no errors in it.
    assert _edge(graph)["change"]["error_ratio"]["baseline"] == 0
    assert _edge(graph)["change"]["error_ratio"]["difference"] == pytest.approx(0.5, abs=0.05)


def _chain_at(collector, at):
    hop = {"trace_id": ("%032x" % int(at)), "span_id": "1" * 16, "parent_id": None,
           "service": "nova-api", "side": "client", "protocol": "rpc", "peer": None,
           "target": "conductor", "operation": "build", "kind": "call",
           "outcome": "timeout", "error": "MessagingTimeout", "start": at - 1,
           "duration": 1.0, "request_id": None, "global_request_id": None, "server": None}
    collector.history.save([(hop["trace_id"], [hop], chains.derive([hop]))])
