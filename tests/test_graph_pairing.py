"""The service graph pairs each caller's RPC edge with the service that answered.

An oslo.messaging reply carries no identity, so the collector pairs a
caller's series (caller, topic, method, kind) with the services that received
exactly that. Most tests feed a collector the snapshots real recorders make;
the last one runs two RPC servers of different services on one topic over the
real rabbit driver.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from commlens.exporters import collector as collector_mod
from commlens.exporters import graph
from commlens.exporters import prometheus
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from support import COMMLENS_URL, PEERS, Metrics, Peer, wait_for

TOPIC = "compute"
RPC = metrics.MESSAGING_SYSTEM


class Cloud:
    """Recorders of a caller and its servers, and a collector fed their snapshots."""

    def __init__(self):
        self.recorders = {}

    def recorder(self, service):
        if service not in self.recorders:
            self.recorders[service] = recorder_mod.Recorder(service)
        return self.recorders[service]

    def call(self, caller, server, method, times, seconds=0.002):
        for _ in range(times):
            self.sent(caller, method, "call")
            self.recorder(caller).observe(metrics.RPC_REPLY_WAIT,
                                          (caller, TOPIC, method, metrics.OK), seconds)
            self.received(server, caller, method, "call", seconds)

    def sent(self, caller, method, kind, times=1):
        self.recorder(caller).inc(metrics.RPC_SENT, (caller, TOPIC, method, kind), times)

    def received(self, server, caller, method, kind, seconds=0.001, times=1):
        recorder = self.recorder(server)
        for _ in range(times):
            recorder.inc(metrics.RPC_RECEIVED, (server, caller, TOPIC, method, kind))
            recorder.observe(metrics.RPC_SERVER_HOPS, (server, caller, TOPIC, method, metrics.OK),
                             seconds)

    def timed_out(self, caller, method, times, topic=TOPIC):
        recorder = self.recorder(caller)
        recorder.inc(metrics.RPC_SENT, (caller, topic, method, "call"), times)
        for _ in range(times):
            recorder.inc(metrics.RPC_CALL_ERRORS,
                         (caller, topic, method, metrics.TIMEOUT, "MessagingTimeout"))
            recorder.observe(metrics.RPC_REPLY_WAIT, (caller, topic, method, metrics.TIMEOUT),
                             60.0)
            # As the driver does for a call nobody answered (rpc_driver._send_failed).
            edge = (caller, topic, RPC)
            recorder.inc(metrics.SERVICE_GRAPH_REQUESTS, edge)
            recorder.inc(metrics.SERVICE_GRAPH_FAILED, edge)

    def collector(self):
        collector = collector_mod.Collector()
        for recorder in self.recorders.values():
            snapshot = recorder.snapshot(1.0)
            assert collector.ingest(json.dumps(snapshot)) == "accepted"
        return collector


def _metrics(collector):
    return Metrics(prometheus.render(collector)[0].decode())


def _method_totals(collector):
    counters, histograms, gauges = collector.merged()
    return graph.method_totals(counters, histograms, gauges, graph.topic_consumers(counters))


def _operations(collector, client, server):
    rows = _method_totals(collector).get((client, server, "rpc"), {})
    return sorted(operation for operation, row in rows.items() if row.requests)


def _edge(graph_json, client, server):
    return next((e for e in graph_json["edges"]
                 if (e["client"], e["server"], e["protocol"]) == (client, server, "rpc")), None)


def _casts_to_k1_and_calls_to_c1(cloud):
    """srv-k1 receives many casts of one method; srv-c1 answers a few calls of another."""
    cloud.sent("api", "update_cache", "cast", times=30)
    cloud.received("srv-k1", "api", "update_cache", "cast", times=30)
    cloud.call("api", "srv-c1", "build", times=10)


def test_a_call_edge_goes_to_the_service_that_answered_not_the_busiest_consumer():
    cloud = Cloud()
    _casts_to_k1_and_calls_to_c1(cloud)
    collector = cloud.collector()

    assert _operations(collector, "api", "srv-c1") == [f"{TOPIC}.build"]
    assert _operations(collector, "api", "srv-k1") == [f"{TOPIC}.update_cache"]
    scrape = _metrics(collector)
    assert scrape.value("traces_service_graph_request_client_seconds_count",
                        client="api", server="srv-c1", connection_type=RPC) == 10
    assert scrape.series("traces_service_graph_request_client_seconds_count",
                         server="srv-k1") == []
    assert scrape.series("traces_service_graph_request_client_seconds_count",
                         server=TOPIC) == []
    edge = _edge(collector.graph(), "api", "srv-c1")
    assert edge["requests"] == 10 and edge["ok_p50_seconds"] is not None


def test_timeouts_and_waiting_replies_go_to_the_service_that_answers_the_method():
    cloud = Cloud()
    _casts_to_k1_and_calls_to_c1(cloud)
    cloud.timed_out("api", "build", times=2)
    waiting = cloud.recorder("api").call_started(("api", TOPIC, "build"))
    assert waiting is not None
    collector = cloud.collector()

    answered = _edge(collector.graph(), "api", "srv-c1")
    assert (answered["timeouts"], answered["waiting_replies"]) == (2, 1)
    assert (answered["requests"], answered["failed"]) == (12, 2)
    casts = _edge(collector.graph(), "api", "srv-k1")
    assert (casts["timeouts"], casts["waiting_replies"], casts["failed"]) == (0, 0, 0)
    scrape = _metrics(collector)
    assert scrape.value("traces_service_graph_request_failed_total",
                        client="api", server="srv-c1", connection_type=RPC) == 2
    assert scrape.value("traces_service_graph_request_failed_total", server="srv-k1") == 0
    assert scrape.series("traces_service_graph_request_failed_total", server=TOPIC) == []
    row = _method_totals(collector)[("api", "srv-c1", "rpc")][f"{TOPIC}.build"]
    assert (row.requests, row.timeouts, row.waiting) == (12, 2, 1)


def test_a_caller_whose_calls_all_timed_out_is_paired_by_who_answers_that_method():
    cloud = Cloud()
    _casts_to_k1_and_calls_to_c1(cloud)
    cloud.timed_out("scheduler", "build", times=3)  # srv-c1 never received these
    collector = cloud.collector()

    edge = _edge(collector.graph(), "scheduler", "srv-c1")
    assert (edge["timeouts"], edge["failed"]) == (3, 3)
    assert _edge(collector.graph(), "scheduler", "srv-k1") is None


def test_calls_several_services_answered_are_split_in_proportion_to_what_each_received():
    cloud = Cloud()
    cloud.call("api", "srv-c1", "build", times=30)
    cloud.call("api", "srv-c2", "build", times=10)
    counters, histograms, _gauges = cloud.collector().merged()
    totals = graph.method_totals(counters, histograms, {}, graph.topic_consumers(counters))

    assert totals[("api", "srv-c1", "rpc")][f"{TOPIC}.build"].requests == pytest.approx(30)
    assert totals[("api", "srv-c2", "rpc")][f"{TOPIC}.build"].requests == pytest.approx(10)
    _counters, resolved = graph.resolve_rpc_servers(counters, histograms,
                                                    graph.topic_consumers(counters))
    client_seconds = metrics.SERVICE_GRAPH_CLIENT_SECONDS.name
    assert sum(resolved[(client_seconds, ("api", "srv-c2", RPC))][0]) == pytest.approx(10)


def test_a_fanout_reaches_every_consumer_whole():
    cloud = Cloud()
    cloud.sent("api", "refresh", "fanout", times=5)
    for server in ("srv-k1", "srv-c1"):
        cloud.received(server, "api", "refresh", "fanout", times=5)
    totals = _method_totals(cloud.collector())

    for server in ("srv-k1", "srv-c1"):
        assert totals[("api", server, "rpc")][f"{TOPIC}.refresh"].requests == 5


def test_timeouts_to_a_topic_nobody_consumes_stay_on_the_topic_node():
    cloud = Cloud()
    _casts_to_k1_and_calls_to_c1(cloud)
    cloud.timed_out("api", "build", times=4, topic="conductor")
    collector = cloud.collector()

    edge = _edge(collector.graph(), "api", "conductor")
    assert (edge["timeouts"], edge["failed"], edge["requests"]) == (4, 4, 4)
    assert _metrics(collector).value("traces_service_graph_request_failed_total",
                                     client="api", server="conductor") == 4


def _rpc_server(tmp_path, topic, service, server):
    log_path = tmp_path / f"{service}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(PEERS / "rpc_peer.py"), "--url", COMMLENS_URL,
             "--topic", topic, "--server", server],
            stdout=subprocess.PIPE, stderr=log, text=True,
            env=dict(os.environ, COMMLENS_SERVICE_NAME=service))
    peer = Peer(process, log_path)
    if process.stdout.readline().strip() != "READY":
        peer.stop()
        raise AssertionError(f"{service} did not start\n{peer.log()}")
    return peer


@pytest.mark.slow
def test_two_services_on_one_topic_each_get_the_edge_they_answered(
        collector, rabbitmq, rpc_client, topic, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    casts_only, answers = f"srv-k1-{suffix}", f"srv-c1-{suffix}"
    peers = [_rpc_server(tmp_path, topic, casts_only, "k1"),
             _rpc_server(tmp_path, topic, answers, "c1")]
    try:
        client = rpc_client(COMMLENS_URL, topic)
        for _ in range(20):
            client.prepare(server="k1").cast({}, "count_cast")
        for i in range(5):
            assert client.prepare(server="c1", timeout=30).call({}, "echo", value=i) == i
        assert wait_for(lambda: client.prepare(server="k1", timeout=30).call(
            {}, "casts_seen") == 20, message="k1 consumed the casts")

        def scraped():
            scrape = collector.metrics()
            received = scrape.value("commlens_rpc_received_total", service=casts_only,
                                    method="count_cast")
            waits = scrape.value("traces_service_graph_request_client_seconds_count",
                                 client="test-client", server=answers)
            return scrape if (received, waits) == (20, 5) else None

        scrape = wait_for(scraped, timeout=30, message="both servers' and the caller's series")
        # The casts_seen calls were answered by k1: its client edge has those.
        assert scrape.value("traces_service_graph_request_client_seconds_count",
                            client="test-client", server=casts_only) >= 1
        assert scrape.series("traces_service_graph_request_client_seconds_count",
                             server=topic) == []

        # The graph's call edge: its successful calls' latency is the caller's
        # wait for the replies of the service that answered.
        edges = {(e["client"], e["server"]): e
                 for e in collector.json("/api/graph?window=5m")["edges"]
                 if e["protocol"] == "rpc"}
        answered = edges[("test-client", answers)]
        assert answered["requests"] == 5 and answered["ok_p50_seconds"] is not None
        assert ("test-client", topic) not in edges
    finally:
        for peer in peers:
            peer.stop()
