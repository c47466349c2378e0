"""WSGI middleware overhead, measured in one run: gunicorn serving a minimal app,
loaded by wrk from a second process.

    .venv/bin/python benchmarks/wsgi_overhead.py [--seconds 5 --rounds 6]

Variants (each a fresh gunicorn, interleaved round by round): plain, commlens
(CommlensMiddleware, shipping to RabbitMQ every second), otel-wsgi
(opentelemetry-instrumentation-wsgi, SDK provider, batch processor, spans
discarded) and ceilometermiddleware (a notification per request over
oslo.messaging to RabbitMQ), the last two if installed.

The rate must be the server's, not the load generator's: one gunicorn worker
(gthread, one thread, keep-alive) on a core of its own, wrk on the others.
With a sync worker every request is a new connection and wrk, not the
server, set the pace: the worker sat idle a fifth of the time and the same
commlens code measured anywhere from 0.90 to 1.11 of plain. Pinned and kept
alive, the worker is busy all the time and the ratio repeats.

Prints requests/s, the ratio to plain (median of per-round ratios, each pair
back to back) and the server's CPU time per request (from /proc).
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

import common  # noqa: E402  (benchmarks/ is the script's own folder)

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("plain", "commlens", "otel-wsgi", "ceilometermiddleware")
RABBIT = "guest:guest@127.0.0.1:5672/"
PATH = "/v1/AUTH_bench/container/object"  # ceilometermiddleware notifies for Swift paths
SHIP_INTERVAL = 1.0
WARM_UP_SECONDS = 3  # wrk takes whole seconds; more than two ship intervals


_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = ["taskset", "-c", str(_CPUS[-1])] if len(_CPUS) > 1 else []
LOAD_CPUS = (["taskset", "-c", ",".join(map(str, _CPUS[:-1]))] if len(_CPUS) > 1 else [])


def _cpu_seconds(pids):
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / ticks


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def run_variant(variant, seconds, connections):
    port = common.free_port()
    env = dict(os.environ, BENCH_VARIANT=variant, BENCH_RABBIT_URL="rabbit://" + RABBIT,
               COMMLENS_SERVICE_NAME="bench-api",
               COMMLENS_EXPORT_URL=os.environ.get("BENCH_EXPORT_URL",
                                                  f"amqp://{RABBIT}?exchange=commlens-bench"),
               COMMLENS_SHIP_INTERVAL=str(SHIP_INTERVAL))
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    server = subprocess.Popen(
        SERVER_CPU + [gunicorn, "--chdir", HERE, "--workers", "1", "--worker-class", "gthread",
                      "--threads", "1", "--keep-alive", "30", "--bind", f"127.0.0.1:{port}",
                      "--log-level", "warning", "wsgi_apps:app"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}{PATH}"
        # Warm up past two ship intervals: commlens's shipper connects to the
        # broker once per process, not per request, and is measured connected.
        subprocess.run(LOAD_CPUS + ["wrk", "-t1", "-c4", f"-d{WARM_UP_SECONDS}s", url],
                       capture_output=True, timeout=30)
        pids = [server.pid] + _children(server.pid)
        cpu = _cpu_seconds(pids)
        done = subprocess.run(LOAD_CPUS + ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", url],
                              capture_output=True, text=True, timeout=seconds + 60)
        cpu = _cpu_seconds(pids) - cpu
    finally:
        server.terminate()
        server.wait(30)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    total = int(re.search(r"(\d+) requests in", done.stdout).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if errors:
        raise SystemExit(f"benchmark: {variant} answered {errors.group(1)} errors")
    return {"rps": rate, "cpu_us_per_request": cpu / total * 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=8)
    common.add_variants_argument(parser, VARIANTS)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmark: wrk is missing "
                         "(Debian package wrk; scripts/setup installs it)")
    optional = {"otel-wsgi": "opentelemetry.instrumentation.wsgi",
                "ceilometermiddleware": "ceilometermiddleware.swift"}
    variants = common.selected_variants(args.variants, VARIANTS, optional)
    results = {v: [] for v in variants}
    for round_number in range(args.rounds):
        for variant in variants:
            results[variant].append(run_variant(variant, args.seconds, args.connections))
            print(f"round {round_number + 1}/{args.rounds} {variant}: "
                  f"{results[variant][-1]['rps']:.0f} req/s", file=sys.stderr)

    print(f"\nWSGI overhead: gunicorn (1 gthread worker, 1 thread, keep-alive, own core) "
          "serving a minimal app, wrk "
          f"-t2 -c{args.connections} for {args.seconds}s, {args.rounds} rounds; "
          "ratio = median of per-round ratios to plain")
    print(f"{'variant':<22}{'req/s':>9}{'ratio':>8}{'server CPU µs/request':>24}")
    for variant in variants:
        rps = statistics.median(r["rps"] for r in results[variant])
        ratio = statistics.median(v["rps"] / p["rps"] for v, p in
                                  zip(results[variant], results["plain"], strict=True))
        cpu = statistics.median(r["cpu_us_per_request"] for r in results[variant])
        print(f"{variant:<22}{rps:>9.0f}{ratio:>8.3f}{cpu:>24.0f}")


if __name__ == "__main__":
    main()
