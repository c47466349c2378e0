"""Mixed fleets: instrumented and uninstrumented peers, and oslo.messaging's own tracing."""

import importlib.util

import pytest
from oslo_config import cfg

from support import COMMLENS_URL, RABBIT_URL, wait_for

pytestmark = pytest.mark.slow

# oslo.messaging's own OpenTelemetry tracing arrived in 18.3; the releases
# before it (2025.2's 17.1, 2026.1's 17.3) have none to interoperate with.
needs_oslo_tracing = pytest.mark.skipif(
    importlib.util.find_spec("oslo_messaging._tracing") is None,
    reason="this oslo.messaging has no OpenTelemetry tracing (18.3+)")


def test_uninstrumented_caller_is_counted_as_unknown(collector, start_peer, rpc_client, topic):
    start_peer(COMMLENS_URL, topic)
    plain = rpc_client(RABBIT_URL, topic)
    assert plain.call({}, "echo", value="x") == "x"
    plain.cast({}, "count_cast")
    collector.wait_metric("commlens_rpc_received_total", 1, service="peer-server",
                          caller="unknown", target=topic, method="echo", kind="call")
    collector.wait_metric("commlens_rpc_received_total", 1, service="peer-server",
                          caller="unknown", target=topic, method="count_cast", kind="cast")


def test_uninstrumented_server_answers_an_instrumented_caller(start_peer, rpc_client, topic):
    start_peer(RABBIT_URL, topic)
    client = rpc_client(COMMLENS_URL, topic)
    assert client.call({"request_id": "req-1"}, "echo", value=[1, 2]) == [1, 2]
    client.cast({}, "count_cast")
    wait_for(lambda: client.call({}, "casts_seen") == 1, message="cast delivered")
    # An uninstrumented receiver sees only the W3C keys added, exactly what
    # oslo.messaging's own tracing adds.
    keys = client.call({"request_id": "req-1"}, "context_keys")
    plain_keys = rpc_client(RABBIT_URL, topic).call({"request_id": "req-1"}, "context_keys")
    assert set(keys) - set(plain_keys) == {"traceparent", "baggage"}


@needs_oslo_tracing
def test_commlens_caller_joins_the_trace_of_a_server_with_oslo_tracing(
        collector, start_peer, rpc_client, topic):
    start_peer(RABBIT_URL, topic, otel=True)
    client = rpc_client(COMMLENS_URL, topic)
    client.call({}, "echo", value=1)
    (hop,) = wait_for(lambda: collector.hops(target=topic, side="client", operation="echo"),
                      message="the client hop")
    spans = [s for s in client.call({}, "otel_spans") if s["name"] == "echo receive"]
    assert spans, "oslo.messaging's tracing recorded no consumer span"
    assert spans[0]["trace_id"] == hop["trace_id"]
    assert spans[0]["parent_id"] == hop["span_id"]


def test_a_forwarded_traceparent_is_replaced_not_reused(collector, start_peer, rpc_client,
                                                       topic):
    start_peer(COMMLENS_URL, topic)
    stale = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    rpc_client(COMMLENS_URL, topic).call({"traceparent": stale}, "echo", value=1)
    (server_hop,) = wait_for(lambda: collector.hops(target=topic, side="server"),
                             message="the server hop")
    (client_hop,) = wait_for(lambda: collector.hops(target=topic, side="client"),
                             message="the client hop")
    assert client_hop["span_id"] != "00f067aa0ba902b7"
    assert server_hop["parent_id"] == client_hop["span_id"]


@pytest.fixture
def oslo_tracing_in_this_process(conf):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg.CONF.set_override("tracing_enabled", True, group="oslo_messaging_tracing")
    yield exporter
    cfg.CONF.clear_override("tracing_enabled", group="oslo_messaging_tracing")


@needs_oslo_tracing
def test_caller_with_oslo_tracing_and_commlens_keeps_one_trace(
        collector, start_peer, rpc_client, topic, oslo_tracing_in_this_process):
    start_peer(COMMLENS_URL, topic)
    rpc_client(COMMLENS_URL, topic).call({}, "echo", value=1)
    producer = [s for s in oslo_tracing_in_this_process.get_finished_spans()
                if s.name == f"{topic}.echo"]
    assert producer, "oslo.messaging's tracing recorded no producer span"
    trace_id = "%032x" % producer[0].context.trace_id
    span_id = "%016x" % producer[0].context.span_id
    (server_hop,) = wait_for(lambda: collector.hops(target=topic, side="server"),
                             message="the server hop")
    (client_hop,) = wait_for(lambda: collector.hops(target=topic, side="client"),
                             message="the client hop")
    assert server_hop["trace_id"] == client_hop["trace_id"] == trace_id
    assert client_hop["span_id"] == span_id == server_hop["parent_id"]
