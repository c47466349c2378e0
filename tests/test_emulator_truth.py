"""The emulator's ground truth (what the fault soak checks commlens against)
counts what really happened, through real oslo.messaging dispatch."""

import json
import uuid

import oslo_messaging as om
import pytest

from commlens.emulator import truth as truth_mod
from support import wait_for


class _Endpoint:
    def __init__(self):
        self.ran = []

    def echo(self, ctxt, value):
        self.ran.append(value)
        return value

    def _private(self, ctxt):
        return "never dispatched"


def test_ground_truth_counts_sends_and_dispatches_through_real_oslo_messaging(conf):
    truth = truth_mod.GroundTruth()
    topic = "truth-" + uuid.uuid4().hex[:8]
    transport = om.get_rpc_transport(conf, url="fake://")
    endpoint = _Endpoint()
    server = om.get_rpc_server(transport, om.Target(topic=topic, server="s1"),
                               [truth.endpoint(endpoint, "svc-server", topic)],
                               executor="threading")
    server.start()
    try:
        client = truth.client(om.get_rpc_client(transport, om.Target(topic=topic)),
                              "svc-client", topic)
        assert client.call({}, "echo", value=1) == 1
        assert client.prepare(server="s1").call({}, "echo", value=2) == 2
        client.cast({}, "echo", value=3)
        fanout = truth.client(om.get_rpc_client(transport, om.Target(topic=topic, fanout=True)),
                              "svc-client", topic, fanout=True)
        fanout.cast({}, "echo", value=4)
        wait_for(lambda: len(endpoint.ran) == 4, message="four messages dispatched")
        # The dispatcher refuses a private method through the proxy as it would
        # without it (NoSuchMethod, back as a remote error): sent, never received.
        with pytest.raises(Exception, match="_private"):
            client.call({}, "_private")
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
    rows = {tuple(row[:-1]): row[-1] for row in json.loads(truth.as_json())}
    assert rows == {
        ("sent", "svc-client", topic, "echo", "call"): 2,
        ("sent", "svc-client", topic, "echo", "cast"): 1,
        ("sent", "svc-client", topic, "echo", "fanout"): 1,
        ("sent", "svc-client", topic, "_private", "call"): 1,
        ("received", "svc-server", topic, "echo"): 4,
    }


def test_ground_truth_counts_each_request_a_wsgi_application_sees():
    truth = truth_mod.GroundTruth()
    app = truth.wsgi(lambda environ, start_response: [b"ok"], "svc-api")
    for _ in range(3):
        assert app({}, lambda *args: None) == [b"ok"]
    assert json.loads(truth.as_json()) == [["http", "svc-api", 3]]
