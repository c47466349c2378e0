"""Periodic reporters that went silent, per host (issue 18, item 1).

A reporter that stops (a compute host down) sends nothing, so no timeout
names it; the collector learns who sends on a timer from the snapshots
every process ships (the sender's host is the snapshot's) and flags one
that stopped for several of its intervals. The demo's ``compute-down``
names compute-1; on real RabbitMQ, a stopped reporter's host is named and
one that merely slows a little is not; the rules hold on exact timings.
"""

import os
import random
import subprocess
import sys
import threading
import time
import uuid

import oslo_messaging as om
import pytest

from commlens.exporters import reporters
from commlens.tracer import metrics
from support import COMMLENS_URL, Demo, wait_for

SENT = metrics.RPC_SENT.name


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _feed(found, clock, schedules, until, ship=1.0, final_at=None):
    """Ship a snapshot every ``ship`` seconds until ``until`` for each
    ``host: [send times]``; the count is what was sent by then."""
    counts = {host: 0 for host in schedules}
    t = clock.now
    while t <= until:
        clock.now = t
        for host, times in schedules.items():
            while counts[host] < len(times) and times[counts[host]] <= t:
                counts[host] += 1
            found.observe("p-" + host, host,
                          {(SENT, ("nova-compute", "conductor", "compute_node_update",
                                   "call")): float(counts[host])},
                          ship, final=final_at is not None and t >= final_at)
        t += ship


def _silent_hosts(found):
    return {row["host"] for row in found.top()}


def test_a_reporter_that_stops_is_named_and_one_that_slows_a_little_is_not():
    clock = _Clock()
    found = reporters.SilentReporters(clock=clock, wall_clock=clock)
    start = clock.now
    schedules = {
        # every 10 s, stops after two minutes
        "compute-1": [start + 0.3 + 10 * i for i in range(12)],
        # every 10 s, then every 13 s: slower, still reporting
        "compute-2": ([start + 0.6 + 10 * i for i in range(12)]
                      + [start + 110.6 + 13 * i for i in range(1, 20)]),
        # every 10 s throughout
        "compute-3": [start + 0.9 + 10 * i for i in range(40)],
    }
    _feed(found, clock, schedules, start + 200, ship=5.0)
    rows = found.top()
    assert [row["host"] for row in rows] == ["compute-1"]
    (row,) = rows
    assert row["service"] == "nova-compute" and row["method"] == "compute_node_update"
    assert row["target"] == "conductor" and row["kind"] == "call"
    assert row["interval_seconds"] == pytest.approx(10, abs=1)
    assert row["missed"] >= 3 and row["silent_seconds"] > 30
    assert row["reports"] == 11 and row["ended"] is False
    assert row["last_seen"] == pytest.approx(start + 110, abs=5)


def test_traffic_that_follows_users_is_no_reporter():
    # Casts at random (a Poisson stream) that stop: no rhythm, so no reporter.
    rng = random.Random(7)
    for mean in (4.0, 10.0, 30.0):
        clock = _Clock()
        found = reporters.SilentReporters(clock=clock, wall_clock=clock)
        schedules = {}
        for n in range(20):
            t, times = clock.now, []
            while t < clock.now + 40 * mean:
                t += rng.expovariate(1 / mean)
                times.append(t)
            schedules[f"host-{n}"] = times
        _feed(found, clock, schedules, clock.now + 60 * mean, ship=1.0)
        assert _silent_hosts(found) == set(), mean


def test_a_rhythm_faster_than_two_snapshots_is_not_learned():
    clock = _Clock()
    found = reporters.SilentReporters(clock=clock, wall_clock=clock)
    start = clock.now
    _feed(found, clock, {"compute-1": [start + 0.5 + 5 * i for i in range(20)]},
          start + 200, ship=5.0)
    assert _silent_hosts(found) == set()


def test_a_process_that_exits_is_named_as_ended_and_forgotten_after_retention():
    clock = _Clock()
    found = reporters.SilentReporters(clock=clock, wall_clock=clock, retention_seconds=600)
    start = clock.now
    _feed(found, clock, {"agent-1": [start + 0.5 + 10 * i for i in range(10)]},
          start + 96, ship=2.0, final_at=start + 96)
    clock.now = start + 200
    (row,) = found.top()
    assert row["host"] == "agent-1" and row["ended"] is True
    clock.now = start + 96 + 601
    assert found.top() == []


def test_reporters_are_bounded_and_hosts_are_checked():
    clock = _Clock()
    found = reporters.SilentReporters(clock=clock, wall_clock=clock, max_reporters=3)
    for n in range(10):
        found.observe(f"p{n}", f"host-{n}", {(SENT, ("s", "t", "m", "cast")): 1.0}, 1.0)
    assert len(found._reporters) == 3
    for host in (None, "", "bad host", "x" * 300, 12):
        found.observe("p", host, {(SENT, ("s", "t", "m", "cast")): 1.0}, 1.0)
    assert len(found._reporters) == 3
    assert {key[0] for key in found._reporters} == {"host-7", "host-8", "host-9"}


@pytest.mark.slow
def test_on_rabbitmq_the_stopped_host_is_named_and_the_slowed_one_is_not(collector, conf,
                                                                       topic):
    # Three emulated hosts report every 1.5 s over real RabbitMQ, on a fixed
    # schedule as oslo.service's FixedIntervalLoopingCall runs state reports,
    # each transport speaking for its host (commlens_host): one stops, one
    # slows by a fifth, one goes on.
    service = f"reporter-{uuid.uuid4().hex[:6]}"
    target = om.Target(topic=topic)
    periods = {"host-stops": 1.5, "host-slows": 1.5, "host-steady": 1.5}
    stop = threading.Event()
    stopped = threading.Event()
    transports = []

    class Endpoint:
        def report_state(self, ctxt, host):
            return host

    server_transport = om.get_rpc_transport(conf, url=COMMLENS_URL)
    transports.append(server_transport)
    server = om.get_rpc_server(server_transport, om.Target(topic=topic, server="conductor-1"),
                               [Endpoint()], executor="threading")
    server.start()

    def report(host):
        transport = om.get_rpc_transport(
            conf, url=f"{COMMLENS_URL}?commlens_service_name={service}&commlens_host={host}")
        transports.append(transport)
        client = om.get_rpc_client(transport, target, timeout=10)
        due = time.monotonic()
        while not stop.is_set():
            if host == "host-stops" and stopped.is_set():
                break
            client.call({}, "report_state", host=host)
            due += periods[host]
            stop.wait(max(0.0, due - time.monotonic()))

    threads = [threading.Thread(target=report, args=(host,), daemon=True) for host in periods]
    for thread in threads:
        thread.start()
    try:
        def learned():
            rows = collector.json("/api/silent-servers")["reporters"]
            return [r for r in rows if r["service"] == service]
        # Learned over ten reports; then host-stops stops and host-slows slows.
        wait_for(lambda: collector.metrics().value(
            "commlens_rpc_sent_total", service=service, target=topic,
            method="report_state", kind="call") >= 3 * 10, timeout=60,
            message="ten reports from each host")
        periods["host-slows"] = 1.8
        stopped.set()
        rows = wait_for(learned, timeout=30, message="a silent reporter")
        # Several intervals more: the slowed host is still not flagged.
        stop.wait(6)
        rows = learned()
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        server.stop()
        server.wait()
        for transport in transports:
            transport.cleanup()
    assert [(r["host"], r["method"], r["target"]) for r in rows] == [
        ("host-stops", "report_state", topic)]
    assert rows[0]["interval_seconds"] == pytest.approx(1.5, abs=0.3)
    assert "host-stops" not in collector.get("/metrics")[1]
    beside_graph = collector.json("/api/graph")["silent_reporters"]
    assert any(r["host"] == "host-stops" for r in beside_graph)


@pytest.mark.slow
def test_demo_compute_down_names_compute_1_among_silent_reporters(tmp_path):
    demo = Demo(tmp_path)
    try:
        wait_for(demo.up, timeout=30, message="demo serving")

        def compute_reporters():
            return [r for r in demo.json("/api/silent-servers")["reporters"]
                    if r["service"] == "nova-compute"]
        # Reports every 2 s, snapshots every 1 s: learned within ~20 s.
        wait_for(lambda: demo.metrics().value(
            "commlens_rpc_sent_total", service="nova-compute", target="conductor",
            method="compute_node_update", kind="call") >= 4 * 12, timeout=60,
            message="a dozen state reports from each compute")
        assert compute_reporters() == []
        demo.fault("compute-down")
        try:
            rows = wait_for(compute_reporters, timeout=40,
                            message="compute-1 among the silent reporters")
            assert {(r["host"], r["method"]) for r in rows} == {
                ("compute-1", "compute_node_update")}
            assert rows[0]["interval_seconds"] == pytest.approx(2.0, abs=0.6)
            assert "compute-1" not in demo.get("/metrics")
            # Beside the graph, and in ``commlens graph``.
            assert [r["host"] for r in demo.json("/api/graph")["silent_reporters"]
                    if r["service"] == "nova-compute"] == ["compute-1"]
            shown = subprocess.run(
                [sys.executable, "-m", "commlens.cli.main", "graph", "--collector", demo.base],
                capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="200"))
            assert shown.returncode == 0, shown.stderr
            assert "Periodic reporters that went silent" in shown.stdout
            (line,) = [x for x in shown.stdout.splitlines() if "compute_node_update" in x]
            assert "compute-1" in line
        finally:
            demo.fault("compute-down", on=False)
        # Back: its reports resume and it leaves the list.
        wait_for(lambda: compute_reporters() == [], timeout=30,
                 message="compute-1 reporting again")
    finally:
        demo.process.kill()
        demo.process.wait()


@pytest.mark.parametrize("query, host", [
    ("commlens_service_name=svc-hosted&commlens_host=compute-9", "compute-9"),
    ("commlens_host=compute-9", None),  # no service name of its own: the process's
    ("commlens_service_name=svc-hosted&commlens_host=bad%20host", None),
])
def test_a_transport_speaks_for_a_host_only_with_a_valid_name_and_a_service(conf, query,
                                                                           host):
    from commlens.tracer import recorder as recorder_mod

    transport = om.get_rpc_transport(conf, url="commlens+fake://?" + query)
    try:
        recorder = transport._driver._recorder
        assert recorder.host == host
        assert (recorder is recorder_mod.get_recorder()) == (host is None)
        if host:
            assert recorder.snapshot(1.0, max_hops=0)["process"]["host"] == host
            # One recorder per host and service.
            again = om.get_rpc_transport(conf, url="commlens+fake://?" + query)
            assert again._driver._recorder is recorder
            again.cleanup()
    finally:
        transport.cleanup()


def test_replicas_lists_merge_by_reporter_keeping_the_last_seen():
    def row(host, last_seen, missed):
        return {"host": host, "service": "nova-compute", "target": "conductor",
                "method": "compute_node_update", "kind": "call", "interval_seconds": 10.0,
                "silent_seconds": 40.0, "missed": missed, "reports": 5,
                "last_seen": last_seen, "ended": False}
    merged = reporters.merge([[row("compute-1", 100.0, 4), row("compute-2", 50.0, 9)],
                              [row("compute-1", 120.0, 3)], []])
    assert [(r["host"], r["last_seen"]) for r in merged] == [("compute-2", 50.0),
                                                             ("compute-1", 120.0)]
