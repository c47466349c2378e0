"""The graph draws what is not instrumented (issue 17, item 5).

nova-api's calls to a glance and a neutron that run without commlens exist
only in nova-api's own series: the graph draws them from the caller's side
(as Kiali draws unknown destinations) and says the destination is not
instrumented. A caller without commlens is known only by the client product in
its User-Agent: an unknown caller of that user agent, not a service. Real
recorders make the snapshots a collector is fed.
"""

import json

from commlens.dashboards import graph_view
from commlens.exporters import collector as collector_mod
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod


def _collector(*recorders):
    collector = collector_mod.Collector()
    for recorder in recorders:
        assert collector.ingest(json.dumps(recorder.snapshot(1.0))) == "accepted"
    return collector


def _called(recorder, target, method, code, times, seconds=0.01):
    outcome = (metrics.FAILED if code == metrics.FAILED
               else metrics.ERROR if code.startswith("5") else metrics.OK)
    for _ in range(times):
        recorder.inc(metrics.HTTP_CLIENT_REQUESTS, (recorder.service, target, method, code))
        recorder.observe(metrics.HTTP_CLIENT_DURATION,
                         (recorder.service, target, method, outcome), seconds)
        if code == metrics.FAILED:  # as middleware/http_client.py does: nobody answered
            edge = (recorder.service, target, "")
            recorder.inc(metrics.SERVICE_GRAPH_REQUESTS, edge)
            recorder.inc(metrics.SERVICE_GRAPH_FAILED, edge)


def _served(recorder, caller, method, route, code, times, seconds=0.005):
    for _ in range(times):
        recorder.observe(metrics.HTTP_SERVER_HOPS,
                         (recorder.service, caller, method, route, code), seconds)


def _edge(graph, client, server):
    return next(e for e in graph["edges"] if (e["client"], e["server"]) == (client, server))


def _nodes(graph):
    return {node["service"]: node for node in graph["nodes"]}


def test_calls_to_an_uninstrumented_service_are_drawn_from_the_caller_s_side():
    api = recorder_mod.Recorder("nova-api")
    _called(api, "glance-api", "GET", "200", 5)
    _called(api, "glance-api", "GET", "503", 2)
    _called(api, "glance-api", "GET", metrics.FAILED, 1)
    collector = _collector(api)
    graph = collector.graph()
    edge = _edge(graph, "nova-api", "glance-api")
    assert (edge["protocol"], edge["requests"], edge["failed"], edge["measured_by"]) == (
        "http", 8, 3, "client")
    nodes = _nodes(graph)
    assert nodes["glance-api"]["instrumented"] is False
    assert nodes["glance-api"]["user_agent"] is None
    assert nodes["nova-api"]["instrumented"] is True
    # Its details: what the caller counted, by method.
    details = collector.edge_details("nova-api", "glance-api", "http")
    assert [(row["operation"], row["errors"]) for row in details["methods"]] == [("GET", 3)]


def test_an_instrumented_destination_is_counted_once_by_its_server():
    api, network = recorder_mod.Recorder("nova-api"), recorder_mod.Recorder("neutron-server")
    _called(api, "neutron-server", "GET", "200", 4)
    _served(network, "nova-api", "GET", "/v2.0/ports/{id}", "200", 4)
    graph = _collector(api, network).graph()
    edge = _edge(graph, "nova-api", "neutron-server")
    assert (edge["requests"], edge["measured_by"]) == (4, "server")
    assert _nodes(graph)["neutron-server"]["instrumented"] is True


def test_an_uninstrumented_caller_is_an_unknown_caller_of_its_user_agent():
    placement = recorder_mod.Recorder("placement-api")
    _served(placement, "keystoneauth1", "GET", "/placement/resource_providers", "200", 3)
    _served(placement, "unknown", "GET", "/placement", "200", 1)
    graph = _collector(placement).graph()
    nodes = _nodes(graph)
    assert (nodes["keystoneauth1"]["instrumented"], nodes["keystoneauth1"]["user_agent"]) == (
        False, "keystoneauth1")
    assert (nodes["unknown"]["instrumented"], nodes["unknown"]["user_agent"]) == (False, None)
    assert _edge(graph, "keystoneauth1", "placement-api")["requests"] == 3
    dot = graph_view.to_dot(graph["nodes"], graph["edges"])
    assert "unknown caller (keystoneauth1)" in dot
    node_lines = {line.split(" [")[0].strip(): line for line in dot.splitlines()
                  if " [id=\"node:" in line}
    assert "uninstrumented" in node_lines['"keystoneauth1"']
    assert "uninstrumented" in node_lines['"unknown"']
    assert "uninstrumented" not in node_lines['"placement-api"']
