"""A process's RPC identity follows its WSGI identity under real WSGI servers
(issue 17, item 2): gunicorn and uwsgi run nova-api's start-up order
(tests/peers/rpc_then_wsgi_app.py: the transport first, a snapshot shipped
under the server's name, then the application), and the collector ends with
every cast under the application's name and no node for the server's."""

import os
import subprocess
import sys
import urllib.request
import uuid

import pytest

from support import COMMLENS_URL, EXPORT_URL, PEERS, Peer, free_port, wait_for

pytestmark = pytest.mark.slow

REQUESTS = 5


def _command(server, port):
    binary = os.path.join(os.path.dirname(sys.executable), server)
    if server == "gunicorn":
        return [sys.executable, binary, "--chdir", str(PEERS), "--bind", f"127.0.0.1:{port}",
                "--workers", "1", "rpc_then_wsgi_app:application"]
    # OpenStack's uwsgi configurations load the application in each worker
    # (lazy-apps) and let its threads run (enable-threads).
    return [binary, "--http-socket", f"127.0.0.1:{port}", "--wsgi-file",
            str(PEERS / "rpc_then_wsgi_app.py"), "--master", "--processes", "1",
            "--lazy-apps", "--enable-threads", "--die-on-term"]


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_the_server_s_name_never_stays_on_the_graph(collector, rabbitmq, tmp_path, server):
    service = f"nova-api-{uuid.uuid4().hex[:6]}"
    topic = f"identity-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "COMMLENS_SERVICE_NAME"}
    env.update(TEST_TRANSPORT_URL=COMMLENS_URL, TEST_TOPIC=topic, TEST_SERVICE=service,
               TEST_NAMING_DELAY="1.5", COMMLENS_EXPORT_URL=EXPORT_URL,
               COMMLENS_SHIP_INTERVAL="0.2")
    log_path = tmp_path / f"{server}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(_command(server, port), stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    peer = Peer(process, log_path)
    try:
        # The provisional name reached the collector before the application named it.
        wait_for(lambda: collector.metrics().value("commlens_rpc_sent_total", service=server,
                                                   target=topic) == 1 or None,
                 timeout=60, message=f"the cast shipped under {server}'s name")

        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    return True
            except OSError:
                return False
        wait_for(answers, timeout=30, message=f"{server} answers")
        for _ in range(REQUESTS - 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                assert response.status == 200
        collector.wait_metric("commlens_rpc_sent_total", REQUESTS + 1, service=service,
                              target=topic, timeout=30)
    finally:
        peer.stop()
    metrics = collector.metrics()
    assert metrics.value("commlens_rpc_sent_total", service=service, method="started") == 1
    assert not metrics.series("commlens_rpc_sent_total", service=server), peer.log()
    assert not [labels for labels, _ in metrics.series("commlens_http_requests_total")
                if server in labels.values()]
    nodes = {node["service"] for node in collector.json("/api/graph?window=15m")["nodes"]}
    assert server not in nodes
