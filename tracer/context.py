"""Identity of a hop: W3C trace context and the caller's service.

Over HTTP these are the ``traceparent`` and ``baggage`` headers; over RPC the
same keys at the top level of the message context, which is exactly where
oslo.messaging's own OpenTelemetry tracing (18.3+) puts them, so a fleet that
mixes both joins into one trace.

Parsing is hand-written rather than done with OpenTelemetry's propagators
because it sits on every hop and must stay within a few microseconds; the
format is small and strict (https://www.w3.org/TR/trace-context/).
"""

import contextvars
import re

from commlens.tracer import implementation
from commlens.tracer import wire

# tracer/_speedups.c, or its Python twin tracer/_speedups_py.py
_speedups = implementation.module("speedups")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
# The baggage member naming the service that sent the hop, with the kind of
# hop and the sender's span id as properties. Each instrumented sender
# overwrites it; the receiver trusts it only if the span id matches.
BAGGAGE_SERVICE = "commlens.service"

_MAX_HEADER = 8192  # W3C recommends at least 8192 bytes for baggage; we stop there
_ZERO_TRACE_ID = "0" * 32  # all-zero ids are invalid in W3C
_ZERO_SPAN_ID = "0" * 16
# version-trace_id-parent_id-flags; the last group is the flags' last digit,
# which holds the sampled bit. The ids are the wire format's (tracer/wire.py).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-(%s)-(%s)-[0-9a-f]([0-9a-f])"
                          % (wire.TRACE_ID, wire.SPAN_ID))
# Our member, in the order with_baggage_sender writes it.
_SENDER = re.compile(r"(?:^|[,\s])commlens\.service=([A-Za-z0-9][A-Za-z0-9_.\-]{0,63})"
                     r";kind=([a-z]{1,16});span=([0-9a-f]{16})\s*(?:,|$)")



class TraceContext(_speedups.TraceContext):
    """What one hop knows of its place in a trace.

    ``TraceContext(trace_id=None, span_id=None, parent_id=None,
    sampled=True)``; its fields are tracer/_speedups_py.py's (compiled as
    tracer/_speedups.c), as it is made for every hop. ``service`` is the service serving this hop:
    outbound REST calls made while it is current are that service's
    (several may share a process). ``child_failed`` is set when a call this
    hop made failed: if the hop still succeeds it absorbed an error (retry,
    fallback) and is shipped, so the chain shows where the error stopped.

    A hop's own ids are drawn when first needed (``ensure_ids``): most hops
    are never shipped and make no calls, and on a WSGI server's request
    path drawing them was about a tenth of commlens's cost. Until then
    ``span_id`` is None, and so is ``trace_id`` for a new trace's first hop.
    Readers of the ids other than the hop's own sampling decision
    (Recorder.keeps_hop) call ``ensure_ids()`` first.

    The compiled paths read the fields directly, so each takes only what
    the tracer writes (an id: None or lowercase hex of its W3C length, not
    all zero; ``sampled``, ``child_failed``: a bool; ``service``: None or a
    str) and none can be deleted: a service's code that tries gets a
    TypeError, ValueError or AttributeError at the assignment.
    """

    __slots__ = ()

    def ensure_ids(self):
        if self.trace_id is None:
            # Also when a span id was set without a trace id (none of ours):
            # the hop starts a fresh trace, never a traceparent without one.
            self.trace_id, self.span_id = new_trace_id(), new_span_id()
        elif self.span_id is None:
            self.span_id = new_span_id()

    def traceparent(self):
        if self.span_id is None or self.trace_id is None:
            self.ensure_ids()
        return "00-%s-%s-%s" % (self.trace_id, self.span_id,
                                "01" if self.sampled else "00")

    def __repr__(self):
        return f"TraceContext({self.trace_id}, {self.span_id}, parent={self.parent_id})"


# Ids: random lowercase hex, never all zero, drawn by a generator seeded
# from the OS again in every forked child (tracer/_speedups.c).
new_trace_id = _speedups.new_trace_id
new_span_id = _speedups.new_span_id


def parse_traceparent(value):
    """(trace_id, span_id, sampled) from a traceparent, or None if not valid.

    The one parser of a traceparent: the RPC and WSGI hooks call it through
    child_of_incoming, the stamping of an outgoing hop through
    _injected_for_this_send. The compiled RPC receive path
    (middleware/_rpc_receive.c) reads the common case itself, a version-00
    value of 55 characters, and hands everything else to this function,
    which is its reference.
    """
    if not isinstance(value, str) or len(value) > 512:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flag_digit = match.groups()
    # Version 00 is exactly 55 characters; a later version may append fields;
    # ff is forbidden.
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    # The sampled flag is the lowest bit of the flags byte, so of its last digit.
    return trace_id, span_id, flag_digit in "13579bdf"


def parse_baggage_sender(value, parent_span_id):
    """(service, kind) of the sender from a W3C baggage value, or (None, None).

    Our member is ``commlens.service=NAME;kind=KIND;span=SPAN``. It counts
    only if SPAN is the parent span of the hop being received: a service in
    between that forwards baggage without being instrumented by commlens
    (OpenTelemetry propagates baggage as it is) leaves a stale member, which
    must not name the wrong caller.
    """
    if not isinstance(value, str) or len(value) > _MAX_HEADER:
        return None, None
    match = _SENDER.search(value)
    if match is None:
        return None, None
    service, kind, span = match.groups()
    if span != parent_span_id:
        return None, None
    return service, kind


def with_baggage_sender(existing, service, kind, span_id):
    """A baggage value naming this sender, keeping other members."""
    member = "%s=%s;kind=%s;span=%s" % (BAGGAGE_SERVICE, service, kind, span_id)
    if not existing or not isinstance(existing, str) or len(existing) > _MAX_HEADER:
        return member
    kept = [m for m in existing.split(",")
            if m.strip() and not m.strip().startswith(BAGGAGE_SERVICE + "=")]
    kept.append(member)
    return ",".join(kept)


# The hop this thread (or greenthread) is serving right now: outgoing calls
# made while it is set become its children. A new thread or greenthread
# starts without it; tracer/propagation.py hands it to spawned work.
_current = contextvars.ContextVar("commlens_current_hop", default=None)


# The ContextVar's own methods, not functions around them: they run on every
# request and message, where a Python frame more is measurable. The
# compiled paths (middleware/_*.c) set and reset the variable itself.
current_var = _current
current = _current.get
set_current = _current.set  # returns the token for reset_current


def reset_current(token):
    """Undo set_current, also from another context (an RPC reply run by
    another thread)."""
    try:
        _current.reset(token)
    except ValueError:
        _current.set(None)


# Undo set_current where the set ran in the same frame, so the token is
# always this context's (the WSGI middleware around the application call).
reset_current_in_frame = _current.reset


def current_service(default):
    """The service of the hop being served, else ``default``."""
    parent = _current.get()
    return parent.service if parent is not None and parent.service else default


def mark_child_failed():
    """The hop being served made a call that failed."""
    parent = _current.get()
    if parent is not None:
        parent.child_failed = True


def child_of_incoming(traceparent_value):
    """The context of a hop received with ``traceparent_value`` (maybe None),
    its own ids not drawn yet.

    Returns (TraceContext, valid) where valid is False when a value was
    present but malformed.
    """
    parsed = parse_traceparent(traceparent_value) if traceparent_value else None
    if parsed is None:
        return TraceContext(), traceparent_value is None
    trace_id, parent_id, sampled = parsed
    return TraceContext(trace_id, None, parent_id, sampled), True


def outgoing():
    """The context for a hop we send: a child of the hop being served, else
    of the active OpenTelemetry span, else the first hop of a new trace."""
    parent = _current.get()
    if parent is not None:
        parent.ensure_ids()
        return TraceContext(parent.trace_id, new_span_id(), parent.span_id, parent.sampled)
    if _otel_context_var is None or _otel_context_var.get():
        otel = otel_current()
        if otel is not None:
            return TraceContext(otel[0], new_span_id(), otel[1])
    return new_trace()


def new_trace():
    """The context of a new trace's first hop, its ids drawn."""
    return TraceContext(new_trace_id(), new_span_id())


# stamp_outgoing(carrier, service, kind): put this hop's trace context and
# our baggage member into ``carrier`` (an RPC message context or HTTP request
# headers); return the hop's context.
#
# A traceparent already in the carrier is kept only if it is the active
# OpenTelemetry span: oslo.messaging's own tracing (or another OpenTelemetry
# instrumentation) opened a producer span for this very send and injected
# it, so our hop is that span and both tracers see one trace. Any other is
# stale, e.g. an incoming context forwarded as-is, and is replaced.
#
# It runs for every message sent. The common case (a dict carrier with no
# traceparent nor baggage yet, no active OpenTelemetry span) is compiled:
# between a driver's socket reads this function cost a service about 10 µs
# in Python, several times its cost in a loop. Everything else is
# _stamp_outgoing_in_python, which is also the reference for what the
# compiled case does.
stamp_outgoing = _speedups.stamp_outgoing


def _stamp_outgoing_in_python(carrier, service, kind):
    existing = carrier.get(TRACEPARENT)
    ctx = _injected_for_this_send(existing) if existing is not None else None
    if ctx is None:
        ctx = outgoing()
        carrier[TRACEPARENT] = ctx.traceparent()
    carrier[BAGGAGE] = with_baggage_sender(carrier.get(BAGGAGE), service, kind, ctx.span_id)
    return ctx


def _injected_for_this_send(traceparent_value):
    """The context of a traceparent injected by the active OpenTelemetry span, else None."""
    parsed = parse_traceparent(traceparent_value)
    if parsed is None or parsed[:2] != otel_current():
        return None
    parent = _current.get()
    if parent is None:
        return TraceContext(parsed[0], parsed[1], None, parsed[2])
    parent.ensure_ids()
    return TraceContext(parsed[0], parsed[1], parent.span_id, parsed[2])


def otel_current():
    """(trace_id, span_id) of the active OpenTelemetry span, if any.

    A service that also runs OpenTelemetry instrumentation (oslo.middleware's
    TracingMiddleware, say) keeps one trace when commlens joins in.
    """
    span = _otel_active_span()
    if span is None:
        return None
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return "%032x" % ctx.trace_id, "%016x" % ctx.span_id


def _otel_span_reader():
    """(a function returning the active OpenTelemetry span or None, the
    ContextVar holding OpenTelemetry's current context or None).

    It is asked on every outgoing hop, and most processes have no span at
    all. OpenTelemetry's public ``get_current_span()`` takes four calls to
    say so; with its default contextvars runtime context, an empty context
    in that ContextVar says it at once, and a span is one dict look-up away.
    Any other runtime context (OTEL_PYTHON_CONTEXT) gets the public function.
    """
    try:
        from opentelemetry import context as otel_context
        from opentelemetry.trace import get_current_span
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return (lambda: None), None
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    current_context = getattr(runtime, "_current_context", None)
    if not isinstance(current_context, contextvars.ContextVar) or not isinstance(_SPAN_KEY, str):
        return get_current_span, None

    def active_span():
        return current_context.get().get(_SPAN_KEY)

    return active_span, current_context


_otel_active_span, _otel_context_var = _otel_span_reader()


_speedups.bind_stamping(current=current_var, otel_context=_otel_context_var,
                        trace_context=TraceContext, in_python=_stamp_outgoing_in_python)
