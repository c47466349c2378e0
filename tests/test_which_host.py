"""Which host (issue 18 item 1): hops, chains and traces name the RPC server.

A call prepared with ``server=`` (oslo.messaging's ``Target.server``, as
nova calls one compute host) keeps it on its client hop; the server that
answered keeps its own on its server hop; a timeout's chain names the
server that did not answer, and the collector lists such servers. Hosts
never become metric labels.
"""

import hashlib
import time
import uuid

import oslo_messaging as om
import pytest

from commlens.exporters import chains
from commlens.exporters import collector as collector_mod
from commlens.exporters import silent
from commlens.tracer import wire
from support import COMMLENS_URL


def _request_id():
    return f"req-{uuid.uuid4()}"


@pytest.mark.slow
def test_a_call_to_a_server_nobody_serves_names_that_server(
        collector, start_peer, rpc_client, topic):
    # host-a serves the topic; nobody serves host-b.
    start_peer(COMMLENS_URL, topic, args=("--server", "host-a"))
    client = rpc_client(COMMLENS_URL, topic, server="host-b", timeout=1)
    request_id = _request_id()
    with pytest.raises(om.MessagingTimeout):
        client.call({"request_id": request_id}, "echo", value=1)

    trace = collector.trace(request_id)
    (call,) = [h for h in trace["hops"] if h["side"] == "client"]
    assert call["server"] == "host-b" and call["outcome"] == "timeout"
    (chain,) = trace["chains"]
    assert chain["origin"] == {"service": topic, "server": "host-b", "protocol": "rpc",
                               "operation": "echo", "error": "MessagingTimeout"}
    grouped = [c for c in collector.json("/api/chains?since=15m")["chains"]
               if c["key"] == chain["key"]]
    assert grouped and grouped[0]["origin"]["server"] == "host-b"

    # The list of servers that stopped answering counts it, in its own
    # endpoint and beside the graph.
    listed = [s for s in collector.json("/api/silent-servers?since=15m")["servers"]
              if s["target"] == topic]
    assert [(s["server"], s["timeouts"], s["callers"], s["operations"]) for s in listed] == [
        ("host-b", 1, ["test-client"], ["echo"])]
    assert listed[0]["first_seen"] <= listed[0]["last_seen"]
    beside_graph = collector.json("/api/graph?window=15m")["silent_servers"]
    assert any(s["target"] == topic and s["server"] == "host-b" for s in beside_graph)

    # Hosts are never labels: nothing on /metrics names it.
    _status, text = collector.get("/metrics")
    # (The service graph's ``server`` label is a service, as Tempo's is.)
    assert "host-b" not in text and "host-a" not in text and 'host="' not in text


@pytest.mark.slow
def test_a_call_answered_by_a_server_records_it_on_both_hops(
        collector, start_peer, rpc_client, topic):
    start_peer(COMMLENS_URL, topic, args=("--server", "host-a"))
    request_id = _request_id()
    assert rpc_client(COMMLENS_URL, topic, server="host-a").call(
        {"request_id": request_id}, "echo", value=2) == 2
    # A call to the whole topic: whichever server answers names itself.
    topic_request_id = _request_id()
    assert rpc_client(COMMLENS_URL, topic).call(
        {"request_id": topic_request_id}, "echo", value=3) == 3

    hops = {h["side"]: h for h in collector.trace(request_id)["hops"]}
    assert hops["client"]["server"] == "host-a"
    assert hops["server"]["server"] == "host-a" and hops["server"]["service"] == "peer-server"
    hops = {h["side"]: h for h in collector.trace(topic_request_id)["hops"]}
    assert hops["client"]["server"] is None
    assert hops["server"]["server"] == "host-a"
    # Answered: not a server that stopped answering.
    assert not [s for s in collector.json("/api/silent-servers")["servers"]
                if s["target"] == topic]


def test_the_graph_command_lists_servers_that_stopped_answering():
    # ``commlens graph`` renders /api/graph's answer: its silent servers too.
    from rich.console import Console

    from commlens.cli import incident
    console = Console(record=True, width=200)
    incident._Graph.show(console, {"window_seconds": 300, "edges": [], "silent_servers": [
        {"target": "compute", "server": "os-compute-1", "timeouts": 7, "first_seen": 1.0,
         "last_seen": 2.0, "callers": ["nova-conductor"],
         "operations": ["build_and_run_instance"]}]})
    text = console.export_text()
    assert "compute (os-compute-1)" in text and "build_and_run_instance" in text


def _hop(span, parent=None, *, service, side, target=None, operation="build_and_run_instance",
         outcome="ok", error=None, server=None, start=1000.0, duration=0.1):
    return {"trace_id": "a" * 32, "span_id": span, "parent_id": parent, "service": service,
            "side": side, "protocol": wire.RPC, "peer": None, "target": target,
            "operation": operation, "kind": "call", "outcome": outcome, "error": error,
            "start": start, "duration": duration, "request_id": None,
            "global_request_id": None, "server": server}


def test_a_timeout_chain_names_the_server_the_call_was_addressed_to():
    hops = [_hop("1" * 16, service="nova-conductor", side="client", target="compute",
                 outcome="timeout", error="MessagingTimeout", server="os-compute-1")]
    (chain,) = chains.derive(hops)
    assert chain["origin"]["service"] == "compute"
    assert chain["origin"]["server"] == "os-compute-1"
    # One chain per host that did not answer.
    other = [dict(hops[0], server="os-compute-2")]
    assert chains.derive(other)[0]["key"] != chain["key"]
    # Metric labels stay host-free.
    assert "os-compute-1" not in chains.metric_labels(chain)


def test_an_error_raised_by_a_server_names_the_server_that_raised_it():
    hops = [_hop("1" * 16, service="nova-conductor", side="client", target="compute",
                 outcome="remote_error", error="BuildAbortException"),
            _hop("2" * 16, "1" * 16, service="nova-compute", side="server", target="compute",
                 outcome="error", error="BuildAbortException", server="os-compute-3")]
    (chain,) = chains.derive(hops)
    assert chain["origin"]["service"] == "nova-compute"
    assert chain["origin"]["server"] == "os-compute-3"
    assert chain["hops"][0]["server"] == "os-compute-3"


def test_chains_without_a_server_keep_their_keys():
    hops = [_hop("1" * 16, service="nova-api", side="client", target="conductor",
                 outcome="timeout", error="MessagingTimeout")]
    (chain,) = chains.derive(hops)
    # The key as it was computed before servers were recorded.
    before = repr([False, "conductor", ("nova-api", "client", "rpc", "build_and_run_instance",
                                        "MessagingTimeout")])
    assert chain["key"] == hashlib.sha1(before.encode()).hexdigest()[:16]


def test_the_silent_servers_list_is_bounded_windowed_and_sorted():
    now = [100000.0]
    servers = silent.SilentServers(max_servers=3, retention_seconds=3600,
                                   clock=lambda: now[0])

    def timeout(server, at, topic="compute"):
        servers.add(_hop("1" * 16, service="nova-conductor", side="client", target=topic,
                         outcome="timeout", error="MessagingTimeout", server=server,
                         start=at - 60, duration=60))

    for _ in range(3):
        timeout("os-compute-1", now[0] - 10)
    timeout("os-compute-2", now[0] - 1200)   # outside a 15-minute window
    timeout("os-compute-2", now[0] - 5)
    # Not a timeout to a named server: not counted.
    servers.add(_hop("2" * 16, service="nova-api", side="client", target="conductor",
                     outcome="timeout", error="MessagingTimeout"))
    servers.add(_hop("3" * 16, service="nova-conductor", side="client", target="compute",
                     outcome="remote_error", error="X", server="os-compute-9"))
    rows = servers.top(since_seconds=900)
    assert [(r["server"], r["timeouts"]) for r in rows] == [("os-compute-1", 3),
                                                            ("os-compute-2", 1)]
    assert rows[0]["last_seen"] == now[0] - 10
    assert servers.top(since_seconds=3600)[0]["timeouts"] == 3
    assert [r["server"] for r in servers.top(since_seconds=3600, limit=1)] == ["os-compute-1"]

    # Bounded: the server seen longest ago goes first.
    timeout("os-compute-3", now[0])
    timeout("os-compute-4", now[0])
    assert {r["server"] for r in servers.top(since_seconds=3600)} == {
        "os-compute-2", "os-compute-3", "os-compute-4"}
    # Past the retention, forgotten.
    now[0] += 7200
    assert servers.top(since_seconds=10800) == []


def test_hops_from_agents_before_the_server_field_are_read():
    # A hop without ``server`` (an older agent's) is kept, its server None.
    hop = _hop("1" * 16, service="old", side="client", target="compute",
               outcome="timeout", error="MessagingTimeout", start=time.time())
    del hop["server"]
    clean = collector_mod._clean_hop(hop)
    assert clean is not None and clean["server"] is None and clean["service"] == "old"
