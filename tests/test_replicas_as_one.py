"""Three collector replicas, each its own process on the real RabbitMQ, that
answer as one (exporters/fleet.py): a trace, a request spanning traces on
several replicas and the chains table are the same from each; a replica
stopped gives partial answers that say so, in bounded time; restarted, it
catches up on what waited in its queue, and nothing is counted twice or lost.
"""

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from commlens.tracer import context
from commlens.tracer import metrics
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import shipping
from support import collector_ready, free_port, run_collector, wait_for

pytestmark = pytest.mark.slow

REPLICAS = 3
PROCESSES = 9
PEER_TIMEOUT = 1.0


def _hop(trace_id, span_id, parent_id, service, side, request_id=None):
    return {"trace_id": trace_id, "span_id": span_id, "parent_id": parent_id,
            "service": service, "side": side, "protocol": "rpc", "peer": None,
            "target": "topic", "operation": "build", "kind": "call", "outcome": "error",
            "error": "Boom", "start": time.time(), "duration": 0.01,
            "request_id": request_id, "global_request_id": None}


def _ship(export_url, recorders):
    """Each process ships what it holds, one more call sent since last time."""
    for recorder in recorders:
        recorder.inc(metrics.RPC_SENT, (recorder.service, "topic", "build", "call"))
        transport = shipping.AmqpTransport(export_url)
        assert shipping.Shipper(recorder, transport, 1.0).ship_once()
        transport.close()


def _add_traces(recorders, count, request_id=None):
    """``count`` traces of three hops from three processes, one chain each."""
    trace_ids = [context.new_trace_id() for _ in range(count)]
    for n, trace_id in enumerate(trace_ids):
        spans = [context.new_span_id() for _ in range(3)]
        for k in range(3):
            recorder = recorders[(n + k) % len(recorders)]
            recorder.add_hop(_hop(trace_id, spans[k], spans[k - 1] if k else None,
                                  recorder.service, "server" if k % 2 == 0 else "client",
                                  request_id if k == 0 else None))
    return trace_ids


def _get(replica, path):
    try:
        return replica.json(path)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _chains(replica):
    return replica.json("/api/chains?since=1h&limit=1000")


def _same_from_each(replicas, path, check):
    """The answer to ``path`` once every replica gives it and ``check`` holds;
    it must be identical from each."""
    def agreed():
        answers = [_get(r, path) for r in replicas]
        if not all(a is not None and check(a) for a in answers):
            return None
        return answers
    answers = wait_for(agreed, timeout=60, interval=0.5, message=f"{path} from each replica")
    first = json.dumps(answers[0], sort_keys=True)
    for other in answers[1:]:
        assert json.dumps(other, sort_keys=True) == first
    return answers[0]


def _sent_total(replicas):
    return sum(r.metrics().value("commlens_rpc_sent_total") for r in replicas)


def test_three_replicas_answer_as_one_and_a_restart_loses_nothing(rabbitmq, tmp_path):
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-fleet-{run}"
                  f"&queue=commlens.fleet-{run}")
    ports = [free_port() for _ in range(REPLICAS)]
    # Every replica is given the list of all of them, itself included.
    peers = [arg for port in ports for arg in ("--peer", f"http://127.0.0.1:{port}")]

    def start(stack, i):
        replica = stack.enter_context(run_collector(
            export_url, tmp_path, ["--replica", str(i), "--peer-timeout", f"{PEER_TIMEOUT}s",
                                   *peers], port=ports[i]))
        wait_for(lambda: collector_ready(replica), timeout=30, message=f"replica {i}")
        return replica

    recorders = [recorder_mod.Recorder(f"svc-{i}") for i in range(PROCESSES)]
    request_id = "req-" + str(uuid.uuid4())
    with contextlib.ExitStack() as stack:
        replicas = [start(stack, i) for i in range(REPLICAS)]
        # One request's traces hash to several replicas; every trace has one chain.
        request_traces = _add_traces(recorders, 6, request_id)
        trace_ids = request_traces + _add_traces(recorders, 30)
        _ship(export_url, recorders)

        chains = _same_from_each(replicas, "/api/chains?since=1h&limit=1000",
                                 lambda a: sum(c["count"] for c in a["chains"]) == 36)
        assert chains["replicas"] == {"answered": ["0", "1", "2"], "missing": [],
                                      "partial": False}
        owners = [sum(_get(r, f"/api/traces/{t}?scope=replica") is not None for r in replicas)
                  for t in trace_ids]
        assert owners == [1] * len(trace_ids), "each trace is held by one replica"
        for trace_id in trace_ids[::7]:
            trace = _same_from_each(replicas, "/api/traces/" + trace_id,
                                    lambda a: len(a["hops"]) == 3)
            assert len(trace["chains"]) == 1
        holders = {i for i, r in enumerate(replicas) for t in request_traces
                   if _get(r, f"/api/traces/{t}?scope=replica") is not None}
        assert len(holders) > 1, "the request's traces are on several replicas"
        request = _same_from_each(replicas, "/api/traces/" + request_id,
                                  lambda a: len(a["hops"]) == 18)
        assert sorted(request["trace_ids"]) == sorted(request_traces)
        graph = replicas[2].json("/api/graph?window=5m")
        assert graph["replicas"]["partial"] is False
        wait_for(lambda: _sent_total(replicas) == PROCESSES, timeout=30,
                 message="every process's totals on a replica")

        # One replica stops: the others answer at once, partially, and say so.
        stopped = replicas[1]
        stopped.process.terminate()
        stopped.process.wait(30)
        started = time.monotonic()
        partial = _chains(replicas[0])
        assert time.monotonic() - started < PEER_TIMEOUT + 5
        assert partial["replicas"]["answered"] == ["0", "2"]
        assert partial["replicas"]["partial"] is True
        assert [m["peer"] for m in partial["replicas"]["missing"]] == [stopped.base_url]
        assert sum(c["count"] for c in partial["chains"]) < 36
        graph = replicas[2].json("/api/graph?window=5m")
        assert graph["replicas"]["missing"][0]["error"] == "Connection refused"
        # The incident commands say so on stderr; their output is the answer.
        command = subprocess.run(
            [sys.executable, "-m", "commlens.cli.main", "chains", "--since", "1h",
             "--collector", replicas[0].base_url, "--json"],
            capture_output=True, text=True, timeout=60)
        assert command.returncode == 0, command.stderr
        assert "partial answer: replicas 0, 2 answered" in command.stderr
        assert stopped.base_url in command.stderr
        assert json.loads(command.stdout)["replicas"]["partial"] is True
        # The dashboard's picture says how many replicas are missing.
        request = urllib.request.Request(replicas[0].base_url + "/dashboard/graph.svg")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.headers["X-Commlens-Missing-Replicas"] == "1"
        except urllib.error.HTTPError as exc:
            assert exc.code == 503  # no Graphviz: the page says so instead

        # What agents ship meanwhile waits in the stopped replica's queue.
        later = _add_traces(recorders, 30)
        _ship(export_url, recorders)
        replicas[1] = start(stack, 1)

        chains = _same_from_each(replicas, "/api/chains?since=1h&limit=1000",
                                 lambda a: sum(c["count"] for c in a["chains"]) >= 66)
        assert sum(c["count"] for c in chains["chains"]) == 66, "nothing counted twice"
        for trace_id in later[::7]:
            _same_from_each(replicas, "/api/traces/" + trace_id, lambda a: len(a["hops"]) == 3)
        # Each process's totals again on one replica, counted once: two
        # snapshots of one increment each.
        wait_for(lambda: _sent_total(replicas) == 2 * PROCESSES, timeout=30,
                 message="every process's totals after the restart")
        assert sum(r.metrics().value("commlens_collector_lost_total") for r in replicas) == 0
