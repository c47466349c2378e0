"""Three collector replicas, each its own process on the real RabbitMQ, that
answer as one (exporters/fleet.py): a trace, a request spanning traces on
several replicas and the chains table are the same from each; a replica
killed with SIGKILL mid-traffic, with traces open in its window, gives
partial answers that say so, in bounded time; restarted under the same name
on its history file, it takes back its open traces from the journal and
catches up on what waited in its queue: every trace complete, chains and
counter totals exact, nothing counted twice.
"""

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from commlens.tracer import recorder as recorder_mod
from support import add_error_traces, collector_ready, free_port, run_collector, ship_recorders
from support import wait_for

pytestmark = pytest.mark.slow

REPLICAS = 3
PROCESSES = 9
PEER_TIMEOUT = 1.0
# Long enough that the traces a replica holds when it is killed are still open.
TRACE_QUIET = "5s"


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


def _hops_total(replicas, outcome):
    return sum(r.metrics().value("commlens_collector_hops_total", outcome=outcome)
               for r in replicas)


class _Traffic(threading.Thread):
    """Agents shipping rounds of traces, one after another, until stopped."""

    def __init__(self, export_url, recorders):
        super().__init__(daemon=True)
        self.export_url, self.recorders = export_url, recorders
        self.trace_ids, self.rounds = [], 0
        self.shipped = threading.Event()
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.trace_ids += add_error_traces(self.recorders, 10)
            ship_recorders(self.export_url, self.recorders)
            self.rounds += 1
            self.shipped.set()

    def stop(self):
        self.stopping.set()
        self.join(60)
        assert not self.is_alive()


def test_three_replicas_answer_as_one_and_a_killed_one_loses_nothing(rabbitmq, tmp_path):
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-fleet-{run}"
                  f"&queue=commlens.fleet-{run}")
    ports = [free_port() for _ in range(REPLICAS)]
    # Every replica is given the list of all of them, itself included.
    peers = [arg for port in ports for arg in ("--peer", f"http://127.0.0.1:{port}")]

    def start(stack, i):
        replica = stack.enter_context(run_collector(
            export_url, tmp_path, ["--replica", str(i), "--peer-timeout", f"{PEER_TIMEOUT}s",
                                   "--trace-quiet", TRACE_QUIET, *peers], port=ports[i]))
        wait_for(lambda: collector_ready(replica), timeout=30, message=f"replica {i}")
        return replica

    recorders = [recorder_mod.Recorder(f"svc-{i}") for i in range(PROCESSES)]
    request_id = "req-" + str(uuid.uuid4())
    with contextlib.ExitStack() as stack:
        replicas = [start(stack, i) for i in range(REPLICAS)]
        # One request's traces hash to several replicas; every trace has one chain.
        request_traces = add_error_traces(recorders, 6, request_id)
        trace_ids = request_traces + add_error_traces(recorders, 30)
        ship_recorders(export_url, recorders)

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

        # Agents keep shipping while one replica is killed with SIGKILL, with
        # traces open in its window: hops it took and acknowledged, none stored.
        in_flight = add_error_traces(recorders, 30)
        ship_recorders(export_url, recorders)
        killed = replicas[1]
        killed_holds = [t for t in trace_ids
                        if _get(killed, f"/api/traces/{t}?scope=replica") is not None]
        wait_for(lambda: killed.metrics().value("commlens_collector_open_traces") > 0,
                 timeout=30, interval=0.05, message="traces open on replica 1")
        traffic = _Traffic(export_url, recorders)
        traffic.start()
        assert traffic.shipped.wait(60)
        killed.process.kill()
        killed.process.wait(30)
        # The others answer at once, partially, and say so.
        started = time.monotonic()
        partial = _chains(replicas[0])
        assert time.monotonic() - started < PEER_TIMEOUT + 5
        assert partial["replicas"]["answered"] == ["0", "2"]
        assert partial["replicas"]["partial"] is True
        assert [m["peer"] for m in partial["replicas"]["missing"]] == [killed.base_url]
        assert killed_holds and _get(replicas[0], "/api/traces/" + killed_holds[0]) is None
        graph = replicas[2].json("/api/graph?window=5m")
        assert graph["replicas"]["missing"][0]["error"] == "Connection refused"
        # The incident commands say so on stderr; their output is the answer.
        command = subprocess.run(
            [sys.executable, "-m", "commlens.cli.main", "chains", "--since", "1h",
             "--collector", replicas[0].base_url, "--json"],
            capture_output=True, text=True, timeout=60)
        assert command.returncode == 0, command.stderr
        assert "partial answer: replicas 0, 2 answered" in command.stderr
        assert killed.base_url in command.stderr
        assert json.loads(command.stdout)["replicas"]["partial"] is True
        # The dashboard's picture says how many replicas are missing.
        request = urllib.request.Request(replicas[0].base_url + "/dashboard/graph.svg")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.headers["X-Commlens-Missing-Replicas"] == "1"
        except urllib.error.HTTPError as exc:
            assert exc.code == 503  # no Graphviz: the page says so instead

        # What agents ship meanwhile waits in the killed replica's queue.
        wait_for(lambda: traffic.rounds >= 3, timeout=60, message="traffic while killed")
        traffic.stop()
        later = add_error_traces(recorders, 30)
        ship_recorders(export_url, recorders)
        replicas[1] = start(stack, 1)

        total = 36 + len(in_flight) + len(traffic.trace_ids) + len(later)
        chains = _same_from_each(replicas, "/api/chains?since=1h&limit=1000",
                                 lambda a: sum(c["count"] for c in a["chains"]) >= total)
        assert sum(c["count"] for c in chains["chains"]) == total, "nothing counted twice"
        # Every trace complete, each hop once, whichever replica holds it.
        for trace_id in in_flight + traffic.trace_ids + later:
            hops = _get(replicas[0], "/api/traces/" + trace_id)["hops"]
            assert len({h["span_id"] for h in hops}) == len(hops) == 3, trace_id
        for trace_id in in_flight[::7]:
            _same_from_each(replicas, "/api/traces/" + trace_id, lambda a: len(a["hops"]) == 3)
        # The killed replica took its open traces back from its journal.
        assert replicas[1].metrics().value("commlens_collector_hops_total",
                                           outcome="reloaded") > 0
        assert _hops_total(replicas, "duplicate") == 0
        # Each process's totals again on one replica, counted once: one
        # increment per snapshot it shipped.
        ships = 3 + traffic.rounds
        wait_for(lambda: _sent_total(replicas) == ships * PROCESSES, timeout=30,
                 message="every process's totals after the restart")
        assert sum(r.metrics().value("commlens_collector_lost_total") for r in replicas) == 0
