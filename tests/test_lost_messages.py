"""Lost messages (issue 18 item 4): casts, fanouts and notifications sent
but never received are counted once the grace period has passed, exactly,
per topic, method and kind; a message in flight never is.

The counting is checked on snapshots whose numbers are known, with the
collector's own clock; then against real RabbitMQ (what the peer really ran)
and the embedded demo's conductor-down.
"""

import contextlib
import json

import oslo_messaging as om
import pika
import pytest

from commlens.exporters import collector as collector_mod
from commlens.exporters import http
from commlens.exporters import lost
from commlens.exporters import prometheus
from commlens.tracer import metrics
from commlens.tracer import wire
from support import Clock, COMMLENS_URL, Demo, wait_for

GRACE = 20.0


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def clocked(clock):
    return collector_mod.Collector(clock=clock, lost_grace=GRACE)


def _snapshot(process_id, seq, service, counters):
    return json.dumps({"format": wire.SNAPSHOT_FORMAT, "seq": seq, "interval": 1.0,
                       "process": {"id": process_id, "service": service, "pid": 1},
                       "counters": [list(c) for c in counters], "histograms": [],
                       "gauges": []})


class Plane:
    """Cumulative counters of a sender and its receivers, shipped on demand."""

    def __init__(self, collector, clock):
        self.collector, self.clock = collector, clock
        self.sent, self.received, self.seq = {}, {}, {}

    def send(self, service, target, method, kind, n=1):
        key = (metrics.RPC_SENT.name, (service, target, method, kind))
        self.sent[key] = self.sent.get(key, 0) + n

    def notify(self, service, target, event_type, n=1):
        key = (metrics.NOTIFICATIONS_SENT.name, (service, target, event_type, "info"))
        self.sent[key] = self.sent.get(key, 0) + n

    def receive(self, service, caller, target, method, kind, n=1):
        key = (service, metrics.RPC_RECEIVED.name, (service, caller, target, method, kind))
        self.received[key] = self.received.get(key, 0) + n

    def receive_notification(self, service, caller, target, event_type, n=1):
        key = (service, metrics.NOTIFICATIONS_RECEIVED.name,
               (service, caller, target, event_type, "info"))
        self.received[key] = self.received.get(key, 0) + n

    def ship(self):
        by_service = {}
        for (name, labels), value in self.sent.items():
            by_service.setdefault(labels[0], []).append([name, list(labels), value])
        for (service, name, labels), value in self.received.items():
            by_service.setdefault(service, []).append([name, list(labels), value])
        for service, counters in by_service.items():
            self.seq[service] = self.seq.get(service, 0) + 1
            assert self.collector.ingest(_snapshot(
                f"p-{service}", self.seq[service], service, counters)) == "accepted"

    def tick(self, seconds):
        """Let time pass in sample steps, shipping and sampling as the sweeper does."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + lost.SAMPLE_INTERVAL_SECONDS)
            self.ship()
            self.collector.sample_graph()


def _rows(collector, window=300):
    return {(r["target"], r["method"], r["kind"]): r
            for r in collector.lost_messages(window)[0]["messages"]}


def test_casts_to_a_topic_nobody_reads_are_counted_after_the_grace_period(clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("nova-api", "conductor", "build_instances", "cast", 7)
    plane.tick(5)
    # In flight: not lost yet.
    assert _rows(clocked) == {}
    plane.tick(GRACE + 5)
    row = _rows(clocked)[("conductor", "build_instances", "cast")]
    assert (row["sent"], row["received"], row["unreceived"]) == (7, 0, 7)
    assert row["callers"] == ["nova-api"]
    # Past the window, forgotten: the gauge reads 0 while it was sent in it,
    # then the series goes.
    plane.tick(300)
    assert _rows(clocked) == {}


def test_only_what_was_not_received_is_counted_and_receipts_after_the_grace_count(
        clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("nova-api", "compute", "terminate_instance", "cast", 57)
    plane.tick(5)
    plane.receive("nova-compute", "nova-api", "compute", "terminate_instance", "cast", 50)
    plane.tick(5)
    # Late, but within the grace period: received.
    plane.receive("nova-compute", "nova-api", "compute", "terminate_instance", "cast", 4)
    plane.tick(GRACE + 5)
    row = _rows(clocked)[("compute", "terminate_instance", "cast")]
    assert (row["sent"], row["received"], row["unreceived"]) == (57, 54, 3)
    # /metrics says the same, by target, method and kind.
    assert _scrape(clocked)[("compute", "terminate_instance", "cast")] == 3


def test_a_fanout_received_by_several_consumers_is_not_lost_and_one_nobody_got_is(
        clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("neutron-server", "q-agent-notifier-port-update", "port_update", "fanout", 10)
    # Three agents each get every fanout: 30 receipts of 10 sends.
    for agent in ("agent-1", "agent-2", "agent-3"):
        plane.receive(f"neutron-{agent}", "neutron-server", "q-agent-notifier-port-update",
                      "port_update", "fanout", 10)
    plane.send("neutron-server", "q-agent-notifier-network-delete", "network_delete",
               "fanout", 4)
    plane.tick(GRACE + 10)
    rows = _rows(clocked)
    assert ("q-agent-notifier-port-update", "port_update", "fanout") not in rows
    assert rows[("q-agent-notifier-network-delete", "network_delete", "fanout")][
        "unreceived"] == 4
    assert _scrape(clocked)[("q-agent-notifier-port-update", "port_update", "fanout")] == 0


def test_receipts_from_another_caller_do_not_hide_a_loss(clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("nova-api", "conductor", "rebuild_instance", "cast", 5)
    # An uninstrumented or other caller's casts were received; not nova-api's.
    plane.receive("nova-conductor", "unknown", "conductor", "rebuild_instance", "cast", 5)
    plane.tick(GRACE + 10)
    assert _rows(clocked)[("conductor", "rebuild_instance", "cast")]["unreceived"] == 5


def test_calls_are_not_lost_messages(clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("nova-api", "conductor", "build_instances", "call", 5)
    plane.tick(GRACE + 10)
    assert _rows(clocked) == {}
    assert ("conductor", "build_instances", "call") not in _scrape(clocked)


def test_notifications_nobody_received_are_counted_by_event_type(clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.notify("nova-compute", "notifications.info", "compute.instance.create.end", 6)
    plane.receive_notification("ceilometer", "nova-compute", "notifications.info",
                               "compute.instance.create.end", 2)
    plane.tick(GRACE + 10)
    row = _rows(clocked)[("notifications.info", "compute.instance.create.end",
                            "notification")]
    assert (row["sent"], row["received"], row["unreceived"]) == (6, 2, 4)


def test_sends_before_the_window_and_their_late_receipts_do_not_count(clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("nova-api", "conductor", "build_instances", "cast", 3)
    plane.tick(200)
    # Consumed late, long after they were sent: not lost any more.
    plane.receive("nova-conductor", "nova-api", "conductor", "build_instances", "cast", 3)
    plane.tick(GRACE + 10)
    assert _rows(clocked, window=60) == {}
    assert _rows(clocked, window=300) == {}


def test_the_api_answers_with_its_window_and_grace_and_refuses_a_bad_window(clocked, clock):
    plane = Plane(clocked, clock)
    plane.tick(10)
    plane.send("nova-api", "conductor", "build_instances", "cast", 2)
    plane.tick(GRACE + 10)
    client = http.create_app(clocked).test_client()
    body = client.get("/api/lost-messages?window=2m").get_json()
    assert body["window_seconds"] == 120 and body["grace_seconds"] == GRACE
    assert body["covered_seconds"] > 0
    assert [(m["target"], m["unreceived"]) for m in body["messages"]] == [("conductor", 2)]
    assert client.get("/api/lost-messages?window=2h").status_code == 400
    assert client.get("/api/lost-messages?limit=0").status_code == 400


def test_a_replica_counts_no_lost_message(clock):
    # Processes are spread over replicas: one sees a topic's senders and
    # receivers only in part, and would count what another received as lost.
    replica = collector_mod.Collector(clock=clock, lost_grace=GRACE, lost_messages=False)
    plane = Plane(replica, clock)
    plane.tick(10)
    plane.send("nova-api", "conductor", "build_instances", "cast", 7)
    plane.tick(GRACE + 10)
    body, series = replica.lost_messages(300)
    assert body["messages"] == [] and series == {} and "replica" in body["unavailable"]
    assert _scrape(replica) == {}


def test_the_grace_period_follows_the_slowest_ship_interval():
    messages = lost.LostMessages()
    assert messages.grace_for([]) == lost.MIN_GRACE_SECONDS
    assert messages.grace_for([{"interval": 1.0}, {"interval": 10.0}]) == 30.0
    assert lost.LostMessages(grace=4.0).grace_for([{"interval": 10.0}]) == 4.0


def _cast_hop(span, server, outcome="ok", kind="cast"):
    return {"trace_id": "a" * 32, "span_id": span, "parent_id": None, "service": "nova-api",
            "side": "client", "protocol": "rpc", "peer": None, "target": "compute",
            "operation": "terminate_instance", "kind": kind, "outcome": outcome, "error": None,
            "start": 5000.0, "duration": 0.001, "request_id": None,
            "global_request_id": None, "server": server}


def test_sampled_casts_name_the_server_that_did_not_receive_them():
    wall = [5030.0]
    messages = lost.LostMessages(grace=10.0, wall_clock=lambda: wall[0])
    received = dict(_cast_hop("2" * 16, "compute-2"), span_id="9" * 16,
                    parent_id="2" * 16, side="server", service="nova-compute")
    messages.add_trace([_cast_hop("1" * 16, "compute-1"), _cast_hop("2" * 16, "compute-2"),
                        received, _cast_hop("3" * 16, "compute-1")])
    assert messages._servers(4000.0, 5020.0) == {
        ("compute", "terminate_instance", "compute-1"): [2, 2],
        ("compute", "terminate_instance", "compute-2"): [1, 0]}
    # A receipt that arrives late (the trace reopened) takes it back.
    late = dict(received, span_id="8" * 16, parent_id="1" * 16, server="compute-1")
    messages.add_trace([_cast_hop("1" * 16, "compute-1"), late])
    assert messages._servers(4000.0, 5020.0)[
        ("compute", "terminate_instance", "compute-1")] == [2, 1]


def test_idle_queues_of_the_topic_name_the_server():
    queues = {"compute": {"ready": 0, "unacked": 0, "consumers": 2},
              "compute.compute-1": {"ready": 3, "unacked": 0, "consumers": 0},
              "compute.compute-2": {"ready": 0, "unacked": 0, "consumers": 1},
              "computer": {"ready": 9, "unacked": 0, "consumers": 0}}
    assert lost._idle_queues(queues, "compute") == {
        "compute.compute-1": {"ready": 3, "unacked": 0, "consumers": 0}}


def _scrape(collector):
    from prometheus_client.parser import text_string_to_metric_families

    text = prometheus.render(collector)[0].decode()
    return {(s.labels["target"], s.labels["method"], s.labels["kind"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "commlens_rpc_unreceived_messages" for s in family.samples}


# -- against real RabbitMQ and the demo ---------------------------------------

def _lost_row(source, target, method, kind, window="15m"):
    for row in source.json(f"/api/lost-messages?window={window}")["messages"]:
        if (row["target"], row["method"], row["kind"]) == (target, method, kind):
            return row
    return None


@contextlib.contextmanager
def _queues_deleted(*names):
    try:
        yield
    finally:
        connection = pika.BlockingConnection(
            pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
        try:
            channel = connection.channel()
            for name in names:
                channel.queue_delete(queue=name)
        finally:
            connection.close()


@pytest.mark.slow
def test_casts_and_notifications_nobody_received_on_rabbitmq_are_counted_exactly(
        collector, start_peer, rpc_client, conf, topic):
    start_peer(COMMLENS_URL, topic, args=("--server", "host-a"), notifications=True)
    received = rpc_client(COMMLENS_URL, topic)
    for _ in range(5):
        received.cast({}, "count_cast")
    # Nobody serves host-b: RabbitMQ has no queue to route these to.
    for _ in range(4):
        rpc_client(COMMLENS_URL, topic, server="host-b").cast({}, "count_cast")
    # One fanout reaches the one server: received.
    for _ in range(3):
        rpc_client(COMMLENS_URL, topic, fanout=True).cast({}, "count_cast")
    nobody = topic + "-nobody"
    transport = om.get_notification_transport(conf, url=COMMLENS_URL)
    with _queues_deleted(nobody + ".info"):
        try:
            notifier = om.Notifier(transport, publisher_id="compute.host-1",
                                   driver="messaging", topics=[topic + "-notifications"])
            for _ in range(2):
                notifier.info({}, "compute.instance.create.end", {"id": 1})
            unread = om.Notifier(transport, publisher_id="compute.host-1",
                                 driver="messaging", topics=[nobody])
            for _ in range(3):
                unread.info({}, "compute.instance.delete.end", {"id": 2})
        finally:
            transport.cleanup()
        # What the server really ran: every cast it was sent but host-b's.
        assert wait_for(lambda: received.call({}, "casts_seen") == 8, timeout=30,
                        message="the peer ran the casts sent to it")

        row = wait_for(lambda: _lost_row(collector, topic, "count_cast", "cast"),
                       timeout=60, message="lost casts listed")
        assert (row["sent"], row["received"], row["unreceived"]) == (9, 5, 4)
        assert row["callers"] == ["test-client"]
        # Every hop is sampled in the tests: the host is named.
        wait_for(lambda: _lost_row(collector, topic, "count_cast", "cast")["servers"],
                 timeout=30, message="the server named")
        assert _lost_row(collector, topic, "count_cast", "cast")["servers"] == [
            {"server": "host-b", "sampled": 4, "unreceived": 4}]
        assert _lost_row(collector, topic, "count_cast", "fanout") is None
        assert _lost_row(collector, topic + "-notifications.info",
                         "compute.instance.create.end", "notification") is None
        unread_row = wait_for(lambda: _lost_row(collector, nobody + ".info",
                                                "compute.instance.delete.end",
                                                "notification"),
                              timeout=30, message="unread notifications listed")
        assert (unread_row["sent"], unread_row["unreceived"]) == (3, 3)
        # /metrics says the same; no host in it.
        scrape = collector.metrics()
        assert scrape.value("commlens_rpc_unreceived_messages", target=topic,
                            method="count_cast", kind="cast") == 4
        assert scrape.value("commlens_rpc_unreceived_messages", target=topic,
                            method="count_cast", kind="fanout") == 0
        assert "host-b" not in collector.get("/metrics")[1]


@pytest.mark.slow
def test_the_demo_conductor_down_shows_casts_nobody_received_until_it_is_back(tmp_path):
    # Users rebuild only servers they booted, and boots fail once the
    # conductor is down: so more users, and the fault only once they have
    # servers enough to keep rebuilding (a few rebuilds seen).
    demo = Demo(tmp_path, "--users", "16")
    try:
        wait_for(demo.up, timeout=30, message="demo serving")

        def sent():
            return demo.metrics().value("commlens_rpc_sent_total", service="nova-api",
                                        target="conductor", method="rebuild_instance",
                                        kind="cast")

        wait_for(lambda: sent() >= 3, timeout=120, message="rebuilds cast to the conductor")
        demo.fault("conductor-down")

        sent_before = sent()

        def listed():
            # Once what was sent by the fault is past the grace period.
            row = _lost_row(demo, "conductor", "rebuild_instance", "cast")
            return row if row and row["unreceived"] >= 1 and row["sent"] >= sent_before else None

        row = wait_for(listed, timeout=120, message="casts to the conductor listed as lost")
        sent_after = sent()
        received = demo.metrics().value("commlens_rpc_received_total",
                                        service="nova-conductor", caller="nova-api",
                                        target="conductor", method="rebuild_instance")
        # Nothing received since the conductor went: what it had received
        # is all there is; what was sent until a grace period ago is between
        # two readings of the counter.
        assert row["received"] == received
        assert row["unreceived"] == row["sent"] - row["received"]
        assert row["unreceived"] <= sent_after - received
        assert row["callers"] == ["nova-api"]
        # The computes' notifications have their reader (as ceilometer's).
        assert _lost_row(demo, "notifications.info", "compute.instance.create.end",
                         "notification") is None

        # Back: the queue is read, nothing is lost any more.
        demo.fault("conductor-down", on=False)
        wait_for(lambda: _lost_row(demo, "conductor", "rebuild_instance", "cast") is None,
                 timeout=60, message="the queued casts received")
    finally:
        demo.process.terminate()
        demo.process.wait(30)


def test_the_graph_and_lost_commands_list_messages_nobody_received_and_name_the_origin():
    from rich.console import Console

    from commlens.cli import incident
    lost_body = {"window_seconds": 300, "grace_seconds": 15, "covered_seconds": 300,
                 "messages": [{"target": "compute", "method": "terminate_instance",
                               "kind": "cast", "sent": 57, "received": 54, "unreceived": 3,
                               "callers": ["nova-api"],
                               "servers": [{"server": "compute-1", "sampled": 3,
                                            "unreceived": 3}],
                               "queues": {"compute.compute-1": {"ready": 3, "unacked": 0,
                                                                "consumers": 0}}}]}
    edge = {"client": "nova-conductor", "server": "nova-compute", "protocol": "rpc",
            "rate": 1.0, "error_ratio": 0.1, "p50_seconds": 0.1, "p99_seconds": 0.2,
            "waiting_replies": 1, "timeouts": 2,
            "change": {"rate": {"baseline": 0.5, "ratio": 2.0},
                       "error_ratio": {"baseline": 0.0, "difference": 0.1},
                       "p99_seconds": {"baseline": 0.1, "ratio": 2.0},
                       "baseline_requests": 3000, "confident": True}}
    console = Console(record=True, width=250)
    incident._Graph.show(console, {
        "window_seconds": 300, "baseline": {"seconds": 3600}, "edges": [edge],
        "silent_servers": [], "lost_messages": lost_body,
        "nodes": [{"service": "nova-compute", "origin": {
            "chains": 4, "absorbed": 0, "errors": ["MessagingTimeout"],
            "servers": ["compute-1"], "topics": ["compute"]}}]})
    text = console.export_text()
    assert "nova-compute [origin of 4 chains on compute-1]" in text
    assert "rate x2, err +10%, p99 x2" in text
    assert "terminate_instance" in text and "compute-1 (3 of 3)" in text
    assert "queue compute.compute-1: 3 ready, no consumer" in text
    console = Console(record=True, width=250)
    incident._Lost.show(console, dict(lost_body, messages=[]))
    assert "No cast, fanout or notification went unreceived" in console.export_text()
    # No baseline yet: said so, and '-' on the edge.
    console = Console(record=True, width=250)
    incident._Graph.show(console, {"window_seconds": 300, "baseline": None, "nodes": [],
                                   "edges": [dict(edge, change=None)], "silent_servers": []})
    assert "vs baseline: none yet" in console.export_text()
