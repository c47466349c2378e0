"""RPC overhead of commlens and its peers, measured in one run on real RabbitMQ.

    .venv/bin/python benchmarks/rpc_overhead.py [--calls 1000 --casts 3000 --rounds 16]

Variants, each its own client process (instrumentation is process-wide),
started and warmed up once, then loaded in turns: each round every client
runs one burst of sequential calls and casts, in reverse order every other
round. Bursts a few seconds apart compare like with like on a machine
whose speed drifts (as the WSGI benchmark found, 2026-11-25):

  plain      rabbit:// client and server
  commlens   commlens+rabbit:// client and server, shipping to the broker every 1 s,
             compiled paths
  commlens-python      the same with COMMLENS_PUREPYTHON=1 on both sides (the
                       Python twins), its own server: compiled and pure Python
                       measured side by side, in the same rounds
  oslo.metrics         rabbit:// with [oslo_messaging_metrics] metrics_enabled,
                       the real oslo-metrics exporter listening
  otel-oslo-messaging  opentelemetry-instrumentation-oslo-messaging with an SDK
                       TracerProvider and a batch processor (spans discarded)

Prints calls/s and casts/s (median of the rounds), the ratio to plain and
client CPU per operation with its ratio (plain's / the variant's). One
burst's rate swings by 10 % and more, so each ratio is the median over
rounds of (variant / plain of the same round). A burst lasts about a
second: with 300 calls and 600 casts (a quarter of a second on
2026-11-26's machine) plain's casts ranged from 2,035 to 3,161 per second
within one run. The CPU ratio is the steadier figure on a noisy machine:
it does not count time spent waiting.
Then the wrapper's own hot path alone (client: begin and end of a send;
server: receipt to reply, no broker) in microseconds, the figure the 30 µs
budget is about.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

BROKER = "guest:guest@127.0.0.1:5672/"
import common  # noqa: E402  (benchmarks/ is the script's own folder)

HERE = os.path.abspath(__file__)
RUN = uuid.uuid4().hex[:8]
VARIANTS = ("plain", "commlens", "commlens-python", "oslo.metrics", "otel-oslo-messaging")
# The targets (docs/benchmarks.md): commlens's calls and casts at these ratios of plain's.
TARGETS = {"commlens": 0.97, "commlens-python": 0.95}
SHIP_INTERVAL = 1.0
WARM_UP_SECONDS = 2.5 * SHIP_INTERVAL


def serve(url, topic):
    import oslo_messaging as om
    from oslo_config import cfg

    cfg.CONF([], project="commlens-bench")

    class Endpoint:
        def echo(self, ctxt, value):
            return value

        def note(self, ctxt, value):
            pass

    transport = om.get_rpc_transport(cfg.CONF, url=url)
    server = om.get_rpc_server(transport, om.Target(topic=topic, server="bench"),
                               [Endpoint()], executor="threading")
    server.start()
    print("READY", flush=True)
    sys.stdin.read()
    server.stop()
    server.wait()


def client(variant, topic, calls, casts, metrics_socket):
    import oslo_messaging as om
    from oslo_config import cfg

    cfg.CONF([], project="commlens-bench")
    url = ("commlens+rabbit://" if variant.startswith("commlens") else "rabbit://") + BROKER
    common.enable_peer(variant, metrics_socket)

    transport = om.get_rpc_transport(cfg.CONF, url=url)
    rpc = om.get_rpc_client(transport, om.Target(topic=topic), timeout=30)
    # Warm up for longer than two ship intervals, so every variant is measured
    # in its steady state: connections and reply queue open, and commlens's
    # shipper connected to the broker (once per process; not per call).
    warm_until = time.monotonic() + WARM_UP_SECONDS
    while time.monotonic() < warm_until:
        rpc.call({}, "echo", value=0)

    print("READY", flush=True)
    # One burst per line from the driver script: the variants take turns a
    # few seconds apart instead of each being a fresh process.
    for _ in sys.stdin:
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(calls):
            rpc.call({"request_id": "req-bench"}, "echo", value=i)
        call_cpu, call_wall = time.process_time() - cpu, time.perf_counter() - wall

        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(casts):
            rpc.cast({"request_id": "req-bench"}, "note", value=i)
        cast_cpu, cast_wall = time.process_time() - cpu, time.perf_counter() - wall
        rpc.call({}, "echo", value=0)  # the casts are delivered before the next burst
        print(json.dumps({
            "calls_per_s": calls / call_wall, "casts_per_s": casts / cast_wall,
            "cpu_us_per_call": call_cpu / calls * 1e6, "cpu_us_per_cast": cast_cpu / casts * 1e6,
        }), flush=True)
    transport.cleanup()


class _Incoming:
    """Stands in for a received message in the server-side micro benchmark."""

    def __init__(self, ctxt, message):
        self.ctxt = ctxt
        self.message = message
        self.msg_id = "m"
        self.orig_msg_id = "m"

    def acknowledge(self):
        pass

    def reply(self, reply=None, failure=None):
        pass


def hot_path(iterations=100000):
    """µs spent in the wrapper itself per message, on each side, no broker."""
    import oslo_messaging as om
    from oslo_config import cfg

    from commlens.middleware import rpc_driver

    os.environ.setdefault("COMMLENS_EXPORT_URL", "memory://")
    cfg.CONF([], project="commlens-bench")
    transport = om.get_rpc_transport(cfg.CONF, url="commlens+fake://")
    driver = transport._driver
    target = om.Target(topic="bench")
    message = {"method": "echo", "args": {"value": 1}}
    results = {}
    for kind, wait in (("call", True), ("cast", None)):
        ctxt = {"request_id": "req-bench", "user_id": "u", "project_id": "p"}
        start = time.perf_counter()
        for _ in range(iterations):
            driver._sends.begin(target, ctxt, message, wait).end(None)
        results[kind] = (time.perf_counter() - start) / iterations * 1e6
    sent = driver._sends.begin(target, {"request_id": "req-bench"}, message, True).ctxt
    listener = rpc_driver._InstrumentedListener(
        _FakeListener(), driver, "bench", notifications=False)
    start = time.perf_counter()
    for _ in range(iterations):
        incoming = listener._wrap(_Incoming(dict(sent), message))
        incoming.acknowledge()
        incoming.reply({"ok": 1})
    results["server"] = (time.perf_counter() - start) / iterations * 1e6
    transport.cleanup()
    return results


class _FakeListener:
    batch_size, batch_timeout, prefetch_size = 1, None, -1


def _start(command, env=None):
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env)
    line = process.stdout.readline()
    if line.strip() != "READY":
        raise SystemExit(f"benchmark: {command[2:4]} did not start")
    return process


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--casts", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=16)
    common.add_variants_argument(parser, VARIANTS)
    parser.add_argument("--serve", nargs=2, metavar=("URL", "TOPIC"), help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, metavar=("VARIANT", "TOPIC", "SOCKET"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--hot-path", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hot_path:
        return print(json.dumps(hot_path()))
    if args.serve:
        return serve(*args.serve)
    if args.client:
        return client(args.client[0], args.client[1], args.calls, args.casts, args.client[2])

    env = dict(os.environ, COMMLENS_SERVICE_NAME="bench",
               COMMLENS_EXPORT_URL=f"amqp://{BROKER}?exchange=commlens-bench",
               COMMLENS_SHIP_INTERVAL=str(SHIP_INTERVAL))
    workdir = tempfile.mkdtemp(prefix="commlens-bench-")
    metrics_socket = os.path.join(workdir, "oslo-metrics.sock")
    optional = {"oslo.metrics": "oslo_metrics",
                "otel-oslo-messaging": "opentelemetry.instrumentation.oslo_messaging"}
    variants = common.selected_variants(args.variants, VARIANTS, optional)
    # Each commlens variant has a server of its own, of the same implementation;
    # the peers share plain's (what they instrument is the client).
    topics = {v: f"bench-{v}-{RUN}" for v in ("plain", "commlens", "commlens-python")}
    servers = [_start([sys.executable, HERE, "--serve", "rabbit://" + BROKER, topics["plain"]],
                      env)]
    for variant in ("commlens", "commlens-python"):
        if variant in variants:
            servers.append(_start(
                [sys.executable, HERE, "--serve", "commlens+rabbit://" + BROKER,
                 topics[variant]], _variant_env(dict(env, COMMLENS_SERVICE_NAME="bench-server"),
                                                variant)))
    extra = []
    if "oslo.metrics" in variants:
        extra.append(common.start_oslo_metrics_exporter(metrics_socket, workdir))

    results = {v: [] for v in variants}
    clients = {}
    try:
        for variant in variants:
            topic = topics.get(variant, topics["plain"])
            clients[variant] = _start(
                [sys.executable, HERE, "--calls", str(args.calls), "--casts", str(args.casts),
                 "--client", variant, topic, metrics_socket], _variant_env(env, variant))
        for round_number in range(args.rounds):
            # Every other round in reverse, so a drift in the machine's speed
            # weighs on every variant alike.
            for variant in variants if round_number % 2 == 0 else reversed(variants):
                process = clients[variant]
                process.stdin.write("go\n")
                process.stdin.flush()
                line = process.stdout.readline()
                if not line:
                    raise SystemExit(f"benchmark: the {variant} client died")
                results[variant].append(json.loads(line))
            print(f"round {round_number + 1}/{args.rounds}: " + ", ".join(
                f"{v} {results[v][-1]['calls_per_s']:.0f}/{results[v][-1]['casts_per_s']:.0f}"
                for v in variants) + " calls/casts per s", file=sys.stderr)
    finally:
        for process in list(clients.values()) + servers:
            process.stdin.close()
            process.wait(60)
        for process in extra:
            process.terminate()
            process.wait(10)

    def median(variant, key):
        return statistics.median(r[key] for r in results[variant])

    def paired_ratio(variant, key):
        return statistics.median(v[key] / p[key]
                                 for v, p in zip(results[variant], results["plain"], strict=True))

    def cpu_ratio(variant, key):
        return statistics.median(p[key] / v[key]
                                 for v, p in zip(results[variant], results["plain"], strict=True))

    print(f"\nRPC overhead on real RabbitMQ: {args.calls} sequential calls and "
          f"{args.casts} casts per round, {args.rounds} rounds, one client thread; "
          "ratio = median of per-round ratios to plain (CPU ratio: plain's client CPU "
          "per operation / the variant's)")
    print(f"{'variant':<22}{'calls/s':>9}{'ratio':>8}{'casts/s':>9}{'ratio':>8}"
          f"{'CPU µs/call':>13}{'ratio':>7}{'CPU µs/cast':>13}{'ratio':>7}")
    for variant in variants:
        calls, casts = median(variant, "calls_per_s"), median(variant, "casts_per_s")
        print(f"{variant:<22}{calls:>9.0f}{paired_ratio(variant, 'calls_per_s'):>8.3f}"
              f"{casts:>9.0f}{paired_ratio(variant, 'casts_per_s'):>8.3f}"
              f"{median(variant, 'cpu_us_per_call'):>13.0f}"
              f"{cpu_ratio(variant, 'cpu_us_per_call'):>7.3f}"
              f"{median(variant, 'cpu_us_per_cast'):>13.0f}"
              f"{cpu_ratio(variant, 'cpu_us_per_cast'):>7.3f}")
    print()
    for variant, target in TARGETS.items():
        if variant not in variants:
            continue
        ratios = {kind: paired_ratio(variant, f"{kind}s_per_s") for kind in ("call", "cast")}
        verdict = ("met" if min(ratios.values()) >= target else "NOT met")
        print(f"target {target:.2f} of plain for {variant}: calls {ratios['call']:.3f}, "
              f"casts {ratios['cast']:.3f}: {verdict}")
    for variant in ("commlens", "commlens-python"):
        if variant in variants:
            micro = _hot_path_in(variant)
            print(f"{variant} wrapper hot path alone (no broker): client "
                  f"{micro['call']:.1f} µs per call, {micro['cast']:.1f} µs per cast; server "
                  f"{micro['server']:.1f} µs per message received and replied")


def _variant_env(env, variant):
    """The environment of a variant's processes: the Python twins for commlens-python."""
    return dict(env, COMMLENS_PUREPYTHON="1") if variant == "commlens-python" else env


def _hot_path_in(variant):
    """hot_path() in a fresh process of the variant's implementation."""
    done = subprocess.run([sys.executable, HERE, "--hot-path"], capture_output=True, text=True,
                          env=_variant_env(dict(os.environ), variant), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
