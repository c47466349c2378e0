"""OTLP export: every hop the collector receives, as an OpenTelemetry span,
posted over OTLP/HTTP protobuf to ``URL/v1/traces``.

A hop already is a span: its W3C trace id, span id and parent span id are
the ones the agents propagated, so the exported spans join those that
oslo.messaging's and oslo.middleware's own OpenTelemetry tracing emit for
the same calls. ``span_fields`` maps a hop to the span's name, kind,
attributes and status (the messaging, RPC and HTTP semantic conventions):
the one home of that mapping.

Two encoders turn spans into the protobuf request, fed the same hops:

- ``sdk_request``, the reference: opentelemetry-sdk's ``ReadableSpan`` and
  ``Resource`` (one per service), encoded by the OTLP exporter's own
  encoder (opentelemetry-exporter-otlp-proto-common, what
  opentelemetry-exporter-otlp-proto-http posts);
- ``request``, the one the collector uses: the same protobuf written
  directly, with the bytes of a resource and of an attribute kept once
  encoded. The reference costs about 23 µs a span here, more than the
  collector spends taking the hop in (benchmarks/collector_ingest.py);
  this one about 3 µs. tests/test_otlp_export.py decodes both with
  opentelemetry-proto and requires them equal. ``COMMLENS_OTLP_ENCODER=sdk``
  makes the collector use the reference.

The collector's intake never waits for the backend: ``SpanExport.offer``
appends to a bounded queue, a thread batches and posts, and whatever the
queue cannot hold or the backend does not take is counted as dropped.
"""

import collections
import http.client
import logging
import os
import struct
import threading
import time
import urllib.parse

from commlens.tracer import metrics
from commlens.tracer import wire

LOG = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 50000
DEFAULT_BATCH = 512
DEFAULT_INTERVAL = 1.0
DEFAULT_TIMEOUT = 10.0
BACKOFF_MAX = 30.0
TRACES_PATH = "v1/traces"
SCOPE_NAME = "commlens"
ENCODER_ENV = "COMMLENS_OTLP_ENCODER"

# Why a span was not exported, as counted on /metrics.
QUEUE_FULL, EXPORT_FAILED, ENCODING_FAILED = "queue_full", "export_failed", "encoding_failed"
DROP_REASONS = (QUEUE_FULL, EXPORT_FAILED, ENCODING_FAILED)

# The OTLP SpanKind values (opentelemetry/proto/trace/v1/trace.proto).
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5
# Span flags: the parent's is_remote is known, and whether it is remote.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
STATUS_ERROR = 2
# RPC kinds with no reply: messaging spans (PRODUCER, CONSUMER), not RPC ones.
_ONE_WAY = frozenset(("cast", "fanout", "notification"))


def span_fields(hop):
    """(name, kind, attributes, error) of a clean hop's span: attributes a
    list of (key, str or int); error None, or the error type the span's
    status names. All of it comes from the hop's label-like fields
    (``_SHAPE``), so encoders may keep it per shape; what is unique to a
    request is ``request_attributes``."""
    protocol, side = hop["protocol"], hop["side"]
    operation, target, kind = hop["operation"] or "", hop["target"] or "", hop["kind"]
    error = hop["error"]
    attributes = []
    add = attributes.append
    if protocol == wire.RPC:
        # The name oslo.messaging's own tracing gives its send spans.
        name = f"{target}.{operation}"
        one_way = kind in _ONE_WAY
        if side == wire.CLIENT:
            span_kind = PRODUCER if one_way else CLIENT
        else:
            span_kind = CONSUMER if one_way else SERVER
        add(("messaging.system", "rabbitmq"))
        add(("messaging.destination.name", target))
        add(("messaging.operation.type", "send" if side == wire.CLIENT else "process"))
        add(("rpc.system", "oslo_messaging"))
        add(("rpc.method", operation))
        if kind:
            add(("commlens.kind", kind))
        if hop["server"]:
            add(("messaging.destination.server", hop["server"]))
        failed = hop["outcome"] not in (metrics.OK, None)
    else:
        code = _status_code(error)
        if side == wire.SERVER:
            # The operation is "METHOD /route/{template}".
            name = operation
            add(("http.request.method", kind or ""))
            add(("http.route", target))
            span_kind = SERVER
            # A 4xx is the client's error, not the server's (semantic conventions).
            failed = hop["outcome"] not in (metrics.OK, None)
        else:
            name = operation
            add(("http.request.method", operation))
            add(("peer.service", target))
            span_kind = CLIENT
            failed = hop["outcome"] not in (metrics.OK, None) or error is not None
        if code is not None:
            add(("http.response.status_code", code))
    peer = hop["peer"]
    if peer and side == wire.SERVER:
        add(("commlens.caller", peer))
    error_type = None
    if error:
        # "409 PortBindingFailed": the class; "500": the status code.
        error_type = error.rpartition(" ")[2]
        add(("error.type", error_type))
    if hop["outcome"]:
        add(("commlens.outcome", hop["outcome"]))
    return name or kind or protocol, span_kind, attributes, (error_type or hop["outcome"]
                                                              if failed else None)


# The hop fields span_fields and _flags read: a hop's shape.
_SHAPE = ("protocol", "side", "kind", "target", "operation", "outcome", "error", "server",
          "peer")


def request_attributes(hop):
    """The span's attributes unique to its request (after span_fields')."""
    attributes = []
    if hop["request_id"]:
        attributes.append(("openstack.request_id", hop["request_id"]))
    if hop["global_request_id"]:
        attributes.append(("openstack.global_request_id", hop["global_request_id"]))
    return attributes


def _status_code(error):
    """The HTTP status code a failed hop names ('409 PortBindingFailed', '500'), or None."""
    if not error:
        return None
    head = error.partition(" ")[0]
    return int(head) if len(head) == 3 and head.isdigit() else None


def _times(hop, received):
    """(start, end) in nanoseconds since the epoch. A hop whose clock the
    collector refused (exporters/collector.py) ends when it was received."""
    duration = hop["duration"] or 0.0
    start = hop["start"]
    if start is None:
        start = received - duration
    start_ns = int(start * 1e9)
    return start_ns, start_ns + int(duration * 1e9)


def _flags(hop):
    # A server hop's parent is the caller's, in another process.
    if hop["parent_id"] and hop["side"] == wire.SERVER:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE


def _scope_version():
    try:
        from importlib import metadata

        return metadata.version("commlens")
    except Exception:
        return ""


SCOPE_VERSION = _scope_version()


# -- the protobuf, written directly -------------------------------------------

_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack


def _varint(value):
    out = bytearray()
    while value > 0x7f:
        out.append((value & 0x7f) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number, payload):
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _key_value(key, value):
    """A KeyValue as field 9 of a Span (its attributes) or 1 of a Resource."""
    if type(value) is int:
        any_value = _varint(3 << 3) + _varint(value & 0xffffffffffffffff)
    else:
        any_value = _field(1, value.encode("utf-8", "replace"))
    return _field(1, key.encode()) + _field(2, any_value)


class Encoder:
    """The protobuf of an ExportTraceServiceRequest, written directly.

    What repeats is encoded once and kept, up to a bound: a service's
    resource, and a shape's (``_SHAPE``) name, kind, attributes, status and
    flags; hops' shapes are label-like (services, topics, methods, routes,
    error classes). Request ids are encoded each time."""

    MAX_CACHED = 50000

    def __init__(self):
        self._shapes = {}
        self._resources = {}
        self._scope = _field(1, _field(1, SCOPE_NAME.encode()) + _field(2, SCOPE_VERSION.encode()))

    def _resource(self, service):
        cached = self._resources.get(service)
        if cached is None:
            cached = _field(1, _field(1, _key_value("service.name", service)))
            if len(self._resources) < self.MAX_CACHED:
                self._resources[service] = cached
        return cached

    def _shape(self, hop, key):
        name, kind, attributes, error = span_fields(hop)
        parts = [_field(5, name.encode("utf-8", "replace")), b"\x30", _varint(kind)]
        parts += (_field(9, _key_value(*pair)) for pair in attributes)
        if error is not None:
            parts.append(_field(15, _field(2, error.encode("utf-8", "replace"))
                                + _varint(3 << 3) + _varint(STATUS_ERROR)))
        else:
            parts.append(_STATUS_UNSET)
        parts += (b"\x85\x01", _pack_fixed32(_flags(hop)))
        shape = b"".join(parts)
        if len(self._shapes) < self.MAX_CACHED:
            self._shapes[key] = shape
        return shape

    def span(self, hop, received):
        """A Span, as field 2 of ScopeSpans."""
        key = (hop["protocol"], hop["side"], hop["kind"], hop["target"], hop["operation"],
               hop["outcome"], hop["error"], hop["server"], hop["peer"],
               hop["parent_id"] is None)
        shape = self._shapes.get(key) or self._shape(hop, key)
        parent = hop["parent_id"]
        # Field 1 (trace id), 2 (span id) and 4 (parent), with their tags, in one go.
        ids = bytes.fromhex("0a10" + hop["trace_id"] + "1208" + hop["span_id"]
                            + ("2208" + parent if parent else ""))
        duration = hop["duration"] or 0.0
        start = hop["start"]
        start_ns = int((received - duration if start is None else start) * 1e9)
        body = ids + _pack_times(0x39, start_ns, 0x41, start_ns + int(duration * 1e9)) + shape
        if hop["request_id"] or hop["global_request_id"]:
            body += b"".join(_field(9, _key_value(*pair)) for pair in request_attributes(hop))
        size = len(body)
        return (b"\x12" + (_VARINTS[size] if size < _SMALL else _varint(size))) + body

    def request(self, hops, received):
        """The serialized request carrying ``hops`` (clean hops), one
        ResourceSpans per service."""
        by_service = {}
        span = self.span
        for hop in hops:
            service = hop["service"]
            spans = by_service.get(service)
            if spans is None:
                spans = by_service[service] = []
            spans.append(span(hop, received))
        return b"".join(
            _field(1, self._resource(service)
                   + _field(2, self._scope + b"".join(spans)))
            for service, spans in by_service.items())


# An empty Status (code UNSET), as the SDK's encoder writes it.
_STATUS_UNSET = b"\x7a\x00"
_pack_times = struct.Struct("<BQBQ").pack
_SMALL = 4096
_VARINTS = [_varint(n) for n in range(_SMALL)]


# -- the reference: opentelemetry-sdk and the OTLP exporter's encoder ---------

class SdkEncoder:
    """The same request through opentelemetry-sdk's ReadableSpan, one
    Resource per service (kept, up to a bound), and the OTLP exporter's
    encoder."""

    MAX_RESOURCES = 10000

    def __init__(self):
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk import resources
        from opentelemetry.sdk import trace as sdk_trace
        from opentelemetry.sdk.util import instrumentation
        from opentelemetry import trace

        self._encode_spans = encode_spans
        self._trace = trace
        self._sdk_trace = sdk_trace
        self._resource_class = resources.Resource
        self._resources = {}
        self._scope = instrumentation.InstrumentationScope(SCOPE_NAME, SCOPE_VERSION)
        self._kinds = {SERVER: trace.SpanKind.SERVER, CLIENT: trace.SpanKind.CLIENT,
                       PRODUCER: trace.SpanKind.PRODUCER, CONSUMER: trace.SpanKind.CONSUMER}

    def _resource(self, service):
        resource = self._resources.get(service)
        if resource is None:
            # Resource(), not Resource.create(): no SDK or process attributes,
            # which would name the collector's host, not the service's.
            resource = self._resource_class({"service.name": service})
            if len(self._resources) < self.MAX_RESOURCES:
                self._resources[service] = resource
        return resource

    def span(self, hop, received):
        trace = self._trace
        name, kind, attributes, error = span_fields(hop)
        start, end = _times(hop, received)
        trace_id = int(hop["trace_id"], 16)
        flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        parent = None
        if hop["parent_id"]:
            parent = trace.SpanContext(trace_id, int(hop["parent_id"], 16),
                                       is_remote=hop["side"] == wire.SERVER, trace_flags=flags)
        status = (trace.Status(trace.StatusCode.ERROR, error) if error is not None
                  else trace.Status(trace.StatusCode.UNSET))
        return self._sdk_trace.ReadableSpan(
            name=name, context=trace.SpanContext(trace_id, int(hop["span_id"], 16),
                                                 is_remote=False, trace_flags=flags),
            parent=parent, resource=self._resource(hop["service"]),
            attributes=dict(attributes + request_attributes(hop)), kind=self._kinds[kind],
            start_time=start,
            end_time=end, status=status, instrumentation_scope=self._scope)

    def request(self, hops, received):
        return self._encode_spans([self.span(h, received) for h in hops]).SerializeToString()


def make_encoder():
    return SdkEncoder() if os.environ.get(ENCODER_ENV) == "sdk" else Encoder()


# -- the export: a bounded queue, a thread, a poster --------------------------

class EndpointError(ValueError):
    """An --otlp-endpoint the collector cannot post to."""


def traces_url(endpoint):
    """``URL/v1/traces`` of an endpoint (``http://host:4318`` or with a path
    prefix); EndpointError if it is not an http(s) URL."""
    parsed = urllib.parse.urlsplit(endpoint or "")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise EndpointError(f"OTLP endpoint {redact(endpoint)!r}: expected "
                            "http://HOST:PORT or https://HOST:PORT")
    try:
        _port = parsed.port
    except ValueError:
        raise EndpointError(f"OTLP endpoint {redact(endpoint)!r}: bad port") from None
    path = parsed.path.rstrip("/")
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path + "/" + TRACES_PATH,
                                    parsed.query, ""))


ENDPOINT_ENV = "COMMLENS_OTLP_ENDPOINT"


def add_arguments(parser):
    """``--otlp-endpoint`` and its companions, for the collector and the demo."""
    parser.add_argument("--otlp-endpoint", default=os.environ.get(ENDPOINT_ENV) or None,
                        help="export every hop received as an OpenTelemetry span over "
                             "OTLP/HTTP protobuf to URL/v1/traces, e.g. http://tempo:4318 "
                             f"(default: {ENDPOINT_ENV}; none)")
    parser.add_argument("--otlp-timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds one OTLP post may take; a slower backend's batch is "
                             f"dropped and counted (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--otlp-max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="spans waiting for the backend at most; more are dropped and "
                             f"counted (default {DEFAULT_MAX_QUEUE})")


def from_arguments(args):
    """A SpanExport for ``--otlp-endpoint``, or None; EndpointError if invalid."""
    if not args.otlp_endpoint:
        return None
    if args.otlp_timeout <= 0 or args.otlp_max_queue < 1:
        raise EndpointError("--otlp-timeout and --otlp-max-queue must be positive")
    return SpanExport(args.otlp_endpoint, max_queue=args.otlp_max_queue,
                      timeout=args.otlp_timeout)


def redact(endpoint):
    from commlens.tracer import urls

    return urls.redact(str(endpoint))


class SpanExport:
    """Hops offered by the collector, posted as spans in batches by a thread.

    ``offer`` never blocks: past ``max_queue`` waiting hops it drops the
    newest and counts them; a batch the backend refuses, does not answer
    within ``timeout`` or cannot be reached for is dropped and counted, and
    the thread waits before the next (doubling up to BACKOFF_MAX), so a
    backend that is down costs the collector nothing but the count."""

    def __init__(self, endpoint, max_queue=DEFAULT_MAX_QUEUE, batch=DEFAULT_BATCH,
                 interval=DEFAULT_INTERVAL, timeout=DEFAULT_TIMEOUT, encoder=None):
        self.url = traces_url(endpoint)
        self.description = redact(self.url)
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.timeout = timeout
        self._encoder = encoder or make_encoder()
        # Lists of hops as offered; _queued counts their hops.
        self._queue = collections.deque()
        self._queued = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = None
        self._connection = None
        self.exported = 0
        self.dropped = collections.Counter({reason: 0 for reason in DROP_REASONS})
        self._failing = False
        parsed = urllib.parse.urlsplit(self.url)
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self._path = parsed.path + ("?" + parsed.query if parsed.query else "")
        self._headers = {"Content-Type": "application/x-protobuf"}
        if parsed.username is not None:
            import base64

            credentials = "%s:%s" % (urllib.parse.unquote(parsed.username),
                                     urllib.parse.unquote(parsed.password or ""))
            self._headers["Authorization"] = "Basic " + base64.b64encode(
                credentials.encode()).decode()

    # -- the intake's side: never waits --------------------------------------

    def offer(self, hops):
        """Queue a list of clean hops for export; drops (and counts) what
        does not fit. The list is kept as it is: the caller gives it up."""
        with self._lock:
            room = self.max_queue - self._queued
            if room < len(hops):
                self.dropped[QUEUE_FULL] += len(hops) - max(0, room)
                if room <= 0:
                    return
                hops = hops[:room]
            self._queue.append(hops)
            self._queued += len(hops)
            full = self._queued >= self.batch
        if full:
            self._wake.set()

    def queued(self):
        return self._queued

    def counts(self):
        """(exported, {reason: dropped})"""
        with self._lock:
            return self.exported, dict(self.dropped)

    # -- the thread ------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="commlens-otlp", daemon=True)
        self._thread.start()

    def stop(self, timeout=5.0):
        """Post what is queued (within ``timeout``), then stop."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close()

    def _run(self):
        delay = 1.0
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            while True:
                batch = self._take()
                if not batch:
                    break
                if self._export(batch):
                    delay = 1.0
                    continue
                if not self._stopping.is_set():
                    # Down or slow: what arrives meanwhile waits in the queue,
                    # within its bound.
                    self._stopping.wait(delay)
                    delay = min(BACKOFF_MAX, delay * 2)
                break
            if self._stopping.is_set():
                # Stopping with a backend that fails: what is left is dropped.
                self._drop_queued()
                return

    def _take(self):
        """About ``batch`` hops (whole lists as offered), oldest first."""
        queue, batch = self._queue, []
        with self._lock:
            while queue and len(batch) < self.batch:
                batch.extend(queue.popleft())
            self._queued -= len(batch)
        return batch

    def _drop_queued(self):
        with self._lock:
            self.dropped[EXPORT_FAILED] += self._queued
            self._queue.clear()
            self._queued = 0

    def _export(self, batch):
        """Encode and post one batch; True if the backend took it."""
        try:
            body = self._encoder.request(batch, time.time())
        except Exception:
            LOG.debug("otlp: encoding %d spans failed", len(batch), exc_info=True)
            with self._lock:
                self.dropped[ENCODING_FAILED] += len(batch)
            return True
        try:
            status = self._post(body)
            ok = 200 <= status < 300
            why = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            ok, why = False, type(exc).__name__
        with self._lock:
            if ok:
                self.exported += len(batch)
            else:
                self.dropped[EXPORT_FAILED] += len(batch)
        if ok and self._failing:
            LOG.info("otlp: exporting to %s again", self.description)
        elif not ok and not self._failing:
            LOG.warning("otlp: exporting spans to %s failed (%s); dropping them (counted "
                        "on commlens_collector_otlp_spans_dropped_total) and retrying",
                        self.description, why)
        self._failing = not ok
        return ok

    def _post(self, body):
        if self._connection is None:
            factory = (http.client.HTTPSConnection if self._https
                       else http.client.HTTPConnection)
            self._connection = factory(self._host, self._port, timeout=self.timeout)
        connection = self._connection
        connection.request("POST", self._path, body=body, headers=self._headers)
        response = connection.getresponse()
        response.read()
        if response.will_close:
            self._close()
        return response.status

    def _close(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass
