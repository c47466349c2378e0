"""Error chains across real processes: api (REST) -> conductor (RPC) -> network (REST).

Every process is a real service on loopback over the real broker; they ship
to the session's collector, which assembles traces and derives chains.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import uuid

import pytest
import requests

from support import (COMMLENS_URL, EXPORT_URL, PEERS, Peer, collector_ready, run_collector,
                     wait_for)

pytestmark = pytest.mark.slow


def _start(tmp_path, role, *extra, service=None, env=None):
    log_path = tmp_path / f"{role}.log"
    environment = dict(os.environ, **(env or {}))
    if service:
        environment["COMMLENS_SERVICE_NAME"] = service
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(PEERS / "chain_services.py"), "--role", role, *extra],
            stdout=subprocess.PIPE, stderr=log, text=True, env=environment)
    peer = Peer(process, log_path)
    words = process.stdout.readline().split()
    if not words or words[0] != "READY":
        peer.stop()
        raise AssertionError(f"{role} did not start\n{peer.log()}")
    return peer, (f"http://127.0.0.1:{words[1]}" if len(words) > 1 else None)


def _scenario(tmp_path, executor="threading", sample_ratio="0"):
    """(api URL, peers): three services shipping only error and absorbing hops
    unless ``sample_ratio`` says otherwise."""
    topic = "conductor-" + uuid.uuid4().hex[:8]
    env = {"COMMLENS_HOP_SAMPLE_RATIO": sample_ratio}
    network, network_url = _start(tmp_path, "network", env=env)
    conductor, _ = _start(tmp_path, "conductor", "--url", COMMLENS_URL, "--topic", topic,
                          "--network", network_url, "--executor", executor,
                          service="nova-conductor",
                          env=dict(env, COMMLENS_HTTP_ENDPOINTS=f"neutron-server={network_url}"))
    api, api_url = _start(tmp_path, "api", "--url", COMMLENS_URL, "--topic", topic,
                          service="nova-api", env=env)
    return api_url, topic, [api, conductor, network]


@pytest.fixture(scope="module")
def scenario(rabbitmq, collector, tmp_path_factory):
    api_url, topic, peers = _scenario(tmp_path_factory.mktemp("chains"))
    yield api_url, topic
    for peer in peers:
        peer.stop()


def method_of(path, paths):
    return next(method for method, p, _ in paths if p == path)


def _request_id(response):
    request_id = response.headers["X-OpenStack-Request-ID"]
    assert request_id.startswith("req-")
    return request_id


def _steps(chain):
    return [(h["service"], h["side"], h["protocol"], h["error"]) for h in chain["hops"]]


def test_chain_names_the_network_service_as_origin_and_the_request_id_finds_it(
        collector, scenario):
    api_url, _topic = scenario
    response = requests.post(f"{api_url}/v2.1/servers/{uuid.uuid4()}", timeout=15)
    assert response.status_code == 500
    trace = collector.trace(_request_id(response))

    (chain,) = trace["chains"]
    assert chain["origin"] == {"service": "neutron-server", "server": None, "protocol": "http",
                               "operation": "PUT /v2.0/ports/{id}/binding",
                               "error": "409 PortBindingFailed"}
    assert chain["entry"]["service"] == "nova-api"
    # Flask turns the exception into its own 500: no exception reaches
    # commlens; its page's title names it (middleware/faults.py).
    assert chain["entry"]["error"] == "500 InternalServerError"
    assert chain["absorbed"] is False
    assert _steps(chain) == [
        ("neutron-server", "server", "http", "409 PortBindingFailed"),
        # The caller's hop names what the fault body it received names.
        ("nova-conductor", "client", "http", "409 PortBindingFailed"),
        ("nova-conductor", "server", "rpc", "PortBindingFailed"),
        # The caller got PortBindingFailed_Remote: labelled by the remote
        # class, with outcome remote_error.
        ("nova-api", "client", "rpc", "PortBindingFailed"),
        ("nova-api", "server", "http", "500 InternalServerError"),
    ]
    api_call = next(h for h in trace["hops"] if h["service"] == "nova-api"
                    and h["side"] == "client")
    assert api_call["outcome"] == "remote_error" and api_call["operation"] == "build_instances"
    # Every hop of the trace, with timing, in order of start.
    assert [h["service"] for h in trace["hops"]][0] == "nova-api"
    assert all(h["duration"] is not None for h in trace["hops"])
    # The trace id finds the same trace.
    assert collector.trace(trace["trace_id"])["hops"] == trace["hops"]

    chains = collector.json("/api/chains?since=15m")["chains"]
    group = next(c for c in chains if c["key"] == chain["key"])
    assert group["count"] >= 1 and group["first_seen"] <= group["last_seen"]
    assert any(e["trace_id"] == trace["trace_id"] for e in group["examples"])
    assert collector.metrics().value(
        "commlens_error_chain_total", origin_service="neutron-server",
        origin_operation="PUT /v2.0/ports/{id}/binding",
        origin_error="409 PortBindingFailed", entry_service="nova-api",
        entry_operation="POST /v2.1/servers/{id}") >= 1


def test_a_call_that_times_out_has_the_unanswering_conductor_as_origin(collector, scenario):
    api_url, topic = scenario
    response = requests.get(f"{api_url}/v2.1/servers/{uuid.uuid4()}/console", timeout=15)
    assert response.status_code == 500
    trace = collector.trace(_request_id(response))

    (chain,) = trace["chains"]
    # The conductor is still busy (it will never answer in time): the callee
    # is the origin, named by the topic the caller waited on.
    assert chain["origin"] == {"service": topic, "server": None, "protocol": "rpc",
                               "operation": "hang", "error": "MessagingTimeout"}
    assert _steps(chain) == [
        ("nova-api", "client", "rpc", "MessagingTimeout"),
        ("nova-api", "server", "http", "500 InternalServerError"),
    ]


def test_a_caller_that_retries_and_succeeds_is_an_absorbed_chain(collector, scenario):
    api_url, _topic = scenario
    response = requests.post(f"{api_url}/v2.1/servers/{uuid.uuid4()}/action", timeout=15)
    assert response.status_code == 200
    trace = collector.trace(_request_id(response))

    (chain,) = trace["chains"]
    assert chain["absorbed"] is True
    assert chain["origin"]["service"] == "neutron-server"
    assert chain["entry"] == {"service": "nova-conductor", "protocol": "rpc",
                              "operation": "reserve", "error": None}
    assert _steps(chain) == [
        ("neutron-server", "server", "http", "409 PortBindingFailed"),
        # The caller's hop names what the fault body it received names.
        ("nova-conductor", "client", "http", "409 PortBindingFailed"),
        ("nova-conductor", "server", "rpc", None),
    ]
    # Not an error at the entry: the api's own hop succeeded and was not kept.
    assert all(h["service"] != "nova-api" or h["error"] is None for h in trace["hops"])
    absorbed = collector.json("/api/chains?since=15m&absorbed=true")["chains"]
    assert chain["key"] in [c["key"] for c in absorbed]
    assert collector.metrics().value(
        "commlens_error_chain_absorbed_total", origin_service="neutron-server",
        entry_service="nova-conductor", entry_operation="reserve") >= 1


@pytest.mark.parametrize("executor", ["threading", "eventlet"])
def test_concurrent_traces_in_one_process_never_mix_hops(collector, rabbitmq, tmp_path,
                                                         executor):
    api_url, _topic, peers = _scenario(tmp_path, executor=executor, sample_ratio="1")
    try:
        paths = [item for _ in range(6) for item in (
            ("post", f"/v2.1/servers/{uuid.uuid4()}", 500),
            ("post", f"/v2.1/servers/{uuid.uuid4()}/action", 200),
            ("get", f"/v2.1/servers/{uuid.uuid4()}", 200))]

        def send(item):
            method, path, status = item
            response = getattr(requests, method)(api_url + path, timeout=30)
            assert response.status_code == status, response.text
            return path, _request_id(response)

        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            sent = list(pool.map(send, paths))
        for path, request_id in sent:
            trace = collector.trace(request_id)
            hops = trace["hops"]
            by_span = {h["span_id"]: h for h in hops}
            (root,) = [h for h in hops if h["parent_id"] not in by_span]
            assert root["service"] == "nova-api" and root["request_id"] == request_id
            # Exactly this request's own calls, and nobody else's: one RPC
            # call (both ends carry this request id) and the REST calls it made.
            rpc = [h for h in hops if h["protocol"] == "rpc"]
            assert len(rpc) == 2 and {h["request_id"] for h in rpc} == {request_id}
            network_calls = len([h for h in hops if h["service"] == "neutron-server"])
            expected = 2 if path.endswith("/action") else (1 if method_of(path, paths) ==
                                                              "post" else 0)
            assert network_calls == expected
    finally:
        for peer in peers:
            peer.stop()


def _edge(graph, client, server, protocol):
    return next((e for e in graph["edges"] if (e["client"], e["server"], e["protocol"])
                 == (client, server, protocol)), None)


@pytest.fixture(scope="module")
def watching_collector(rabbitmq, tmp_path_factory):
    """A second collector on its own queue (it sees everything too), watching
    the broker's queues through the management API."""
    with run_collector(EXPORT_URL + "&queue=commlens.watching-" + uuid.uuid4().hex[:6],
                       tmp_path_factory.mktemp("watching"),
                       ["--rabbitmq-management-url",
                        "http://guest:guest@127.0.0.1:15672/"]) as process:
        wait_for(lambda: collector_ready(process), timeout=30, message="collector ready")
        yield process


def test_graph_and_tempo_service_graph_metrics_show_both_kinds_of_edge(
        collector, watching_collector, scenario):
    api_url, topic = scenario
    # The services ran before this collector: what they had done when it first
    # heard from them is carried in and left out of its rates (docs/architecture.md, "A
    # collector restart is not a burst of traffic"); the requests below come after.
    wait_for(lambda: {"nova-api", "nova-conductor", "neutron-server"} <= {
        p["service"] for p in watching_collector.json("/api/processes")["processes"]} or None,
        timeout=30, message="the second collector hears from every service")
    for _ in range(3):
        assert requests.get(f"{api_url}/v2.1/servers/{uuid.uuid4()}", timeout=15).ok
    assert requests.post(f"{api_url}/v2.1/servers/{uuid.uuid4()}", timeout=15).status_code \
        == 500
    assert requests.get(f"{api_url}/v2.1/servers/{uuid.uuid4()}/console",
                        timeout=15).status_code == 500

    def graph_ready():
        graph = watching_collector.json("/api/graph?window=5m")
        rpc = _edge(graph, "nova-api", "nova-conductor", "rpc")
        rest = _edge(graph, "nova-conductor", "neutron-server", "http")
        if rpc and rest and rpc["failed"] >= 2 and rpc["timeouts"] >= 1 and rpc.get("queues"):
            return graph, rpc, rest
        return None

    graph, rpc, rest = wait_for(graph_ready, timeout=30, message="graph edges")
    assert rpc["rate"] > 0 and 0 < rpc["error_ratio"] < 1
    assert rpc["p50_seconds"] is not None and rpc["p99_seconds"] >= rpc["p50_seconds"]
    assert rpc["waiting_replies"] >= 0
    # The broker's side of the edge: the conductor's topic queue, consumed.
    assert rpc["queues"][topic]["consumers"] == 1
    assert rest["error_ratio"] == 0  # a 409 is the server refusing, not failing
    services = {n["service"] for n in graph["nodes"]}
    assert {"nova-api", "nova-conductor", "neutron-server"} <= services

    metrics = watching_collector.metrics()
    rpc_labels = {"client": "nova-api", "server": "nova-conductor",
                  "connection_type": "messaging_system"}
    assert metrics.value("traces_service_graph_request_total", **rpc_labels) >= 5
    assert metrics.value("traces_service_graph_request_failed_total", **rpc_labels) >= 2
    assert metrics.value("traces_service_graph_request_server_seconds_count",
                         **rpc_labels) >= 3
    # Client side: the caller named the topic; the collector names its consumer.
    assert metrics.value("traces_service_graph_request_client_seconds_count",
                         **rpc_labels) >= 5
    assert metrics.value("traces_service_graph_request_total", client="nova-conductor",
                         server="neutron-server", connection_type="") >= 1
    assert metrics.value("commlens_broker_queue_consumers", queue=topic) == 1
    assert metrics.value("commlens_broker_management_up") == 1


def _edge_rows(table, edges):
    """The table's rows naming an edge's caller and callee, whole, in order."""
    rows = []
    for line in table.splitlines():
        # A service where chains start is marked after its name: "[origin of N chains]".
        cells = [c.split(" [origin of ")[0].strip() for c in line.split("│")]
        for edge in edges:
            if cells[1:3] == [edge["client"], edge["server"]]:
                rows.append((edge["client"], edge["server"]))
    return rows


def test_piped_graph_shows_whole_names_sorted_and_cut_to_the_top(collector, scenario):
    """`commlens graph | grep -c nova-conductor` counts every edge of it: a pipe
    gets the whole width, not rich's 80 columns; --sort and --top order and cut."""
    api_url, _topic = scenario
    requests.post(f"{api_url}/v2.1/servers/{uuid.uuid4()}", timeout=15)

    def commlens(*args):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        done = subprocess.run([sys.executable, "-m", "commlens.cli.main", "graph",
                               "--window", "15m", *args, "--collector", collector.base_url],
                              capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def edges_of_conductor():
        edges = json.loads(commlens("--json"))["edges"]
        return edges if any("nova-conductor" in (e["client"], e["server"])
                            for e in edges) else None

    wait_for(edges_of_conductor, timeout=30, message="edges of nova-conductor")
    keys = [None]

    def settled():
        # The same edges twice in a row: what follows compares several calls.
        edges = json.loads(commlens("--json"))["edges"]
        now = sorted((e["client"], e["server"], e["protocol"]) for e in edges)
        settled_edges = edges if now == keys[0] else None
        keys[0] = now
        return settled_edges

    edges = wait_for(settled, timeout=30, message="the graph's edges settle")
    table = commlens()
    assert max(len(line) for line in table.splitlines()) > 80
    conductor = [e for e in edges if "nova-conductor" in (e["client"], e["server"])]
    assert len(_edge_rows(table, conductor)) == len(conductor)
    assert len(_edge_rows(table, edges)) == len(edges)

    by_rate = json.loads(commlens("--sort", "rate", "--json"))["edges"]
    assert [e["rate"] for e in by_rate] == sorted((e["rate"] for e in by_rate), reverse=True)
    by_callee = json.loads(commlens("--sort", "callee", "--json"))["edges"]
    assert [e["server"] for e in by_callee] == sorted(e["server"] for e in by_callee)
    top = json.loads(commlens("--sort", "callee", "--top", "1", "--json"))
    first = (by_callee[0]["client"], by_callee[0]["server"])
    assert [(e["client"], e["server"]) for e in top["edges"]] == [first]
    assert top["edges_total"] == len(by_callee) == len(edges)
    table = commlens("--sort", "callee", "--top", "1")
    assert _edge_rows(table, by_callee) == [first]
    assert f"top 1 of {len(by_callee)} edges" in table


def test_incident_commands_print_tables_and_json(collector, scenario):
    api_url, _topic = scenario
    response = requests.post(f"{api_url}/v2.1/servers/{uuid.uuid4()}", timeout=15)
    request_id = _request_id(response)
    collector.trace(request_id)

    def commlens(*args, columns="200"):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        if columns:
            env["COLUMNS"] = columns
        done = subprocess.run([sys.executable, "-m", "commlens.cli.main", *args,
                               "--collector", collector.base_url],
                              capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = commlens("trace", request_id)
    assert "neutron-server" in table and "409 PortBindingFailed" in table
    assert json.loads(commlens("trace", request_id, "--json"))["hops"]
    chains = commlens("chains", "--since", "15m")
    assert "neutron-server" in chains and request_id in chains
    assert json.loads(commlens("chains", "--since", "15m", "--json"))["chains"]
    graph = commlens("graph", "--window", "15m")
    assert "nova-conductor" in graph
    assert json.loads(commlens("graph", "--json"))["edges"]

    missing = subprocess.run([sys.executable, "-m", "commlens.cli.main", "trace",
                              "req-does-not-exist", "--collector", collector.base_url],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no trace or request id" in missing.stderr
    down = subprocess.run([sys.executable, "-m", "commlens.cli.main", "graph",
                           "--collector", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "cannot reach the collector" in down.stderr
    bad = subprocess.run([sys.executable, "-m", "commlens.cli.main", "chains", "--since",
                          "yesterday", "--collector", collector.base_url],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "not a duration" in bad.stderr
