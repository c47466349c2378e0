"""What the emulated control plane really did, counted by itself, not by commlens.

The fault soak (benchmarks/fault_soak.py) compares commlens's counters with
this ground truth after broker restarts, alarms, collector restarts and
frozen servers. It counts on the application's side of oslo.messaging and
of the WSGI middleware, so nothing commlens does can change it:
- ``sent``: every RPC call or cast a client of the plane made, by (service,
  topic, method, kind), counted before the call, as commlens counts a send;
- ``received``: every RPC an endpoint ran, by (service, topic, method);
- ``http``: every request a REST service's application saw, by service.
"""

import collections
import json
import threading


class GroundTruth:

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()

    def count(self, *key):
        with self._lock:
            self._counts[key] += 1

    def as_json(self):
        with self._lock:
            rows = [list(key) + [value] for key, value in sorted(self._counts.items())]
        return json.dumps(rows)

    def client(self, rpc_client, service, topic, fanout=False):
        return _CountedClient(rpc_client, self, service, topic, fanout)

    def endpoint(self, endpoint, service, topic):
        return _CountedEndpoint(endpoint, self, service, topic)

    def wsgi(self, app, service):
        def counted(environ, start_response):
            self.count("http", service)
            return app(environ, start_response)
        return counted


class _CountedClient:
    """An RPCClient (or a prepared one) that counts what it sends."""

    def __init__(self, rpc_client, truth, service, topic, fanout):
        self._client = rpc_client
        self._truth = truth
        self._service = service
        self._topic = topic
        self._fanout = fanout

    def prepare(self, **kwargs):
        return _CountedClient(self._client.prepare(**kwargs), self._truth, self._service,
                              self._topic, self._fanout)

    def call(self, ctxt, method, **kwargs):
        self._truth.count("sent", self._service, self._topic, method, "call")
        return self._client.call(ctxt, method, **kwargs)

    def cast(self, ctxt, method, **kwargs):
        kind = "fanout" if self._fanout else "cast"
        self._truth.count("sent", self._service, self._topic, method, kind)
        return self._client.cast(ctxt, method, **kwargs)


class _CountedEndpoint:
    """An RPC endpoint whose public methods count each run.

    oslo.messaging's dispatcher finds methods with getattr and allows the
    ones without a leading underscore: this proxy answers the same way.
    """

    def __init__(self, endpoint, truth, service, topic):
        self._endpoint = endpoint
        self._truth = truth
        self._service = service
        self._topic = topic

    def __getattr__(self, name):
        attribute = getattr(self._endpoint, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        def counted(ctxt, *args, **kwargs):
            self._truth.count("received", self._service, self._topic, name)
            return attribute(ctxt, *args, **kwargs)
        return counted
