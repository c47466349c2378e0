"""Tuning advice for a fleet of replicas (exporters/advice.py, share and
combine; exporters/fleet.py, advice): each replica gives its raw advice
inputs at the same wall-clock marks, the replica asked adds them up and
runs the rules once, so its findings are one collector's on the same
traffic. In-process collectors here; the real RabbitMQ and replica
processes in the test at the end.
"""

import contextlib
import json
import math
import time
import uuid

import pytest

from commlens.exporters import advice
from commlens.exporters import collector as collector_mod
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import shipping
from support import Clock, collector_ready, free_port, run_collector, wait_for

MINUTE = 60.0
API, CONDUCTOR, TOPIC, UNREAD = "nova-api", "nova-conductor", "conductor", "fleet-unread"


class Pool:
    """A conductor process's executor pool, as its gauges say it."""

    def __init__(self, recorder):
        self.size, self.in_flight, self.saturation = 8, 1, 0.1
        recorder.add_gauges(self.gauges)

    def gauges(self):
        labels = (CONDUCTOR, TOPIC)
        return [(metrics.RPC_EXECUTOR_POOL_SIZE, labels, self.size),
                (metrics.RPC_HANDLERS_IN_FLIGHT, labels, self.in_flight),
                (metrics.RPC_POOL_SATURATION_PEAK, labels, self.saturation)]


class Plane:
    """Three nova-api and three nova-conductor processes calling each other:
    fast, then (``slow``) with waits that grow and pools full."""

    def __init__(self):
        self.apis = [recorder_mod.Recorder(API) for _ in range(3)]
        self.conductors = [recorder_mod.Recorder(CONDUCTOR) for _ in range(3)]
        self.pools = [Pool(r) for r in self.conductors]
        self.recorders = self.apis + self.conductors

    def tick(self, slow):
        wait, processing = (3.05, 3.0) if slow else (0.02, 0.01)
        for i, (api, conductor) in enumerate(zip(self.apis, self.conductors, strict=True)):
            api.inc(metrics.RPC_SENT, (API, TOPIC, "build", "call"), 10)
            conductor.inc(metrics.RPC_RECEIVED, (CONDUCTOR, API, TOPIC, "build", "call"), 10)
            for _ in range(10):
                api.observe(metrics.RPC_REPLY_WAIT, (API, TOPIC, "build", metrics.OK), wait)
                conductor.observe(metrics.RPC_PROCESSING, (CONDUCTOR, TOPIC, "build", "ok"),
                                  processing)
                if slow:
                    conductor.observe(metrics.RPC_POOL_WAIT, (CONDUCTOR, TOPIC, "build"), 0.5)
            # One process's pool at a time is full: only the fleet's peak
            # (added mark by mark) sees how many handlers were busy at once.
            pool = self.pools[i]
            pool.in_flight, pool.saturation = (8, 1.0) if slow else (1, 0.1)
        self.apis[0].inc(metrics.RPC_SENT, (API, UNREAD, "rebuild", "cast"), 7)


def _snapshots(recorders):
    return [json.dumps(r.snapshot(10.0)) for r in recorders]


def _findings(report, figures=12, seconds=False):
    """The findings, their numbers to ``figures`` significant figures (sums
    of floats added in another order differ in the last bits), without
    their sentences (which quote the numbers) and, unless ``seconds``, how
    long the window was."""
    def rounded(value):
        if isinstance(value, float):
            return float(f"{value:.{figures}g}")
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items() if seconds or k != "seconds"}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value
    return [{k: rounded(v) for k, v in f.items() if k not in ("finding", "recommendation")}
            for f in report["findings"]]


def test_a_fleets_advice_is_one_collectors_on_the_same_traffic():
    """Six processes split over three replicas: their shares, added, give
    the advice of one collector that received every process (to the
    last bits of a float), and not the advice of any replica alone."""
    clock = Clock()
    one = collector_mod.Collector(clock=clock, wall_clock=clock)
    replicas = [collector_mod.Collector(clock=clock, wall_clock=clock) for _ in range(3)]
    plane = Plane()
    # Each replica holds one nova-api and one nova-conductor process.
    homes = [i % 3 for i in range(len(plane.recorders))]
    for slow in [False] * 6 + [True] * 6:
        plane.tick(slow)
        for body, home in zip(_snapshots(plane.recorders), homes, strict=True):
            assert one.ingest(body) == "accepted"
            assert replicas[home].ingest(body) == "accepted"
        clock.now += 10
        for collector in [one, *replicas]:
            collector.sample_advice()
    expected = one.advice(MINUTE, MINUTE)

    then, before = advice.ends(MINUTE, MINUTE, clock())
    # Through JSON, as peers answer.
    shares = [json.loads(json.dumps(r.advice_share(then, before))) for r in replicas]
    inputs = advice.combine(shares, clock(), then, before, None, one.lost_messages()[1])
    fleet = advice.report(inputs)
    assert _findings(fleet, seconds=True) == _findings(expected, seconds=True)
    assert [f["finding"] for f in fleet["findings"]] == [
        f["finding"] for f in expected["findings"]]
    assert (fleet["window_seconds"], fleet["baseline_seconds"]) == (60.0, 60.0)

    rules = {f["rule"]: f for f in expected["findings"]}
    assert rules["waits_growing"]["subject"]["service"] == CONDUCTOR
    pool = rules["executor_thread_pool_size"]["evidence"]
    assert (pool["processes"], pool["pool_size"], pool["handlers_in_flight_peak"]) == (3, 24, 24)
    for replica in replicas:
        assert _findings(replica.advice(MINUTE, MINUTE)) != _findings(expected)


def test_the_window_and_baseline_end_on_the_same_marks_for_every_replica():
    """Replicas asked a few seconds apart within one mark use the same
    samples; the ends fall on SAMPLE_SECONDS marks of the wall clock."""
    assert advice.ends(60, 900, 10_000.0) == (9940.0, 9040.0)
    assert advice.ends(60, 900, 10_009.9) == (9940.0, 9040.0)
    assert advice.ends(60, 900, 10_010.0) == (9950.0, 9050.0)


def test_samples_are_kept_on_wall_clock_marks_once_each():
    clock = Clock()
    clock.now = 1003.0
    samples = advice.Samples(clock=clock, keep=40)
    assert not samples.due()
    clock.now = 1010.4
    assert samples.due()
    samples.add(advice.Figures())
    assert not samples.due()
    samples.add(advice.Figures())  # the same mark: not kept twice
    clock.now = 1059.0
    samples.add(advice.Figures())
    assert [t for t, _f in samples.since(0)] == [1010.0, 1050.0]  # the start: older than keep
    assert samples.at_or_before(1049.0)[0] == 1010.0
    assert samples.at_or_before(0.0)[0] == 1010.0  # the oldest kept, for older times


def _figures(**fields):
    figures = advice.Figures()
    for field, rows in fields.items():
        getattr(figures, field).update(rows)
    return figures


def test_shares_add_up_field_by_field():
    """Counts and sizes add, a process's saturation peak is the largest and
    a timed-out call's shortest wait the shortest, histograms add bucket by
    bucket; gauges add mark by mark, so a peak is the fleet's at one mark;
    a process reporting to two replicas (a rebalance) is counted once."""
    key = (CONDUCTOR, TOPIC)
    samples = []
    for in_flight in ((2, 7), (6, 1)):  # replica a then b, at the marks 1010 and 1020
        clock = Clock()
        clock.now = 1005.0
        store = advice.Samples(clock=clock)
        for value in in_flight:
            clock.now += 10
            store.add(_figures(in_flight={key: value}))
        clock.now = 1025.0
        samples.append(store)
    now_a = _figures(received={key: 10}, saturation={key: 0.5}, timeout_low={key: 30.0},
                     processing={key: [[1, 2], 0.3, 0.1, 0.2]})
    now_b = _figures(received={key: 5}, saturation={key: 0.9}, timeout_low={key: 20.0},
                     processing={key: [[0, 4], 0.8, 0.2, 0.2]})
    shares = [advice.share(samples[0], now_a, 1010.0, 1000.0,
                           [{"id": "p1", "service": CONDUCTOR}]),
              advice.share(samples[1], now_b, 1010.0, 1000.0,
                           [{"id": "p1", "service": CONDUCTOR}, {"id": "p2", "service": API}])]
    inputs = advice.combine(json.loads(json.dumps(shares)), 1025.0, 1010.0, 1000.0)
    window = inputs.window
    assert window.now.received[key] == 15
    assert window.now.saturation[key] == 0.9
    assert window.now.timeout_low[key] == 20.0
    assert window.now.processing[key] == [[1, 6], 1.1, 0.1, 0.2]
    assert window.seconds == 15.0
    # 2 + 6 at one mark, 7 + 1 at the next: the fleet's peak is 8, not 7 + 6.
    assert window.peak("in_flight", key) == 8
    assert inputs.process_count(CONDUCTOR) == 1 and inputs.process_count(API) == 1


def test_a_peers_rows_that_do_not_fit_are_left_out():
    key = [CONDUCTOR, TOPIC]
    bad = {"now": {"received": [[key, 3], [key, "many"], [[1, 2], 4], "row"],
                   "processing": [[key, [[1, 2, 3], 0.1, None, None]], [key, [[1], 0.1]]],
                   "http": [[[API, CONDUCTOR], [1, 2]], [[API, "x"], [1]]]},
           "then": "nothing", "gauges": [[1010.0, {"in_flight": [[key, 2]]}], ["x", {}]],
           "processes": [{"service": API}, "p3", {"id": 4}]}
    good = {"now": {"processing": [[key, [[1, 1], 0.2, 0.1, 0.1]]]}}
    inputs = advice.combine([good, bad, None], 1025.0, 1010.0, 1000.0)
    now = inputs.window.now
    assert now.received[tuple(key)] == 3
    assert now.processing[tuple(key)] == [[1, 1], 0.2, 0.1, 0.1]  # other buckets: left out
    assert now.http[(API, CONDUCTOR)] == [1, 2] and (API, "x") not in now.http
    assert inputs.window.peak("in_flight", tuple(key)) == 2
    assert [p["service"] for p in inputs.processes] == [API]
    # No end given: the marks asked for.
    assert (inputs.window.seconds, inputs.baseline.seconds) == (15.0, 10.0)


# -- on the real RabbitMQ --------------------------------------------------------

REPLICAS = 3


def _next_mark_passed(seconds_after=2.5):
    """Wait until a sampling mark has passed and every collector's sweeper
    (each second) has sampled at it; the mark."""
    mark = (time.time() // advice.SAMPLE_SECONDS + 1) * advice.SAMPLE_SECONDS
    wait_for(lambda: time.time() >= mark + seconds_after, timeout=advice.SAMPLE_SECONDS + 10,
             interval=0.2, message="a sampling mark")
    return mark


def _close(a, b, skip=("finding", "recommendation", "seconds")):
    """``a`` and ``b`` the same, numbers within 1% (a lone collector and a
    fleet asked a few milliseconds apart: rates are per second of a window
    that ends when asked), sentences (which quote the numbers) left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a if k not in skip)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.01)
    return a == b


@pytest.mark.slow
def test_the_fleets_advice_from_each_replica_is_one_collectors(rabbitmq, tmp_path):
    """The same snapshots, through the real broker, to three replicas (each
    gets its share of the processes) and to one lone collector: the advice
    from each replica is the lone collector's, and says every replica
    answered; with a replica stopped, it says it is partial."""
    run = uuid.uuid4().hex[:8]
    fleet_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-fleetadvice-{run}"
                 f"&queue=commlens.fleetadvice-{run}")
    lone_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-loneadvice-{run}"
                f"&queue=commlens.loneadvice-{run}")
    ports = [free_port() for _ in range(REPLICAS)]
    peers = [arg for port in ports for arg in ("--peer", f"http://127.0.0.1:{port}")]
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(run_collector(
            fleet_url, tmp_path, ["--replica", str(i), "--peer-timeout", "2s", "--lost-grace",
                                  "3s", *peers], port=ports[i])) for i in range(REPLICAS)]
        lone = stack.enter_context(run_collector(lone_url, tmp_path, ["--lost-grace", "3s"]))
        for collector in [*replicas, lone]:
            wait_for(lambda c=collector: collector_ready(c), timeout=30, message="a collector")
        # Processes started after the collectors: each counts a process's
        # first snapshot whole, though the lone one gets the second of each
        # (collector.py, _predates_me).
        plane = Plane()
        shippers = []
        for url in (fleet_url, lone_url):
            transports = [shipping.AmqpTransport(url) for _ in plane.recorders]
            stack.callback(lambda ts=transports: [t.close() for t in ts])
            shippers += [shipping.Shipper(r, t, 10.0)
                         for r, t in zip(plane.recorders, transports, strict=True)]

        ticks = 0

        def phase(slow):
            nonlocal ticks
            ticks += 1
            plane.tick(slow)
            for shipper in shippers:
                assert shipper.ship_once()
            # 30 calls received a tick: every snapshot in, on the lone
            # collector and on the replicas together.
            wait_for(lambda: _received(lone) == ticks * 30
                     and sum(_received(r) for r in replicas) == ticks * 30,
                     timeout=30, interval=0.2, message="every snapshot in")

        before = _next_mark_passed()
        phase(False)
        then = _next_mark_passed()
        phase(True)
        # Both ticks' casts to a topic nobody reads, past the lost-message
        # grace, for the lone collector and the fleet alike.
        wait_for(lambda: all(_unread(c) == 14 for c in [lone, *replicas]), timeout=60,
                 interval=0.5, message="unreceived casts counted")
        _next_mark_passed()  # a sample of the window too (peaks)

        def asked(collector):
            # Whole seconds, down: the window starts at the mark ``then``
            # (advice.ends), whoever is asked within the next 10 s.
            window = f"{math.floor(time.time() - then)}s"
            return collector.json(f"/api/advice?window={window}&baseline={then - before:.0f}s")

        expected = asked(lone)
        assert expected["findings"] and "replicas" not in expected
        for replica in replicas:
            answer = asked(replica)
            assert answer["replicas"] == {"answered": ["0", "1", "2"], "missing": [],
                                          "partial": False}
            assert _close(answer["findings"], expected["findings"]), (answer, expected)
        rules = {f["rule"] for f in expected["findings"]}
        assert {"waits_growing", "executor_thread_pool_size", "queue_without_consumer"} <= rules

        replicas[2].process.terminate()
        replicas[2].process.wait(30)
        partial = asked(replicas[0])
        assert partial["replicas"]["partial"] is True
        assert partial["replicas"]["answered"] == ["0", "1"]
        assert [m["peer"] for m in partial["replicas"]["missing"]] == [replicas[2].base_url]


def _received(collector):
    return collector.metrics().value("commlens_rpc_received_total")


def _unread(collector):
    return sum(m["unreceived"] for m in collector.json("/api/lost-messages")["messages"]
               if m["target"] == UNREAD)
