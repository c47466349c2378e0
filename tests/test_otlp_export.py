"""OTLP export (exporters/otlp.py): every hop the collector receives becomes
an OpenTelemetry span posted to ``--otlp-endpoint``/v1/traces.

No tracing backend can be installed here: the backend is a local OTLP/HTTP
receiver on loopback that decodes the protobuf with opentelemetry-proto
(tests/otlp_receiver.py). The agents are real: oslo.messaging's rabbit
driver in processes of their own, over the real broker, into a real
collector process.
"""

import json
import subprocess
import sys
import time
import uuid

import pytest

from otlp_receiver import Receiver, decode
from support import (PEERS, Demo, Peer, collector_ready, free_port, run_collector, wait_for)

from commlens.exporters import otlp
from commlens.tracer import context
from commlens.tracer import recorder as recorder_mod
from commlens.tracer import shipping

SECRET = "s3cr3t-token-" + uuid.uuid4().hex
CLIENT, SERVER, PRODUCER, CONSUMER = otlp.CLIENT, otlp.SERVER, otlp.PRODUCER, otlp.CONSUMER
STATUS_ERROR = otlp.STATUS_ERROR


def _hop(**fields):
    hop = {"trace_id": context.new_trace_id(), "span_id": context.new_span_id(),
           "parent_id": None, "service": "nova-api", "side": "client", "protocol": "rpc",
           "peer": None, "target": "conductor", "operation": "build_instances",
           "kind": "call", "outcome": "ok", "error": None, "start": time.time(),
           "duration": 0.25, "request_id": None, "global_request_id": None, "server": None}
    hop.update(fields)
    return hop


HOPS = [
    _hop(request_id="req-1", global_request_id="req-g"),
    # The same shape again (the encoder keeps its bytes), another request.
    _hop(request_id="req-2"),
    _hop(side="server", service="nova-conductor", peer="nova-api",
         parent_id=context.new_span_id(), outcome="error", error="PortBindingFailed",
         server="host-1"),
    _hop(kind="cast", operation="update", start=None),
    _hop(kind="fanout", side="server", service="nova-compute", peer="nova-api",
         parent_id=context.new_span_id()),
    _hop(outcome="timeout", error="MessagingTimeout", duration=60.5),
    _hop(protocol="http", side="server", service="neutron-server", peer="nova-api",
         target="/v2.0/ports/{id}", operation="PUT /v2.0/ports/{id}", kind="PUT",
         error="409 PortBindingFailed", parent_id=context.new_span_id()),
    _hop(protocol="http", side="server", service="nova-api", peer="unknown",
         target="/v2.1/servers", operation="POST /v2.1/servers", kind="POST",
         outcome="error", error="500"),
    _hop(protocol="http", side="client", service="nova-conductor", target="neutron",
         operation="PUT", kind="PUT", error="409", parent_id=context.new_span_id()),
    _hop(protocol="http", side="client", service="nova-conductor", target="placement",
         operation="GET", kind="GET", duration=None),
]


def test_the_fast_encoder_writes_what_the_sdk_and_the_otlp_exporter_encode():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    received = time.time()
    fast, reference = (trace_service_pb2.ExportTraceServiceRequest(),
                       trace_service_pb2.ExportTraceServiceRequest())
    fast.ParseFromString(otlp.Encoder().request(HOPS, received))
    reference.ParseFromString(otlp.SdkEncoder().request(HOPS, received))
    if not any(s.flags for r in reference.resource_spans for ss in r.scope_spans
               for s in ss.spans):
        # An SDK before span flags (1.36): it writes none.
        for spans in fast.resource_spans:
            for scope in spans.scope_spans:
                for span in scope.spans:
                    span.ClearField("flags")
    assert fast == reference
    assert len([s for r in fast.resource_spans for ss in r.scope_spans for s in ss.spans]) \
        == len(HOPS)


def test_spans_follow_the_messaging_rpc_and_http_conventions():
    spans = {s["span_id"]: s for s in decode(otlp.Encoder().request(HOPS, time.time()))}
    call, again, served, cast, fanout, timeout, put, post, client_409, get = (
        spans[h["span_id"]] for h in HOPS)
    assert again["attributes"]["openstack.request_id"] == "req-2"
    assert "openstack.global_request_id" not in again["attributes"]
    assert (call["kind"], served["kind"], cast["kind"], fanout["kind"]) == (
        CLIENT, SERVER, PRODUCER, CONSUMER)
    assert call["attributes"]["messaging.system"] == "rabbitmq"
    assert call["attributes"]["messaging.destination.name"] == "conductor"
    assert call["attributes"]["rpc.method"] == "build_instances"
    assert call["attributes"]["openstack.request_id"] == "req-1"
    assert call["name"] == "conductor.build_instances"
    assert call["end"] - call["start"] == 250_000_000
    assert served["status_code"] == STATUS_ERROR
    assert served["attributes"]["error.type"] == "PortBindingFailed"
    assert served["resource"] == {"service.name": "nova-conductor"}
    assert timeout["status_code"] == STATUS_ERROR
    # A server's 4xx is its client's error; a client's is its own.
    assert put["kind"] == SERVER and put["status_code"] == 0
    assert put["attributes"]["http.route"] == "/v2.0/ports/{id}"
    assert put["attributes"]["http.request.method"] == "PUT"
    assert put["attributes"]["http.response.status_code"] == 409
    assert put["attributes"]["error.type"] == "PortBindingFailed"
    assert post["status_code"] == STATUS_ERROR
    assert post["attributes"]["http.response.status_code"] == 500
    assert client_409["kind"] == CLIENT and client_409["status_code"] == STATUS_ERROR
    assert client_409["attributes"]["peer.service"] == "neutron"
    assert get["start"] == get["end"]


def test_an_endpoint_that_is_not_http_is_refused_without_its_credentials():
    with pytest.raises(otlp.EndpointError) as refused:
        otlp.traces_url("grpc://user:hunter2@tempo:4317")
    assert "hunter2" not in str(refused.value)
    assert otlp.traces_url("http://tempo:4318") == "http://tempo:4318/v1/traces"
    assert otlp.traces_url("https://otel/prefix/") == "https://otel/prefix/v1/traces"


def _spawn(script, export_url, service, *args):
    env = dict(__import__("os").environ, COMMLENS_SERVICE_NAME=service,
               COMMLENS_EXPORT_URL=export_url)
    process = subprocess.Popen([sys.executable, str(PEERS / script), *args], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "READY"
    return process


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["direct", "sdk"])
def test_every_hop_of_real_agents_reaches_the_backend_as_a_span_with_its_ids(
        rabbitmq, tmp_path, monkeypatch, encoder):
    if encoder == "sdk":
        # The reference: opentelemetry-sdk's spans through the OTLP exporter's encoder.
        monkeypatch.setenv(otlp.ENCODER_ENV, "sdk")
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-otlp-{run}"
                  f"&queue=commlens.otlp-{run}")
    topic = "otlp-" + run
    url = "commlens+rabbit://guest:guest@127.0.0.1:5672/"
    with Receiver() as receiver, \
            run_collector(export_url, tmp_path, ["--otlp-endpoint", receiver.endpoint]) \
            as collector:
        wait_for(lambda: collector_ready(collector), timeout=30, message="collector")
        server = _spawn("rpc_peer.py", export_url, "otlp-server", "--url", url,
                        "--topic", topic)
        request_id = "req-" + str(uuid.uuid4())
        caller = _spawn("rpc_caller.py", export_url, "otlp-caller", "--url", url,
                        "--topic", topic, "--context",
                        json.dumps({"auth_token": SECRET, "request_id": request_id}))
        try:
            for command in ("call 3", "cast 2", "fail 1 PortBindingFailed"):
                caller.stdin.write(command + "\n")
                caller.stdin.flush()
                json.loads(caller.stdout.readline())
            # 6 sends and 6 receipts, all shipped (the tests sample every trace).
            hops = wait_for(lambda: (lambda h: h if len(h) >= 12 else None)(
                collector.json("/api/hops?limit=100")["hops"]), timeout=30,
                message="the collector's hops")
            spans = wait_for(lambda: (lambda s: s if len(s) >= len(hops) else None)(
                receiver.by_span_id()), timeout=30, message="the backend's spans")
        finally:
            for process in (caller, server):
                Peer(process, None).stop()
        assert receiver.paths == {"/v1/traces"}
        for hop in hops:
            span = spans[hop["span_id"]]
            assert span["trace_id"] == hop["trace_id"]
            assert span["parent_id"] == hop["parent_id"]
            assert span["service"] == hop["service"]
            assert span["end"] >= span["start"] > 0
        kinds = sorted((s["service"], s["kind"], s["attributes"]["rpc.method"])
                       for s in spans.values())
        assert kinds == sorted(
            [("otlp-caller", CLIENT, "echo")] * 3 + [("otlp-server", SERVER, "echo")] * 3
            + [("otlp-caller", PRODUCER, "count_cast")] * 2
            + [("otlp-server", CONSUMER, "count_cast")] * 2
            + [("otlp-caller", CLIENT, "fail"), ("otlp-server", SERVER, "fail")])
        # A server span is the child of its caller's span, in the caller's trace.
        for span in spans.values():
            if span["service"] == "otlp-server":
                parent = spans[span["parent_id"]]
                assert (parent["service"], parent["trace_id"]) == ("otlp-caller",
                                                                   span["trace_id"])
            assert span["attributes"]["messaging.destination.name"] == topic
            assert span["attributes"]["openstack.request_id"] == request_id
        failed = [s for s in spans.values() if s["attributes"]["rpc.method"] == "fail"]
        assert {s["status_code"] for s in failed} == {STATUS_ERROR}
        assert {s["attributes"]["error.type"] for s in failed} == {"PortBindingFailed"}
        everything = json.dumps(list(spans.values()))
        assert SECRET not in everything and "guest:guest" not in everything
        assert collector.metrics().value(
            "commlens_collector_otlp_spans_exported_total") >= len(hops)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hangs", "refuses", "unavailable"])
def test_a_backend_that_hangs_or_refuses_never_stalls_the_intake(rabbitmq, tmp_path, backend):
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-otlp-{run}"
                  f"&queue=commlens.otlp-{run}")
    with Receiver(mode={"hangs": "hang", "unavailable": "unavailable"}.get(backend, "ok")) \
            as receiver:
        endpoint = (f"http://127.0.0.1:{free_port()}" if backend == "refuses"
                    else receiver.endpoint)
        with run_collector(export_url, tmp_path, ["--otlp-endpoint", endpoint,
                                                  "--otlp-timeout", "2",
                                                  "--otlp-max-queue", "50"]) as collector:
            wait_for(lambda: collector_ready(collector), timeout=30, message="collector")
            recorder = recorder_mod.Recorder("otlp-agent")
            transport = shipping.AmqpTransport(export_url)
            shipper = shipping.Shipper(recorder, transport, 1.0)
            trace_ids = []
            try:
                # More than the queue holds, in rounds, while the backend hangs
                # or refuses: the intake takes every one.
                for _ in range(4):
                    for _ in range(100):
                        hop = _hop(service="otlp-agent")
                        trace_ids.append(hop["trace_id"])
                        recorder.add_hop(hop)
                    assert shipper.ship_once()
            finally:
                transport.close()

            def all_taken():
                metrics = collector.metrics()
                return metrics.value("commlens_collector_hops_total", outcome="assembled") \
                    == len(trace_ids)
            wait_for(all_taken, timeout=30, message="every hop taken in")
            assert collector_ready(collector)

            def dropped():
                metrics = collector.metrics()
                return sum(metrics.value("commlens_collector_otlp_spans_dropped_total",
                                         reason=reason) for reason in otlp.DROP_REASONS)
            # What the backend did not take is counted; nothing was exported.
            wait_for(lambda: dropped() >= len(trace_ids) - 50, timeout=30,
                     message="drops counted")
            metrics = collector.metrics()
            assert metrics.value("commlens_collector_otlp_spans_exported_total") == 0
            assert metrics.value("commlens_collector_otlp_queue_spans") <= 50
            assert metrics.value("commlens_collector_otlp_spans_dropped_total",
                                 reason="queue_full") > 0


@pytest.mark.slow
def test_the_demo_exports_rest_spans_that_join_its_rpc_spans(tmp_path):
    """``commlens demo --otlp-endpoint``: the emulated plane's real WSGI
    middleware and outbound hook give HTTP spans, its failures ERROR."""
    with Receiver() as receiver:
        demo = Demo(tmp_path, "--otlp-endpoint", receiver.endpoint, "--fault", "neutron-error")
        try:
            wait_for(demo.up, timeout=60, message="demo up")

            def failed_port_binding():
                spans = receiver.by_span_id()
                return next((s for s in spans.values()
                             if s["service"] == "neutron-server" and s["kind"] == SERVER
                             and s["attributes"].get("http.response.status_code") == 409
                             and s["parent_id"] in spans), None)
            bound = wait_for(failed_port_binding, timeout=60,
                             message="neutron's 409 under its caller's span")
        finally:
            demo.process.terminate()
            demo.process.wait(30)
        spans = receiver.by_span_id()
        assert bound["attributes"]["http.route"].startswith("/v2.0/ports")
        assert bound["attributes"]["error.type"] == "PortBindingFailed"
        caller = spans[bound["parent_id"]]
        assert caller["kind"] == CLIENT and caller["trace_id"] == bound["trace_id"]
        assert caller["attributes"]["peer.service"] == "neutron-server"
        assert caller["status_code"] == STATUS_ERROR
        kinds = {(s["attributes"].get("rpc.system") is not None, s["kind"])
                 for s in spans.values()}
        assert {(True, CLIENT), (True, SERVER), (False, CLIENT), (False, SERVER)} <= kinds


def test_the_endpoint_comes_from_the_flag_or_the_environment(monkeypatch):
    from commlens.cli import main

    monkeypatch.setenv(otlp.ENDPOINT_ENV, "http://tempo:4318")
    for command in ("collector", "demo"):
        args = main.build_parser().parse_args([command])
        assert otlp.from_arguments(args).url == "http://tempo:4318/v1/traces"
        args = main.build_parser().parse_args([command, "--otlp-endpoint", "http://otel:4318"])
        assert otlp.from_arguments(args).url == "http://otel:4318/v1/traces"
    monkeypatch.delenv(otlp.ENDPOINT_ENV)
    assert otlp.from_arguments(main.build_parser().parse_args(["collector"])) is None
