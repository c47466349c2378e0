"""The metric schema: names, types and labels exposed on the collector's /metrics.

These names are a contract (docs/metrics.md): dashboards, alert rules and
operators' queries use them. The recorder keys its aggregates by the names
here and the collector refuses anything that is not declared here.
Labels stay bounded: service names, topics, RPC methods, route templates,
status codes, exception class names; never a host, an id or a raw URL.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge, histogram
    labels: tuple
    help: str
    # A histogram's bucket bounds (then +Inf): durations unless it says.
    buckets: tuple = None
    # How the collector combines a gauge's values from several processes:
    # "sum" (waiting replies, handlers in flight) or "max" (a peak ratio,
    # which added up over processes would mean nothing).
    merge: str = "sum"

    def __post_init__(self):
        if self.kind == "histogram" and self.buckets is None:
            object.__setattr__(self, "buckets", LATENCY_BUCKETS)


# Seconds. Covers a fast local RPC (ms) up to OpenStack's long timeouts,
# with a bound at each timeout operators meet, so a call cut off by one
# lands just above its bound and no bucket spans two of them: 30 (common
# HTTP client and proxy timeouts), 60 (oslo.messaging's rpc_response_timeout,
# Apache's Timeout), 120, 300 (nova's vif_plugging_timeout, a common raised
# rpc_response_timeout), 600 (neutron's rpc_response_max_timeout), 1800
# (nova's long_rpc_timeout). The bounds are a contract (the ``le`` values on
# /metrics); the collector clamps its percentile estimates to the smallest
# and largest value observed (exporters/graph.py).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# Fractions of a call's timeout its reply wait used (the timeout budget):
# dense where a call starts to matter (past half), with 1.0 the timeout
# itself, so a call that timed out lands in +Inf or on 1.0, never below.
BUDGET_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# A call is close to its timeout past this fraction of it.
BUDGET_OVER = 0.5

# Outcomes of an RPC call, seen by the caller.
OK = "ok"
REMOTE_ERROR = "remote_error"
TIMEOUT = "timeout"
TRANSPORT_ERROR = "transport_error"
# Outcome of processing, seen by the server; 5xx for REST.
ERROR = "error"
# An outbound REST request that got no response at all.
FAILED = "failed"

RPC_SENT = Metric(
    "commlens_rpc_sent_total", "counter",
    ("service", "target", "method", "kind"),
    "RPC messages sent, by target topic, method and kind (call, cast, fanout).")
RPC_RECEIVED = Metric(
    "commlens_rpc_received_total", "counter",
    ("service", "caller", "target", "method", "kind"),
    "RPC messages received and handed to the service, by caller service.")
RPC_WAITING_REPLIES = Metric(
    "commlens_rpc_waiting_replies", "gauge",
    ("service", "target", "method"),
    "RPC calls sent whose reply has not arrived yet.")
RPC_REPLY_WAIT = Metric(
    "commlens_rpc_reply_wait_seconds", "histogram",
    ("service", "target", "method", "outcome"),
    "Time a caller waited for an RPC reply (outcome: ok, remote_error, "
    "timeout, transport_error).")
RPC_TIMEOUT_BUDGET = Metric(
    "commlens_rpc_timeout_budget_used", "histogram",
    ("service", "target", "method"),
    "Each finished RPC call's reply wait as a fraction of its timeout "
    "(prepare(timeout=) or rpc_response_timeout); a timed-out call is 1.0 or above.",
    BUDGET_BUCKETS)
RPC_OVER_HALF_TIMEOUT = Metric(
    "commlens_rpc_calls_over_half_timeout_total", "counter",
    ("service", "target", "method"),
    "RPC calls whose reply wait used more than half of their timeout "
    "(timed-out calls included).")
RPC_CALL_ERRORS = Metric(
    "commlens_rpc_call_errors_total", "counter",
    ("service", "target", "method", "outcome", "error"),
    "Failed RPC sends and calls seen by the caller, by exception class.")
RPC_PROCESSING = Metric(
    "commlens_rpc_processing_seconds", "histogram",
    ("service", "target", "method", "outcome"),
    "Time the server spent on an RPC, from dispatch to reply (outcome: ok, error).")
# Where a call's wait goes, server side (docs/architecture.md, "Where the
# wait goes"): the time a message waited for a free worker of the RPC
# server's executor pool (from the listener handing it over to dispatch),
# and the pool's load. The caller's reply wait minus this and the
# processing is the time queued in the broker and in transit.
RPC_POOL_WAIT = Metric(
    "commlens_rpc_pool_wait_seconds", "histogram",
    ("service", "target", "method"),
    "Time an RPC waited for a free worker of the server's executor pool, from the "
    "listener handing it over to its dispatch.")
RPC_HANDLERS_IN_FLIGHT = Metric(
    "commlens_rpc_handlers_in_flight", "gauge",
    ("service", "target"),
    "RPCs dispatched to the server's endpoints and not yet replied, summed over processes.")
RPC_EXECUTOR_POOL_SIZE = Metric(
    "commlens_rpc_executor_pool_size", "gauge",
    ("service", "target"),
    "Size of the RPC server's executor pool (executor_thread_pool_size), summed over "
    "processes.")
RPC_POOL_SATURATION_PEAK = Metric(
    "commlens_rpc_pool_saturation_peak", "gauge",
    ("service", "target"),
    "Highest ratio of handlers in flight to pool size in one process during its last "
    "ship interval (0..1; the maximum over processes).", merge="max")
RPC_PROCESSING_ERRORS = Metric(
    "commlens_rpc_processing_errors_total", "counter",
    ("service", "caller", "target", "method", "error"),
    "RPCs whose endpoint raised, by exception class.")
NOTIFICATIONS_SENT = Metric(
    "commlens_notifications_sent_total", "counter",
    ("service", "target", "event_type", "priority"),
    "Notifications sent, by topic, event type and priority.")
NOTIFICATIONS_RECEIVED = Metric(
    "commlens_notifications_received_total", "counter",
    ("service", "caller", "target", "event_type", "priority"),
    "Notifications received, by caller service.")

HTTP_REQUESTS = Metric(
    "commlens_http_requests_total", "counter",
    ("service", "caller", "method", "route", "code"),
    "Inbound REST requests, by calling service, route template and status code.")
HTTP_DURATION = Metric(
    "commlens_http_request_duration_seconds", "histogram",
    ("service", "method", "route", "outcome"),
    "Inbound REST request time to the last byte of the body (outcome: ok, "
    "error for 5xx).")
HTTP_CLIENT_REQUESTS = Metric(
    "commlens_http_client_requests_total", "counter",
    ("service", "target", "method", "code"),
    "Outbound REST requests, by target service and status code "
    "(code 'failed' when no response came).")
HTTP_CLIENT_DURATION = Metric(
    "commlens_http_client_request_duration_seconds", "histogram",
    ("service", "target", "method", "outcome"),
    "Outbound REST request time until the response headers arrived "
    "(outcome: ok, error for 5xx, failed).")

AGENT_DROPPED = Metric(
    "commlens_agent_records_dropped_total", "counter",
    ("service", "reason"),
    "Records the in-process agent could not keep or ship (reason: "
    "hop_buffer_full, ship_failed, recording_error, series_limit, bad_context).")
AGENT_SHIP_FAILURES = Metric(
    "commlens_agent_ship_failures_total", "counter",
    ("service",),
    "Snapshots the agent failed to ship (collector or broker unreachable).")
AGENT_QUEUE_DEPTH = Metric(
    "commlens_agent_queue_depth", "gauge",
    ("service",),
    "Hops waiting in the agent to be shipped.")

# Tempo-compatible service-graph metrics: the same edges Grafana's service map
# and service-graph dashboards read from Tempo's metrics generator, with the
# same names and labels, so they work with no glue (connection_type is
# "messaging_system" for RPC and empty for REST, as Tempo sets it). A server
# counts every request it received; a caller counts only the requests no
# server answered (timeout, broker or connection failure), so no request is
# counted twice. A client-side ``server`` of an RPC edge is the target topic;
# the collector names the service consuming it.
MESSAGING_SYSTEM = "messaging_system"
SERVICE_GRAPH_LABELS = ("client", "server", "connection_type")
SERVICE_GRAPH_REQUESTS = Metric(
    "traces_service_graph_request_total", "counter", SERVICE_GRAPH_LABELS,
    "Requests between two services (Tempo service-graph compatible).")
SERVICE_GRAPH_FAILED = Metric(
    "traces_service_graph_request_failed_total", "counter", SERVICE_GRAPH_LABELS,
    "Failed requests between two services (Tempo service-graph compatible).")
SERVICE_GRAPH_SERVER_SECONDS = Metric(
    "traces_service_graph_request_server_seconds", "histogram", SERVICE_GRAPH_LABELS,
    "Time the server spent on requests of this edge.")
SERVICE_GRAPH_CLIENT_SECONDS = Metric(
    "traces_service_graph_request_client_seconds", "histogram", SERVICE_GRAPH_LABELS,
    "Time the client waited on requests of this edge (RPC calls and REST).")

# Recorded in the process but never shipped: every request a server handled,
# once, in the finest series there is. The shipped server-side metrics and
# the service graph's server side are sums of these, added at snapshot time
# (tracer/derived.py).
HTTP_SERVER_HOPS = Metric(
    "commlens_internal_http_server_hops", "histogram",
    ("service", "caller", "method", "route", "code"),
    "Inbound REST requests and their durations.")
RPC_SERVER_HOPS = Metric(
    "commlens_internal_rpc_server_hops", "histogram",
    ("service", "caller", "target", "method", "outcome"),
    "RPCs processed and their processing times.")

# Everything a process ships, in one table.
SHIPPED = {m.name: m for m in (
    RPC_SENT, RPC_RECEIVED, RPC_WAITING_REPLIES, RPC_REPLY_WAIT,
    RPC_TIMEOUT_BUDGET, RPC_OVER_HALF_TIMEOUT, RPC_CALL_ERRORS,
    RPC_PROCESSING, RPC_PROCESSING_ERRORS,
    RPC_POOL_WAIT, RPC_HANDLERS_IN_FLIGHT, RPC_EXECUTOR_POOL_SIZE, RPC_POOL_SATURATION_PEAK,
    NOTIFICATIONS_SENT, NOTIFICATIONS_RECEIVED,
    HTTP_REQUESTS, HTTP_DURATION, HTTP_CLIENT_REQUESTS, HTTP_CLIENT_DURATION,
    AGENT_DROPPED, AGENT_SHIP_FAILURES, AGENT_QUEUE_DEPTH,
    SERVICE_GRAPH_REQUESTS, SERVICE_GRAPH_FAILED, SERVICE_GRAPH_SERVER_SECONDS,
    SERVICE_GRAPH_CLIENT_SECONDS,
)}

# Metrics whose second label is the caller of what the process received.
_CALLER_SECOND = frozenset(
    m.name for m in (*SHIPPED.values(), HTTP_SERVER_HOPS, RPC_SERVER_HOPS)
    if m.labels[1:2] == ("caller",))


def renamed_labels(name, labels, renamed):
    """``labels`` of metric ``name`` with the names a process had replaced by
    the one it took (``renamed``: {old: new}; tracer/recorder.py Recorder.adopt):
    its own name (the first label) and, where the process called itself, the
    caller's."""
    first = renamed.get(labels[0]) if labels else None
    second = renamed.get(labels[1]) if name in _CALLER_SECOND else None
    if first is None and second is None:
        return labels
    return ((first or labels[0],) + ((second or labels[1],) if name in _CALLER_SECOND else ())
            + tuple(labels[(2 if name in _CALLER_SECOND else 1):]))


def buckets_of(name):
    """The bucket bounds of histogram ``name`` (durations for the internal ones)."""
    metric = SHIPPED.get(name)
    return metric.buckets if metric is not None and metric.buckets else LATENCY_BUCKETS
