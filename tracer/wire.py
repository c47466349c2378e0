"""The wire format between agents and the collector: its one home.

Agents (tracer/recorder.py builds snapshots, tracer/hops.py builds hops,
tracer/shipping.py sends them) and the collector (exporters/collector.py,
chains.py, intake.py) both import what they must agree on from here, and
nothing else: this module imports no other part of commlens.

Two kinds of message travel, JSON, on one topic exchange:

- a snapshot (``SNAPSHOT_FORMAT``): one process's cumulative counters,
  histograms and gauges, with ``SNAPSHOT_FIELDS`` and a ``process`` object
  of ``PROCESS_FIELDS``; routed by ``snapshot_routing_key``;
- hops (``HOPS_FORMAT``): hop records of one trace's routing key, each with
  exactly ``HOP_FIELDS``; routed by ``hop_routing_key``.

A change a collector of the previous version could not read takes a new
format version; the collector refuses (and counts) a format it does not know.
"""

import re

SNAPSHOT_FORMAT = "commlens.snapshot/2"
HOPS_FORMAT = "commlens.hops/1"

SNAPSHOT_FIELDS = ("format", "process", "seq", "sent_at", "interval", "final",
                   "counters", "histograms", "gauges", "hops")
# One entry of a snapshot's "histograms": the counts per bucket of
# metrics.LATENCY_BUCKETS (then +Inf), their sum, and the smallest and
# largest value observed (null both before any).
HISTOGRAM_FIELDS = ("name", "labels", "counts", "sum", "min", "max")

# The previous snapshot format, still read (agents are upgraded after the
# collector): the same fields, but histograms without min and max, in the
# buckets of these bounds (then +Inf).
SNAPSHOT_FORMAT_1 = "commlens.snapshot/1"
SNAPSHOT_1_HISTOGRAM_FIELDS = ("name", "labels", "counts", "sum")
SNAPSHOT_1_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SNAPSHOT_FORMATS = (SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_1)
PROCESS_FIELDS = ("id", "service", "host", "pid", "started_at")
# What a hops message says of its process (the snapshot says the rest).
HOPS_PROCESS_FIELDS = ("id", "service")

HOP_FIELDS = ("trace_id", "span_id", "parent_id", "service", "side", "protocol", "peer",
              "target", "operation", "kind", "outcome", "error", "start", "duration",
              "request_id", "global_request_id", "server", "timeout", "pool_wait")
# ``server`` is the RPC server (oslo.messaging's ``Target.server``, a host):
# on a client hop the one the call was addressed to, on a server hop the one
# that answered; None over HTTP and for calls to a whole topic. Agents before
# it send hops without it, which collectors read as None; collectors before
# it take the fields they know: so the format stays version 1.
# ``timeout`` (seconds) is an RPC call's timeout on its client hop (what
# oslo.messaging gave the driver's send), None elsewhere; read as None from
# agents before it, the same way.
# ``pool_wait`` (seconds) is on RPC server hops only: the time the message
# waited for a free worker of the server's executor pool; None elsewhere
# and from agents before it (read the same way as ``server``).
# Both are numbers, like ``start`` and ``duration``.
HOP_NUMBER_FIELDS = ("start", "duration", "timeout", "pool_wait")
# A hop's side and protocol.
CLIENT = "client"
SERVER = "server"
RPC = "rpc"
HTTP = "http"
SIDES = frozenset((CLIENT, SERVER))
PROTOCOLS = frozenset((RPC, HTTP))

# W3C trace context ids, lowercase hex of fixed width: a hop's trace_id,
# span_id and parent_id, and the ids inside a traceparent
# (tracer/context.parse_traceparent is built on the same two patterns).
TRACE_ID = "[0-9a-f]{32}"
SPAN_ID = "[0-9a-f]{16}"
# Compiled matchers, not functions around them: the collector checks every
# hop it receives with them.
match_trace_id = re.compile(TRACE_ID + r"\Z").match
match_span_id = re.compile(SPAN_ID + r"\Z").match

# The exchange every agent publishes to and every collector binds: one name
# by default (``?exchange=`` in the export URL changes it) and the same
# declaration on both sides, or RabbitMQ refuses the second one.
DEFAULT_EXCHANGE = "commlens"


def declare_exchange(channel, name):
    """Declare the exchange on a pika channel, as agents and collectors all do."""
    channel.exchange_declare(exchange=name, exchange_type="topic",
                             durable=True, auto_delete=False)


def snapshot_routing_key(process):
    """A process's snapshots always share a key: with collector replicas behind
    a consistent-hash exchange, one replica owns a process's cumulative totals,
    so the replicas' sums never count it twice."""
    return "snapshot.%s.%s" % (process["service"], process["id"])


def hop_routing_key(trace_id):
    """Hops of one trace always share a key, so one replica assembles the whole
    trace; the first two hex digits give 256 keys to spread."""
    return "hops." + trace_id[:2]
