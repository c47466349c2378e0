"""A local OTLP/HTTP receiver on loopback: what the tests (and the ingest
benchmark) export spans to, since no Tempo, Jaeger or OpenTelemetry
Collector binary can be installed here.

It accepts POST /v1/traces with a protobuf ExportTraceServiceRequest,
decodes it with opentelemetry-proto, and keeps each span as a plain dict
(``service`` from its resource's service.name). ``mode`` makes it a backend
that answers (``ok``), hangs until stopped (``hang``) or answers 503
(``unavailable``).
"""

import http.server
import threading

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def decode(body):
    """The spans of a serialized ExportTraceServiceRequest, as dicts."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({
                    "service": resource.get("service.name"),
                    "resource": resource,
                    "scope": scope_spans.scope.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_id": span.parent_span_id.hex() or None,
                    "name": span.name,
                    "kind": span.kind,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                    "status_code": span.status.code,
                    "status_message": span.status.message,
                })
    return spans


def _value(any_value):
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


class Receiver:
    def __init__(self, mode="ok", keep=True):
        self.mode = mode
        self.keep = keep
        self.spans = []
        self.requests = 0
        self.span_count = 0
        self.paths = set()
        self._lock = threading.Lock()
        self._released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.mode == "hang":
                    receiver._released.wait()
                    return
                if receiver.mode == "unavailable":
                    self._answer(503)
                    return
                spans = decode(body)
                with receiver._lock:
                    receiver.requests += 1
                    receiver.paths.add(self.path)
                    receiver.span_count += len(spans)
                    if receiver.keep:
                        receiver.spans.extend(spans)
                self._answer(200)

            def _answer(self, code):
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def by_span_id(self):
        with self._lock:
            return {s["span_id"]: s for s in self.spans}
