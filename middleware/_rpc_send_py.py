"""The RPC client's per-send path in Python: the reference for middleware/_rpc_send.c.

middleware/rpc_driver.py is the driver wrapper; this module is what runs
around every call, cast and fanout a service sends (CommlensDriver.send),
and rpc_driver.py says what it records and why. A Sender (one per driver)
begins a Send for each message:

    result = sender.send(target, ctxt, message, ...)   # CommlensDriver.send itself

which is:

    call = sender.begin(target, ctxt, message, wait_for_reply, timeout)  # None: unrecorded
    ... the inner driver sends call.ctxt ...
    call.end(None)   # or call.end(exception) if the send raised

What is rare (a context that is not a dict, a send that failed, a hop to
ship) is rpc_driver.py's own Python, given to the Sender when the driver
is made. tracer/implementation.py picks this module or the compiled one.
"""

import time

from commlens.tracer import implementation

CALL, CAST, FANOUT = "call", "cast", "fanout"
OK = "ok"  # metrics.OK
BUDGET_OVER = 0.5  # metrics.BUDGET_OVER
_INF = float("inf")

_clock = time.perf_counter  # CLOCK_MONOTONIC, as the compiled path reads it
_speedups = implementation.module("speedups")


class Sender:
    """Sender(*, service, recorder, ...): the per-send path of one
    rpc_driver.CommlensDriver."""

    def __init__(self, *, service, recorder, sent_metric, reply_wait_metric, budget_metric,
                 over_half_metric, method_label, context_copy, stamp, failed, add_hop,
                 recording_failed, inner_send):
        self._service = service
        self._recorder = recorder
        self._inc = recorder.inc
        self._observe = recorder.observe
        self._keeps_hop = recorder.keeps_hop
        self._sent_metric = sent_metric
        self._reply_wait_metric = reply_wait_metric
        self._budget_metric = budget_metric        # metrics.RPC_TIMEOUT_BUDGET.name
        self._over_half_metric = over_half_metric  # metrics.RPC_OVER_HALF_TIMEOUT.name
        self._method_label = method_label     # labels.method
        self._context_copy = context_copy     # rpc_driver._context_copy
        self._stamp = stamp                   # context.stamp_outgoing
        self._failed = failed                 # (send, exception, duration): the error path
        self._add_hop = add_hop               # (send, outcome, error, duration)
        self._recording_failed = recording_failed  # (exception)
        self._inner_send = inner_send         # the inner driver's send
        # The tokens of the calls waiting for a reply: released by the
        # driver's cleanup if their reply never comes.
        self._open_calls = set()

    def send(self, target, ctxt, message, wait_for_reply=None, timeout=None,
             call_monitor_timeout=None, retry=None, transport_options=None):
        """The inner driver's send, recorded: CommlensDriver.send is this method.

        The inner driver's exception is re-raised as it was. Compiled, the
        inner driver is called from C and no commlens frame is in its
        traceback; here one frame is, this one (docs/architecture.md, "Tracebacks"):
        Python adds the frame of every function an exception passes
        through, and only code that sees the exception can record it.
        """
        try:
            call = self.begin(target, ctxt, message, wait_for_reply, timeout)
        except Exception as exc:
            self._recording_failed(exc)
            call = None
        if call is None:
            return self._inner_send(
                target, ctxt, message, wait_for_reply=wait_for_reply, timeout=timeout,
                call_monitor_timeout=call_monitor_timeout, retry=retry,
                transport_options=transport_options)
        try:
            result = self._inner_send(
                target, call.ctxt, message, wait_for_reply=wait_for_reply, timeout=timeout,
                call_monitor_timeout=call_monitor_timeout, retry=retry,
                transport_options=transport_options)
        except BaseException as exc:
            call.end(exc)
            raise
        call.end(None)
        return result

    def begin(self, target, ctxt, message, wait_for_reply, timeout=None, /):
        """A Send, or None when the context cannot carry ours (counted as
        dropped "bad_context"): the send then goes on unrecorded. Raises
        only on commlens's own errors, which the driver counts and sends
        on without recording. ``timeout``: the send's, as oslo.messaging's
        RPC client passes it (``prepare(timeout=)``, else
        ``rpc_response_timeout``; None for casts)."""
        # A copy of the context, which we add our keys to.
        out = dict(ctxt) if type(ctxt) is dict else self._context_copy(ctxt)
        if not isinstance(out, dict):
            self._recorder.dropped("bad_context")
            return None
        call = Send(self, out)
        # Kept whole: its server is read only for the few hops kept.
        call.target = target
        try:
            if wait_for_reply:
                call.kind = CALL
                call.timeout = budget_timeout(timeout)
            else:
                call.kind = FANOUT if target.fanout else CAST
            call.method = self._method_label(message.get("method"))
            call.ctx = self._stamp(out, self._service, call.kind)
            if not isinstance(call.ctx, _speedups.TraceContext):
                raise TypeError("stamp did not return a TraceContext")
            call.topic = target.topic
            self._inc(self._sent_metric, (self._service, call.topic, call.method, call.kind))
            if call.kind == CALL:
                call.token = self._recorder.call_started(
                    (self._service, call.topic, call.method))
                self._open_calls.add(call.token)
        except BaseException:
            # A call already counted as waiting is finished, so the gauge
            # does not stay up for a send that goes out unrecorded.
            if call.token is not None:
                try:
                    self._recorder.call_finished(call.token)
                except Exception:
                    pass
                self._open_calls.discard(call.token)
            call.done = True
            raise
        call.start = _clock()
        return call

    def take_open_calls(self):
        """The tokens of the calls still waiting for a reply, forgotten here."""
        taken, self._open_calls = self._open_calls, set()
        return taken


class Send:
    """One message on its way: made by Sender.begin, ended by end()."""

    __slots__ = ("sender", "ctxt", "ctx", "kind", "topic", "method", "target", "token", "start",
                 "timeout", "done")

    def __init__(self, sender, ctxt):
        self.sender = sender
        self.ctxt = ctxt       # the message context sent: a copy, stamped
        self.ctx = None        # the hop's TraceContext
        self.kind = None       # call, cast or fanout
        self.topic = None
        self.method = None
        self.target = None     # the oslo.messaging Target sent to
        self.token = None      # a call's waiting-reply token
        self.start = 0.0
        self.timeout = None    # a call's timeout in seconds (budget_timeout), or None
        self.done = False

    def end(self, exc):
        """end(exception or None): the reply came (or the cast went out), or
        the send raised ``exception``. Records once; never raises."""
        if self.done:
            return
        self.done = True
        try:
            self._record_end(exc)
        except Exception as error:
            self.sender._recording_failed(error)

    def _record_end(self, exc):
        sender = self.sender
        duration = _clock() - self.start
        if self.token is not None:
            sender._recorder.call_finished(self.token)
            sender._open_calls.discard(self.token)
        if exc is not None:
            sender._failed(self, exc, duration)
            return
        if self.kind == CALL:
            # The service graph's client side is its sum (tracer/derived.py).
            sender._observe(sender._reply_wait_metric,
                            (sender._service, self.topic, self.method, OK), duration)
            if self.timeout is not None:
                # How much of its timeout the call used (the reply wait's
                # error path is rpc_driver.py's _record_budget).
                used = duration / self.timeout
                labels = (sender._service, self.topic, self.method)
                sender._observe(sender._budget_metric, labels, used)
                if used > BUDGET_OVER:
                    sender._inc(sender._over_half_metric, labels)
        if sender._keeps_hop(self.ctx.trace_id, duration, False):
            sender._add_hop(self, OK, None, duration)


def budget_timeout(timeout):
    """A call's timeout as the seconds its budget is measured against: a
    positive, finite int or float, else None (no budget: a call that waits
    forever, or a value that is not a number)."""
    if type(timeout) is not float and type(timeout) is not int:
        return None
    try:
        seconds = float(timeout)
    except OverflowError:
        return None
    return seconds if 0 < seconds < _INF else None
