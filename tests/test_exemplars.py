"""Trace-id exemplars on the latency histograms (exporters/exemplars.py):
in the OpenMetrics exposition, asked for by content negotiation, and
stored by Debian's real Prometheus with exemplar storage on."""

import json
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client.openmetrics import parser as openmetrics_parser

from support import COMMLENS_URL, free_port, wait_for
from test_alert_rules import _scraped, _tool

from commlens.exporters import collector as collector_mod
from commlens.exporters import prometheus
from commlens.tracer import context
from commlens.tracer import metrics
from commlens.tracer import wire

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROCESSING = metrics.RPC_PROCESSING.name


def _hop(trace_id, duration, outcome="ok"):
    return {"trace_id": trace_id, "span_id": context.new_span_id(), "parent_id": None,
            "service": "nova-conductor", "side": "server", "protocol": "rpc",
            "peer": "nova-api", "target": "conductor", "operation": "build_instances",
            "kind": "call", "outcome": outcome, "error": None, "start": time.time(),
            "duration": duration, "request_id": None, "global_request_id": None,
            "server": None}


def _collector_with(hops, counts):
    collector = collector_mod.Collector()
    collector.ingest(json.dumps({"format": wire.HOPS_FORMAT,
                                 "process": {"id": "p", "service": "nova-conductor"},
                                 "hops": hops}))
    labels = ["nova-conductor", "conductor", "build_instances", "ok"]
    collector.ingest(json.dumps({
        "format": wire.SNAPSHOT_FORMAT, "seq": 1, "sent_at": time.time(), "interval": 1,
        "final": False, "process": {"id": "p", "service": "nova-conductor", "host": "h",
                                    "pid": 1, "started_at": time.time()},
        "counters": [], "gauges": [], "hops": [],
        "histograms": [[PROCESSING, labels, counts, 1.0, 0.002, 0.7]]}))
    return collector


def _bucket_exemplars(body):
    found = {}
    for family in openmetrics_parser.text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == PROCESSING + "_bucket" and sample.exemplar is not None:
                found[sample.labels["le"]] = sample.exemplar
    return found


def test_openmetrics_scrapes_carry_the_latest_trace_of_each_bucket_and_plain_text_none():
    fast, slow_old, slow_new = (context.new_trace_id() for _ in range(3))
    counts = [0] * (len(metrics.LATENCY_BUCKETS) + 1)
    counts[1], counts[9] = 1, 2  # 0.0025 and 1.0
    collector = _collector_with([_hop(fast, 0.002), _hop(slow_old, 0.6),
                                 _hop(slow_new, 0.7)], counts)
    body, content_type = prometheus.render(collector, None, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    found = _bucket_exemplars(body)
    assert {le: e.labels["trace_id"] for le, e in found.items()} == {
        "0.0025": fast, "1.0": slow_new}
    assert found["1.0"].value == pytest.approx(0.7)
    # A later scrape reads only what came since, and keeps what it found.
    newest = context.new_trace_id()
    collector.ingest(json.dumps({"format": wire.HOPS_FORMAT,
                                 "process": {"id": "p", "service": "nova-conductor"},
                                 "hops": [_hop(newest, 0.8)]}))
    found = _bucket_exemplars(prometheus.render(collector, None, OPENMETRICS)[0])
    assert {le: e.labels["trace_id"] for le, e in found.items()} == {
        "0.0025": fast, "1.0": newest}
    # Prometheus without exemplar storage asks for the text format: unchanged.
    for accept in (None, "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"):
        text, content_type = prometheus.render(collector, None, accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert b"trace_id" not in text and b"# EOF" not in text


def test_a_bucket_no_count_landed_in_gets_no_exemplar():
    # A hop whose series the process has not reported (yet): no exemplar
    # hangs on an empty bucket.
    counts = [0] * (len(metrics.LATENCY_BUCKETS) + 1)
    counts[1] = 1
    collector = _collector_with([_hop(context.new_trace_id(), 5.0)], counts)
    assert _bucket_exemplars(prometheus.render(collector, None, OPENMETRICS)[0]) == {}


@pytest.mark.slow
def test_real_prometheus_stores_the_exemplars_and_returns_them(
        collector, start_peer, rpc_client, topic, tmp_path):
    host_port = collector.base_url.removeprefix("http://")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "commlens-collector",
                            "static_configs": [{"targets": [host_port]}]}],
    }))
    prometheus_process = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    api = f"http://127.0.0.1:{port}/api/v1"

    def exemplar_trace_ids():
        query = urllib.parse.urlencode({
            "query": f'{PROCESSING}_bucket{{target="{topic}"}}',
            "start": time.time() - 600, "end": time.time() + 60})
        try:
            with urllib.request.urlopen(f"{api}/query_exemplars?{query}",
                                        timeout=2) as response:
                data = json.load(response)["data"]
        except OSError:
            return set()
        return {e["labels"]["trace_id"] for series in data for e in series["exemplars"]}

    start_peer(COMMLENS_URL, topic)
    client = rpc_client(COMMLENS_URL, topic, timeout=30)
    try:
        wait_for(lambda: _scraped(api), timeout=30, message="Prometheus up and scraping")
        client.call({}, "slow", seconds=0.3)
        hop = wait_for(lambda: next(iter(collector.hops(target=topic, side="server")), None),
                       timeout=30, message="the server's hop")
        found = wait_for(exemplar_trace_ids, timeout=30,
                         message="exemplars from /api/v1/query_exemplars")
        assert found == {hop["trace_id"]}
    finally:
        prometheus_process.terminate()
        prometheus_process.wait(10)
