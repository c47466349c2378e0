"""An RPC exception reaches the service as the inner driver raised it: real
RabbitMQ, real oslo.messaging rabbit driver, with and without commlens.

Compiled, the inner driver is called from C (middleware/_rpc_send.c) and no
commlens frame is in the traceback: it is the one plain ``rabbit://`` gives.
Over the Python twin, one frame is, and only that one:
``middleware/_rpc_send_py.py, in send`` (docs/architecture.md, "Tracebacks").
"""

import pathlib
import traceback

import oslo_messaging as om
import pytest

from support import COMMLENS_URL, RABBIT_URL, blocks_left_behind

import commlens.exporters
import commlens.middleware
import commlens.tracer
from commlens.tracer import implementation

COMMLENS_DIRS = tuple(str(pathlib.Path(package.__file__).parent) + "/" for package in (
    commlens.tracer, commlens.middleware, commlens.exporters))
DEAD_BROKER = "guest:guest@127.0.0.1:1/"


def frames(exc):
    """(file, function) of each frame of the exception's traceback."""
    return [(f.filename, f.name) for f in traceback.extract_tb(exc.__traceback__)]


def commlens_frames(exc):
    return [(pathlib.Path(path).name, name) for path, name in frames(exc)
            if path.startswith(COMMLENS_DIRS)]


def raised(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


def assert_as_the_inner_driver_raised_it(plain, wrapped):
    assert type(wrapped) is type(plain) or type(wrapped).__name__ == type(plain).__name__
    if implementation.IMPLEMENTATION == "compiled":
        assert commlens_frames(wrapped) == []
        assert [name for _, name in frames(wrapped)] == [name for _, name in frames(plain)]
    else:
        assert commlens_frames(wrapped) == [("_rpc_send_py.py", "send")]
        assert len(frames(wrapped)) == len(frames(plain)) + 1


def test_a_messaging_timeout_has_no_commlens_frame(rabbitmq, rpc_client, topic):
    # Nobody consumes the topic: the call times out.
    plain = raised(lambda: rpc_client(RABBIT_URL, topic, timeout=1).call({}, "echo", value=1))
    wrapped = raised(
        lambda: rpc_client(COMMLENS_URL, topic, timeout=1).call({}, "echo", value=1))
    assert isinstance(wrapped, om.MessagingTimeout)
    assert_as_the_inner_driver_raised_it(plain, wrapped)


def test_a_transport_error_has_no_commlens_frame(rabbitmq, rpc_client, topic):
    plain = raised(lambda: rpc_client("rabbit://" + DEAD_BROKER, topic, retry=0).cast(
        {}, "echo", value=1))
    wrapped = raised(lambda: rpc_client("commlens+rabbit://" + DEAD_BROKER, topic,
                                        retry=0).cast({}, "echo", value=1))
    assert_as_the_inner_driver_raised_it(plain, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("error", ["PortBindingFailed", "ValueError"])
def test_a_remote_error_has_no_commlens_frame(start_peer, rpc_client, topic, error):
    start_peer(COMMLENS_URL, topic)
    plain = raised(lambda: rpc_client(RABBIT_URL, topic).call({}, "fail", error=error))
    wrapped = raised(lambda: rpc_client(COMMLENS_URL, topic).call({}, "fail", error=error))
    assert_as_the_inner_driver_raised_it(plain, wrapped)
    # The server's own traceback, carried in the reply, has none either.
    remote = str(wrapped)
    assert not any(name in remote for name in ("rpc_driver.py", "_rpc_send", "_rpc_receive",
                                               "propagation.py"))


SENDER_SEND_LEAK_CHECK = r"""
import oslo_messaging as om
from oslo_config import cfg
from commlens.middleware import _rpc_send, rpc_driver
from commlens.tracer import recorder as recorder_mod

cfg.CONF([], project="commlens-leak-check")
driver = om.get_rpc_transport(cfg.CONF, url="commlens+fake://")._driver
endings = []

def inner_send(target, ctxt, message, wait_for_reply=None, timeout=None,
               call_monitor_timeout=None, retry=None, transport_options=None):
    if endings[-1] is not None:
        raise endings[-1]
    return ctxt

sender = _rpc_send.Sender(
    service="leak-check", recorder=driver._recorder, sent_metric="commlens_rpc_sent_total",
    reply_wait_metric="commlens_rpc_reply_wait_seconds",
    budget_metric="commlens_rpc_timeout_budget_used",
    over_half_metric="commlens_rpc_calls_over_half_timeout_total",
    method_label=rpc_driver.labels.method,
    context_copy=rpc_driver._context_copy, stamp=rpc_driver.context.stamp_outgoing,
    failed=driver._send_failed, add_hop=driver._add_send_hop,
    recording_failed=driver._send_recording_failed, inner_send=inner_send)
target = om.Target(topic="leak-check")
fanout = om.Target(topic="leak-check", fanout=True)

def one_of_each():
    for end in (None, om.MessagingTimeout("late"), RuntimeError("broker gone")):
        endings.append(end)
        for tgt, wait in ((target, True), (target, None), (fanout, None)):
            for ctxt in ({"request_id": "req-1"}, object()):
                for message in ({"method": "build_instances"}, 12):  # 12: begin fails
                    for call in (
                            lambda: sender.send(tgt, ctxt, message, wait),
                            lambda: sender.send(tgt, ctxt, message, wait_for_reply=wait,
                                                timeout=5, retry=0),
                            lambda: sender.send(target=tgt, ctxt=ctxt, message=message),
                            lambda: sender.send(tgt),  # not a send: the inner one says so
                    ):
                        try:
                            call()
                        except Exception:
                            pass
        endings.pop()
    recorder_mod.get_recorder().snapshot(1.0)
"""


def test_the_compiled_send_leaks_nothing():
    # Sender.send (middleware/_rpc_send.c) counts its references by hand:
    # a missed release on any path (ok, raised; positional, keyword; a
    # context refused; commlens's own error; arguments it cannot read)
    # would leave 1,000 objects here, or more.
    if implementation.IMPLEMENTATION != "compiled":
        pytest.skip("the Python twin counts no references")
    assert blocks_left_behind(SENDER_SEND_LEAK_CHECK) < 200
