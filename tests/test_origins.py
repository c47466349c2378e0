"""Origins stand out (issue 18 item 5): the graph marks where error chains
start, apart from the services that only pass errors on; a trace's chains
carry their own hops and the trace names its entry's request id."""

import shutil

import pytest

from commlens.dashboards import graph_view
from commlens.exporters import chains
from commlens.exporters import graph
from commlens.exporters import history as history_mod
from commlens.tracer import metrics


def _hop(span, parent=None, *, service, side, protocol="rpc", target=None, operation,
         error=None, outcome=None, request_id=None, trace="a", server=None, start=1000.0):
    return {"trace_id": trace * 32, "span_id": span, "parent_id": parent, "service": service,
            "side": side, "protocol": protocol, "peer": None, "target": target,
            "operation": operation, "kind": "call" if protocol == "rpc" else None,
            "outcome": outcome or ("ok" if error is None else "error"), "error": error,
            "start": start, "duration": 0.1, "request_id": request_id,
            "global_request_id": None, "server": server}


def _binding_failure(trace, request_id, start):
    """nova-api POST /servers 500 <- nova-conductor <- neutron-server 409."""
    return [
        _hop("1" * 16, service="nova-api", side="server", protocol="http",
             operation="POST /v2.1/servers", error="500", request_id=request_id,
             trace=trace, start=start),
        _hop("2" * 16, "1" * 16, service="nova-api", side="client", target="conductor",
             operation="build_instances", error="RemoteError", outcome="remote_error",
             request_id=request_id, trace=trace, start=start + 0.01),
        _hop("3" * 16, "2" * 16, service="nova-conductor", side="server", target="conductor",
             operation="build_instances", error="PortBindingFailed", request_id=request_id,
             trace=trace, start=start + 0.02),
        _hop("4" * 16, "3" * 16, service="neutron-server", side="server", protocol="http",
             operation="PUT /v2.0/ports/{id}", error="409", request_id=request_id,
             trace=trace, start=start + 0.03),
    ]


def test_a_traces_chains_carry_its_own_hops_and_it_names_its_entry_request():
    history = history_mod.History()
    first = _binding_failure("a", "req-first", 1000.0)
    second = _binding_failure("b", "req-second", 2000.0)
    # A hop of another request in the second trace (work handed over).
    second.append(_hop("5" * 16, "1" * 16, service="nova-api", side="client",
                       protocol="http", target="keystone", operation="GET",
                       request_id="req-other", trace="b", start=2000.05))
    history.save([("a" * 32, first, chains.derive(first))])
    history.save([("b" * 32, second, chains.derive(second))])
    trace = history.trace("b" * 32)
    assert trace["entry_request_id"] == "req-second"
    (chain,) = trace["chains"]
    assert {h["request_id"] for h in chain["hops"]} == {"req-second"}
    assert chain["hops"][0]["start"] == pytest.approx(2000.03)
    # The grouped view keeps the first example's shape.
    assert history.trace("a" * 32)["chains"][0]["hops"][0]["request_id"] == "req-first"


def _nodes(*specs):
    return [{"service": name, "rate_in": 1.0, "rate_out": 0.0, "failed_in": failed,
             "processes": 1, "error_ratio": failed, "instrumented": True, "user_agent": None}
            for name, failed in specs]


def _consumers(*received):
    counters = {(metrics.RPC_RECEIVED.name, (service, "nova-conductor", topic, "m", "call")): 1.0
                for service, topic in received}
    return graph.topic_consumers(counters)


def test_origins_are_marked_apart_from_services_that_pass_errors_on():
    nodes = _nodes(("nova-api", 0.2), ("nova-conductor", 0.2), ("neutron-server", 0.05),
                   ("nova-compute", 0.0), ("keystone", 0.0))
    groups = [
        {"origin": {"service": "neutron-server", "server": None, "error": "409"},
         "count": 12, "absorbed": False},
        {"origin": {"service": "neutron-server", "server": None, "error": "500"},
         "count": 3, "absorbed": True},
        # A compute host that did not answer: the topic, consumed by nova-compute.
        {"origin": {"service": "compute", "server": "compute-1", "error": "MessagingTimeout"},
         "count": 4, "absorbed": False},
        # A topic nobody consumes is a node of its own name; not in this graph.
        {"origin": {"service": "conductor-gone", "server": None, "error": "MessagingTimeout"},
         "count": 1, "absorbed": False},
    ]
    graph.mark_origins(nodes, groups, _consumers(("nova-compute", "compute")))
    by_name = {n["service"]: n for n in nodes}
    assert by_name["neutron-server"]["origin"] == {
        "chains": 15, "absorbed": 3, "errors": ["409", "500"], "servers": [], "topics": []}
    assert by_name["nova-compute"]["origin"] == {
        "chains": 4, "absorbed": 0, "errors": ["MessagingTimeout"], "servers": ["compute-1"],
        "topics": ["compute"]}
    assert by_name["nova-api"]["origin"] is None
    assert by_name["nova-api"]["passes_errors_on"] is True
    assert by_name["nova-conductor"]["passes_errors_on"] is True
    assert by_name["keystone"]["passes_errors_on"] is False
    # A topic nobody answered, drawn under its own name, is an origin too.
    topic_nodes = _nodes(("conductor", 0.0))
    graph.mark_origins(topic_nodes, [groups[3] | {"origin": dict(groups[3]["origin"],
                                                                 service="conductor")}],
                       _consumers())
    assert topic_nodes[0]["origin"]["chains"] == 1


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is installed by scripts/setup")
def test_the_picture_marks_the_origin_with_its_chain_count():
    nodes = _nodes(("nova-api", 0.2), ("neutron-server", 0.05))
    groups = [{"origin": {"service": "neutron-server", "server": None, "error": "409"},
               "count": 12, "absorbed": False}]
    graph.mark_origins(nodes, groups, _consumers())
    edges = [{"client": "nova-api", "server": "neutron-server", "protocol": "http",
              "rate": 1.0, "error_ratio": 0.05, "requests": 300, "failed": 15}]
    svg = graph_view.render_svg(graph_view.to_dot(nodes, edges))
    assert '<g id="node:neutron&#45;server" class="node failing origin"' in svg
    assert '<g id="node:nova&#45;api" class="node failing passes&#45;on"' in svg
    assert "origin of 12 chains" in svg
    assert "passes errors on" in svg
