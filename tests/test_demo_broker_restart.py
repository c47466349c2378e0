"""``commlens demo``'s broker-restart fault closes the demo's connections and no one else's.

The demo runs over the shared broker; the test holds a connection of its own
beside it, and the fault goes through RabbitMQ's management API
(rabbitmq_management, enabled by scripts/ensure-rabbitmq).
"""

import base64
import json
import signal
import urllib.request
import uuid

import pika
import pytest

from support import RABBIT_URL, Demo, wait_for

pytestmark = pytest.mark.slow

MANAGEMENT = "http://127.0.0.1:15672"
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def _connections():
    """{broker's connection name: client-provided name} of every connection."""
    request = urllib.request.Request(
        MANAGEMENT + "/api/connections?columns=name,user_provided_name",
        headers={"Authorization": AUTH})
    with urllib.request.urlopen(request, timeout=10) as response:
        return {c["name"]: c.get("user_provided_name") for c in json.loads(response.read())}


def _named(prefix):
    return {name for name, given in _connections().items()
            if given and (given == prefix or given.startswith(prefix + ":"))}


def test_broker_restart_closes_only_the_demos_own_connections(rabbitmq, tmp_path):
    bystander_name = f"commlens-test-bystander-{uuid.uuid4().hex[:8]}"
    parameters = pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/")
    parameters.client_properties = {"connection_name": bystander_name}
    bystander = pika.BlockingConnection(parameters)
    demo = Demo(tmp_path, "--transport", RABBIT_URL)
    prefix = None
    try:
        wait_for(demo.up, timeout=60, message="demo over RabbitMQ serving")
        prefix = demo.json("/api/demo")["connection_name"]

        def received():
            return demo.metrics().value("commlens_rpc_received_total",
                                        service="nova-conductor", method="build_instances")
        wait_for(lambda: received() > 0, timeout=30, message="the plane at work")
        # Five parts' oslo.messaging connections and AMQP shippers, and the intake.
        before = wait_for(lambda: (lambda n: n if len(n) >= 11 else None)(_named(prefix)),
                          timeout=30, message="the demo's connections listed")
        assert _named(bystander_name), "the test's own connection is listed"

        counted = received()
        answer = demo.fault("broker-restart")
        assert answer["closed_connections"] >= len(before)
        wait_for(lambda: not (before & set(_connections())), timeout=30,
                 message="every connection the demo had is gone")
        wait_for(lambda: received() > counted + 5, timeout=60,
                 message="the plane recovers and keeps counting")
        # The management API names a new connection a few seconds after it opens.
        wait_for(lambda: len(_named(prefix)) >= 11, timeout=30,
                 message="the demo connected again")

        # The test's connection was never touched.
        assert bystander.is_open and _named(bystander_name)
        channel = bystander.channel()
        channel.queue_declare(queue="", exclusive=True)
        bystander.process_data_events(time_limit=0.1)
        assert bystander.is_open
    finally:
        bystander.close()
        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(60) == 0
        if prefix:
            _delete_shipping_queues(prefix)


def _delete_shipping_queues(prefix):
    """The demo's per-run exchange, collector queue and dead letters."""
    run = prefix.rsplit("-", 1)[1]
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
    try:
        channel = connection.channel()
        for queue in (f"commlens.demo-{run}", f"commlens.demo-{run}.dead"):
            channel.queue_delete(queue=queue)
        for exchange in (f"commlens-demo-{run}", f"commlens.demo-{run}.dead"):
            channel.exchange_delete(exchange=exchange)
    finally:
        connection.close()


def test_broker_restart_without_the_management_api_is_a_clear_error(rabbitmq, tmp_path):
    bystander = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
    # Nothing listens on port 9 (discard) on loopback: the API cannot be reached.
    demo = Demo(tmp_path, "--transport", RABBIT_URL, "--rabbitmq-management-url",
                "http://guest:s3cret-pw@127.0.0.1:9/")
    try:
        wait_for(demo.up, timeout=60, message="demo over RabbitMQ serving")
        wait_for(lambda: "Ctrl-C stops" in demo.log_path.read_text(), timeout=60,
                 message="the plane started")
        request = urllib.request.Request(f"{demo.base}/api/demo/faults/broker-restart",
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)
        error = json.loads(raised.value.read())["error"]
        assert raised.value.code == 502
        assert "management API" in error and "nothing was closed" in error
        assert "s3cret-pw" not in error
        assert bystander.is_open
    finally:
        bystander.close()
        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(60) == 0
    log = demo.log_path.read_text()
    assert "management API" in log and "s3cret-pw" not in log
