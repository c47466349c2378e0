"""What the overhead benchmarks need: ports, variants and optional peers, a
discarding OTel SDK, the WSGI benchmarks' server."""

import importlib
import os
import socket
import sys

# The request path of the WSGI benchmarks: ceilometermiddleware notifies
# only for Swift paths.
WSGI_PATH = "/v1/AUTH_bench/container/object"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def installed(module):
    """Whether an optional peer (oslo.metrics, an OTel instrumentation) imports."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def add_variants_argument(parser, variants):
    parser.add_argument("--variants", default=",".join(variants),
                        help="comma-separated, plain always included (default: all)")


def selected_variants(chosen, variants, optional):
    """The variants asked for (``--variants``), plain always, in their order;
    an optional peer ({variant: module}) only if it imports."""
    chosen = {"plain", *chosen.split(",")}
    return [v for v in variants if v in chosen
            and (v not in optional or installed(optional[v]))]


def discarding_tracer_provider():
    """An OpenTelemetry SDK provider with a batch processor whose spans go nowhere:
    the peer's real recording cost, without an OTLP backend."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SpanExporter,
                                                SpanExportResult)

    class Discard(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)
    return provider


def gunicorn_command(port):
    """The WSGI benchmarks' server: gunicorn with one gthread worker of one
    thread, keep-alive, serving wsgi_apps:app (BENCH_VARIANT picks the
    variant). The worker is always busy, so its rate is the server's."""
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    return [sys.executable, gunicorn, "--chdir", os.path.dirname(os.path.abspath(__file__)),
            "--workers", "1", "--worker-class", "gthread", "--threads", "1",
            "--keep-alive", "30", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
            "wsgi_apps:app"]


def enable_peer(variant, metrics_socket):
    """Turn on a peer variant in this process, after cfg.CONF is parsed:
    oslo.messaging's own metrics client (``oslo.metrics``, writing to the
    exporter's ``metrics_socket``) or the OpenTelemetry instrumentation
    (``otel-oslo-messaging``, spans to a discarding SDK). Other variants: nothing."""
    from oslo_config import cfg

    if variant == "oslo.metrics":
        cfg.CONF.set_override("metrics_enabled", True, group="oslo_messaging_metrics")
        cfg.CONF.set_override("metrics_socket_file", metrics_socket,
                              group="oslo_messaging_metrics")
    if variant == "otel-oslo-messaging":
        from opentelemetry.instrumentation.oslo_messaging import OsloMessagingInstrumentor

        discarding_tracer_provider()
        OsloMessagingInstrumentor().instrument()


def start_oslo_metrics_exporter(socket_file, workdir):
    """The real oslo-metrics exporter listening on ``socket_file`` (the peer's
    per-host process that oslo.messaging's metrics client writes to)."""
    import subprocess
    import time

    config = os.path.join(workdir, "oslo-metrics.conf")
    with open(config, "w") as f:
        f.write(f"[oslo_metrics]\nmetrics_socket_file = {socket_file}\n"
                f"prometheus_host = 127.0.0.1\nprometheus_port = {free_port()}\n")
    oslo_metrics = os.path.join(os.path.dirname(sys.executable), "oslo-metrics")
    process = subprocess.Popen([oslo_metrics, "--config-file", config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(socket_file) and time.monotonic() < deadline:
        time.sleep(0.1)
    return process
