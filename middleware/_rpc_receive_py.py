"""The RPC server's per-message path in Python: the reference for middleware/_rpc_receive.c.

middleware/rpc_driver.py is the driver wrapper; this module is what runs
for every RPC message a service receives, from its receipt to its reply,
and rpc_driver.py says what is recorded and why. A Receiver (one per
listener) reads the message context and counts the message; the Incoming
it returns is what the RPC server acknowledges, replies to or requeues,
timing the processing in between:

    incoming = receiver.wrap(message)   # read and counted; waits for a worker
    incoming.acknowledge()              # dispatch: the hop is the current one
    incoming.reply(result)              # or reply(failure=...), requeue()

From ``wrap`` (the listener handing the message to the RPC server, which
queues it for its executor) to ``acknowledge`` (a worker took it) is the
message's pool wait; from there to the reply, its processing, during which
it is one of the handlers in flight of the listener's ``Pool``.

Reading the context is rpc_driver.py's own Python (``in_python``, that is
CommlensDriver._received): the compiled module reads the common contexts
itself and hands it the rest. tracer/implementation.py picks this module
or the compiled one.
"""

import operator
import sys
import threading
import time

OK = "ok"  # metrics.OK

_clock = time.perf_counter  # CLOCK_MONOTONIC, as the compiled path reads it
_SSIZE_LIMIT = sys.maxsize + 1


class Pool:
    """Pool(size): the handlers in flight of one RPC server's executor pool
    of ``size`` workers (0 while unknown), and the most there were at once
    since the last ``take_peak()``. Shared by the Receivers its listener
    makes, so a renamed listener keeps counting the messages in flight."""

    __slots__ = ("_size", "in_flight", "_peak", "_lock")

    def __init__(self, size=0):
        self.size = size
        self.in_flight = 0
        self._peak = 0
        # Worker threads dispatch and reply concurrently: ``+=`` on an
        # attribute is not atomic in Python (the compiled Pool holds the GIL).
        self._lock = threading.Lock()

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, value):
        value = operator.index(value)  # an int, as the compiled Pool's Py_ssize_t
        if not -_SSIZE_LIMIT <= value < _SSIZE_LIMIT:
            raise OverflowError("pool size out of range")
        if value < 0:
            raise ValueError("pool size: not negative")
        self._size = value

    def dispatched(self):
        with self._lock:
            self.in_flight += 1
            if self.in_flight > self._peak:
                self._peak = self.in_flight

    def done(self):
        with self._lock:
            if self.in_flight > 0:
                self.in_flight -= 1

    def take_peak(self):
        """The most handlers in flight at once since the last call; the
        next interval's peak starts from those in flight now."""
        with self._lock:
            peak, self._peak = self._peak, self.in_flight
            return peak


class Receiver:
    """Receiver(*, service, topic, recorder, ...): the per-message path of
    one rpc_driver._InstrumentedListener."""

    def __init__(self, *, service, topic, recorder, received_metric, hops_metric,
                 pool_wait_metric, pool, method_label, incoming_type, trace_context, current,
                 in_python, failed, add_hop, recording_failed):
        if not (isinstance(incoming_type, type) and issubclass(incoming_type, Incoming)):
            raise TypeError("incoming_type: a subclass of Incoming")
        if type(pool) is not Pool:
            raise TypeError("pool: a Pool")
        self.service = service
        self.topic = topic
        self._inc = recorder.inc
        self._observe = recorder.observe
        self._keeps_hop = recorder.keeps_hop
        self._received_metric = received_metric
        self._hops_metric = hops_metric
        self._pool_wait_metric = pool_wait_metric
        self._pool = pool
        self._incoming_type = incoming_type  # rpc_driver._InstrumentedIncoming
        self._trace_context = trace_context  # context.TraceContext
        self._current = current              # ContextVar of the hop being served
        self._in_python = in_python          # (message) -> the Incoming, or the message
        self._failed = failed                # (incoming, failure, duration)
        self._add_hop = add_hop              # (incoming, outcome, error, duration)
        self._recording_failed = recording_failed  # (exception)

    def wrap(self, message):
        """The Incoming the RPC server gets, the message counted (or the
        message itself if its context is not a dict)."""
        return self._in_python(message)

    def incoming(self, message, ctx, caller, method, kind):
        """The Incoming of a message whose context the driver read."""
        if type(ctx) is not self._trace_context:
            raise TypeError("incoming: ctx is not a TraceContext")
        ctxt = message.ctxt
        self._inc(self._received_metric, (self.service, caller, self.topic, method, kind))
        return self._incoming_type(self, message, ctxt, ctx, caller, method, kind)


class Incoming:
    """One RPC message from receipt to reply (rpc_driver._InstrumentedIncoming).

    ``ctxt``, ``message``, ``msg_id`` and ``client_timeout`` are the inner
    message's, which the RPC server may replace; ``ctx``, ``caller``,
    ``method`` and ``kind`` are what the Receiver read.
    """

    __slots__ = ("_receiver", "inner", "ctxt", "message", "msg_id", "client_timeout", "ctx",
                 "caller", "method", "kind", "received", "start", "end", "_context_token",
                 "_dispatched", "_done")

    def __init__(self, receiver, inner, ctxt, ctx, caller, method, kind):
        self._receiver = receiver
        self.inner = inner
        self.ctxt = ctxt
        self.ctx = ctx
        self.caller = caller
        self.method = method
        self.kind = kind
        self.received = self.start = self.end = _clock()
        self._context_token = None
        self._dispatched = False
        self._done = False
        # What the RPC server reads of a message, as the inner one has it.
        self.message = inner.message
        self.msg_id = inner.msg_id
        self.client_timeout = getattr(inner, "client_timeout", None)

    @property
    def topic(self):
        return self._receiver.topic

    @property
    def pool_wait(self):
        """Seconds from receipt to dispatch; None until dispatched."""
        return self.start - self.received if self._dispatched else None

    def acknowledge(self):
        result = self.inner.acknowledge()
        # Dispatch starts: the hop is the one served until the reply, so the
        # calls its endpoint makes are its children.
        self.start = _clock()
        receiver = self._receiver
        try:
            if not self._dispatched:
                self._dispatched = True
                receiver._pool.dispatched()
                receiver._observe(receiver._pool_wait_metric,
                                  (receiver.service, receiver.topic, self.method),
                                  self.start - self.received)
            self._context_token = receiver._current.set(self.ctx)
        except Exception as exc:
            receiver._recording_failed(exc)
        return result

    def reply(self, reply=None, failure=None):
        # The processing time ends before the reply goes out; the recording
        # is done after, so the caller does not wait for it.
        self.end = _clock()
        try:
            return self.inner.reply(reply=reply, failure=failure)
        finally:
            self._finish(failure)

    def requeue(self):
        self.end = _clock()
        try:
            return self.inner.requeue()
        finally:
            self._finish(None)

    def heartbeat(self):
        return self.inner.heartbeat()

    def _finish(self, failure):
        """The processing ended (``failure``: None, an exception or an
        exc_info): recorded once; never raises."""
        if self._done:
            return
        self._done = True
        if self._dispatched:
            self._receiver._pool.done()
        try:
            self._record(failure)
        except Exception as exc:
            self._receiver._recording_failed(exc)

    def _record(self, failure):
        receiver = self._receiver
        token = self._context_token
        if token is not None:
            self._context_token = None
            try:
                receiver._current.reset(token)
            except ValueError:
                # The reply came from another context (another thread): the
                # hop is no longer served there either (context.reset_current).
                receiver._current.set(None)
        duration = self.end - self.start
        if failure is not None:
            receiver._failed(self, failure, duration)
            return
        # One update for the processing metrics and the graph edge alike
        # (tracer/derived.py).
        receiver._observe(receiver._hops_metric,
                          (receiver.service, self.caller, receiver.topic, self.method, OK),
                          duration)
        if receiver._keeps_hop(self.ctx.trace_id, duration, self.ctx.child_failed):
            receiver._add_hop(self, OK, None, duration)
