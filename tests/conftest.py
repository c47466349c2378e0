"""Fixtures that own real resources: RabbitMQ, a collector process, RPC peers.

Every test run ships to its own exchange on the real broker, so runs never
see each other's data; every test uses its own topic, so tests never see
each other's series.
"""

import os
import subprocess
import sys
import uuid

import pytest

from support import (BROKER, EXPORT_URL, PEERS, Peer, broker_accepts, collector_ready,
                     run_collector, wait_for)


# -- which implementation the suite runs over ---------------------------------
#
# Every compiled path has a Python twin (tracer/implementation.py). A process
# picks one at its first import of commlens, and the peers a test starts
# inherit the environment that decides it; so the suite runs over one
# implementation per run, chosen here before anything imports commlens:
# `pytest --implementation=python` is the run over the Python twins (the
# Makefile's test target runs the fast tests that way after the full run),
# `--implementation=compiled` refuses to run if the C did not build.
# tests/test_differential.py compares the two side by side in either run.

def pytest_addoption(parser):
    parser.addoption(
        "--implementation", choices=("compiled", "python"), default=None,
        help="run over the compiled paths (fail if they did not build) or over their "
             "Python twins (COMMLENS_PUREPYTHON=1, for the peers too); default: "
             "what commlens picks by itself")


def pytest_configure(config):
    wanted = config.getoption("--implementation")
    if wanted is None:
        return
    if "commlens.tracer.implementation" in sys.modules:
        raise pytest.UsageError("--implementation: commlens was imported before conftest")
    if wanted == "python":
        os.environ["COMMLENS_PUREPYTHON"] = "1"
    else:
        os.environ.pop("COMMLENS_PUREPYTHON", None)
    from commlens.tracer import implementation
    if implementation.IMPLEMENTATION != wanted:
        raise pytest.UsageError(
            f"--implementation={wanted}: this process runs {implementation.IMPLEMENTATION}"
            f" ({implementation.REASON})")


def pytest_report_header(config):
    from commlens.tracer import implementation
    return (f"commlens implementation: {implementation.IMPLEMENTATION} "
            f"({implementation.REASON})")


@pytest.fixture(scope="session")
def rabbitmq():
    """The real broker; .ci/run starts it. Missing is a failure, never a skip."""
    if not broker_accepts():
        wait_for(broker_accepts, timeout=30, message="RabbitMQ on 127.0.0.1:5672")
    return BROKER


@pytest.fixture(scope="session")
def conf():
    from oslo_config import cfg

    # oslo.messaging registers its tracing options on the global CONF only,
    # so tests use the global CONF as services do.
    cfg.CONF([], project="commlens-tests")
    return cfg.CONF


@pytest.fixture(scope="session")
def collector(rabbitmq, tmp_path_factory):
    with run_collector(EXPORT_URL, tmp_path_factory.mktemp("collector")) as process:
        wait_for(lambda: collector_ready(process), timeout=30, message="collector ready")
        yield process


@pytest.fixture
def start_peer(rabbitmq, tmp_path):
    """Start an RPC server process: start_peer(url, topic, service=..., ...);
    ``script`` is another peer of tests/peers/ taking the same arguments,
    ``args`` more of them."""
    peers = []

    def start(url, topic, service="peer-server", executor="threading",
              notifications=False, otel=False, env=None, script="rpc_peer.py", args=()):
        log_path = tmp_path / f"peer-{len(peers)}.log"
        command = [sys.executable, str(PEERS / script), "--url", url,
                   "--topic", topic, "--executor", executor, *args]
        if notifications:
            command.append("--notifications")
        if otel:
            command.append("--otel")
        environment = dict(os.environ, COMMLENS_SERVICE_NAME=service, **(env or {}))
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                       env=environment, text=True)
        peer = Peer(process, log_path)
        peers.append(peer)
        line = process.stdout.readline()
        if line.strip() != "READY":
            peer.stop()
            raise AssertionError(f"peer did not start: {line!r}\n{peer.log()}")
        return peer

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def topic(request):
    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}".replace("[", "-").replace("]", "")


@pytest.fixture
def rpc_client(conf):
    """rpc_client(url, topic, **prepare) -> an RPCClient; transports cleaned up."""
    import oslo_messaging as om

    transports = []

    def make(url, topic, fanout=False, **prepare):
        transport = om.get_rpc_transport(conf, url=url)
        transports.append(transport)
        client = om.get_rpc_client(transport, om.Target(topic=topic, fanout=fanout))
        return client.prepare(**prepare) if prepare else client

    yield make
    for transport in transports:
        transport.cleanup()


@pytest.fixture(autouse=True)
def _outbound_http_hook_undone():
    """A commlens+ transport made in this process also hooks its outbound
    requests (as it does in a service); undone after every test, or tests
    that use this process as a plain HTTP client would see their calls
    recorded as another service's, depending on the order they run in."""
    yield
    from commlens.middleware import http_client
    http_client.uninstrument()


@pytest.fixture
def start_wsgi(rabbitmq, tmp_path):
    """Start a WSGI service process; returns (peer, base URL)."""
    peers = []

    def start(kind, service, downstream=None, endpoints=""):
        log_path = tmp_path / f"wsgi-{len(peers)}.log"
        command = [sys.executable, str(PEERS / "wsgi_service.py"), "--kind", kind,
                   "--service", service]
        if downstream:
            command += ["--downstream", downstream]
        if endpoints:
            command += ["--endpoints", endpoints]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        peer = Peer(process, log_path)
        peers.append(peer)
        words = process.stdout.readline().split()
        if not words or words[0] != "READY":
            peer.stop()
            raise AssertionError(f"WSGI service did not start\n{peer.log()}")
        return peer, f"http://127.0.0.1:{words[1]}"

    yield start
    for peer in peers:
        peer.stop()
