"""The dashboard's graph: filter expressions, health tolerances, focus and the
Graphviz picture (Debian's real dot), without a browser."""

import random
import re
import xml.etree.ElementTree as ET

import pytest

from commlens.dashboards import filters
from commlens.dashboards import formatting
from commlens.dashboards import graph_view
from commlens.dashboards import health


def _edge(client, server, protocol="rpc", rate=1.0, error_ratio=0.0, waiting=0.0,
          timeouts=0.0, p99=0.05):
    edge = {"client": client, "server": server, "protocol": protocol, "rate": rate,
            "error_ratio": error_ratio, "requests": rate * 60, "failed": rate * 60 * error_ratio,
            "p50_seconds": p99 / 2, "p99_seconds": p99, "ok_p50_seconds": p99 / 2,
            "ok_p99_seconds": p99}
    if protocol == "rpc":
        edge.update(waiting_replies=waiting, timeouts=timeouts)
    return edge


def _graph(edges):
    nodes = {}
    for e in edges:
        for name in (e["client"], e["server"]):
            nodes.setdefault(name, {"service": name, "rate_in": 0.0, "rate_out": 0.0,
                                    "failed_in": 0.0, "processes": 1})
        nodes[e["client"]]["rate_out"] += e["rate"]
        nodes[e["server"]]["rate_in"] += e["rate"]
        nodes[e["server"]]["failed_in"] += e["rate"] * e["error_ratio"]
    for node in nodes.values():
        node["error_ratio"] = node["failed_in"] / node["rate_in"] if node["rate_in"] else 0.0
    return {"window_seconds": 60, "nodes": list(nodes.values()), "edges": edges}


CONTROL_PLANE = _graph([
    _edge("nova-api", "keystone", "http", rate=20),
    _edge("nova-api", "nova-conductor", rate=12, error_ratio=0.08, waiting=4),
    _edge("nova-conductor", "nova-scheduler", rate=3),
    _edge("nova-conductor", "nova-compute", rate=3, timeouts=2),
    _edge("nova-compute", "neutron-server", "http", rate=6, error_ratio=0.02),
    _edge("neutron-server", "keystone", "http", rate=5),
    _edge("neutron-openvswitch-agent", "neutron-server", rate=0.05),
])


@pytest.mark.parametrize("expression, nodes", [
    ("rate > 10", {"keystone", "nova-conductor"}),
    ("err% > 5", {"nova-conductor"}),
    ("waiting > 0", {"nova-conductor"}),
    ("timeouts >= 2", {"nova-compute"}),
    ("service = nova-conductor", {"nova-conductor"}),
    ("service = nova-*", {"nova-api", "nova-conductor", "nova-scheduler", "nova-compute"}),
    ("service != nova-* and rate > 5", {"keystone", "neutron-server"}),
    ("err% > 5 or service = keystone", {"nova-conductor", "keystone"}),
    ("protocol = http and rate < 1", {"nova-api"}),
])
def test_find_marks_the_nodes_an_expression_matches(expression, nodes):
    _nodes, _edges, found = graph_view.select(CONTROL_PLANE, find=expression)
    assert {f[5:] for f in found if f.startswith("node:")} == nodes


def test_find_marks_edges_too():
    _nodes, _edges, found = graph_view.select(CONTROL_PLANE, find="err% > 5")
    assert "edge:nova-api->nova-conductor:rpc" in found
    _nodes, _edges, found = graph_view.select(CONTROL_PLANE, find="p99 > 40")
    assert len([f for f in found if f.startswith("edge:")]) == len(CONTROL_PLANE["edges"])


@pytest.mark.parametrize("expression, message", [
    ("rate >", "expected FIELD OP VALUE"),
    ("speed > 3", "unknown field 'speed'"),
    ("rate > fast", "rate takes a number"),
    ("service > nova", "service takes = or != only"),
    ("x" * 600, "longer than 500"),
])
def test_bad_expressions_say_what_is_wrong(expression, message):
    with pytest.raises(filters.FilterError, match=re.escape(message)):
        filters.parse(expression)


def test_hide_removes_matches_and_their_edges():
    nodes, edges, _found = graph_view.select(CONTROL_PLANE, hide="service = keystone")
    assert "keystone" not in {n["service"] for n in nodes}
    assert all("keystone" not in (e["client"], e["server"]) for e in edges)
    nodes, edges, _found = graph_view.select(CONTROL_PLANE, hide="rate < 0.1")
    assert ("neutron-openvswitch-agent", "neutron-server") not in {
        (e["client"], e["server"]) for e in edges}


def test_focus_keeps_neighbours_to_the_chosen_depth():
    def names(depth):
        nodes, edges, _ = graph_view.select(CONTROL_PLANE, focus="nova-conductor", depth=depth)
        assert all(e["client"] in {n["service"] for n in nodes} for e in edges)
        return {n["service"] for n in nodes}

    assert names(0) == {"nova-conductor"}
    assert names(1) == {"nova-conductor", "nova-api", "nova-scheduler", "nova-compute"}
    assert names(2) == names(1) | {"keystone", "neutron-server"}
    assert names(3) == {n["service"] for n in CONTROL_PLANE["nodes"]}
    with pytest.raises(graph_view.UnknownService):
        graph_view.select(CONTROL_PLANE, focus="glance-api")


def test_health_uses_the_tolerances():
    tolerances = health.Tolerances(degraded=0.01, failing=0.05)
    assert tolerances.classify(0.0, 3.0) == health.HEALTHY
    assert tolerances.classify(0.02, 3.0) == health.DEGRADED
    assert tolerances.classify(0.05, 3.0) == health.FAILING
    assert tolerances.classify(0.0, 0.0) == health.IDLE
    assert tolerances.classify(0.0, 0.0, waiting=3) == health.DEGRADED
    strict = health.Tolerances(degraded=0.001, failing=0.01)
    assert strict.classify(0.02, 3.0) == health.FAILING
    with pytest.raises(ValueError, match="degraded"):
        health.Tolerances(degraded=0.5, failing=0.1)


def _svg(graph, **select):
    nodes, edges, found = graph_view.select(graph, **select)
    svg = graph_view.render_svg(graph_view.to_dot(nodes, edges, found),
                                graph_view.layout_engine(edges))
    return ET.fromstring(svg)


SVG = "{http://www.w3.org/2000/svg}"


def _groups(root, kind):
    return {g.get("id"): g.get("class").split() for g in root.iter(SVG + "g")
            if g.get("class", "").split()[:1] == [kind]}


def test_svg_draws_rpc_and_rest_differently_with_health_and_badges():
    root = _svg(CONTROL_PLANE, find="service = nova-conductor")
    nodes, edges = _groups(root, "node"), _groups(root, "edge")
    assert set(nodes) == {"node:" + n["service"] for n in CONTROL_PLANE["nodes"]}
    assert "failing" in nodes["node:nova-conductor"] and "found" in nodes["node:nova-conductor"]
    assert "degraded" in edges["edge:nova-compute->neutron-server:http"]
    assert "http" in edges["edge:nova-api->keystone:http"]
    assert "rpc" in edges["edge:nova-api->nova-conductor:rpc"]
    text = ET.tostring(root, encoding="unicode")
    assert "4 waiting" in text and "2 timeouts" in text
    dashed = [g for g in root.iter(SVG + "g") if g.get("id") == "edge:nova-api->keystone:http"]
    assert 'stroke-dasharray' in ET.tostring(dashed[0], encoding="unicode")


def test_thirty_services_and_a_hundred_edges_stay_readable():
    """No two service boxes overlap, every service and edge is drawn, and the
    picture stays within a scrollable size at its natural (readable) scale."""
    rng = random.Random(7)
    # A region: API services, control services and agents; calls go down a
    # tier or along it, and a third of them back up (agents reporting in).
    tiers = [[f"api-{i}" for i in range(6)], [f"control-{i}" for i in range(8)],
             [f"agent-{i:02d}" for i in range(16)]]
    pairs = set()
    while len(pairs) < 100:
        tier = rng.randrange(2)
        callee_tier = rng.choice([tier, tier + 1]) if tier == 0 else tier + 1
        client, server = rng.choice(tiers[tier]), rng.choice(tiers[callee_tier])
        if client != server:
            pairs.add((server, client) if rng.random() < 0.3 else (client, server))
    graph = _graph([_edge(c, s, rng.choice(["rpc", "http"]), rate=rng.uniform(0.1, 200),
                          error_ratio=rng.choice([0, 0, 0.02, 0.2])) for c, s in sorted(pairs)])
    root = _svg(graph)
    assert len(_groups(root, "node")) == 30 and len(_groups(root, "edge")) == 100
    boxes = []
    for group in root.iter(SVG + "g"):
        if group.get("class", "").startswith("node"):
            path = next(group.iter(SVG + "path"))
            numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", path.get("d"))]
            xs, ys = numbers[0::2], numbers[1::2]
            boxes.append((min(xs), min(ys), max(xs), max(ys)))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    width, height = (float(root.get(k).removesuffix("pt")) for k in ("width", "height"))
    assert width < 2500 and height < 2500, (width, height)


def test_service_names_cannot_break_the_picture():
    graph = _graph([_edge('evil"]; a -> b [label="x', "<script>alert(1)</script>", "http")])
    root = _svg(graph)
    assert {"node:<script>alert(1)</script>", 'node:evil"]; a -> b [label="x'} == set(
        _groups(root, "node"))
    assert not list(root.iter(SVG + "script"))


def test_methods_tables_count_per_method_and_time_only_successes():
    from commlens.exporters import graph
    from commlens.tracer import metrics

    buckets = len(metrics.LATENCY_BUCKETS) + 1

    def histogram(bucket, count):
        counts = [0] * buckets
        counts[bucket] = count
        return [counts, 0.0, None, None]  # extremes not known: no clamping

    ok_fast, slow_failures = 2, 12  # bucket indexes: <= 5 ms, <= 60 s
    counters = {
        (metrics.RPC_RECEIVED.name, ("nova-conductor", "nova-api", "conductor",
                                     "build_instances", "call")): 100.0,
        (metrics.RPC_SENT.name, ("nova-api", "conductor", "build_instances", "call")): 100.0,
        (metrics.RPC_CALL_ERRORS.name, ("nova-api", "conductor", "build_instances",
                                        "timeout", "MessagingTimeout")): 10.0,
        (metrics.HTTP_REQUESTS.name, ("neutron-server", "nova-compute", "PUT",
                                      "/v2.0/ports/{id}", "200")): 45.0,
        (metrics.HTTP_REQUESTS.name, ("neutron-server", "nova-compute", "PUT",
                                      "/v2.0/ports/{id}", "500")): 5.0,
    }
    histograms = {
        (metrics.RPC_REPLY_WAIT.name, ("nova-api", "conductor", "build_instances", "ok")):
            histogram(ok_fast, 90),
        (metrics.RPC_REPLY_WAIT.name, ("nova-api", "conductor", "build_instances",
                                       "timeout")): histogram(slow_failures, 10),
        (metrics.HTTP_DURATION.name, ("neutron-server", "PUT", "/v2.0/ports/{id}", "ok")):
            histogram(ok_fast, 45),
    }
    gauges = {(metrics.RPC_WAITING_REPLIES.name, ("nova-api", "conductor",
                                                  "build_instances")): 3.0}
    consumers = graph.topic_consumers(counters)
    totals = graph.method_totals(counters, histograms, gauges, consumers)

    [rpc] = graph.method_rows(totals[("nova-api", "nova-conductor", "rpc")], {}, 10.0)
    assert rpc["operation"] == "conductor.build_instances"
    assert (rpc["rate"], rpc["errors"], rpc["timeouts"], rpc["waiting_replies"]) == \
        (10.0, 10.0, 10.0, 3.0)
    assert rpc["p99_seconds"] <= metrics.LATENCY_BUCKETS[ok_fast]  # timeouts left out
    [rest] = graph.method_rows(totals[("nova-compute", "neutron-server", "http")], {}, 10.0)
    assert rest["operation"] == "PUT /v2.0/ports/{id}"
    assert (rest["rate"], rest["errors"], rest["error_ratio"]) == (5.0, 5.0, 0.1)
    assert rest["p50_seconds"] <= metrics.LATENCY_BUCKETS[ok_fast]

    edges = [{"client": "nova-api", "server": "nova-conductor", "protocol": "rpc"}]
    graph.add_ok_latency(edges, totals, {})
    assert edges[0]["ok_p99_seconds"] <= metrics.LATENCY_BUCKETS[ok_fast]
    # Against a baseline equal to now, nothing happened in the window.
    [idle] = graph.method_rows(totals[("nova-api", "nova-conductor", "rpc")],
                               totals[("nova-api", "nova-conductor", "rpc")], 10.0)
    assert idle["rate"] == 0 and idle["p50_seconds"] is None and idle["waiting_replies"] == 3


# -- numbers as people read them (issue 17: "1e+02% err") ---------------------

@pytest.mark.parametrize("value, text", [
    (0, "0"), (100, "100"), (99.96, "100"), (999.7, "1000"), (1000, "1,000"),
    (1234567.8, "1,234,568"), (1234.5, "1,235"), (-2500.5, "-2,501"), (45.678, "45.7"),
    (1.5, "1.5"), (12.0, "12"), (0.05, "0.05"),
    (0.0123456, "0.0123"), (0.0001, "<0.001"),
])
def test_numbers_have_three_significant_digits_and_no_exponent(value, text):
    assert formatting.number(value) == text


def test_a_fully_failing_edge_reads_100_percent_everywhere():
    graph = _graph([_edge("nova-api", "nova-conductor", rate=1234.5, error_ratio=1.0,
                          p99=60.07)])
    graph["edges"][0].update(ok_p50_estimated=True, ok_p99_estimated=False)
    dot = graph_view.to_dot(graph["nodes"], graph["edges"])
    assert "100% err" in dot and "1,235/s" in dot
    assert "p99 60.1 s" in dot and "p50 ~30 s" in dot
    assert not re.search(r"\de[+-]\d", dot), dot


def test_the_cli_graph_reads_100_percent_and_marks_estimates():
    from rich.console import Console

    from commlens.cli import incident

    edge = _edge("nova-api", "nova-conductor", rate=1234.5, error_ratio=1.0, p99=0.375)
    edge.update(p50_estimated=True, p99_estimated=False)
    console = Console(record=True, width=200)
    incident._Graph.show(console, {"window_seconds": 300, "edges": [edge]})
    text = console.export_text()
    assert "│   100 │" in text and "│ 1,235 │" in text
    assert "~188 ms" in text and "375 ms" in text
    assert not re.search(r"\de[+-]\d", text), text
