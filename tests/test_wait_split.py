"""Where the wait goes (issue 18 item 2), against real RabbitMQ and oslo.messaging.

A caller's reply wait = queued in the broker and in transit + waiting for a
free worker of the server's executor pool + processing
(exporters/wait_split.py). The server measures the last two; the first is
the rest. The bound the parts are held to here: the server's two parts
never exceed the caller's wait by more than ``CLOCKS`` (the server's
interval lies inside the caller's; each is measured on its own monotonic
clock, so only their rates can differ), so the three add up to the wait
within it, and each part is where the cause was put: a sleeping handler in
processing, a pool of one in pool wait, a consumer started late in queue
and transit.
"""

import threading
import time
import uuid

import pytest

from commlens.exporters import collector as collector_mod
from commlens.exporters import wait_split
from commlens.tracer import metrics
from commlens.tracer import wire
from support import COMMLENS_URL, wait_for

CLOCKS = 0.001  # seconds the server's parts may exceed the caller's wait by


def _request_id():
    return f"req-{uuid.uuid4()}"


def _service():
    return f"peer-{uuid.uuid4().hex[:8]}"


def _split(collector, request_id):
    """The one call's split in its trace, checked to add up to the wait."""
    trace = collector.trace(request_id)
    (split,) = trace["wait_splits"]
    raw = split["wait"] - split["pool_wait"] - split["processing"]
    assert raw >= -CLOCKS, split
    assert split["queue_transit"] == pytest.approx(max(0.0, raw), abs=1e-9)
    (server_hop,) = [h for h in trace["hops"] if h["side"] == "server"]
    assert server_hop["pool_wait"] == split["pool_wait"]
    return split


def _edge(collector, client, server):
    edges = collector.json("/api/graph?window=15m")["edges"]
    return next((e for e in edges if (e["client"], e["server"], e["protocol"])
                 == (client, server, "rpc")), None)


@pytest.mark.slow
def test_a_sleeping_handler_shows_up_as_processing(collector, start_peer, rpc_client, topic):
    service = _service()
    start_peer(COMMLENS_URL, topic, service=service)
    client = rpc_client(COMMLENS_URL, topic)
    request_ids = [_request_id() for _ in range(3)]
    for request_id in request_ids:
        assert client.call({"request_id": request_id}, "slow", seconds=0.3) == 0.3
    for request_id in request_ids:
        split = _split(collector, request_id)
        assert split["processing"] >= 0.3
        assert split["pool_wait"] < 0.1 and split["queue_transit"] < 0.25
        assert split["dominant"] == wait_split.PROCESSING
        assert (split["caller"], split["service"], split["operation"]) == (
            "test-client", service, "slow")

    # Per edge: the same split from the histograms, with its ranges.
    def edge_split():
        edge = _edge(collector, "test-client", service)
        found = edge and edge.get("wait_split")
        return found if found and found["calls"] >= 3 else None
    found = wait_for(edge_split, message="the edge's wait split")
    p50 = found["p50"]
    assert 0.3 <= p50["processing"] <= 0.5
    assert p50["pool_wait"] < 0.1
    assert p50["processing"] + p50["pool_wait"] <= p50["wait"] + CLOCKS
    low, high = p50["queue_transit_range"]
    assert low <= p50["queue_transit"] <= high
    assert found["dominant"] == wait_split.PROCESSING
    (pool,) = found["pools"]
    assert pool["target"] == topic and pool["pool_size"] == 64  # oslo.messaging's default
    # /api/graph/edge says the same.
    details = collector.json(f"/api/graph/edge?client=test-client&server={service}"
                             "&protocol=rpc&window=15m")
    assert details["wait_split"]["calls"] == found["calls"]


@pytest.mark.slow
def test_a_pool_of_one_with_concurrent_calls_shows_pool_wait_and_saturation(
        collector, start_peer, rpc_client, topic):
    service = _service()
    start_peer(COMMLENS_URL, topic, service=service, args=("--pool-size", "1"))
    client = rpc_client(COMMLENS_URL, topic, timeout=30)
    client.call({}, "echo", value=0)  # the pool is up and its gauges shipped
    request_ids = [_request_id() for _ in range(4)]
    calls = [threading.Thread(target=client.call, args=({"request_id": r}, "slow"),
                              kwargs={"seconds": 0.5}) for r in request_ids]
    for call in calls:
        call.start()
    labels = {"service": service, "target": topic}

    def saturated():
        scraped = collector.metrics()
        return (scraped.value(metrics.RPC_POOL_SATURATION_PEAK.name, **labels) == 1.0
                and scraped.value(metrics.RPC_EXECUTOR_POOL_SIZE.name, **labels) == 1
                and scraped)
    scraped = wait_for(saturated, message="saturation 1.0 of a pool of 1")
    assert scraped.value(metrics.RPC_HANDLERS_IN_FLIGHT.name, **labels) <= 1
    for call in calls:
        call.join(30)

    splits = [_split(collector, r) for r in request_ids]
    # One worker: the calls were served one after another, each waiting for
    # those before it: 0, 0.5, 1.0 and 1.5 s of pool wait, about.
    waits = sorted(s["pool_wait"] for s in splits)
    assert waits[0] < 0.4 and waits[-1] >= 1.2
    assert all(s["processing"] >= 0.5 for s in splits)
    assert splits[[s["pool_wait"] for s in splits].index(waits[-1])]["dominant"] == \
        wait_split.POOL_WAIT
    scraped = collector.metrics()
    assert scraped.value(metrics.RPC_POOL_WAIT.name + "_count", service=service,
                         target=topic, method="slow") == 4
    # Once idle, the next interval's peak is what is in flight: nothing.
    wait_for(lambda: collector.metrics().value(metrics.RPC_POOL_SATURATION_PEAK.name,
                                               **labels) == 0.0,
             message="the peak falls back once the pool is idle")

    def edge_split():
        edge = _edge(collector, "test-client", service)
        found = edge and edge.get("wait_split")
        return found if found and found["calls"] >= 5 else None
    found = wait_for(edge_split, message="the edge's wait split")
    assert found["dominant"] == wait_split.POOL_WAIT
    assert found["p99"]["pool_wait"] >= 1.0


@pytest.mark.slow
def test_a_consumer_started_late_shows_queue_time(collector, start_peer, rpc_client, topic):
    service = _service()
    # The server's queue exists (and outlives it: oslo.messaging's queues
    # are not auto-deleted), with nobody consuming it when the call is sent.
    start_peer(COMMLENS_URL, topic, service=service).stop()
    client = rpc_client(COMMLENS_URL, topic, timeout=30)
    request_id = _request_id()
    answer = {}
    caller = threading.Thread(target=lambda: answer.setdefault(
        "value", client.call({"request_id": request_id}, "echo", value=7)))
    caller.start()
    time.sleep(1.5)  # the fault under test: nobody consumes for 1.5 s
    start_peer(COMMLENS_URL, topic, service=service)
    caller.join(30)
    assert answer == {"value": 7}
    split = _split(collector, request_id)
    assert split["queue_transit"] >= 1.4
    assert split["pool_wait"] < 0.2 and split["processing"] < 0.2
    assert split["dominant"] == wait_split.QUEUE_TRANSIT


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["threading", "eventlet"])
def test_the_pool_size_is_the_executors(collector, start_peer, rpc_client, topic, executor):
    service = _service()
    start_peer(COMMLENS_URL, topic, service=service, executor=executor,
               args=("--pool-size", "3"))
    assert rpc_client(COMMLENS_URL, topic).call({}, "echo", value=1) == 1
    labels = {"service": service, "target": topic}
    wait_for(lambda: collector.metrics().value(metrics.RPC_EXECUTOR_POOL_SIZE.name,
                                               **labels) == 3,
             message=f"pool size 3 of the {executor} executor")


# -- the collector's side, on what agents ship --------------------------------

def _snapshot(process_id, gauges):
    import json

    return json.dumps({"format": wire.SNAPSHOT_FORMAT, "seq": 1, "interval": 60.0,
                       "final": False, "process": {"id": process_id, "service": "s", "pid": 1},
                       "counters": [], "histograms": [], "gauges": gauges})


def test_the_peak_saturation_is_the_max_over_processes_the_rest_their_sum():
    collector = collector_mod.Collector()
    for process_id, peak, in_flight in (("a", 0.5, 2), ("b", 1.0, 4), ("c", 0.25, 1)):
        assert collector.ingest(_snapshot(process_id, [
            [metrics.RPC_POOL_SATURATION_PEAK.name, ["conductor-svc", "conductor"], peak],
            [metrics.RPC_HANDLERS_IN_FLIGHT.name, ["conductor-svc", "conductor"], in_flight],
            [metrics.RPC_EXECUTOR_POOL_SIZE.name, ["conductor-svc", "conductor"], 4]])) \
            == collector_mod.ACCEPTED
    gauges = collector.merged()[2]
    key = ("conductor-svc", "conductor")
    assert gauges[(metrics.RPC_POOL_SATURATION_PEAK.name, key)] == 1.0
    assert gauges[(metrics.RPC_HANDLERS_IN_FLIGHT.name, key)] == 7
    assert gauges[(metrics.RPC_EXECUTOR_POOL_SIZE.name, key)] == 12


def _hop(span_id, side, duration, parent_id=None, pool_wait=None, kind="call"):
    return {"trace_id": "ab" * 16, "span_id": span_id, "parent_id": parent_id,
            "service": "nova-conductor" if side == "client" else "nova-compute",
            "side": side, "protocol": "rpc", "peer": None, "target": "compute",
            "operation": "build_and_run_instance", "kind": kind, "outcome": "ok",
            "error": None, "start": 0.0, "duration": duration, "request_id": None,
            "global_request_id": None, "server": None, "pool_wait": pool_wait}


def test_a_traced_call_joins_its_client_hop_with_the_server_hop_that_answered_it():
    hops = [_hop("1" * 16, "client", 2.0),
            _hop("2" * 16, "server", 0.5, parent_id="1" * 16, pool_wait=1.25),
            # A cast has no wait to split; a call nobody answered neither.
            _hop("3" * 16, "client", 0.01, kind="cast"),
            _hop("4" * 16, "server", 0.2, parent_id="3" * 16, pool_wait=0.0),
            _hop("5" * 16, "client", 60.0)]
    (split,) = wait_split.of_trace(hops)
    assert split["span_id"] == "1" * 16
    assert (split["wait"], split["pool_wait"], split["processing"]) == (2.0, 1.25, 0.5)
    assert split["queue_transit"] == pytest.approx(0.25)
    assert split["dominant"] == wait_split.POOL_WAIT
    # A server hop from an agent before pool_wait: its wait counts as none.
    hops[1]["pool_wait"] = None
    assert wait_split.of_trace(hops)[0]["queue_transit"] == pytest.approx(1.5)


def test_hops_with_a_bad_pool_wait_keep_the_hop_and_lose_the_figure():
    for bad in (-1.0, "0.5", True, 10 ** 9):
        hop = _hop("2" * 16, "server", 0.5, parent_id="1" * 16, pool_wait=bad)
        clean = collector_mod._clean_hop(hop)
        assert clean is not None and clean["pool_wait"] is None, bad
    assert collector_mod._clean_hop(_hop("2" * 16, "server", 0.5, pool_wait=0.125))[
        "pool_wait"] == 0.125


def test_replicas_wait_splits_merge_from_their_buckets_and_pools():
    """Two replicas, each with its share of the processes: the fleet's split
    comes from the added buckets (not averaged percentiles); pools' handlers
    and sizes add up, their peaks take the largest (exporters/fleet.py)."""
    from commlens.exporters import fleet
    from commlens.exporters import graph as graph_mod

    def latency(seconds, calls):
        counts = [0.0] * (len(metrics.LATENCY_BUCKETS) + 1)
        counts[next(i for i, bound in enumerate(metrics.LATENCY_BUCKETS)
                    if seconds <= bound)] = calls
        return graph_mod.latency_json(graph_mod.Latency(counts, seconds, seconds))

    def replica(wait, pool_wait, processing, calls, pool):
        edge = {"client": "nova-api", "server": "nova-conductor", "protocol": "rpc",
                "requests": calls, "rate": 1.0, "failed": 0.0,
                "wait_split_parts": {"wait": latency(wait, calls),
                                     "pool_wait": latency(pool_wait, calls),
                                     "processing": latency(processing, calls)}}
        edge["wait_split"] = {"pools": [pool]}
        return {"edges": [edge], "nodes": []}

    merged = fleet.merge_graphs([
        replica(2.0, 1.5, 0.4, 90, {"target": "conductor", "handlers_in_flight": 2,
                                     "pool_size": 2, "saturation_peak": 1.0}),
        replica(0.05, 0.001, 0.04, 10, {"target": "conductor", "handlers_in_flight": 1,
                                         "pool_size": 64, "saturation_peak": 0.25})])
    (edge,) = merged["edges"]
    split = edge["wait_split"]
    assert split["calls"] == 100
    # 90 of the 100 calls waited 2 s: the fleet's p50 is in their bucket
    # (1 to 2.5 s, up to the largest seen), not an average with the other's.
    assert 1.0 <= split["p50"]["wait"] <= 2.0
    assert 1.0 <= split["p50"]["pool_wait"] <= 1.5
    assert split["dominant"] == wait_split.POOL_WAIT
    assert split["pools"] == [{"target": "conductor", "handlers_in_flight": 3.0,
                               "pool_size": 66.0, "saturation_peak": 1.0}]
    assert split["saturation_peak"] == 1.0
