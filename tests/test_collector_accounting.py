"""The collector's accounting: exact counts through gaps, restarts and finals,
and bounded memory whatever the wire brings.

These drive a Collector directly with a fake clock and the snapshots agents
ship (from a real Recorder where the shape matters, hand-built where the test
needs values a recorder would never produce).
"""

import json
import random
import time

from prometheus_client.parser import text_string_to_metric_families

from commlens.exporters import collector as collector_mod
from commlens.exporters import prometheus
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import wire
from support import Clock

RECEIVED = metrics.RPC_RECEIVED
RECEIVED_LABELS = ("conductor", "api", "conductor", "build_instances", "call")
RECEIVED_KEY = (RECEIVED.name, RECEIVED_LABELS)
WAITING_KEY = (metrics.RPC_WAITING_REPLIES.name, ("api", "conductor", "build_instances"))
N_BUCKETS = len(metrics.LATENCY_BUCKETS) + 1


def _ship(collector, recorder, final=False, interval=1.0):
    return collector.ingest(json.dumps(recorder.snapshot(interval, final=final)))


def _received(collector):
    return collector.merged()[0].get(RECEIVED_KEY, 0)


def _waiting(collector):
    return collector.merged()[2].get(WAITING_KEY, 0)


def _snapshot(process_id, seq, counters=(), histograms=(), gauges=(), final=False,
              interval=1.0, service="svc", hops=None):
    body = {"format": wire.SNAPSHOT_FORMAT, "seq": seq, "interval": interval,
            "final": final, "process": {"id": process_id, "service": service, "pid": 1},
            "counters": [list(c) for c in counters], "histograms": [list(h) for h in histograms],
            "gauges": [list(g) for g in gauges]}
    if hops is not None:
        body["hops"] = hops
    return json.dumps(body)


def _sent(service, value, target="t"):
    return [metrics.RPC_SENT.name, [service, target, "m", "call"], value]


def _assert_strict_json(collector):
    """What the API serves must be JSON a browser can parse: no NaN, no Infinity."""
    for view in collector.merged():
        json.dumps([[list(key), value] for key, value in view.items()], allow_nan=False)
    json.dumps(collector.processes(), allow_nan=False)
    json.dumps(collector.graph(), allow_nan=False)


def _scrape(collector):
    text = prometheus.render(collector)[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- item 1: counts are exact -----------------------------------------------

def test_counters_stay_exact_when_a_silent_process_resumes():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock)
    server = recorder_mod.Recorder("conductor")
    for _ in range(200):
        server.inc(RECEIVED, RECEIVED_LABELS)
    server.call_started(WAITING_KEY[1])
    assert _ship(collector, server) == "accepted"
    assert (_received(collector), _waiting(collector)) == (200, 1)

    clock.now += 6  # kill -STOP for 6 intervals: past the expiry
    assert (_received(collector), _waiting(collector)) == (200, 0)
    assert collector.processes() == []

    assert _ship(collector, server) == "accepted"  # kill -CONT, no new call
    assert (_received(collector), _waiting(collector)) == (200, 1)
    assert [p["service"] for p in collector.processes()] == ["conductor"]
    for _ in range(50):
        server.inc(RECEIVED, RECEIVED_LABELS)
    _ship(collector, server)
    assert _received(collector) == 250


def test_a_restarted_process_adds_on_top_of_the_retired_totals():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock)
    first = recorder_mod.Recorder("conductor")
    for _ in range(200):
        first.inc(RECEIVED, RECEIVED_LABELS)
    _ship(collector, first)
    clock.now += 10  # died without a final snapshot
    restarted = recorder_mod.Recorder("conductor")
    for _ in range(30):
        restarted.inc(RECEIVED, RECEIVED_LABELS)
    _ship(collector, restarted)
    assert _received(collector) == 230
    _ship(collector, restarted, final=True)  # a clean exit, then a third start
    third = recorder_mod.Recorder("conductor")
    third.inc(RECEIVED, RECEIVED_LABELS)
    _ship(collector, third)
    assert _received(collector) == 231


def test_a_final_snapshot_retires_and_later_ones_are_stale():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock)
    server = recorder_mod.Recorder("conductor")
    server.inc(RECEIVED, RECEIVED_LABELS, 7)
    server.call_started(WAITING_KEY[1])
    replay = json.dumps(server.snapshot(1.0))
    assert _ship(collector, server, final=True) == "accepted"
    assert (_received(collector), _waiting(collector)) == (7, 0)
    assert collector.processes() == []
    server.inc(RECEIVED, RECEIVED_LABELS, 5)
    assert _ship(collector, server) == "stale"  # sent after its own final: not counted
    assert collector.ingest(replay) == "stale"
    clock.now += 1800  # long after: its id is still remembered
    assert _ship(collector, server) == "stale"
    assert _received(collector) == 7
    assert collector.message_counts() == {"accepted": 1, "stale": 3}


def test_a_lower_value_within_one_incarnation_adds_nothing_and_becomes_the_baseline():
    collector = collector_mod.Collector(clock=Clock())
    for seq, value in enumerate((100, 90, 95), start=1):
        collector.ingest(_snapshot("a", seq, [_sent("svc", value)]))
        totals = collector.merged()[0]
        assert totals[(metrics.RPC_SENT.name, ("svc", "t", "m", "call"))] == {
            100: 100, 90: 100, 95: 105}[value]


def test_a_forgotten_process_that_resumes_adds_nothing_and_is_counted():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, process_retention=60)
    key = (metrics.RPC_SENT.name, ("svc", "t", "m", "call"))
    collector.ingest(_snapshot("a", 1, [_sent("svc", 10)]))
    clock.now += 61
    assert collector.merged()[0][key] == 10
    # Its earlier value is forgotten: counting 25 again would count 10 twice.
    assert collector.ingest(_snapshot("a", 2, [_sent("svc", 25)])) == "rebaselined"
    assert collector.merged()[0][key] == 10
    assert collector.ingest(_snapshot("a", 1, [_sent("svc", 99)])) == "stale"
    assert collector.ingest(_snapshot("a", 3, [_sent("svc", 27)])) == "accepted"
    assert collector.merged()[0][key] == 12
    assert _scrape(collector)[("commlens_collector_messages_total",
                               (("outcome", "rebaselined"),))] == 1


def test_histograms_stay_exact_through_a_gap_and_a_restart():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock)
    labels = ("api", "conductor", "build_instances", "ok")
    key = (metrics.RPC_REPLY_WAIT.name, labels)
    first = recorder_mod.Recorder("api")
    for _ in range(3):
        first.observe(metrics.RPC_REPLY_WAIT, labels, 0.002)
    _ship(collector, first)
    clock.now += 10
    assert sum(collector.merged()[1][key][0]) == 3  # a scrape during the gap
    _ship(collector, first)
    restarted = recorder_mod.Recorder("api")
    restarted.observe(metrics.RPC_REPLY_WAIT, labels, 0.2)
    _ship(collector, restarted)
    counts, total, low, high = collector.merged()[1][key]
    assert sum(counts) == 4
    assert (low, high) == (0.002, 0.2)  # the extremes of both incarnations
    assert abs(total - 0.206) < 1e-9


def test_exported_counters_never_go_backwards():
    """Random gaps, restarts, finals and replays: after every step the totals
    are at least what they were and equal the sum, over incarnations, of each
    incarnation's last value the collector took."""
    rng = random.Random(15)
    clock = Clock()
    # Nothing is forgotten or freed here: both retentions outlast the run.
    collector = collector_mod.Collector(clock=clock, process_retention=10 ** 9,
                                        series_retention=10 ** 9)
    counter_key = (metrics.RPC_SENT.name, ("svc", "t", "m", "call"))
    histogram_key = (metrics.RPC_REPLY_WAIT.name, ("svc", "t", "m", "ok"))
    incarnations = {}  # id -> {"seq", "value", "buckets", "sent": [bodies], "final"}
    taken = {}  # id -> (seq, value, buckets) of the newest snapshot the collector took
    next_id = iter(range(10 ** 6))
    live = []
    previous = (0, [0] * N_BUCKETS)

    def start():
        process_id = "p%d" % next(next_id)
        incarnations[process_id] = {"seq": 0, "value": 0, "buckets": [0] * N_BUCKETS,
                                    "sent": [], "final": False}
        live.append(process_id)

    def ship(process_id, final=False):
        inc = incarnations[process_id]
        inc["seq"] += 1
        body = _snapshot(process_id, inc["seq"], [_sent("svc", inc["value"])],
                         [[histogram_key[0], list(histogram_key[1]), list(inc["buckets"]),
                           sum(inc["buckets"]) * 0.5, None, None]], final=final)
        inc["sent"].append((inc["seq"], inc["value"], list(inc["buckets"]), body))
        deliver(process_id, inc["sent"][-1])
        if final:
            inc["final"] = True
            live.remove(process_id)

    def deliver(process_id, sent):
        seq, value, buckets, body = sent
        outcome = collector.ingest(body)
        newest = taken.get(process_id)
        if outcome == "accepted":
            assert newest is None or seq > newest[0]
            taken[process_id] = (seq, value, buckets)
        else:
            assert outcome == "stale" and newest is not None and seq <= newest[0]

    for _ in range(3):
        start()
    for _step in range(600):
        action = rng.random()
        if not live or action < 0.05:
            start()
        elif action < 0.55:
            inc = incarnations[rng.choice(live)]
            inc["value"] += rng.randint(0, 5)
            inc["buckets"][rng.randrange(N_BUCKETS)] += rng.randint(0, 3)
        elif action < 0.8:
            ship(rng.choice(live))
        elif action < 0.85:
            ship(rng.choice(live), final=True)
        elif action < 0.93:
            process_id = rng.choice(sorted(incarnations))
            if incarnations[process_id]["sent"]:
                deliver(process_id, rng.choice(incarnations[process_id]["sent"]))
        elif action < 0.97:
            clock.now += rng.choice((0.5, 2, 5, 30, 600))  # gaps past the expiry
        else:
            live.remove(rng.choice(live))  # killed: never ships again

        counters, histograms, _gauges = collector.merged()
        total = counters.get(counter_key, 0)
        buckets = histograms.get(histogram_key, [[0] * N_BUCKETS, 0])[0]
        assert total >= previous[0]
        assert all(b >= a for a, b in zip(previous[1], buckets, strict=True))
        assert total == sum(value for _seq, value, _b in taken.values())
        assert buckets == [sum(t[2][i] for t in taken.values()) for i in range(N_BUCKETS)]
        previous = (total, list(buckets))
    assert previous[0] > 0


# -- item 6: wire input cannot hurt the collector --------------------------------

def test_non_finite_numbers_are_refused_and_every_view_stays_strict_json():
    collector = collector_mod.Collector(clock=Clock())
    wait = [metrics.RPC_REPLY_WAIT.name, ["svc", "t", "m", "ok"]]
    good_hop = {"trace_id": "a" * 32, "span_id": "b" * 16, "service": "svc",
                "side": "server", "protocol": "rpc", "start": time.time(), "duration": 0.1}
    literal = '{"format": "commlens.snapshot/1", "seq": 1, "interval": 1, ' \
              '"process": {"id": "lit"}, "counters": [["%s", ["svc", "t", "m", "call"], %s]]}'
    for constant in ("Infinity", "-Infinity", "NaN"):
        assert collector.ingest(literal % (metrics.RPC_SENT.name, constant)) == "malformed"
    hop = dict(good_hop, start="START", duration="DURATION")
    hops_message = json.dumps({"format": "commlens.hops/1", "hops": [hop]})
    assert collector.ingest(hops_message.replace('"START"', "NaN")) == "malformed"
    assert collector.ingest(hops_message.replace('"DURATION"', "Infinity")) == "malformed"
    # 1e400 is valid JSON that Python reads as inf: refused where it lands.
    huge = "1e400"
    accepted = _snapshot("big", 1, [_sent("svc", "HUGE"), _sent("svc", 3, target="u")],
                         [wait + [[1] * (N_BUCKETS - 1) + ["HUGE"], 0.5],
                          wait[:1] + [["svc", "t", "m", "timeout"]] + [[1] * N_BUCKETS, "HUGE"]],
                         [[metrics.RPC_WAITING_REPLIES.name, ["svc", "t", "m"], "HUGE"]],
                         hops=[dict(good_hop, start="HUGE"), dict(good_hop, span_id="c" * 16,
                                                                  duration="HUGE"),
                               dict(good_hop, span_id="d" * 16, start="HUGE_INT")])
    accepted = accepted.replace('"HUGE_INT"', "1" + "0" * 400)
    assert collector.ingest(accepted.replace('"HUGE"', huge)) == "accepted"
    assert collector.invalid_series == 4
    assert len(collector.hops) == 3
    assert all(h["start"] is None or h["duration"] is None for h in collector.hops)
    for interval in (huge, "-" + huge):
        body = _snapshot("interval", 1, [_sent("svc", 1)], interval="INTERVAL")
        assert collector.ingest(body.replace('"INTERVAL"', interval)) == "malformed"
    counters = collector.merged()[0]
    assert counters == {(metrics.RPC_SENT.name, ("svc", "u", "m", "call")): 3.0}
    _assert_strict_json(collector)
    assert collector.message_counts() == {"malformed": 7, "accepted": 1}


def test_a_message_over_the_size_cap_is_refused_before_it_is_parsed():
    collector = collector_mod.Collector(clock=Clock(), max_message_bytes=4096)
    small = _snapshot("a", 1, [_sent("svc", 1)])
    big = _snapshot("a", 2, [_sent("svc", 2)], hops=[{"operation": "x" * 5000}])
    assert collector.ingest(small.encode()) == "accepted"
    assert collector.ingest(big.encode()) == "too_large"
    assert collector.ingest("{" * 5000) == "too_large"  # never reaches the parser
    assert collector.message_counts() == {"accepted": 1, "too_large": 2}
    assert _scrape(collector)[("commlens_collector_messages_total",
                               (("outcome", "too_large"),))] == 2


def test_one_snapshot_with_100000_series_is_held_to_the_per_process_cap():
    collector = collector_mod.Collector(clock=Clock())
    body = _snapshot("flood", 1, [_sent("svc-%d" % i, 1) for i in range(100000)])
    assert collector.ingest(body) == "accepted"
    assert len(collector.merged()[0]) == collector_mod.MAX_SERIES_PER_PROCESS
    assert collector.refused_series == {"process_cap": 100000 - 20000}
    # The same snapshot again: the series it holds are updated, the rest refused again.
    assert collector.ingest(body.replace('"seq": 1', '"seq": 2')) == "accepted"
    assert collector.refused_series == {"process_cap": 2 * 80000}


def test_a_flood_of_services_stays_under_the_caps_and_every_refusal_is_counted():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, max_processes=500, max_series=1000,
                                        max_series_per_process=5)
    outcomes = {}
    for i in range(3000):
        service = "svc-%d" % i
        body = _snapshot("p%d" % i, 1, [_sent(service, 1), _sent(service, 2, target="u")],
                         gauges=[[metrics.RPC_WAITING_REPLIES.name, [service, "t", "m"], 1]],
                         service=service)
        outcome = collector.ingest(body)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if i % 700 == 0:
            clock.now += 10  # some go silent: they are forgotten first
    counters, histograms, gauges = collector.merged()
    assert len(counters) + len(histograms) + len(gauges) <= 1000
    assert len(collector._processes) <= 500
    assert outcomes["too_many_processes"] > 0 and collector.refused_series["total_cap"] > 0
    assert collector.message_counts() == outcomes
    scraped = _scrape(collector)
    assert scraped[("commlens_collector_series_refused_total", (("reason", "total_cap"),))] \
        == collector.refused_series["total_cap"]
    assert scraped[("commlens_collector_messages_total",
                    (("outcome", "too_many_processes"),))] == outcomes["too_many_processes"]
    _assert_strict_json(collector)


def test_silent_processes_are_forgotten_first_when_the_process_cap_is_reached():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, max_processes=2)
    collector.ingest(_snapshot("a", 1, [_sent("svc", 1)]))
    collector.ingest(_snapshot("b", 1, [_sent("svc", 2)]))
    assert collector.ingest(_snapshot("c", 1, [_sent("svc", 4)])) == "too_many_processes"
    clock.now += 2
    collector.ingest(_snapshot("b", 2, [_sent("svc", 3)]))
    clock.now += 2  # "a" silent for 4 intervals, "b" for 2
    assert collector.ingest(_snapshot("c", 1, [_sent("svc", 4)])) == "accepted"
    assert sorted(p["id"] for p in collector.processes()) == ["b", "c"]
    assert collector.merged()[0][(metrics.RPC_SENT.name, ("svc", "t", "m", "call"))] == 8
    assert collector.ingest(_snapshot("a", 2, [_sent("svc", 5)])) == "too_many_processes"


def test_series_with_no_process_left_are_freed_after_the_retention():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, process_retention=100,
                                        series_retention=50)
    gone, kept = ((metrics.RPC_SENT.name, (s, "t", "m", "call")) for s in ("gone", "kept"))
    collector.ingest(_snapshot("short", 1, [_sent("gone", 3)], final=True, service="gone"))
    collector.ingest(_snapshot("silent", 1, [_sent("gone", 4)], service="gone"))
    collector.ingest(_snapshot("live", 1, [_sent("kept", 1)], service="kept"))
    for seq in range(2, 22):  # "live" keeps reporting, "silent" never again
        clock.now += 7.5
        collector.ingest(_snapshot("live", seq, [_sent("kept", 1)], service="kept"))
        collector.merged()  # a scrape
    # At 1105 s "silent" was forgotten; at 1150 s its series had no process for 45 s.
    counters = collector.merged()[0]
    assert counters[gone] == 7 and counters[kept] == 1
    clock.now += 10
    counters = collector.merged()[0]
    assert gone not in counters and counters[kept] == 1
    assert list(collector._holders) == [kept]


# -- a collector restart is not a burst of traffic ----------------------------

class WallClock:
    """The collector's wall clock, which agents' start times are compared with."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


HANDLED = ("conductor", "api", "conductor", "build_instances", "ok")


def _conductor(started_at, calls, snapshots_before=1):
    """An agent with ``calls`` handled and snapshots shipped already."""
    server = recorder_mod.Recorder("conductor")
    server.started_at = started_at
    for _ in range(calls):
        server.observe(metrics.RPC_SERVER_HOPS, HANDLED, 0.01)
    for _ in range(snapshots_before):
        server.snapshot(1.0)
    return server


def _edge_requests(collector):
    return sum(e["requests"] for e in collector.graph(60)["edges"])


def test_a_process_older_than_the_collector_counts_exactly_but_is_no_burst_of_traffic():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, wall_clock=WallClock(5000.0))
    server = _conductor(5000.0 - 600, 1000)
    assert _ship(collector, server) == "accepted"
    # The totals continue where the previous collector left them...
    edge = (metrics.SERVICE_GRAPH_REQUESTS.name, ("api", "conductor", metrics.MESSAGING_SYSTEM))
    assert collector.merged()[0][edge] == 1000
    assert _scrape(collector)[(edge[0], tuple(sorted(zip(metrics.SERVICE_GRAPH_LABELS,
                                                         edge[1], strict=True))))] == 1000
    # ...and the collector's rates count only what happens from now on.
    collector.sample_graph()
    assert _edge_requests(collector) == 0
    for _ in range(12):
        server.observe(metrics.RPC_SERVER_HOPS, HANDLED, 0.01)
    _ship(collector, server)
    assert _edge_requests(collector) == 12
    (row,) = collector.node_details("conductor")["methods"] or [None]
    assert row is None or row["rate"] < 1000
    assert collector.merged()[0][edge] == 1012


def test_a_process_started_after_the_collector_is_traffic_from_its_first_call():
    # Its first snapshots were lost (a broker outage): new all the same.
    collector = collector_mod.Collector(clock=Clock(), wall_clock=WallClock(5000.0))
    assert _ship(collector, _conductor(5010.0, 30)) == "accepted"
    assert _edge_requests(collector) == 30


def test_the_first_snapshot_of_a_process_is_traffic_whatever_the_clocks_say():
    # A host whose clock is behind: its process seems older than the
    # collector, but seq 1 is everything it did since it started.
    collector = collector_mod.Collector(clock=Clock(), wall_clock=WallClock(5000.0))
    assert _ship(collector, _conductor(4000.0, 30, snapshots_before=0)) == "accepted"
    assert _edge_requests(collector) == 30


def test_metrics_leave_the_shipped_sums_out_until_the_warm_up_is_over():
    clock = Clock()
    collector = collector_mod.Collector(clock=clock, metrics_warm_up=10.0)
    server = _conductor(clock.now, 5, snapshots_before=0)
    server.call_started(WAITING_KEY[1])

    def names():
        return {name for name, _labels in _scrape(collector)}

    assert metrics.SERVICE_GRAPH_REQUESTS.name not in names()
    _ship(collector, server, interval=30.0)
    clock.now += 9
    assert metrics.SERVICE_GRAPH_REQUESTS.name not in names()
    assert metrics.RPC_WAITING_REPLIES.name in names()  # a gauge is not a sum over time
    clock.now += 1
    assert metrics.SERVICE_GRAPH_REQUESTS.name in names()
