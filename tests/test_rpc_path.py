"""The RPC path end to end: real RabbitMQ, real oslo.messaging, separate processes.

The test process is the caller ("test-client"), an RPC peer process is the
server ("peer-server"), and a collector process merges what both ship.
"""

import concurrent.futures
import threading

import oslo_messaging as om
import pytest

from support import COMMLENS_URL, RABBIT_URL, blocks_left_behind, wait_for

pytestmark = pytest.mark.slow


def test_received_counts_equal_sent_counts_per_method_and_kind(
        collector, start_peer, rpc_client, topic):
    start_peer(COMMLENS_URL, topic)
    client = rpc_client(COMMLENS_URL, topic)
    for i in range(7):
        assert client.call({}, "echo", value=i) == i
    for _ in range(4):
        client.cast({}, "count_cast")
    fanout = rpc_client(COMMLENS_URL, topic, fanout=True)
    for _ in range(3):
        fanout.cast({}, "count_cast")
    wait_for(lambda: client.call({}, "casts_seen") == 7, message="casts delivered")

    for method, kind, count in (("echo", "call", 7), ("count_cast", "cast", 4),
                                ("count_cast", "fanout", 3)):
        collector.wait_metric("commlens_rpc_received_total", count, service="peer-server",
                              caller="test-client", target=topic, method=method, kind=kind)
        collector.wait_metric("commlens_rpc_sent_total", count, service="test-client",
                              target=topic, method=method, kind=kind)
    metrics = collector.metrics()
    assert metrics.value("commlens_rpc_reply_wait_seconds_count", service="test-client",
                         target=topic, method="echo", outcome="ok") == 7
    assert metrics.value("commlens_rpc_processing_seconds_count", service="peer-server",
                         target=topic, method="echo", outcome="ok") == 7


def test_waiting_replies_follow_twenty_concurrent_slow_calls(
        collector, start_peer, rpc_client, topic):
    start_peer(COMMLENS_URL, topic)
    client = rpc_client(COMMLENS_URL, topic, timeout=60)
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(client.call, {}, "slow", seconds=4) for _ in range(20)]
        collector.wait_metric("commlens_rpc_waiting_replies", 20, timeout=10,
                              service="test-client", target=topic, method="slow")
        release.set()
        assert [f.result() for f in futures] == [4] * 20
    collector.wait_metric("commlens_rpc_waiting_replies", 0, service="test-client",
                          target=topic, method="slow")


def test_waiting_replies_return_to_zero_after_timeout(collector, start_peer, rpc_client, topic):
    start_peer(COMMLENS_URL, topic)
    client = rpc_client(COMMLENS_URL, topic, timeout=1)
    with pytest.raises(om.MessagingTimeout):
        client.call({}, "slow", seconds=3)
    collector.wait_metric("commlens_rpc_call_errors_total", 1, service="test-client",
                          target=topic, method="slow", outcome="timeout",
                          error="MessagingTimeout")
    assert collector.metrics().value("commlens_rpc_waiting_replies", service="test-client",
                                     target=topic, method="slow") == 0


def _raised(client, error):
    try:
        client.call({}, "fail", error=error)
    except Exception as exc:  # the class is what we compare
        return exc
    raise AssertionError("no exception")


@pytest.mark.parametrize("error, expected_label", [
    ("ValueError", "ValueError"),
    ("PortBindingFailed", "PortBindingFailed"),
    ("MessagingTimeout", "MessagingTimeout"),
])
def test_remote_errors_reach_the_caller_exactly_as_without_commlens(
        collector, start_peer, rpc_client, topic, error, expected_label):
    start_peer(COMMLENS_URL, topic)
    plain = _raised(rpc_client(RABBIT_URL, topic), error)
    wrapped = _raised(rpc_client(COMMLENS_URL, topic), error)
    assert type(wrapped).__name__ == type(plain).__name__
    assert type(wrapped).__mro__[1:] == type(plain).__mro__[1:] or type(wrapped) is type(plain)
    assert getattr(wrapped, "exc_type", None) == getattr(plain, "exc_type", None)

    collector.wait_metric("commlens_rpc_processing_errors_total", 2, service="peer-server",
                          target=topic, method="fail", error=expected_label)
    collector.wait_metric("commlens_rpc_call_errors_total", 1, service="test-client",
                          target=topic, method="fail", error=expected_label)
    assert collector.metrics().value("commlens_rpc_waiting_replies", service="test-client",
                                     target=topic) == 0


def test_send_to_an_unreachable_broker_is_a_transport_error(collector, rpc_client, topic):
    # A cast: for a call, the rabbit driver itself retries the reply queue's
    # connection forever, with or without commlens.
    dead = "guest:guest@127.0.0.1:1/"
    plain = _outcome(lambda: rpc_client("rabbit://" + dead, topic, retry=0).cast({}, "echo"))
    wrapped = _outcome(
        lambda: rpc_client("commlens+rabbit://" + dead, topic, retry=0).cast({}, "echo"))
    assert wrapped == plain != "ok"
    collector.wait_metric("commlens_rpc_call_errors_total", 1, service="test-client",
                          target=topic, method="echo", outcome="transport_error",
                          error=wrapped)


def test_waiting_replies_return_to_zero_when_the_driver_is_cleaned_up(
        collector, start_peer, conf, topic):
    start_peer(COMMLENS_URL, topic)
    transport = om.get_rpc_transport(conf, url=COMMLENS_URL)
    client = om.get_rpc_client(transport, om.Target(topic=topic), timeout=30)
    results = []
    caller = threading.Thread(
        target=lambda: results.append(_outcome(lambda: client.call({}, "slow", seconds=10))))
    caller.start()
    collector.wait_metric("commlens_rpc_waiting_replies", 1, timeout=10,
                          service="test-client", target=topic, method="slow")
    transport.cleanup()
    collector.wait_metric("commlens_rpc_waiting_replies", 0, timeout=10,
                          service="test-client", target=topic, method="slow")
    caller.join(40)
    assert results, "the call did not end"
    assert collector.metrics().value("commlens_rpc_waiting_replies", service="test-client",
                                     target=topic, method="slow") == 0


def _outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return type(exc).__name__


def test_notifications_are_counted_on_both_sides(collector, start_peer, conf, topic):
    start_peer(COMMLENS_URL, topic, notifications=True)
    transport = om.get_notification_transport(conf, url=COMMLENS_URL)
    try:
        notifier = om.Notifier(transport, publisher_id="compute.host-1", driver="messaging",
                               topics=[topic + "-notifications"])
        for _ in range(5):
            notifier.info({}, "compute.instance.create.end", {"id": 1})
        # The topic's own series: other tests notify the same event type.
        collector.wait_metric("commlens_notifications_received_total", 5,
                              service="peer-server", caller="test-client",
                              target=topic + "-notifications.info",
                              event_type="compute.instance.create.end", priority="info")
        # Each side ships on its own clock: the sender's count may arrive later.
        collector.wait_metric("commlens_notifications_sent_total", 5, service="test-client",
                              target=topic + "-notifications.info",
                              event_type="compute.instance.create.end", priority="info")
    finally:
        transport.cleanup()


def test_heartbeats_keep_a_long_call_alive_through_the_wrapper(
        collector, start_peer, rpc_client, topic):
    # With call_monitor_timeout the server heartbeats every timeout/2 s
    # (oslo.messaging skips it below 1 s) while it works; a wrapper that lost
    # heartbeats would time out after 2 s.
    start_peer(COMMLENS_URL, topic)
    client = rpc_client(COMMLENS_URL, topic, timeout=30, call_monitor_timeout=2)
    assert client.call({}, "slow", seconds=6) == 6


def test_requeued_notifications_are_redelivered_through_the_wrapper(
        collector, start_peer, conf, topic):
    start_peer(COMMLENS_URL, topic, notifications=True)
    transport = om.get_notification_transport(conf, url=COMMLENS_URL)
    try:
        notifier = om.Notifier(transport, publisher_id="compute.host-1", driver="messaging",
                               topics=[topic + "-notifications"])
        for i in range(3):
            notifier.warn({}, "compute.instance.delete.start", {"id": i})
        # Each one requeued once, then handled: received twice.
        collector.wait_metric("commlens_notifications_received_total", 6,
                              service="peer-server", caller="test-client",
                              target=topic + "-notifications.warn",
                              event_type="compute.instance.delete.start", priority="warn")
    finally:
        transport.cleanup()


SEND_LEAK_CHECK = r"""
import oslo_messaging as om
from oslo_config import cfg
from commlens.tracer import recorder as recorder_mod

cfg.CONF([], project="commlens-leak-check")
transport = om.get_rpc_transport(cfg.CONF, url="commlens+fake://")
sends = transport._driver._sends
target = om.Target(topic="leak-check")
fanout = om.Target(topic="leak-check", fanout=True)

class RequestContext:
    def to_dict(self):
        return {"request_id": "req-1"}

def one_of_each():
    for ctxt in ({"request_id": "req-1"}, RequestContext(), object()):
        for tgt, wait in ((target, True), (target, None), (fanout, None)):
            for end in (None, om.MessagingTimeout("late"), RuntimeError("broker gone")):
                call = sends.begin(tgt, ctxt, {"method": "build_instances", "args": {}}, wait)
                if call is not None:
                    call.end(end)
                    call.end(None)  # a second end records nothing
    # Failed sends' hops are always kept: taken here, as the shipper would.
    recorder_mod.get_recorder().snapshot(1.0)
"""


def test_the_compiled_send_path_leaks_nothing():
    # middleware/_rpc_send.c counts its references by hand: a missed release
    # on any path (call, cast, fanout; a dict context, one with to_dict, one
    # refused; a reply, a timeout, a transport error) would leave 1,000
    # objects here, or more.
    assert blocks_left_behind(SEND_LEAK_CHECK) < 200


RECEIVE_LEAK_CHECK = r"""
import threading
import oslo_messaging as om
from oslo_config import cfg
from commlens.middleware import rpc_driver
from commlens.tracer import recorder as recorder_mod

cfg.CONF([], project="commlens-leak-check")
transport = om.get_rpc_transport(cfg.CONF, url="commlens+fake://")

class Listener:
    batch_size, batch_timeout, prefetch_size = 1, None, -1

class Message:
    def __init__(self, ctxt):
        self.ctxt = ctxt
        self.message = {"method": "build_instances", "args": {}}
        self.msg_id = "m-1"
    def acknowledge(self): pass
    def reply(self, reply=None, failure=None): pass
    def requeue(self): pass

class Broken:
    def __init__(self, ctxt):
        self.ctxt = ctxt

listener = rpc_driver._InstrumentedListener(Listener(), transport._driver, "conductor", False)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MEMBER = "commlens.service=nova-api;kind=call;span=00f067aa0ba902b7"
CONTEXTS = [{}, {"traceparent": TRACEPARENT, "baggage": MEMBER}, {"traceparent": "garbage"},
            {"baggage": "vendor=1," + MEMBER}, {"msg_id": "x"}]

def one_of_each():
    for ctxt in CONTEXTS:
        for end in ("reply", "failure", "requeue", "other thread", "never acknowledged"):
            incoming = listener._wrap(Message(dict(ctxt)))
            if end != "never acknowledged":
                incoming.acknowledge()
            if end == "failure":
                incoming.reply(failure=ValueError("endpoint failed"))
            elif end == "requeue":
                incoming.requeue()
            elif end == "other thread":
                worker = threading.Thread(target=incoming.reply, args=({"ok": 1},))
                worker.start()
                worker.join()
            else:
                incoming.reply({"ok": 1})
    # A message the driver gives without a body: passed on unrecorded.
    broken = Broken({"traceparent": TRACEPARENT, "baggage": MEMBER.replace("call", "poke")})
    assert listener._wrap(broken) is broken
    # Failed messages' hops are always kept: taken here, as the shipper would.
    recorder_mod.get_recorder().snapshot(1.0)
"""


def test_the_compiled_receive_path_leaks_nothing():
    # middleware/_rpc_receive.c, like the send path: every kind of context
    # (compiled or read in Python), every ending (reply, failure, requeue, a
    # reply from another thread, no acknowledge) and a message without a
    # body, 26,000 times.
    assert blocks_left_behind(RECEIVE_LEAK_CHECK) < 200
