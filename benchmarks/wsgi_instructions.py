"""The WSGI middleware's cost on a gunicorn worker, counted instead of timed.

    .venv/bin/python benchmarks/wsgi_instructions.py [--variants plain,passthrough,commlens,...]

commlens-python is CommlensMiddleware with COMMLENS_PUREPYTHON=1 (the Python twins).

Each variant's gunicorn worker (the app of wsgi_apps.py, the same server
settings as wsgi_overhead.py) runs twice under valgrind's callgrind with its
cache simulation, serving a warm-up and then SHORT or LONG keep-alive
requests; the difference between the two runs, divided by LONG - SHORT, is
one request's instructions and L1 cache misses, with start-up and warm-up
cancelled out. The same code and inputs give the same counts on any machine,
however busy, so a change's cost shows to a tenth of a percent where wrk's
rates swing by several.

Prints per request: instructions, L1 instruction and data misses, and
cycles = instructions + 10 x misses (the price of an L2 hit), with the
ratio plain / variant. The timed ratio of wsgi_overhead.py comes out lower:
a miss that goes past L2 costs more than ten cycles, and callgrind does not
model L2 (2026-11-26, Python path: 0.958 counted, 0.921 timed; compiled
path: 0.98 counted, 0.95 timed). Use this one to compare changes; the
target is judged by the timed one.

Found with it (2026-11-26): a list body and its request referred to each
other, so every request's objects waited for the garbage collector; that was
a third of commlens's cost.
"""

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import common  # noqa: E402  (benchmarks/ is the script's own folder)

VARIANTS = ("plain", "passthrough", "commlens", "commlens-python")
WARM_UP = 300
SHORT, LONG = 1000, 3000
MISS_CYCLES = 10
EVENTS = ("Ir", "I1mr", "D1mr", "D1mw")


def _request_loop(port, count):
    """``count`` sequential keep-alive GETs, each read to its last byte."""
    request = (f"GET {common.WSGI_PATH} HTTP/1.1\r\n"
               "Host: bench\r\nUser-Agent: wrk\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        pending = b""
        for _ in range(count):
            sock.sendall(request)
            while True:
                head_end = pending.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = int(re.search(rb"content-length: *(\d+)",
                                           pending[:head_end], re.I).group(1))
                    if len(pending) >= head_end + 4 + length:
                        pending = pending[head_end + 4 + length:]
                        break
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("benchmark: the server closed the connection")
                pending += data


def _wait_ready(port, process):
    deadline = time.monotonic() + 300  # importing under valgrind takes a while
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("benchmark: the server exited while starting")
        try:
            _request_loop(port, 1)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("benchmark: the server did not answer under valgrind")


def _worker_counts(variant, requests, workdir):
    """Event totals of one gunicorn worker's life that served ``requests``."""
    port = common.free_port()
    out = os.path.join(workdir, f"{variant}-{requests}")
    os.mkdir(out)
    env = dict(os.environ, BENCH_VARIANT=variant, PYTHONHASHSEED="0",
               COMMLENS_PUREPYTHON="1" if variant == "commlens-python" else "",
               COMMLENS_SERVICE_NAME="bench-api", COMMLENS_EXPORT_URL="memory://",
               COMMLENS_SHIP_INTERVAL="3600")  # no shipping inside the count
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--trace-children=yes",
         f"--callgrind-out-file={out}/callgrind.%p"] + common.gunicorn_command(port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port, process)
        _request_loop(port, WARM_UP)
        _request_loop(port, requests)
    finally:
        process.terminate()
        process.wait(120)
    # The worker served every request: its file is the larger of the two.
    worker = max(glob.glob(f"{out}/callgrind.*"), key=os.path.getsize)
    with open(worker) as f:
        header = next(line for line in f if line.startswith("events:")).split()[1:]
        totals = next(line for line in f if line.startswith(("totals:", "summary:")))
    values = dict(zip(header, map(int, totals.split()[1:]), strict=True))
    return {event: values[event] for event in EVENTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_variants_argument(parser, VARIANTS)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("benchmark: valgrind is missing "
                         "(Debian package valgrind; scripts/setup installs it)")
    variants = common.selected_variants(args.variants, VARIANTS, {})
    per_request = {}
    with tempfile.TemporaryDirectory() as workdir:
        for variant in variants:
            short = _worker_counts(variant, SHORT, workdir)
            long = _worker_counts(variant, LONG, workdir)
            per_request[variant] = {e: (long[e] - short[e]) / (LONG - SHORT) for e in EVENTS}
            print(f"{variant}: counted", file=sys.stderr)

    def cycles(counts):
        return counts["Ir"] + MISS_CYCLES * (counts["I1mr"] + counts["D1mr"] + counts["D1mw"])

    plain = cycles(per_request["plain"])
    print(f"\nWSGI cost per request on a gunicorn worker, counted by callgrind "
          f"({LONG} - {SHORT} requests); cycles = instructions + {MISS_CYCLES} x L1 misses")
    print(f"{'variant':<14}{'instructions':>14}{'I1 misses':>11}{'D1 misses':>11}"
          f"{'cycles':>11}{'over plain':>12}{'ratio':>8}")
    for variant, counts in per_request.items():
        total = cycles(counts)
        print(f"{variant:<14}{counts['Ir']:>14.0f}{counts['I1mr']:>11.0f}"
              f"{counts['D1mr'] + counts['D1mw']:>11.0f}{total:>11.0f}"
              f"{total - plain:>12.0f}{plain / total:>8.3f}")


if __name__ == "__main__":
    main()
