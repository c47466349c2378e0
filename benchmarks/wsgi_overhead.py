"""WSGI middleware overhead, measured in one run: gunicorn serving a minimal app,
loaded by wrk from a second process.

    .venv/bin/python benchmarks/wsgi_overhead.py [--seconds 2 --rounds 16]

Variants, each its own gunicorn: plain, passthrough (a middleware that only
calls the app: the floor for any middleware), commlens
(CommlensMiddleware, shipping to RabbitMQ every second, compiled paths),
commlens-python (the same with COMMLENS_PUREPYTHON=1: the Python twins,
measured side by side with the compiled paths in the same rounds), otel-wsgi
(opentelemetry-instrumentation-wsgi, SDK provider, batch processor, spans
discarded) and ceilometermiddleware (a notification per request over
oslo.messaging to RabbitMQ), the last two if installed.

The rate must be the server's, not the load generator's: one gunicorn worker
(gthread, one thread, keep-alive) on a core of its own, wrk on the others.
With a sync worker every request is a new connection and wrk, not the
server, set the pace: the worker sat idle a fifth of the time and the same
commlens code measured anywhere from 0.90 to 1.11 of plain. Pinned and kept
alive, the worker is busy all the time.

All servers start (and warm up) first; then each round loads them in turn
for a few seconds, in reverse order every other round. On a shared machine
whose speed drifts by 10-20 % within a minute (seen on 2026-11-25), pairs
run a few seconds apart still compare like with like, where a fresh server
per run put 10 s and more between them and two identical plain servers
measured 0.91 of each other.

Prints requests/s, the ratio to plain (median of per-round ratios) and the
server's CPU time per request (from /proc) with its ratio (plain's / the
variant's, median of per-round ratios).
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: E402  (benchmarks/ is the script's own folder)

VARIANTS = ("plain", "passthrough", "commlens", "commlens-python", "otel-wsgi",
            "ceilometermiddleware")
# The targets (docs/benchmarks.md), requests/s as a ratio of plain's.
TARGETS = {"commlens": 0.95, "commlens-python": 0.95}
RABBIT = "guest:guest@127.0.0.1:5672/"
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


class Server:
    """One variant's gunicorn, started once and loaded in turns with the others."""

    def __init__(self, variant):
        self.variant = variant
        self.port = common.free_port()
        env = dict(os.environ, BENCH_VARIANT=variant, BENCH_RABBIT_URL="rabbit://" + RABBIT,
                   COMMLENS_SERVICE_NAME="bench-api",
                   COMMLENS_EXPORT_URL=os.environ.get("BENCH_EXPORT_URL",
                                                      f"amqp://{RABBIT}?exchange=commlens-bench"),
                   COMMLENS_SHIP_INTERVAL=str(SHIP_INTERVAL))
        if variant == "commlens-python":
            env["COMMLENS_PUREPYTHON"] = "1"
        # A file, not a pipe: the server runs for the whole benchmark and
        # nobody reads its stderr until it fails, so a full pipe would stall it.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            SERVER_CPU + common.gunicorn_command(self.port),
            env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}{common.WSGI_PATH}"
        self.rates = []
        self.cpu_us_per_request = []

    def wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.log.seek(0)
        raise SystemExit(f"benchmark: {self.variant} did not start:\n{self.log.read()[-2000:]}")

    def warm_up(self):
        # Past two ship intervals: commlens's shipper connects to the broker
        # once per process, not per request, and is measured connected.
        subprocess.run(LOAD_CPUS + ["wrk", "-t1", "-c4", f"-d{WARM_UP_SECONDS}s", self.url],
                       capture_output=True, timeout=60)

    def load(self, seconds, connections):
        pids = [self.process.pid] + _children(self.process.pid)
        cpu = _cpu_seconds(pids)
        done = subprocess.run(
            LOAD_CPUS + ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", self.url],
            capture_output=True, text=True, timeout=seconds + 60)
        cpu = _cpu_seconds(pids) - cpu
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
        if errors:
            raise SystemExit(f"benchmark: {self.variant} answered {errors.group(1)} errors")
        total = int(re.search(r"(\d+) requests in", done.stdout).group(1))
        self.rates.append(float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1)))
        self.cpu_us_per_request.append(cpu / total * 1e6)

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--connections", type=int, default=8)
    common.add_variants_argument(parser, VARIANTS)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmark: wrk is missing "
                         "(Debian package wrk; scripts/setup installs it)")
    optional = {"otel-wsgi": "opentelemetry.instrumentation.wsgi",
                "ceilometermiddleware": "ceilometermiddleware.swift"}
    variants = common.selected_variants(args.variants, VARIANTS, optional)
    servers = [Server(v) for v in variants]
    try:
        for server in servers:
            server.wait_ready()
            server.warm_up()
        for round_number in range(args.rounds):
            # ABBA: every other round runs the variants in reverse, so a drift
            # in the machine's speed weighs on all of them alike.
            for server in servers if round_number % 2 == 0 else reversed(servers):
                server.load(args.seconds, args.connections)
            print(f"round {round_number + 1}/{args.rounds}: " + ", ".join(
                f"{s.variant} {s.rates[-1]:.0f}" for s in servers) + " req/s", file=sys.stderr)
    finally:
        for server in servers:
            server.stop()

    plain = servers[0]
    print(f"\nWSGI overhead: gunicorn (1 gthread worker, 1 thread, keep-alive, own core) "
          "serving a minimal app, wrk "
          f"-t2 -c{args.connections} for {args.seconds}s, variants loaded in turns, "
          f"{args.rounds} rounds; ratio = median of per-round ratios to plain")
    print(f"{'variant':<22}{'req/s':>9}{'ratio':>8}{'server CPU µs/request':>24}{'ratio':>8}")
    for server in servers:
        ratio = statistics.median(v / p for v, p in zip(server.rates, plain.rates, strict=True))
        cpu_ratio = statistics.median(p / v for v, p in zip(
            server.cpu_us_per_request, plain.cpu_us_per_request, strict=True))
        print(f"{server.variant:<22}{statistics.median(server.rates):>9.0f}{ratio:>8.3f}"
              f"{statistics.median(server.cpu_us_per_request):>24.0f}{cpu_ratio:>8.3f}")
    print()
    for server in servers:
        target = TARGETS.get(server.variant)
        if target is None:
            continue
        ratio = statistics.median(v / p for v, p in zip(server.rates, plain.rates, strict=True))
        print(f"target {target:.2f} of plain for {server.variant}: {ratio:.3f}: "
              + ("met" if ratio >= target else "NOT met"))


if __name__ == "__main__":
    main()
