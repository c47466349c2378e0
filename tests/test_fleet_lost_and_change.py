"""Lost messages and change against a baseline, for replicas that answer as
one (exporters/fleet.py): a cast's sender and its receivers report to
different replicas, so each replica gives its raw counts and totals and the
replica asked adds them, then computes once, as one collector does. Checked
here against one collector that sees every process; on real RabbitMQ with
three replicas in tests/test_replicas_as_one.py.
"""

import json

from prometheus_client.parser import text_string_to_metric_families

from commlens.exporters import change
from commlens.exporters import collector as collector_mod
from commlens.exporters import fleet as fleet_mod
from commlens.exporters import graph
from commlens.exporters import history as history_mod
from commlens.exporters import http
from commlens.exporters import lost
from commlens.exporters import prometheus
from commlens.tracer import metrics
from commlens.tracer import wire
from support import free_port, serve_wsgi

GRACE = 20.0
EDGE = ["nova-api", "nova-conductor", metrics.MESSAGING_SYSTEM]
N_BUCKETS = len(metrics.LATENCY_BUCKETS) + 1


class Clock:
    def __init__(self):
        self.now = 1.0e6 + 7.0

    def __call__(self):
        return self.now


def _collector(clock, grace=GRACE):
    return collector_mod.Collector(clock=clock, wall_clock=clock, lost_grace=grace,
                                   history=history_mod.History(clock=clock))


class Processes:
    """Processes' cumulative counters, each shipped to the replica its id
    hashes to and to one collector that sees them all."""

    def __init__(self, clock, single, replicas, interval=1.0):
        self.clock, self.single, self.replicas = clock, single, replicas
        self.interval = interval
        self.counters, self.histograms, self.seq = {}, {}, {}

    def add(self, process, name, labels, n=1):
        key = (name, tuple(labels))
        store = self.counters.setdefault(process, {})
        store[key] = store.get(key, 0) + n

    def observe(self, process, name, labels, bucket, n=1):
        store = self.histograms.setdefault(process, {})
        counts = store.setdefault((name, tuple(labels)), [0] * N_BUCKETS)
        counts[bucket] += n

    def tick(self, seconds, step=5.0, each=None):
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + step)
            if each:
                each()
            for n, process in enumerate(sorted(set(self.counters) | set(self.histograms))):
                self.seq[process] = self.seq.get(process, 0) + 1
                body = json.dumps({
                    "format": wire.SNAPSHOT_FORMAT, "seq": self.seq[process],
                    "interval": self.interval,
                    "process": {"id": process, "service": process.split("#")[0], "pid": 1},
                    "counters": [[name, list(labels), value] for (name, labels), value
                                 in self.counters.get(process, {}).items()],
                    "histograms": [[name, list(labels), counts,
                                    sum(counts) * metrics.LATENCY_BUCKETS[2], 0.005, 0.005]
                                   for (name, labels), counts
                                   in self.histograms.get(process, {}).items()],
                    "gauges": []})
                for collector in {self.single, self.replicas[n % len(self.replicas)]}:
                    assert collector.ingest(body) == "accepted"
            for collector in {self.single, *self.replicas}:
                collector.sample_graph()


def test_lost_messages_of_replicas_added_then_computed_once_equal_one_collectors():
    clock = Clock()
    single, replicas = _collector(clock), [_collector(clock), _collector(clock)]
    plane = Processes(clock, single, replicas)
    plane.tick(10)
    # nova-api's casts reach nova-compute, which reports to the other replica;
    # casts to the conductor reach nobody.
    plane.add("nova-api#1", metrics.RPC_SENT.name,
              ("nova-api", "compute", "terminate_instance", "cast"), 57)
    plane.add("nova-compute#1", metrics.RPC_RECEIVED.name,
              ("nova-compute", "nova-api", "compute", "terminate_instance", "cast"), 54)
    plane.add("nova-api#1", metrics.RPC_SENT.name,
              ("nova-api", "conductor", "build_instances", "cast"), 7)
    plane.tick(GRACE + 10)

    one = single.lost_messages(300)
    shares = [r.lost_share(300) for r in replicas]
    fleet = lost.report(shares, None, lost.DEFAULT_LIMIT)
    assert fleet == one
    assert {(m["target"], m["sent"], m["received"], m["unreceived"])
            for m in fleet[0]["messages"]} == {("compute", 57, 54, 3), ("conductor", 7, 0, 7)}
    # Each replica alone would count every terminate_instance as lost.
    alone = lost.report(shares[:1], None, lost.DEFAULT_LIMIT)[1]
    assert alone[("compute", "terminate_instance", "cast")] == 57


def test_a_share_from_a_peer_that_does_not_fit_is_left_out():
    good = {"window_seconds": 300.0, "grace_seconds": GRACE, "covered_seconds": 300.0,
            "counts": [["nova-api", "conductor", "build", "cast", 3, 0]], "servers": []}
    bad = {"counts": [["nova-api", "conductor", "build", "cast", "3", 0], ["x"], "y",
                      ["nova-api", "conductor", "build", "cast", -1, 0]],
           "servers": [[1, 2, 3, 4, 5]], "covered_seconds": 300.0}
    body, series = lost.report([good, bad])
    assert series == {("conductor", "build", "cast"): 3.0}


def _edge_traffic(plane, process, requests, failed, bucket):
    plane.add(process, metrics.SERVICE_GRAPH_REQUESTS.name, EDGE, requests)
    plane.add(process, metrics.SERVICE_GRAPH_FAILED.name, EDGE, failed)
    plane.observe(process, metrics.SERVICE_GRAPH_SERVER_SECONDS.name, EDGE, bucket, requests)
    plane.add(process, metrics.RPC_SENT.name, ("nova-api", "conductor", "build", "call"),
              requests)
    plane.add(process, metrics.RPC_RECEIVED.name,
              ("nova-conductor", "nova-api", "conductor", "build", "call"), requests)
    plane.observe(process, metrics.RPC_REPLY_WAIT.name, ("nova-api", "conductor", "build", "ok"),
                  bucket, requests - failed)


def _figures(pair_start, pair_end, seconds):
    (key,) = pair_end[0]
    requests, failed, latency, _ = graph.edge_window(pair_end[0][key], pair_start[0][key], "rpc")
    return change.figures(requests, failed, latency, seconds)


def test_baseline_totals_of_replicas_added_equal_one_collectors():
    clock = Clock()
    single, replicas = _collector(clock), [_collector(clock), _collector(clock)]
    plane = Processes(clock, single, replicas)
    # Two callers of one edge, each on its own replica; 15 minutes of traffic.
    plane.tick(900, each=lambda: [_edge_traffic(plane, "nova-api#1", 4, 1, 2),
                                  _edge_traffic(plane, "nova-api#2", 6, 0, 7)])
    description, start, end = single.baseline(60)
    assert description is not None and description["from"] % 60 == 0
    shares = [r.baseline_share(description["from"], description["to"]) for r in replicas]
    found, agreed = change.combine(json.loads(json.dumps(shares)))
    assert agreed and found[:2] == (description["from"], description["to"])
    seconds = description["seconds"]
    assert _figures(found[2], found[3], seconds) == _figures(start, end, seconds)
    assert _figures(start, end, seconds)["requests"] > 0
    # The methods tables' baselines too.
    assert {k: {op: (t.requests, t.errors, t.ok_latency.counts) for op, t in rows.items()}
            for k, rows in found[3][1].items()} == \
        {k: {op: (t.requests, t.errors, t.ok_latency.counts) for op, t in rows.items()}
         for k, rows in end[1].items()}


def test_a_younger_replica_moves_the_fleets_baseline_start_to_its_first_minute():
    clock = Clock()
    old = _collector(clock)
    plane = Processes(clock, old, [old])
    plane.tick(600, each=lambda: _edge_traffic(plane, "nova-api#1", 1, 0, 2))
    young = plane.replicas[0] = _collector(clock)
    plane.tick(300, each=lambda: _edge_traffic(plane, "nova-api#1", 1, 0, 2))
    start, end, _ = change.window(60, None, clock.now)
    found, agreed = change.combine([old.baseline_share(start, end),
                                    young.baseline_share(start, end)])
    assert not agreed and found[0] > start
    # Asked again from the start both hold, they agree.
    again, agreed = change.combine([old.baseline_share(found[0], found[1]),
                                    young.baseline_share(found[0], found[1])])
    assert agreed and again[:2] == found[:2]
    # A replica with no sample that old: no baseline for the fleet.
    newborn = _collector(clock)
    assert change.combine([old.baseline_share(start, end),
                           newborn.baseline_share(start, end)]) == (None, False)


def _unreceived_scrape(replica, fleet):
    text = prometheus.render(replica, fleet=fleet)[0].decode()
    return {s.labels["target"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "commlens_rpc_unreceived_messages" for s in f.samples}


def test_while_a_peer_does_not_answer_metrics_hold_the_last_complete_figure_then_none():
    clock = Clock()
    replica = _collector(clock)
    plane = Processes(clock, replica, [replica])
    plane.tick(10)
    plane.add("nova-api#1", metrics.RPC_SENT.name, ("nova-api", "conductor", "build", "cast"), 7)
    plane.tick(GRACE + 10)
    missing = f"http://127.0.0.1:{free_port()}"
    fleet = fleet_mod.Fleet(replica, "0", [missing], timeout=1.0, clock=clock)
    try:
        body, series = fleet.lost_messages(300)
        # The API answers, and says it is partial.
        assert body["replicas"]["partial"] is True
        assert series == {("conductor", "build", "cast"): 7.0}
        # /metrics never had a complete figure: none (the missing replica's
        # receivers would read as losses, and page).
        assert _unreceived_scrape(replica, fleet) == {}
        fleet.peers = []
        assert _unreceived_scrape(replica, fleet) == {"conductor": 7.0}
        plane.add("nova-api#1", metrics.RPC_SENT.name,
                  ("nova-api", "conductor", "build", "cast"), 5)
        plane.tick(GRACE + 10)
        # A peer goes missing (a rollout): the last complete figure stands ...
        fleet.peers = [missing]
        assert _unreceived_scrape(replica, fleet) == {"conductor": 7.0}
        # ... for as long as CommlensCollectorDown waits, then none.
        clock.now += fleet_mod.HOLD_UNRECEIVED_SECONDS - 35
        assert _unreceived_scrape(replica, fleet) == {"conductor": 7.0}
        clock.now += 10
        assert _unreceived_scrape(replica, fleet) == {}
    finally:
        fleet.close()


def _serving(collector, name):
    """``collector`` as a replica named ``name`` on a loopback port, its
    own only peer (it answers its share, as a peer does)."""
    return serve_wsgi(http.create_app(collector, fleet=fleet_mod.Fleet(collector, name, [])))


def test_the_fleets_grace_period_is_the_longest_any_replica_needs():
    clock = Clock()
    # Processes that ship every 10 s report to the peer: it needs 30 s of
    # grace; this replica's ship every second and need the 15 s minimum.
    mine, theirs = _collector(clock, grace=None), _collector(clock, grace=None)
    senders = Processes(clock, mine, [mine])
    receivers = Processes(clock, theirs, [theirs], interval=10.0)
    receivers.add("nova-compute#1", metrics.RPC_RECEIVED.name,
                  ("nova-compute", "nova-api", "compute", "reboot", "cast"), 0)
    for _ in range(8):
        senders.tick(5)
        receivers.tick(5)
    senders.add("nova-api#1", metrics.RPC_SENT.name, ("nova-api", "compute", "reboot", "cast"), 4)
    senders.tick(5)
    # 20 s on, the receipt has not been shipped yet (the receiver ships every
    # 10 s): past this replica's grace, within the peer's.
    senders.tick(20)
    assert (mine.lost_grace(), theirs.lost_grace()) == (15.0, 30.0)
    key = ("compute", "reboot", "cast")
    with_my_grace = [mine.lost_share(300, 15.0), theirs.lost_share(300, 15.0)]
    assert lost.report(with_my_grace)[1] == {key: 4.0}
    with _serving(theirs, "1") as peer:
        fleet = fleet_mod.Fleet(mine, "0", [peer], timeout=5.0)
        try:
            body, series = fleet.lost_messages(300)
            assert body["replicas"] == {"answered": ["0", "1"], "missing": [],
                                        "partial": False}
            assert body["grace_seconds"] == 30.0
            # Sent 25 s ago: still in its grace period, not counted yet.
            assert body["messages"] == [] and series == {}
            # The receipt arrives: received, never counted as lost.
            receivers.add("nova-compute#1", metrics.RPC_RECEIVED.name,
                          ("nova-compute", "nova-api", "compute", "reboot", "cast"), 4)
            receivers.tick(5)
            senders.tick(20)
            body, series = fleet.lost_messages(300)
            assert body["messages"] == [] and series == {key: 0.0}
        finally:
            fleet.close()
