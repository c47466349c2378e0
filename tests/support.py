"""Shared test support: constants, polling, real processes and scrapes.

Every test run ships to its own exchange on the real broker, so runs never
see each other's data; every test uses its own topic, so tests never see
each other's series.
"""

import contextlib
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from prometheus_client.parser import text_string_to_metric_families

RUN_ID = uuid.uuid4().hex[:10]
BROKER = ("127.0.0.1", 5672)
EXPORT_URL = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-test-{RUN_ID}"
              f"&queue=commlens-test-{RUN_ID}")
RABBIT_URL = "rabbit://guest:guest@127.0.0.1:5672/"
COMMLENS_URL = "commlens+" + RABBIT_URL
PEERS = pathlib.Path(__file__).parent / "peers"
ARTIFACTS = pathlib.Path(__file__).parent.parent / "artifacts"

# This test process is itself an instrumented service ("test-client"); the
# environment is how a non-oslo service configures commlens.
os.environ.update({
    "COMMLENS_SERVICE_NAME": "test-client",
    "COMMLENS_EXPORT_URL": EXPORT_URL,
    "COMMLENS_SHIP_INTERVAL": "0.2",
    "COMMLENS_HOP_SAMPLE_RATIO": "1",
})


def wait_for(predicate, timeout=20.0, interval=0.1, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last: {last!r}")


@contextlib.contextmanager
def serve_wsgi(app):
    """A threaded werkzeug server on a free loopback port; yields its base URL."""
    import threading

    from werkzeug import serving

    server = serving.make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(5)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_accepts():
    try:
        with socket.create_connection(BROKER, timeout=1):
            return True
    except OSError:
        return False


class Metrics:
    """A scrape of /metrics, looked up by name and a subset of labels."""

    def __init__(self, text):
        self.text = text
        self.samples = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, sample.labels, sample.value))

    def value(self, name, **labels):
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(v for n, ls, v in self.samples
                   if n == name and all(ls.get(k) == str(val) for k, val in labels.items()))

    def series(self, name, **labels):
        return [(ls, v) for n, ls, v in self.samples
                if n == name and all(ls.get(k) == str(val) for k, val in labels.items())]

class Clock:
    """A clock a test moves by hand (``clock.now += 5``), for a Collector's
    ``clock`` or ``wall_clock``."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class CollectorProcess:
    def __init__(self, process, base_url, log_path):
        self.process = process
        self.base_url = base_url
        self.log_path = log_path

    def get(self, path, timeout=5):
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.status, response.read().decode()

    def metrics(self):
        return Metrics(self.get("/metrics")[1])

    def hops(self, **match):
        """Recent hops whose fields equal ``match``."""
        hops = json.loads(self.get("/api/hops?limit=10000")[1])["hops"]
        return [h for h in hops if all(h.get(k) == v for k, v in match.items())]

    def wait_metric(self, name, expected, timeout=20, **labels):
        return wait_for(lambda: self.metrics().value(name, **labels) == expected or None,
                        timeout=timeout,
                        message=f"{name}{labels} == {expected}") and True

    def json(self, path):
        return json.loads(self.get(path)[1])

    def trace(self, trace_or_request_id, timeout=30):
        """The assembled trace, once the collector has closed it."""
        def found():
            try:
                return self.json("/api/traces/" + trace_or_request_id)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                raise
        return wait_for(found, timeout=timeout, message=f"trace {trace_or_request_id}")

    def log(self):
        return self.log_path.read_text()


def error_hop(trace_id, span_id, parent_id, service, side, request_id=None):
    """A failed RPC hop, as an agent records it."""
    return {"trace_id": trace_id, "span_id": span_id, "parent_id": parent_id,
            "service": service, "side": side, "protocol": "rpc", "peer": None,
            "target": "topic", "operation": "build", "kind": "call", "outcome": "error",
            "error": "Boom", "start": time.time(), "duration": 0.01,
            "request_id": request_id, "global_request_id": None}


def add_error_traces(recorders, count, request_id=None):
    """``count`` traces of three hops from three recorders (processes), one
    chain each; their trace ids."""
    from commlens.tracer import context

    trace_ids = [context.new_trace_id() for _ in range(count)]
    for n, trace_id in enumerate(trace_ids):
        spans = [context.new_span_id() for _ in range(3)]
        for k in range(3):
            recorder = recorders[(n + k) % len(recorders)]
            recorder.add_hop(error_hop(trace_id, spans[k], spans[k - 1] if k else None,
                                       recorder.service, "server" if k % 2 == 0 else "client",
                                       request_id if k == 0 else None))
    return trace_ids


def ship_recorders(export_url, recorders):
    """Each recorder (a process) ships what it holds, one more call sent
    (``commlens_rpc_sent_total``) since last time."""
    from commlens.tracer import metrics
    from commlens.tracer import shipping

    for recorder in recorders:
        recorder.inc(metrics.RPC_SENT, (recorder.service, "topic", "build", "call"))
        transport = shipping.AmqpTransport(export_url)
        assert shipping.Shipper(recorder, transport, 1.0).ship_once()
        transport.close()


# Traces close after this quiet period in the tests' collectors (default 5 s).
TRACE_QUIET = "1.5s"


@contextlib.contextmanager
def run_collector(export_url, tmp_path, extra_args=(), port=None):
    """A collector process; ``port``: where it listens (a restart on the same
    port keeps its history file), else a free one."""
    port = port or free_port()
    log_path = tmp_path / f"collector-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "commlens.cli.main", "collector",
             "--listen", f"127.0.0.1:{port}", "--export-url", export_url,
             "--history", str(tmp_path / f"history-{port}.sqlite"),
             "--trace-quiet", TRACE_QUIET, "--metrics-warm-up", "0", *extra_args],
            stdout=log, stderr=subprocess.STDOUT)
    collector = CollectorProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        yield collector
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

def collector_ready(collector):
    if collector.process.poll() is not None:
        raise AssertionError("collector exited:\n" + collector.log())
    try:
        return collector.get("/readyz")[0] == 200
    except OSError:
        return False

class Peer:
    def __init__(self, process, log_path):
        self.process = process
        self.log_path = log_path

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Demo:
    """``commlens demo`` on its embedded default, in a process of its own."""

    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "demo.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "commlens.cli.main", "demo", "--listen",
                 f"127.0.0.1:{self.port}", "--no-live", "--duration", "300", *args],
                stdout=log, stderr=subprocess.STDOUT)

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return response.read().decode()

    def json(self, path):
        return json.loads(self.get(path))

    def fault(self, name, on=True):
        request = urllib.request.Request(f"{self.base}/api/demo/faults/{name}",
                                         method="POST" if on else "DELETE")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def metrics(self):
        return Metrics(self.get("/metrics"))

    def up(self):
        if self.process.poll() is not None:
            raise AssertionError("demo exited:\n" + self.log_path.read_text())
        try:
            return self.get("/readyz") and True
        except OSError:
            return False


_LEAK_MEASURE = """
import gc as _gc, sys as _sys
for _ in range(WARM_UP):
    one_of_each()
_gc.collect()
_before = _sys.getallocatedblocks()
for _ in range(ROUNDS):
    one_of_each()
_gc.collect()
print(_sys.getallocatedblocks() - _before)
"""


def blocks_left_behind(script, warm_up=100, rounds=1000):
    """Memory blocks still allocated after ``rounds`` more calls of the
    ``one_of_each()`` that ``script`` defines, in a fresh process that
    records but never ships (the compiled paths' leak checks)."""
    env = dict(os.environ, COMMLENS_EXPORT_URL="memory://", COMMLENS_SHIP_INTERVAL="3600",
               COMMLENS_HOP_SAMPLE_RATIO="0", COMMLENS_SERVICE_NAME="leak-check")
    measure = _LEAK_MEASURE.replace("WARM_UP", str(warm_up)).replace("ROUNDS", str(rounds))
    done = subprocess.run([sys.executable, "-c", script + measure], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def mutations(value, count, seed=7):
    """``count`` copies of ``value`` with one to three characters replaced,
    deleted or inserted: what a peer's garbled traceparent or baggage looks
    like, for the tests that compare two readers of it."""
    rng = random.Random(seed)
    alphabet = "0123456789abcdefABCDEF-;=,. xyz\t"
    for _ in range(count):
        chars = list(value)
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.5:
                chars[where] = rng.choice(alphabet)
            elif action < 0.75:
                del chars[where]
            else:
                chars.insert(where, rng.choice(alphabet))
        yield "".join(chars)
