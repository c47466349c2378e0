"""Work a service does for a request continues that request's trace
(tracer/propagation.py): real RabbitMQ, real oslo.messaging rabbit driver.

The test process casts ``spawn_and_call`` to a peer (tests/peers/
spawning_peer.py) while serving a hop of its own; the peer's cast handler
hands work to a thread, a greenthread, an executor or a looping call, and
that work calls back into an RPC server in this process. The call back
belongs to the cast's trace exactly when it arrives with the cast's trace id.
"""

import os
import subprocess
import sys
import threading
import uuid

import oslo_messaging as om
import pytest

from support import COMMLENS_URL, wait_for

from commlens.tracer import context
from commlens.tracer import propagation

THREADING_WAYS = ["thread", "timer", "concurrent.futures", "futurist", "utils.spawn"]
EVENTLET_WAYS = ["eventlet.spawn", "eventlet.spawn_n", "eventlet.spawn_after",
                 "greenpool.spawn", "greenpool.spawn_n", "thread", "futurist", "utils.spawn",
                 "looping_call"]


class CallBacks:
    """The test's RPC endpoint: the trace id each call back arrived in."""

    def __init__(self):
        self.seen = {}  # (how, run) -> trace id of the hop serving the call back
        self.lock = threading.Lock()

    def called_back(self, ctxt, how, run):
        hop = context.current()
        with self.lock:
            self.seen[(how, run)] = hop.trace_id if hop is not None else None
        return True


@pytest.fixture
def callbacks(rabbitmq, conf):
    """An RPC server in this process: (topic, CallBacks)."""
    topic = "callbacks-" + uuid.uuid4().hex[:8]
    transport = om.get_rpc_transport(conf, url=COMMLENS_URL)
    endpoint = CallBacks()
    server = om.get_rpc_server(transport, om.Target(topic=topic, server="test"), [endpoint],
                               executor="threading", serializer=om.NoOpSerializer())
    server.start()
    yield topic, endpoint
    server.stop()
    server.wait()
    transport.cleanup()


@pytest.fixture
def spawning_peer(start_peer):
    """spawning_peer(topic, executor, *args): a peer whose casts spawn work."""
    def start(topic, executor, *args):
        return start_peer(COMMLENS_URL, topic, service="spawner", executor=executor,
                          script="spawning_peer.py", args=args)
    return start


def cast_in_a_trace(client, method, request_id=None, **kwargs):
    """Cast while serving a hop of this process's; returns its trace id."""
    served = context.new_trace()
    token = context.set_current(served)
    try:
        client.cast({"request_id": request_id} if request_id else {}, method, **kwargs)
    finally:
        context.reset_current(token)
    return served.trace_id


def _spawned_work_continues_the_trace(spawning_peer, callbacks, rpc_client, topic, executor,
                                      ways):
    peer = spawning_peer(topic, executor)
    callback_topic, endpoint = callbacks
    client = rpc_client(COMMLENS_URL, topic)
    traces = {how: cast_in_a_trace(client, "spawn_and_call", how=how, topic=callback_topic)
              for how in ways}
    wait_for(lambda: len(endpoint.seen) == len(ways), timeout=30,
             message=f"call backs {sorted(endpoint.seen)}")
    arrived = {how: endpoint.seen[(how, 1)] for how in ways}
    assert arrived == traces, peer.log()


@pytest.mark.slow
def test_work_spawned_in_threads_continues_the_trace_of_the_cast_that_spawned_it(
        spawning_peer, callbacks, rpc_client, topic):
    _spawned_work_continues_the_trace(spawning_peer, callbacks, rpc_client, topic,
                                      "threading", THREADING_WAYS)


@pytest.mark.slow
def test_work_spawned_in_greenthreads_continues_the_trace_of_the_cast_that_spawned_it(
        spawning_peer, callbacks, rpc_client, topic):
    _spawned_work_continues_the_trace(spawning_peer, callbacks, rpc_client, topic,
                                      "eventlet", EVENTLET_WAYS)


@pytest.mark.slow
def test_a_looping_call_started_by_a_request_leaves_its_trace_after_the_window(
        spawning_peer, callbacks, rpc_client, topic):
    spawning_peer(topic, "eventlet", "--loop-window", "1")
    callback_topic, endpoint = callbacks
    client = rpc_client(COMMLENS_URL, topic)
    trace_id = cast_in_a_trace(client, "spawn_and_call", how="looping_call",
                               topic=callback_topic, runs=8, interval=0.3)
    wait_for(lambda: len(endpoint.seen) == 8, timeout=30, message="eight runs")
    runs = [endpoint.seen[("looping_call", run)] for run in range(1, 9)]
    # The first runs are the request's; those after the window serve none:
    # each of their calls starts a trace of its own.
    assert runs[0] == trace_id
    assert trace_id not in runs[-3:]
    assert len(set(runs[-3:])) == 3


@pytest.mark.slow
def test_a_request_id_returns_every_trace_of_the_request_joined_entry_first(
        collector, spawning_peer, callbacks, rpc_client, topic):
    # A raw _thread is not patched: its call back starts a trace of its own,
    # which only the request id joins to the cast's.
    spawning_peer(topic, "threading")
    callback_topic, endpoint = callbacks
    client = rpc_client(COMMLENS_URL, topic)
    request_id = "req-" + str(uuid.uuid4())
    trace_id = cast_in_a_trace(client, "spawn_and_call", request_id=request_id,
                               how="raw_thread", topic=callback_topic)
    wait_for(lambda: endpoint.seen, message="the call back")
    split = endpoint.seen[("raw_thread", 1)]
    assert split != trace_id

    def joined():
        found = collector.trace(request_id)
        return found if len(found.get("trace_ids", ())) == 2 else None
    found = wait_for(joined, timeout=30, message="both traces of the request")
    assert found["request_id"] == request_id
    assert found["trace_ids"] == [trace_id, split]
    assert found["trace_id"] == trace_id
    entry = found["hops"][0]
    assert (entry["service"], entry["side"], entry["operation"], entry["trace_id"]) == (
        "test-client", "client", "spawn_and_call", trace_id)
    assert {(h["service"], h["side"], h["trace_id"]) for h in found["hops"]} == {
        ("test-client", "client", trace_id), ("spawner", "server", trace_id),
        ("spawner", "client", split), ("test-client", "server", split)}

    # The CLI's equivalent: the same request, its entry's trace named.
    done = subprocess.run([sys.executable, "-m", "commlens.cli.main", "trace", request_id,
                           "--collector", collector.base_url], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, COLUMNS="250"))
    assert done.returncode == 0, done.stderr
    assert f"Request {request_id}: 2 traces, entry {trace_id}" in done.stdout
    assert done.stdout.count("spawn_and_call") == 2 and "called_back" in done.stdout


@pytest.fixture
def instrumented():
    """Propagation patched in for the test, left as it was found after."""
    before = propagation.instrumented()
    propagation.instrument()
    yield
    if not before:
        propagation.uninstrument()


def run_in_hop(hop, fn):
    token = context.set_current(hop)
    try:
        return fn()
    finally:
        context.reset_current(token)


def test_instrument_patches_once_and_uninstrument_restores_every_original():
    import concurrent.futures
    import threading

    import futurist

    before = propagation.instrumented()
    propagation.uninstrument()
    originals = (threading.Thread.start, threading.Thread._bootstrap_inner,
                 concurrent.futures.ThreadPoolExecutor.submit, futurist.ThreadPoolExecutor.submit)
    try:
        propagation.instrument()
        patched = (threading.Thread.start, concurrent.futures.ThreadPoolExecutor.submit)
        propagation.instrument()  # twice: nothing wrapped twice
        assert (threading.Thread.start, concurrent.futures.ThreadPoolExecutor.submit) == patched
        assert threading.Thread.start is not originals[0]
        assert threading.Thread.start.__commlens_original__ is originals[0]
        propagation.uninstrument()
        propagation.uninstrument()
        assert (threading.Thread.start, threading.Thread._bootstrap_inner,
                concurrent.futures.ThreadPoolExecutor.submit,
                futurist.ThreadPoolExecutor.submit) == originals
    finally:
        if before:
            propagation.instrument()


def test_a_thread_subclass_with_its_own_run_continues_the_trace(instrumented):
    import threading

    class Worker(threading.Thread):
        def run(self):
            self.seen = context.current()

    hop = context.new_trace()
    worker = Worker()
    run_in_hop(hop, worker.start)
    worker.join()
    assert worker.seen is hop


def test_a_pool_worker_never_keeps_a_hop_between_items(instrumented):
    import concurrent.futures

    import futurist

    for pool in (concurrent.futures.ThreadPoolExecutor(1), futurist.ThreadPoolExecutor(1)):
        with pool:
            hop = context.new_trace()
            # The first item starts the pool's only worker, inside the hop.
            first = run_in_hop(hop, lambda pool=pool: pool.submit(context.current)).result()
            second = pool.submit(context.current).result()
            other = context.new_trace()
            third = run_in_hop(other, lambda pool=pool: pool.submit(context.current)).result()
        assert (first, second, third) == (hop, None, other)


def test_a_hop_handed_to_threads_has_its_ids_before_they_share_it(instrumented):
    import threading

    # A received hop draws its span id when first needed: threads that each
    # drew it at once would give their calls different parents. So the ids
    # are drawn where the hop is handed over, before any thread runs.
    hop = context.TraceContext(context.new_trace_id(), None, context.new_span_id())
    release = threading.Event()
    parents = []

    def call():
        release.wait(10)
        parents.append(context.outgoing().parent_id)

    threads = [threading.Thread(target=call) for _ in range(4)]
    run_in_hop(hop, lambda: [t.start() for t in threads])
    drawn = hop.span_id
    release.set()
    for thread in threads:
        thread.join()
    assert drawn is not None and parents == [drawn] * 4
