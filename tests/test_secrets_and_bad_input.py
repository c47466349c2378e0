"""Nothing secret leaves the process; bad input is survived, skipped and counted."""

import json
import pathlib
import subprocess
import sys
import time
import uuid

import oslo_messaging as om
import pika
import pytest

from support import (COMMLENS_URL, EXPORT_URL, RABBIT_URL, collector_ready, run_collector,
                     wait_for)

pytestmark = pytest.mark.slow

COMMLENS = str(pathlib.Path(sys.executable).parent / "commlens")  # the console script


@pytest.fixture
def secret_broker_user(rabbitmq):
    """A RabbitMQ user whose password appears nowhere else."""
    user = "commlens-secret-" + uuid.uuid4().hex[:6]
    password = "Pw" + uuid.uuid4().hex
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run(ctl + ["add_user", user, password], check=True, capture_output=True,
                   timeout=60)
    subprocess.run(ctl + ["set_permissions", "-p", "/", user, ".*", ".*", ".*"],
                   check=True, capture_output=True, timeout=60)
    yield user, password
    subprocess.run(ctl + ["delete_user", user], capture_output=True, timeout=60)


def _capture_queue(url, exchange):
    """A queue bound to the exchange, to read the raw shipped bodies."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue=queue, exchange=exchange, routing_key="#")
    return connection, channel, queue


def test_no_password_or_token_reaches_metrics_hops_records_or_logs(
        secret_broker_user, start_peer, rpc_client, tmp_path, topic):
    user, password = secret_broker_user
    token = "gAAAAAB" + uuid.uuid4().hex  # a Fernet-looking keystone token
    exchange = "commlens-secret-" + uuid.uuid4().hex[:6]
    broker = f"{user}:{password}@127.0.0.1:5672/"
    export_url = f"amqp://{broker}?exchange={exchange}&queue={exchange}"
    connection, channel, capture = _capture_queue("amqp://" + broker, exchange)
    try:
        with run_collector(export_url, tmp_path) as collector:
            wait_for(lambda: collector_ready(collector), timeout=30, message="collector ready")
            # The server's export URL is its transport URL's broker, with the
            # secret password: the default an operator gets.
            peer = start_peer(f"commlens+rabbit://{broker}", topic, service="secret-server",
                              env={"COMMLENS_EXPORT_URL": export_url})
            client = rpc_client(COMMLENS_URL, topic)
            ctxt = {"auth_token": token, "request_id": "req-" + str(uuid.uuid4()),
                    "password": password}
            assert client.call(ctxt, "echo", value="v") == "v"
            with pytest.raises(ValueError):
                client.call(ctxt, "fail", error="ValueError")
            collector.wait_metric("commlens_rpc_processing_errors_total", 1,
                                  service="secret-server", target=topic)

            bodies = []
            for _ in range(10000):  # agents keep shipping: read what is there now
                method, _props, body = channel.basic_get(capture, auto_ack=True)
                if method is None:
                    break
                bodies.append(body.decode())
            assert any("secret-server" in b for b in bodies)
            exposed = {
                "metrics": collector.get("/metrics")[1],
                "hops": collector.get("/api/hops")[1],
                "processes": collector.get("/api/processes")[1],
                "shipped records": "\n".join(bodies),
                "collector log": collector.log(),
                "server log": peer.log(),
            }
    finally:
        connection.close()
    for where, text in exposed.items():
        assert password not in text, f"broker password in {where}"
        assert token not in text, f"auth token in {where}"
    # The hops did keep what an SRE greps logs for.
    assert ctxt["request_id"] in exposed["hops"]


def test_garbage_context_from_a_peer_is_served_and_counted(collector, start_peer, conf, topic):
    start_peer(COMMLENS_URL, topic)
    # An uninstrumented sender that writes garbage where we read.
    transport = om.get_rpc_transport(conf, url=RABBIT_URL)
    try:
        client = om.get_rpc_client(transport, om.Target(topic=topic))
        garbage = [
            {"traceparent": "zz-not-a-trace",
             "baggage": "commlens.service=" + "x" * 100000 + ";kind=call"},
            {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
             "baggage": 'commlens.service=evil"} 1\nfake_metric{a="b;kind={"x": 1}'},
            {"traceparent": 42, "baggage": ["not", "a", "string"]},
            {"huge": "y" * 1_000_000},
        ]
        for ctxt in garbage:
            assert client.call(ctxt, "echo", value="fine") == "fine"
    finally:
        transport.cleanup()
    collector.wait_metric("commlens_rpc_received_total", 4, service="peer-server",
                          caller="unknown", target=topic, method="echo", kind="call")
    metrics = collector.metrics()
    assert metrics.value("commlens_agent_records_dropped_total", service="peer-server",
                         reason="bad_context") >= 3
    assert "evil" not in metrics.text and "fake_metric" not in metrics.text


def test_collector_skips_and_counts_non_json_foreign_and_malformed_messages(collector):
    before = collector.metrics()
    connection = pika.BlockingConnection(pika.URLParameters(EXPORT_URL.split("?")[0]))
    try:
        channel = connection.channel()
        exchange = EXPORT_URL.split("exchange=")[1].split("&")[0]
        for body in (b"\xff\xfe not json", b"[1, 2",
                     json.dumps({"format": "someone-else/2"}).encode(),
                     json.dumps({"format": "commlens.snapshot/1", "process": "x"}).encode(),
                     json.dumps({"format": "commlens.snapshot/1", "seq": 1, "interval": 1,
                                 "process": {"id": "p-" + uuid.uuid4().hex},
                                 "counters": [["commlens_rpc_sent_total", ["a"], 1],
                                              ["not_our_metric", [], 1], "junk"]}).encode()):
            channel.basic_publish(exchange, "snapshot.garbage", body)
    finally:
        connection.close()

    def counted():
        now = collector.metrics()
        delta = {o: now.value("commlens_collector_messages_total", outcome=o)
                 - before.value("commlens_collector_messages_total", outcome=o)
                 for o in ("malformed", "foreign", "accepted")}
        invalid = (now.value("commlens_collector_invalid_series_total")
                   - before.value("commlens_collector_invalid_series_total"))
        return (delta["malformed"] == 3 and delta["foreign"] == 1 and invalid == 3) or None

    wait_for(counted, message="garbage counted")
    assert collector.process.poll() is None
    assert collector.get("/healthz")[0] == 200


def test_collector_explains_a_bad_url_without_its_password(tmp_path):
    done = subprocess.run(
        [COMMLENS, "collector", "--listen", "127.0.0.1:0",
         "--export-url", "amqp://admin:Hunter2pw@127.0.0.1:5672/?heartbeat=notanumber"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "not a valid AMQP URL" in done.stderr
    assert "Hunter2pw" not in done.stderr + done.stdout

    done = subprocess.run([COMMLENS, "collector", "--export-url", "kafka://x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown scheme" in done.stderr


def test_collector_waits_for_an_unreachable_broker_and_says_so(tmp_path):
    with run_collector("amqp://guest:Hunter2pw@127.0.0.1:1/", tmp_path) as collector:
        wait_for(lambda: "retrying" in collector.log(), timeout=30,
                 message="a retry message in the collector log")
        status = wait_for(lambda: _status(collector, "/readyz"), message="readyz answers")
        assert status == 503
        assert _status(collector, "/metrics") == 200
        time.sleep(0.5)
        assert "Hunter2pw" not in collector.log()
        assert collector.process.poll() is None


def _status(collector, path):
    import urllib.error
    try:
        return collector.get(path)[0]
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None
