"""Collector ingest: hops per second assembled into traces and chains, on one core.

The whole path a shipped hop takes in the collector, in this one process:
JSON decoding, checking, the trace window, writing each message to the
journal before it would be acknowledged (the intake commits at
least every read from the broker; here every message, its worst case),
closing quiet traces, deriving chains and writing the SQLite history (a real
file, pruned as it would be).
Messages are built beforehand in batches and not timed. One in ten traces
is an error trace of five hops (a chain), the rest sampled successes of
three. Peak memory (RSS) is printed beside the window's configured bound:
it must follow the configuration, not the traffic.

    python benchmarks/collector_ingest.py [--traces 1000000]
        [--replicas 1,3] [--replica-traces 150000] [--snapshots]

``--replicas``: the same ingest split among replica processes as the
consistent-hash exchange splits it (each its share of the trace ids, its own
history), all at once on this machine's cores: their combined hops per second.
``--snapshots``: the per-unit costs of snapshots (an agent process's series
merged per second, and the memory a process's baseline holds) that
docs/scale.md multiplies out for a large cloud.
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

from commlens.exporters import collector as collector_mod
from commlens.exporters import history as history_mod
from commlens.exporters import journal as journal_mod
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
    add_scale_arguments(parser)
    args = parser.parse_args()
    if args.only_scale:
        return run_scale_measurements(args)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    with tempfile.TemporaryDirectory() as tmp:
        window = traces.TraceWindow(quiet_seconds=1.0, max_open_traces=args.max_open_traces)
        history = history_mod.History(os.path.join(tmp, "history.sqlite"),
                                      max_traces=args.history_max_traces)
        collector = collector_mod.Collector(
            window=window, history=history,
            journal=journal_mod.Journal(os.path.join(tmp, "history.sqlite.journal")))
        start_rss = rss_mib()
        busy = cpu = 0.0
        hops = 0
        last_prune = time.monotonic()
        for first in range(0, args.traces, args.batch):
            batch = messages(first, min(args.batch, args.traces - first), time.time())
            started, cpu_started = time.perf_counter(), time.process_time()
            for body in batch:
                collector.ingest(body)
                collector.commit()
            collector.sweep()
            if time.monotonic() - last_prune > 10:
                history.prune()
                last_prune = time.monotonic()
            busy += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
            hops += sum(body.count(b'"span_id"') for body in batch)
        started, cpu_started = time.perf_counter(), time.process_time()
        collector.sweep(force=True)
        history.prune()
        busy += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        peak_rss = rss_mib()
        chains = sum(collector.chain_counter.entry_errors.values())
        stored = history.size()
        history.close()

    rate = hops / busy
    print(f"traces: {args.traces:,}  hops: {hops:,}  chains counted: {chains:,}  "
          f"history kept: {stored:,} (bound {args.history_max_traces:,})")
    print(f"ingest: {rate:,.0f} hops/s on one core  "
          f"(target {TARGET_HOPS_PER_SECOND:,}: ratio {rate / TARGET_HOPS_PER_SECOND:.2f}); "
          f"{hops / cpu:,.0f} hops per CPU second")
    print(f"memory: peak RSS {peak_rss:,.0f} MiB (at start {start_rss:,.0f} MiB); window "
          f"bound {args.max_open_traces:,} open traces, "
          f"{window.closed['window_full']:,} closed early")
    run_scale_measurements(args)
    return 0 if rate >= TARGET_HOPS_PER_SECOND else 1


# -- Replicas and snapshots: the per-unit costs docs/scale.md builds on -------

def add_scale_arguments(parser):
    parser.add_argument("--replicas", default="",
                        help="comma-separated replica counts to measure, e.g. 1,3")
    parser.add_argument("--replica-traces", type=int, default=150_000,
                        help="traces split among the replicas (default 150000)")
    parser.add_argument("--snapshots", action="store_true",
                        help="measure snapshot ingest and a process's memory")
    parser.add_argument("--only-scale", action="store_true",
                        help="skip the one-core ingest above")


def run_scale_measurements(args):
    counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    print(f"date: {time.strftime('%Y-%m-%d')}  cores: {os.cpu_count()}  load average: "
          f"{os.getloadavg()[0]:.1f}")
    if counts:
        os.sched_setaffinity(0, set(range(os.cpu_count())))  # every core again
        single = None
        for n in counts:
            rate, per_cpu, peak = measure_replicas(n, args.replica_traces)
            single = single or (rate if n == 1 else None)
            versus = f", {rate / single:.2f}x one replica" if single and n > 1 else ""
            print(f"replicas {n}: {rate:,.0f} hops/s combined ({per_cpu:,.0f} per CPU "
                  f"second{versus}); peak RSS per replica {peak:,.0f} MiB")
    if args.snapshots:
        measure_snapshots()
    return 0


def _replica_share(index, replicas, total, barrier, results):
    """One replica: its share of the traces (every ``replicas``-th, as a
    consistent hash spreads trace ids evenly), built before the start and
    ingested after it, into its own collector and history file."""
    batch = [body for first in range(index * 1000, total, replicas * 1000)
             for body in messages(first, min(1000, total - first), time.time())]
    with tempfile.TemporaryDirectory() as tmp:
        window = traces.TraceWindow(quiet_seconds=1.0)
        history = history_mod.History(os.path.join(tmp, "history.sqlite"))
        collector = collector_mod.Collector(
            window=window, history=history,
            journal=journal_mod.Journal(os.path.join(tmp, "history.sqlite.journal")))
        barrier.wait()
        started, cpu = time.perf_counter(), time.process_time()
        for i, body in enumerate(batch):
            collector.ingest(body)
            collector.commit()
            if i % 50 == 0:
                collector.sweep()
        collector.sweep(force=True)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        history.close()
    results.put((sum(body.count(b'"span_id"') for body in batch), started, elapsed,
                 rss_mib(), cpu))


def measure_replicas(replicas, total):
    """(combined hops/s, hops per CPU second, peak RSS MiB of the largest
    replica) of ``replicas`` processes ingesting ``total`` traces between
    them at once. The CPU figure is the per-unit cost: it holds whatever
    else the machine runs; the combined one is this machine's, now."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(replicas + 1), context.Queue()
    workers = [context.Process(target=_replica_share, args=(i, replicas, total, barrier,
                                                            results))
               for i in range(replicas)]
    for worker in workers:
        worker.start()
    barrier.wait()
    done = [results.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    hops = sum(d[0] for d in done)
    print(f"  {replicas} replica(s): " + ", ".join(
        f"{d[0]:,} hops in {d[2]:.1f}s ({d[4]:.1f}s CPU)" for d in done))
    first_start = min(d[1] for d in done)
    wall = max(d[1] + d[2] for d in done) - first_start
    return hops / wall, hops / sum(d[4] for d in done), max(d[3] for d in done)


# An agent process's series as a compute host's agent holds them: ten
# methods sent and received, their waits and processing times, a REST route.
def _agent_snapshot(recorder_mod, metrics, service):
    recorder = recorder_mod.Recorder(service)
    for m in range(10):
        method = f"method_{m}"
        recorder.inc(metrics.RPC_SENT, (service, "conductor", method, "call"))
        recorder.observe(metrics.RPC_REPLY_WAIT, (service, "conductor", method, "ok"), 0.02)
        recorder.observe(metrics.RPC_SERVER_HOPS,
                         (service, "nova-conductor", "compute", method, "ok"), 0.01)
    recorder.observe(metrics.HTTP_CLIENT_DURATION, (service, "placement", "GET", "ok"), 0.01)
    return recorder.snapshot(5.0)


def measure_snapshots(processes=20000, rounds=3):
    """Snapshots merged per second (and series per second), and the memory
    each process adds, for ``processes`` agent processes shipping ``rounds``
    snapshots each."""
    from commlens.tracer import metrics
    from commlens.tracer import recorder as recorder_mod

    snapshot = _agent_snapshot(recorder_mod, metrics, "nova-compute")
    series = sum(len(snapshot.get(k) or ()) for k in ("counters", "histograms", "gauges"))
    collector = collector_mod.Collector()
    before = rss_mib()
    busy, cpu, count = 0.0, 0.0, 0
    for seq in range(1, rounds + 1):
        bodies = []
        for p in range(processes):
            snapshot["process"] = dict(snapshot["process"], id=f"bench-{p}")
            snapshot["seq"] = seq
            bodies.append(json.dumps(snapshot).encode())
        started, cpu_started = time.perf_counter(), time.process_time()
        for body in bodies:
            collector.ingest(body)
        busy += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        count += len(bodies)
        del bodies
    started = time.perf_counter()
    collector.graph(300)
    graph_seconds = time.perf_counter() - started
    grown = rss_mib() - before
    accepted = collector.message_counts().get("accepted", 0)
    print(f"snapshots: {count / busy:,.0f}/s, {count / cpu:,.0f} per CPU second "
          f"({series} series each: {count * series / cpu:,.0f} series per CPU second); "
          f"{accepted:,} accepted")
    print(f"memory: {grown * 1024 / processes:,.1f} KiB per reporting process "
          f"(peak RSS grew {grown:,.0f} MiB for {processes:,} processes); "
          f"graph of them built in {graph_seconds:.2f}s")


if __name__ == "__main__":
    sys.exit(main())
