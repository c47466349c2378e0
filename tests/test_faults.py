"""Counts stay exact through the faults of a real cloud.

A RabbitMQ node of the tests' own (tests/rabbit_node.py) is alarmed,
stopped and restarted; the shared broker on 5672 never sees any of it. Real
processes take part: an RPC server (peers/rpc_peer.py), an RPC client that
keeps its own ground truth (peers/rpc_caller.py), a collector. After each
fault: what the collector exports equals what the client really did, the
waiting replies are back to 0, every process is listed again, and what the
agents could not ship is counted on their own metric.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from rabbit_node import RabbitNode
from support import PEERS, Peer, collector_ready, free_port, run_collector, wait_for

pytestmark = pytest.mark.slow

SHIP_INTERVAL = "0.3"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    if not RabbitNode.available():
        pytest.fail("RabbitMQ is not installed: scripts/setup installs rabbitmq-server")
    rabbit = RabbitNode(tmp_path_factory.mktemp("rabbit-node")).start()
    yield rabbit
    rabbit.stop()


class Plane:
    """A collector, an RPC server and an RPC client on the private node."""

    def __init__(self, node, tmp_path, topic):
        self.node = node
        self.tmp_path = tmp_path
        self.topic = topic
        run = uuid.uuid4().hex[:8]
        self.export_url = (f"{node.amqp_url}?exchange=commlens-faults-{run}"
                           f"&queue=commlens-faults-{run}")
        self.env = dict(os.environ, COMMLENS_EXPORT_URL=self.export_url,
                        COMMLENS_SHIP_INTERVAL=SHIP_INTERVAL)
        self.collector = None
        self._collector_context = None
        self.peers = []
        self.made = {"call": 0, "cast": 0}

    # -- processes -----------------------------------------------------------

    def start_collector(self, *extra_args):
        self._collector_context = run_collector(self.export_url, self.tmp_path, extra_args)
        self.collector = self._collector_context.__enter__()
        # Ready means consuming: its queue exists before anything is shipped.
        wait_for(lambda: collector_ready(self.collector), timeout=30, message="collector ready")

    def stop_collector(self, kill=False):
        if kill:
            self.collector.process.kill()
        self._collector_context.__exit__(None, None, None)
        self.collector = None

    def _spawn(self, script, *args, service, env=None):
        log_path = self.tmp_path / f"{service}-{len(self.peers)}.log"
        env = dict(self.env, COMMLENS_SERVICE_NAME=service, **(env or {}))
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(PEERS / script), "--url", "commlens+" + self.node.url,
                 "--topic", self.topic, *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        peer = Peer(process, log_path)
        self.peers.append(peer)
        line = process.stdout.readline()
        if line.strip() != "READY":
            peer.stop()
            raise AssertionError(f"{script} did not start: {line!r}\n{peer.log()}")
        return peer

    def start_server(self, *args, env=None):
        self.server = self._spawn("rpc_peer.py", *args, service="fault-server", env=env)
        return self.server

    def start_caller(self):
        self.caller = self._spawn("rpc_caller.py", service="fault-caller")
        return self.caller

    def tell_caller(self, line):
        self.caller.process.stdin.write(line + "\n")
        self.caller.process.stdin.flush()

    def caller_answer(self):
        return json.loads(self.caller.process.stdout.readline())

    def _ask_caller(self, line):
        self.tell_caller(line)
        return self.caller_answer()

    def drive(self, command, count):
        """Ground truth of the sending side: what the client made, as it says itself."""
        result = self._ask_caller(f"{command} {count}")
        assert result["made"] == count
        self.made[command] += count
        return result

    def stop(self):
        for peer in self.peers:
            peer.stop()
        if self.collector is not None:
            self.stop_collector()

    # -- what the collector says -------------------------------------------

    def counts(self):
        metrics = self.collector.metrics()
        sent = dict(service="fault-caller", target=self.topic)
        received = dict(service="fault-server", caller="fault-caller", target=self.topic)
        return {
            "calls_sent": metrics.value("commlens_rpc_sent_total", **sent, method="echo",
                                        kind="call"),
            "calls_received": metrics.value("commlens_rpc_received_total", **received,
                                            method="echo", kind="call"),
            "casts_sent": metrics.value("commlens_rpc_sent_total", **sent, method="count_cast",
                                        kind="cast"),
            "casts_received": metrics.value("commlens_rpc_received_total", **received,
                                            method="count_cast", kind="cast"),
            "waiting": metrics.value("commlens_rpc_waiting_replies", service="fault-caller",
                                     target=self.topic),
        }

    def ground_truth(self):
        """What the client made and what the server ran, each as it says itself.

        They differ only where the broker really lost a message (a call
        published into a connection the restart was closing): the caller
        then saw a timeout, and commlens must count exactly that too."""
        seen = self._ask_caller("seen")
        return {"calls_sent": self.made["call"], "calls_received": seen["echoes"],
                "casts_sent": self.made["cast"], "casts_received": seen["casts"],
                "waiting": 0}

    def assert_exact(self, timeout=30):
        """The collector's counts reach the ground truth and stay there."""
        expected = self.ground_truth()
        wait_for(lambda: self.counts() == expected, timeout=timeout,
                 message=f"counts == {expected} (now {self.counts()})")
        # Stay exact past several collector expiry periods: nothing is added
        # twice later (a process that resumes, a late snapshot).
        time.sleep(3 * float(SHIP_INTERVAL) * 4)
        assert self.counts() == expected

    def assert_listed(self, *services):
        def listed():
            found = {p["service"] for p in self.collector.json("/api/processes")["processes"]}
            return set(services) <= found
        wait_for(listed, timeout=30, message=f"{services} listed in /api/processes")

    def ship_failures(self, service):
        return self.collector.metrics().value("commlens_agent_ship_failures_total",
                                              service=service)


@pytest.fixture
def plane(node, tmp_path, request):
    topic = f"faults-{request.node.name[5:35]}-{uuid.uuid4().hex[:6]}"
    control = Plane(node, tmp_path, topic)
    yield control
    control.stop()


def _traffic(plane):
    plane.drive("call", 100)
    plane.drive("cast", 50)


def _start(plane, *collector_args):
    plane.start_collector(*collector_args)
    plane.start_server()
    plane.start_caller()
    _traffic(plane)
    plane.assert_exact()


def _through(plane, fault, recovery, seconds):
    """Exact counts before; the fault for ``seconds``; traffic again after it."""
    _start(plane)
    fault()
    try:
        time.sleep(seconds)
    finally:
        recovery()
    _traffic(plane)


def test_counts_stay_exact_through_a_memory_alarm(node, plane):
    # Longer than pika's blocked-connection timeout (5 s): the agents'
    # connections are torn down under them while the broker is blocked.
    _through(plane, node.alarm_memory, node.clear_memory_alarm, 30)
    plane.assert_exact()
    plane.assert_listed("fault-server", "fault-caller")
    assert plane.ship_failures("fault-caller") > 0, "the blocked interval is counted"


def test_counts_stay_exact_through_a_broker_restart(node, plane):
    # oslo.messaging reconnects on its own; a call published into a closing
    # connection is lost for real: each side's own count says so.
    _through(plane, node.stop_app, node.start_app, 5)
    plane.assert_exact(timeout=60)
    plane.assert_listed("fault-server", "fault-caller")
    assert plane.ship_failures("fault-server") > 0
    # The service's own log (INFO, as nova logs) says it once each way, and
    # pika, retrying underneath, says nothing.
    log = plane.caller.log()
    assert log.count("commlens: cannot ship") == 1, log
    assert log.count("commlens: shipping to") == 1 and "works again" in log, log
    assert not [line for line in log.splitlines() if " pika" in line], log


def test_counts_stay_exact_when_a_frozen_server_resumes(plane):
    _start(plane)
    # Silent for 12 s: far past the collector's expiry (3 ship intervals).
    os.kill(plane.server.process.pid, signal.SIGSTOP)
    try:
        def server_expired():
            found = {p["service"] for p in plane.collector.json("/api/processes")["processes"]}
            return "fault-server" not in found
        wait_for(server_expired, timeout=15, message="the frozen server leaves /api/processes")
        time.sleep(12 - 3 * float(SHIP_INTERVAL))
    finally:
        os.kill(plane.server.process.pid, signal.SIGCONT)
    plane.assert_listed("fault-server")
    plane.assert_exact()
    plane.drive("call", 100)
    plane.assert_exact()


def test_counts_stay_exact_when_the_collector_was_down_past_the_queue_ttl(plane):
    # The 150 s outage against the default 120 s TTL, scaled down:
    # the queue keeps messages 2 s here and the collector is gone for 6 s.
    _start(plane, "--queue-ttl", "2")
    plane.stop_collector(kill=True)
    plane.drive("call", 100)
    time.sleep(6)
    plane.start_collector("--queue-ttl", "2")
    plane.assert_exact()
    plane.assert_listed("fault-server", "fault-caller")
    metrics = plane.collector.metrics()
    assert metrics.value("commlens_collector_lost_total") > 0, \
        "expired messages are counted as lost"


def test_a_process_that_exits_right_after_its_last_call_ships_it(plane):
    plane.start_collector()
    plane.start_server()
    plane.start_caller()
    plane.drive("call", 37)
    plane.caller.process.stdin.write("exit\n")
    plane.caller.process.stdin.flush()
    assert plane.caller.process.wait(10) == 0
    # Its last snapshot was marked final: its counts stay. A new caller asks
    # the server what it ran (its own calls are another method).
    plane.start_caller()
    plane.assert_exact()


def _wsgi_server_command(server, port):
    """gunicorn or uwsgi, two workers each recycled after 15 requests."""
    binary = os.path.join(os.path.dirname(sys.executable), server)
    if server == "gunicorn":
        return [sys.executable, binary, "--chdir", str(PEERS), "--bind", f"127.0.0.1:{port}",
                "--workers", "2", "--max-requests", "15", "wsgi_app:application"]
    # uwsgi loads the app in its master and forks the workers (no lazy-apps);
    # a worker is recycled only after living --min-worker-lifetime seconds.
    # Without --enable-threads no thread of the app runs (commlens's shipper,
    # oslo.messaging's heartbeats): OpenStack's uwsgi configurations set it.
    return [binary, "--http-socket", f"127.0.0.1:{port}", "--wsgi-file",
            str(PEERS / "wsgi_app.py"), "--master", "--processes", "2",
            "--max-requests", "15", "--min-worker-lifetime", "1", "--die-on-term",
            "--enable-threads"]


_RECYCLED = {"gunicorn": "Autorestarting worker", "uwsgi": "Respawned uWSGI worker"}


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_requests_served_by_recycled_workers_are_all_counted(plane, server):
    """Each worker leaves after 15 requests (--max-requests), well inside one
    ship interval: only its exit hook ships what it served."""
    plane.start_collector()
    port = free_port()
    log_path = plane.tmp_path / f"{server}.log"
    env = dict(plane.env, COMMLENS_SERVICE_NAME="fault-api", COMMLENS_SHIP_INTERVAL="30")
    with open(log_path, "w") as log:
        process = subprocess.Popen(_wsgi_server_command(server, port), stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    plane.peers.append(Peer(process, log_path))
    url = f"http://127.0.0.1:{port}/v2.0/ports"

    def answers():
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            return False
    wait_for(answers, timeout=30, message=f"{server} answers")
    requests_made = 1
    for _ in range(99):
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        requests_made += 1
        time.sleep(0.02)  # past uwsgi's minimum worker lifetime
    if server == "uwsgi":
        # When both workers recycle at once, uwsgi's master sleeps 2 s before
        # respawning ("respawning too fast"); a SIGTERM in that sleep hangs it.
        def respawns_done():
            log = log_path.read_text()
            return log.count("killed successfully") == log.count("Respawned uWSGI worker")
        wait_for(respawns_done, timeout=10, message="uwsgi's respawns done")
    process.terminate()  # the last workers leave too, gracefully
    process.wait(30)
    plane.collector.wait_metric("commlens_http_requests_total", requests_made,
                                service="fault-api", timeout=30)
    assert _RECYCLED[server] in log_path.read_text()


def test_a_server_that_leaves_with_os_exit_ships_at_its_listener_cleanup(plane):
    """oslo.service's workers stop their RPC server, then os._exit: atexit
    never runs. The listener's cleanup ships what the server counted."""
    plane.start_collector()
    # Nothing leaves on the server's clock: only the cleanup can ship.
    server = plane.start_server("--exit-hard", env={"COMMLENS_SHIP_INTERVAL": "3600"})
    plane.start_caller()
    plane.drive("call", 40)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0
    plane.collector.wait_metric("commlens_rpc_received_total", 40, service="fault-server",
                                method="echo", timeout=20)


def test_waiting_replies_return_to_zero_when_broker_connections_are_lost(node, plane):
    plane.start_collector()
    plane.start_server()
    plane.start_caller()
    waiting = dict(service="fault-caller", target=plane.topic, method="slow")
    plane.tell_caller("slow 3 2")  # three calls of 2 s at once; the answer comes later
    plane.collector.wait_metric("commlens_rpc_waiting_replies", 3, timeout=10, **waiting)
    node.ctl("close_all_connections", "commlens test")
    assert plane.caller_answer()["made"] == 3
    plane.collector.wait_metric("commlens_rpc_waiting_replies", 0, timeout=30, **waiting)
