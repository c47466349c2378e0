"""Collector ingest with OTLP export on and off: hops per second per core,
and their ratio (target: at least 0.8).

The same messages as benchmarks/collector_ingest.py (the whole path: JSON,
checks, the trace window, chains, the SQLite history on disk) go through a
collector twice in this one process pinned to one core: without export,
then with ``--otlp-endpoint`` posting every hop to a local OTLP/HTTP
receiver (tests/otlp_receiver.py, which decodes each request with
opentelemetry-proto) in a process of its own on another core: the backend
is not the collector's cost. Each phase ends when every span was posted;
its figure is hops per CPU-second of this process (all its threads: the
intake and the exporter), so the export's encoding and posting are
counted. The export queue is made large enough that nothing is dropped,
and the receiver's count is checked against the hops: a dropped span
would make the figure look better than it is.

    python benchmarks/otlp_export.py [--traces 300000]
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import collector_ingest  # noqa: E402

from commlens.exporters import collector as collector_mod  # noqa: E402
from commlens.exporters import history as history_mod  # noqa: E402
from commlens.exporters import otlp  # noqa: E402
from commlens.exporters import traces  # noqa: E402

TARGET_RATIO = 0.8
TESTS = pathlib.Path(__file__).parent.parent / "tests"

_RECEIVER = """
import os, sys
sys.path.insert(0, sys.argv[1])
cores = sorted(os.sched_getaffinity(0))
if len(cores) > 1:
    os.sched_setaffinity(0, set(cores[1:]))
from otlp_receiver import Receiver
with Receiver(keep=False) as receiver:
    print(receiver.endpoint, flush=True)
    sys.stdin.read()
    print(receiver.span_count, flush=True)
"""


def phase(args, endpoint=None):
    """(hops, CPU seconds, spans posted) of one run through a fresh collector."""
    with tempfile.TemporaryDirectory() as tmp:
        window = traces.TraceWindow(quiet_seconds=1.0)
        history = history_mod.History(os.path.join(tmp, "history.sqlite"))
        collector = collector_mod.Collector(window=window, history=history)
        if endpoint:
            collector.span_export = otlp.SpanExport(endpoint, max_queue=10_000_000)
            collector.span_export.start()
        busy, hops = 0.0, 0
        for first in range(0, args.traces, args.batch):
            batch = collector_ingest.messages(first, min(args.batch, args.traces - first),
                                              time.time())
            started = time.process_time()
            for body in batch:
                collector.ingest(body)
            collector.sweep()
            busy += time.process_time() - started
            hops += sum(body.count(b'"span_id"') for body in batch)
        started = time.process_time()
        collector.sweep(force=True)
        exported = 0
        if endpoint:
            # Every span posted before the clock stops.
            collector.span_export.stop(timeout=600)
            exported, dropped = collector.span_export.counts()
            if sum(dropped.values()):
                raise SystemExit(f"spans dropped: {dropped}: the figure would not be honest")
        busy += time.process_time() - started
        history.close()
    return hops, busy, exported


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--traces", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=5000, help="traces per built batch")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(TESTS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    endpoint = receiver.stdout.readline().strip()
    try:
        hops_off, cpu_off = phase(args)[:2]
        hops_on, cpu_on, exported = phase(args, endpoint)
    finally:
        received = receiver.communicate("", timeout=120)[0].strip()
    off, on = hops_off / cpu_off, hops_on / cpu_on
    ratio = on / off
    print(f"traces: {args.traces:,} a phase  hops: {hops_on:,}  exported: {exported:,}  "
          f"received by the backend: {int(received):,}")
    print(f"ingest, OTLP export off: {off:,.0f} hops/s per core")
    print(f"ingest, OTLP export on:  {on:,.0f} hops/s per core  "
          f"(ratio {ratio:.2f}, target {TARGET_RATIO})  "
          f"encoder: {'sdk' if os.environ.get(otlp.ENCODER_ENV) == 'sdk' else 'direct'}")
    return 0 if ratio >= TARGET_RATIO and int(received) == hops_on == exported else 1


if __name__ == "__main__":
    sys.exit(main())
