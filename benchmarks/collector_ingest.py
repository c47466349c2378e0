"""Collector ingest: hops per second assembled into traces and chains, on one core.

The whole path a shipped hop takes in the collector, in this one process:
JSON decoding, checking, the trace window, closing quiet traces, deriving
chains and writing the SQLite history (a real file, pruned as it would be).
Messages are built beforehand in batches and not timed. One in ten traces
is an error trace of five hops (a chain), the rest sampled successes of
three. Peak memory (RSS) is printed beside the window's configured bound:
it must follow the configuration, not the traffic.

    python benchmarks/collector_ingest.py [--traces 1000000]
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from commlens.exporters import collector as collector_mod
from commlens.exporters import history as history_mod
from commlens.exporters import traces
from commlens.tracer import wire

HOPS_PER_MESSAGE = 200
TARGET_HOPS_PER_SECOND = 50000


def trace_hops(n, now):
    trace_id = "%032x" % (n + 1)
    span = ["%016x" % (n * 8 + k + 1) for k in range(5)]
    failing = n % 10 == 0
    shape = [("nova-api", "server", "http", "POST /v2.1/servers", "500"),
             ("nova-api", "client", "rpc", "build_instances", "PortBindingFailed"),
             ("nova-conductor", "server", "rpc", "build_instances", "PortBindingFailed"),
             ("nova-conductor", "client", "http", "PUT", "409"),
             ("neutron-server", "server", "http", "PUT /v2.0/ports/{id}", "409")]
    if not failing:
        shape = shape[:3]
    return [{"trace_id": trace_id, "span_id": span[k], "parent_id": span[k - 1] if k else None,
             "service": service, "side": side, "protocol": protocol, "peer": None,
             "target": "conductor", "operation": operation, "kind": "call",
             "outcome": "error" if failing else "ok", "error": error if failing else None,
             "start": now + k * 0.001, "duration": 0.01,
             "request_id": "req-%08x" % n if k == 0 else None, "global_request_id": None}
            for k, (service, side, protocol, operation, error) in enumerate(shape)]


def messages(first, count, now):
    """Encoded hop messages for traces [first, first+count), hops of one trace
    spread over two messages (two processes) as they would be."""
    early, late = [], []
    for n in range(first, first + count):
        hops = trace_hops(n, now)
        early.extend(hops[:2])
        late.extend(hops[2:])
    out = []
    for hops in (early, late):
        for i in range(0, len(hops), HOPS_PER_MESSAGE):
            out.append(json.dumps({"format": wire.HOPS_FORMAT,
                                   "process": {"id": "bench", "service": "bench"},
                                   "hops": hops[i:i + HOPS_PER_MESSAGE]}).encode())
    return out


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--traces", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000, help="traces per built batch")
    parser.add_argument("--max-open-traces", type=int, default=traces.DEFAULT_MAX_OPEN_TRACES)
    parser.add_argument("--history-max-traces", type=int,
                        default=history_mod.DEFAULT_MAX_TRACES)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    with tempfile.TemporaryDirectory() as tmp:
        window = traces.TraceWindow(quiet_seconds=1.0, max_open_traces=args.max_open_traces)
        history = history_mod.History(os.path.join(tmp, "history.sqlite"),
                                      max_traces=args.history_max_traces)
        collector = collector_mod.Collector(window=window, history=history)
        start_rss = rss_mib()
        busy = 0.0
        hops = 0
        last_prune = time.monotonic()
        for first in range(0, args.traces, args.batch):
            batch = messages(first, min(args.batch, args.traces - first), time.time())
            started = time.perf_counter()
            for body in batch:
                collector.ingest(body)
            collector.sweep()
            if time.monotonic() - last_prune > 10:
                history.prune()
                last_prune = time.monotonic()
            busy += time.perf_counter() - started
            hops += sum(body.count(b'"span_id"') for body in batch)
        started = time.perf_counter()
        collector.sweep(force=True)
        history.prune()
        busy += time.perf_counter() - started
        peak_rss = rss_mib()
        chains = sum(collector.chain_counter.entry_errors.values())
        stored = history.size()
        history.close()

    rate = hops / busy
    print(f"traces: {args.traces:,}  hops: {hops:,}  chains counted: {chains:,}  "
          f"history kept: {stored:,} (bound {args.history_max_traces:,})")
    print(f"ingest: {rate:,.0f} hops/s on one core  "
          f"(target {TARGET_HOPS_PER_SECOND:,}: ratio {rate / TARGET_HOPS_PER_SECOND:.2f})")
    print(f"memory: peak RSS {peak_rss:,.0f} MiB (at start {start_rss:,.0f} MiB); window "
          f"bound {args.max_open_traces:,} open traces, "
          f"{window.closed['window_full']:,} closed early")
    return 0 if rate >= TARGET_HOPS_PER_SECOND else 1


if __name__ == "__main__":
    sys.exit(main())
