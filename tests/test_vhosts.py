"""Agents and the collector meet by default, across vhosts.

An agent ships to its transport URL's broker and vhost (openstack-helm gives
each service its own: /nova, /neutron); one collector consumes several
export URLs at once, given as repeated ``--export-url`` or as one
COMMLENS_EXPORT_URL list. Here: two vhosts made for the test on the real
broker (through its management API, deleted after), on each an RPC server
and an RPC caller whose only commlens setting is the ``commlens+rabbit://``
transport URL, and one collector that must see both edges.
"""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support import (PEERS, RUN_ID, CollectorProcess, Peer, collector_ready, free_port,
                     wait_for)

pytestmark = pytest.mark.slow

MANAGEMENT = "http://127.0.0.1:15672"
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()
SERVICES = ("nova", "neutron")


def _management(method, path, body=None):
    request = urllib.request.Request(
        MANAGEMENT + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": AUTH, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


@pytest.fixture
def vhosts(rabbitmq):
    """{service: vhost}: two vhosts of this run, guest allowed in, gone after."""
    made = {service: f"commlens-test-{RUN_ID}-{service}" for service in SERVICES}
    try:
        for vhost in made.values():
            quoted = urllib.parse.quote(vhost, safe="")
            _management("PUT", f"/api/vhosts/{quoted}", {})
            _management("PUT", f"/api/permissions/{quoted}/guest",
                        {"configure": ".*", "write": ".*", "read": ".*"})
        yield made
    finally:
        for vhost in made.values():
            try:
                _management("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise


def _agent_env(service):
    """A service configured as the operator guide says: the transport URL
    only, no export URL anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMLENS_")}
    env.update(COMMLENS_SERVICE_NAME=service, COMMLENS_SHIP_INTERVAL="0.2",
               COMMLENS_HOP_SAMPLE_RATIO="1")
    return env


@pytest.fixture
def start_agents(vhosts, tmp_path):
    """start_agents(): on each vhost an RPC server and a caller that made 5
    calls (after the collector is up: what a process did before the collector
    heard of it is its baseline, not traffic)."""
    started = []

    def spawn(script, service, url, topic):
        log_path = tmp_path / f"{service}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(PEERS / script), "--url", url, "--topic", topic],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True, env=_agent_env(service))
        peer = Peer(process, log_path)
        started.append(peer)
        assert process.stdout.readline().strip() == "READY", peer.log()
        return peer

    def start():
        for service, vhost in vhosts.items():
            url = f"commlens+rabbit://guest:guest@127.0.0.1:5672/{vhost}"
            spawn("rpc_peer.py", f"{service}-server", url, "work")
            caller = spawn("rpc_caller.py", f"{service}-caller", url, "work")
            caller.process.stdin.write("call 5\n")
            caller.process.stdin.flush()
            assert json.loads(caller.process.stdout.readline())["ok"] == 5, caller.log()
        return started

    try:
        yield start
    finally:
        for peer in started:
            peer.stop()


def _collector(tmp_path, args, env):
    port = free_port()
    log_path = tmp_path / "collector.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COMMLENS_")}
    environment.update(env)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "commlens.cli.main", "collector", "--listen",
             f"127.0.0.1:{port}", "--history", ":memory:", "--metrics-warm-up", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, env=environment)
    return CollectorProcess(process, f"http://127.0.0.1:{port}", log_path)


@pytest.mark.parametrize("given", ["repeated --export-url", "COMMLENS_EXPORT_URL list"])
def test_one_collector_consumes_two_vhosts_where_agents_ship_by_default(
        given, vhosts, start_agents, tmp_path):
    urls = [f"amqp://guest:guest@127.0.0.1:5672/{vhost}" for vhost in vhosts.values()]
    if given == "repeated --export-url":
        args, env = [arg for url in urls for arg in ("--export-url", url)], {}
    else:
        args, env = [], {"COMMLENS_EXPORT_URL": ", ".join(urls)}
    collector = _collector(tmp_path, args, env)
    try:
        wait_for(lambda: collector_ready(collector), timeout=30, message="collector ready")
        agents = start_agents()
        expected = {(f"{s}-caller", f"{s}-server") for s in SERVICES}

        def both_edges():
            graph = collector.json("/api/graph?window=15m")
            edges = {(e["client"], e["server"]) for e in graph["edges"]
                     if e["protocol"] == "rpc"}
            return graph if expected <= edges else None

        try:
            graph = wait_for(both_edges, timeout=30, message="an RPC edge on each vhost")
        except AssertionError:
            raise AssertionError("\n".join([collector.log()[-3000:]]
                                           + [a.log()[-1500:] for a in agents])) from None
        for service in SERVICES:
            (edge,) = [e for e in graph["edges"] if e["client"] == f"{service}-caller"]
            assert edge["server"] == f"{service}-server"
        for service in SERVICES:
            # Every call counted, each on its own vhost's agents.
            collector.wait_metric("commlens_rpc_received_total", 5, service=f"{service}-server",
                                  caller=f"{service}-caller", target="work", method="echo",
                                  kind="call")
        assert collector.metrics().value("commlens_collector_intake_up") == 1
        log = collector.log()
        assert all(f"/{vhost}" in log for vhost in vhosts.values())
        assert "guest:guest" not in log
    finally:
        collector.process.terminate()
        collector.process.wait(15)
