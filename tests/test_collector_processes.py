"""Collector processes: two replicas sharing the load, and a restart keeping the history.

Real agents' shippers publish to a fresh exchange; each trace's hops come
from three different processes. Every trace must be assembled whole by
exactly one replica, and every process's totals must be on exactly one, so
Prometheus can sum the replicas.
"""

import subprocess
import sys
import uuid

import pytest

from commlens.tracer import context
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import shipping
from support import collector_ready, run_collector, wait_for

pytestmark = pytest.mark.slow

PROCESSES = 12
TRACES = 120


def _hop(trace_id, span_id, parent_id, service, side):
    return {"trace_id": trace_id, "span_id": span_id, "parent_id": parent_id,
            "service": service, "side": side, "protocol": "rpc", "peer": None,
            "target": "topic", "operation": "build", "kind": "call", "outcome": "error",
            "error": "Boom", "start": 1.0e9, "duration": 0.01, "request_id": None,
            "global_request_id": None}


def test_two_replicas_never_split_a_trace_and_sum_to_the_whole(rabbitmq, tmp_path):
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-replicas-{run}"
                  f"&queue=commlens.replicas-{run}")
    with run_collector(export_url, tmp_path, ["--replica", "1"]) as one, \
            run_collector(export_url, tmp_path, ["--replica", "2"]) as two:
        replicas = (one, two)
        for replica in replicas:
            wait_for(lambda r=replica: collector_ready(r), timeout=30, message="replica")

        recorders = [recorder_mod.Recorder(f"svc-{i}") for i in range(PROCESSES)]
        trace_ids = [context.new_trace_id() for _ in range(TRACES)]
        for n, trace_id in enumerate(trace_ids):
            spans = [context.new_span_id() for _ in range(3)]
            for k in range(3):
                recorder = recorders[(n + k) % PROCESSES]
                recorder.add_hop(_hop(trace_id, spans[k], spans[k - 1] if k else None,
                                      recorder.service, "server" if k % 2 == 0 else "client"))
        for recorder in recorders:
            recorder.inc(metrics.RPC_SENT, (recorder.service, "topic", "build", "call"))
            transport = shipping.AmqpTransport(export_url)
            assert shipping.Shipper(recorder, transport, 1.0).ship_once()
            transport.close()

        def totals():
            sent = [r.metrics().series("commlens_rpc_sent_total") for r in replicas]
            return sent if sum(len(s) for s in sent) == PROCESSES else None

        per_replica = wait_for(totals, timeout=30, message="every process on a replica")
        assert all(per_replica), "both replicas take a share of the processes"
        services = [label["service"] for series in per_replica for label, _ in series]
        assert sorted(services) == sorted(r.service for r in recorders)

        def assembled(trace_id):
            found = []
            for replica in replicas:
                try:
                    found.append(len(replica.json("/api/traces/" + trace_id)["hops"]))
                except OSError:
                    pass
            return found or None

        owners = {}
        for trace_id in trace_ids:
            (hops,) = wait_for(lambda t=trace_id: assembled(t), timeout=30,
                               message=f"trace {trace_id}")
            assert hops == 3
            owners[trace_id] = [i for i, r in enumerate(replicas)
                                if _has(r, trace_id)]
        assert all(len(o) == 1 for o in owners.values())
        assert {o[0] for o in owners.values()} == {0, 1}


def _has(replica, trace_id):
    try:
        replica.json("/api/traces/" + trace_id)
        return True
    except OSError:
        return False


def test_a_restarted_collector_keeps_its_history_and_late_hops_still_join(rabbitmq, tmp_path):
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-restart-{run}"
                  f"&queue=commlens.restart-{run}")
    history = ["--history", str(tmp_path / "kept.sqlite")]
    trace_id = context.new_trace_id()
    spans = [context.new_span_id() for _ in range(3)]
    api, conductor = recorder_mod.Recorder("nova-api"), recorder_mod.Recorder("nova-conductor")

    def ship(recorder):
        transport = shipping.AmqpTransport(export_url)
        assert shipping.Shipper(recorder, transport, 1.0).ship_once()
        transport.close()

    with run_collector(export_url, tmp_path, history) as first:
        wait_for(lambda: collector_ready(first), timeout=30, message="collector")
        api.add_hop(_hop(trace_id, spans[0], None, "nova-api", "server"))
        api.add_hop(_hop(trace_id, spans[1], spans[0], "nova-api", "client"))
        ship(api)
        wait_for(lambda: _has(first, trace_id), timeout=30, message="trace closed")
    with run_collector(export_url, tmp_path, history) as second:
        wait_for(lambda: collector_ready(second), timeout=30, message="collector again")
        assert len(second.json("/api/traces/" + trace_id)["hops"]) == 2
        # The conductor's hop comes after the restart: it joins the stored trace.
        conductor.add_hop(_hop(trace_id, spans[2], spans[1], "nova-conductor", "server"))
        ship(conductor)
        trace = wait_for(lambda: (lambda t: t if len(t["hops"]) == 3 else None)(
            second.json("/api/traces/" + trace_id)), timeout=30, message="late hop joined")
        (chain,) = trace["chains"]
        assert chain["origin"]["service"] == "nova-conductor"


# An agent process that keeps running across the collector's restart: a
# conductor that handled many calls before, then a steady few per second.
_STEADY_AGENT = """
import sys, time
from commlens.tracer import metrics, recorder as recorder_mod, shipping
recorder = recorder_mod.Recorder("nova-conductor")
handled = ("nova-conductor", "nova-api", "conductor", "build_instances", "ok")
for _ in range(int(sys.argv[2])):
    recorder.observe(metrics.RPC_SERVER_HOPS, handled, 0.01)
recorder.attach_shipper(shipping.Shipper(recorder, shipping.AmqpTransport(sys.argv[1]), 1.0))
while True:
    for _ in range(int(sys.argv[3])):
        recorder.observe(metrics.RPC_SERVER_HOPS, handled, 0.01)
    time.sleep(1.0)
"""


def _edge_requests(collector):
    """The edge's total on /metrics; None while it is not shown."""
    series = collector.metrics().series(
        "traces_service_graph_request_total", client="nova-api", server="nova-conductor",
        connection_type="messaging_system")
    return series[0][1] if series else None


def test_a_restarted_collector_continues_the_counts_with_no_burst_of_traffic(
        rabbitmq, tmp_path):
    """The agent keeps running across the collector's restart: the totals on
    /metrics continue exactly (never lower, as Prometheus would read a
    reset), and the collector's rates show the steady calls, not the 5000
    made before."""
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-burst-{run}"
                  f"&queue=commlens.burst-{run}")
    before, per_second = 5000, 4
    with run_collector(export_url, tmp_path) as first:
        wait_for(lambda: collector_ready(first), timeout=30, message="collector")
        agent = subprocess.Popen([sys.executable, "-c", _STEADY_AGENT, export_url,
                                  str(before), str(per_second)])
        try:
            wait_for(lambda: (_edge_requests(first) or 0) >= before, timeout=30,
                     message="the agent's calls on the first collector")
            last_seen = _edge_requests(first)
            first.process.terminate()
            first.process.wait(10)
            with run_collector(export_url, tmp_path, ["--metrics-warm-up", "3s"]) as second:
                wait_for(lambda: collector_ready(second), timeout=30, message="collector again")
                shown = []

                def continued():
                    value = _edge_requests(second)
                    if value is not None:
                        shown.append(value)
                    return value
                wait_for(continued, timeout=30, message="the totals on the restarted collector")
                assert all(value >= last_seen for value in shown), (last_seen, shown)
                wait_for(lambda: _edge_requests(second) >= last_seen + 2 * per_second,
                         timeout=30, message="calls made after the restart")
                (edge,) = [e for e in second.json("/api/graph?window=1m")["edges"]
                           if e["server"] == "nova-conductor"]
                assert edge["rate"] < 10 * per_second, edge
                assert 0 < edge["requests"] < before / 10, edge
        finally:
            agent.kill()
            agent.wait()
