"""A real oslo.messaging RPC server (and notification listener) in its own process.

Run by the tests as ``python rpc_peer.py --url ... --topic ...``; prints
READY once it consumes. Its service name comes from COMMLENS_SERVICE_NAME,
as it would for an operator's non-oslo service.
"""

import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--url", required=True)
parser.add_argument("--topic", required=True)
parser.add_argument("--server", default="peer")
parser.add_argument("--executor", default="threading", choices=("threading", "eventlet"))
parser.add_argument("--notifications", action="store_true")
parser.add_argument("--otel", action="store_true",
                    help="enable oslo.messaging's own OpenTelemetry tracing")
parser.add_argument("--pool-size", type=int, default=None,
                    help="executor_thread_pool_size, as an operator sets it")
parser.add_argument("--exit-hard", action="store_true",
                    help="leave with os._exit once the server stopped, past atexit, "
                         "as oslo.service's workers do")
args = parser.parse_args()

if args.executor == "eventlet":
    import eventlet
    eventlet.monkey_patch()

import threading  # noqa: E402
import time  # noqa: E402

import oslo_messaging as om  # noqa: E402
from oslo_config import cfg  # noqa: E402
from serving import ready_until_sigterm  # noqa: E402

finished_spans = []
if args.otel:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    finished_spans = exporter

cfg.CONF([], project="commlens-peer")
if args.otel:
    cfg.CONF.set_override("tracing_enabled", True, group="oslo_messaging_tracing")


class PortBindingFailed(Exception):
    """A service's own exception: not in allowed_remote_exmods of the caller."""


class Endpoint:
    def __init__(self):
        self.casts = 0
        self.echoes = 0
        self.lock = threading.Lock()

    def echo(self, ctxt, value):
        with self.lock:
            self.echoes += 1
        return value

    def echoes_seen(self, ctxt):
        return self.echoes

    def count_cast(self, ctxt):
        with self.lock:
            self.casts += 1

    def casts_seen(self, ctxt):
        return self.casts

    def slow(self, ctxt, seconds):
        time.sleep(seconds)
        return seconds

    def fail(self, ctxt, error):
        if error == "ValueError":
            raise ValueError("bad value from the endpoint")
        if error == "PortBindingFailed":
            raise PortBindingFailed("binding failed for port 42")
        if error == "MessagingTimeout":
            raise om.MessagingTimeout("a timeout raised by the endpoint itself")
        raise RuntimeError(error)

    def context_keys(self, ctxt):
        return sorted(ctxt.keys()) if isinstance(ctxt, dict) else sorted(ctxt.to_dict())

    def otel_spans(self, ctxt):
        spans = finished_spans.get_finished_spans() if finished_spans else []
        return [{"name": s.name, "trace_id": "%032x" % s.context.trace_id,
                 "span_id": "%016x" % s.context.span_id,
                 "parent_id": "%016x" % s.parent.span_id if s.parent else None}
                for s in spans]


class NotificationEndpoint:
    def __init__(self):
        self.seen = 0
        self.requeued = set()

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.seen += 1

    def warn(self, ctxt, publisher_id, event_type, payload, metadata):
        # Requeue each notification once, as a listener that cannot handle
        # it yet would; the redelivery is counted again on our side.
        key = payload.get("id")
        if key not in self.requeued:
            self.requeued.add(key)
            return om.NotificationResult.REQUEUE
        return om.NotificationResult.HANDLED


transport = om.get_rpc_transport(cfg.CONF, url=args.url)
endpoint = Endpoint()
server = om.get_rpc_server(transport, om.Target(topic=args.topic, server=args.server),
                           [endpoint], executor=args.executor,
                           serializer=om.NoOpSerializer())
if args.pool_size is not None:
    # Registered by the server just made, read by its start().
    cfg.CONF.set_override("executor_thread_pool_size", args.pool_size)
server.start()
listener = None
if args.notifications:
    notification_transport = om.get_notification_transport(cfg.CONF, url=args.url)
    listener = om.get_notification_listener(
        notification_transport, [om.Target(topic=args.topic + "-notifications")],
        [NotificationEndpoint()], executor=args.executor, allow_requeue=True)
    listener.start()

try:
    ready_until_sigterm()
finally:
    server.stop()
    server.wait()
    if args.exit_hard:
        os._exit(0)
    if listener is not None:
        listener.stop()
        listener.wait()
    transport.cleanup()
