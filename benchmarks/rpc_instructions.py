"""RPC cost per call and per cast, client and server, counted instead of timed.

    .venv/bin/python benchmarks/rpc_instructions.py [--variants plain,commlens,...]
        [--messages 200] [--runs 2] [--keep DIR]

For each variant and each side, one process runs under valgrind's callgrind
and its peer outside it, over the shared RabbitMQ with a topic of the run's
own. The measured process counts in windows: entering ``os.getppid()`` and
entering ``os.getpgrp()`` each dump callgrind's counters and zero them
(``--dump-before``), two libc calls nothing else in these processes makes,
so every second dump is a window. Four windows per process: N calls, 2N
calls, N casts, 2N casts, each burst ended by one call (so a server has
processed every cast before its window closes); (2N window - N window) / N
is one message's instructions, with start-up, warm-up and the windows'
edges cancelled out. Every thread of the process is counted: on the client
the calling thread and the rabbit driver's reply poller (which receives the
replies), on the server the poller and the executor's worker (one:
executor_thread_pool_size = 1, so messages are processed in order and a
burst's last call ends its casts). What runs by the clock, not per message,
is kept out: no AMQP heartbeats (heartbeat_timeout_threshold = 0), the
rabbit driver's reply waiter and listener poll with a first timeout of 1 s
instead of 1 ms (see _transport), and commlens ships to memory:// once an
hour. Each window starts with
``gc.freeze()``: a full collection scans the whole heap of oslo.messaging
and kombu and falls in one window or the other by chance; the young
collections that a message's garbage causes are counted. The same code and
inputs give the same counts however busy the machine; ``--runs`` (2)
repeats everything in fresh processes and prints how far the runs differ.

Variants (both sides run the same one):

  plain                rabbit://
  commlens             commlens+rabbit://, compiled paths
  commlens-python      the same with COMMLENS_PUREPYTHON=1, if this build has
                       the switch (skipped with a note if not)
  oslo.metrics         rabbit:// with [oslo_messaging_metrics] metrics_enabled,
                       the real oslo-metrics exporter listening
  otel-oslo-messaging  opentelemetry-instrumentation-oslo-messaging, SDK
                       provider with a batch processor (spans discarded)

Prints instructions per message and ratio = plain's / the variant's.
Found with it (2026-11-30): timed by the clock, one such poll that times
out was a sixth of a counted call; and half of commlens's extra per cast on
the client is oslo.messaging's JSON encoding of the two context keys
(traceparent, baggage), which the rabbit driver encodes twice (the message,
then the envelope holding it as a string). Also found with it: the
compiled stamping's PyUnicode_FromFormat was half of a stamp (2,500
instructions), since replaced; and the traceparent alone costs
oslo.messaging 9,400 client and 14,100 server instructions per cast, more
than the 0.99 target leaves (docs/benchmarks.md, "Counted instead of timed").

``--keep DIR`` keeps the callgrind files (DIR/<run>-<variant>-<side>/
callgrind.out.<dump>, the windows in dumps 2, 4, 6, 8) for callgrind_annotate.
"""

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import common  # noqa: E402  (benchmarks/ is the script's own folder)

HERE = os.path.abspath(__file__)
RUN = uuid.uuid4().hex[:8]
BROKER = "guest:guest@127.0.0.1:5672/"
VARIANTS = ("plain", "commlens", "commlens-python", "oslo.metrics", "otel-oslo-messaging")
OPTIONAL = {"oslo.metrics": "oslo_metrics",
            "otel-oslo-messaging": "opentelemetry.instrumentation.oslo_messaging"}
SIDES = ("client", "server")
TARGET = 0.99  # commlens compiled, instructions, every figure (docs/benchmarks.md)
KINDS = ("call", "cast")
WARM_UP = 50  # calls and casts before the first window
# Heartbeats run by the clock, and a process under callgrind runs ~50x
# slower than its peer: counted, they would weigh on the longer window.
# An exchange of the run's own, so its queues can leave with it (auto-delete
# would conflict with the shared broker's "openstack" exchange).
CONFIG = (f"[DEFAULT]\nexecutor_thread_pool_size = 1\ncontrol_exchange = bench-instr-{RUN}\n"
          "[oslo_messaging_rabbit]\nheartbeat_timeout_threshold = 0\namqp_auto_delete = true\n")
# Entering either dumps and zeroes callgrind's counters: a window opens, closes.
OPEN, CLOSE = "getppid", "getpgrp"


def _transport(variant, config_file, metrics_socket):
    """The variant's RPC transport, set up the same way on either side."""
    import oslo_messaging as om
    from oslo_config import cfg
    from oslo_messaging._drivers import amqpdriver

    # The reply waiter and the listener poll with a timeout of 1 ms after
    # each message, doubling while none comes: one timed-out poll costs
    # about 250,000 instructions, and under callgrind a message's gap is
    # 50 times longer than outside it, and longer still for a slower
    # variant. Counted, that clock would pass for per-message cost.
    amqpdriver.ACK_REQUEUE_EVERY_SECONDS_MIN = 1.0

    cfg.CONF(["--config-file", config_file], project="commlens-bench")
    common.enable_peer(variant, metrics_socket)
    scheme = "commlens+rabbit://" if variant.startswith("commlens") else "rabbit://"
    return om.get_rpc_transport(cfg.CONF, url=scheme + BROKER)


def serve(variant, topic, config_file, metrics_socket):
    """The server: answers echo (call) and note (cast); stdin ``zero`` and
    ``dump`` open and close a counted window."""
    import oslo_messaging as om

    class Endpoint:
        def echo(self, ctxt, value):
            return value

        def note(self, ctxt, value):
            pass

    transport = _transport(variant, config_file, metrics_socket)
    server = om.get_rpc_server(transport, om.Target(topic=topic, server="bench"),
                               [Endpoint()], executor="threading")
    server.start()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "zero":
            gc.freeze()
            os.getppid()
        else:
            os.getpgrp()
        print("OK", flush=True)
    server.stop()
    server.wait()
    transport.cleanup()


def client(variant, topic, config_file, metrics_socket):
    """The client: stdin ``call N`` or ``cast N`` runs one counted burst."""
    import oslo_messaging as om

    transport = _transport(variant, config_file, metrics_socket)
    rpc = om.get_rpc_client(transport, om.Target(topic=topic), timeout=600)
    ctxt = {"request_id": "req-bench"}
    for i in range(WARM_UP):
        rpc.call(ctxt, "echo", value=i)
        rpc.cast(ctxt, "note", value=i)
    rpc.call(ctxt, "echo", value=0)
    print("READY", flush=True)
    for line in sys.stdin:
        kind, count = line.split()
        send = rpc.call if kind == "call" else rpc.cast
        method = "echo" if kind == "call" else "note"
        gc.freeze()
        os.getppid()
        for i in range(int(count)):
            send(ctxt, method, value=i)
        rpc.call(ctxt, "echo", value=0)  # the server has processed the burst
        os.getpgrp()
        print("OK", flush=True)
    transport.cleanup()


def _start(role, variant, topic, workdir, env, out_dir=None):
    command = [sys.executable, HERE, f"--{role}", variant, topic,
               os.path.join(workdir, "bench.conf"), os.path.join(workdir, "oslo-metrics.sock")]
    if out_dir is not None:
        command = ["valgrind", "--tool=callgrind", f"--dump-before={OPEN}",
                   f"--dump-before={CLOSE}",
                   f"--callgrind-out-file={out_dir}/callgrind.out"] + command
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env)
    _expect(process, "READY", f"the {variant} {role}")
    return process


def _expect(process, word, who):
    line = process.stdout.readline()
    if line.strip() != word:
        raise SystemExit(f"benchmark: {who} did not answer ({line.strip() or 'exited'})")


def _order(process, command, word="OK"):
    process.stdin.write(command + "\n")
    process.stdin.flush()
    _expect(process, word, command)


def _stop(process):
    if process.poll() is None:
        process.stdin.close()
        process.wait(600)


def _window_counts(out_dir):
    """Instructions of each window, in order (dumps 2, 4, 6, 8: the odd ones
    are what ran before a window opened)."""
    counts = []
    for number in range(2, 9, 2):
        with open(os.path.join(out_dir, f"callgrind.out.{number}")) as f:
            totals = next(line for line in f if line.startswith("totals:"))
        counts.append(int(totals.split()[1]))
    return counts


def _measure(variant, side, messages, workdir, out_dir, env):
    """{kind: instructions per message} of ``side`` for ``variant``."""
    topic = f"bench-instr-{RUN}-{uuid.uuid4().hex[:6]}"
    os.makedirs(out_dir)
    env = dict(env, COMMLENS_PUREPYTHON="1") if variant == "commlens-python" else env
    server = _start("serve", variant, topic, workdir,
                    dict(env, COMMLENS_SERVICE_NAME="bench-server"),
                    out_dir if side == "server" else None)
    try:
        rpc = _start("client", variant, topic, workdir, env,
                     out_dir if side == "client" else None)
        try:
            for kind in KINDS:
                for count in (messages, 2 * messages):
                    _order(server, "zero")
                    _order(rpc, f"{kind} {count}")
                    _order(server, "dump")
        finally:
            _stop(rpc)
    finally:
        _stop(server)
    windows = _window_counts(out_dir)
    return {"call": (windows[1] - windows[0]) / messages,
            "cast": (windows[3] - windows[2]) / messages}


def pure_python_switch():
    """Whether COMMLENS_PUREPYTHON=1 keeps every compiled module out of the
    RPC driver's import (another change brings the switch; it may be absent)."""
    probe = ("import sys, commlens.middleware.rpc_driver\n"
             "print(any(getattr(m, '__file__', None) and m.__file__.endswith('.so')"
             " for n, m in list(sys.modules.items()) if n.startswith('commlens')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env=dict(os.environ, COMMLENS_PUREPYTHON="1"))
    return result.returncode == 0 and result.stdout.strip() == "False"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_variants_argument(parser, VARIANTS)
    parser.add_argument("--messages", type=int, default=200, help="N (default 200)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files here")
    for role in ("serve", "client"):
        parser.add_argument(f"--{role}", nargs=4, help=argparse.SUPPRESS,
                            metavar=("VARIANT", "TOPIC", "CONFIG", "SOCKET"))
    args = parser.parse_args()
    if args.serve:
        return serve(*args.serve)
    if args.client:
        return client(*args.client)
    if shutil.which("valgrind") is None:
        raise SystemExit("benchmark: valgrind is missing "
                         "(Debian package valgrind; scripts/setup installs it)")

    variants = common.selected_variants(args.variants, VARIANTS, OPTIONAL)
    notes = []
    if "commlens-python" in variants and not pure_python_switch():
        variants.remove("commlens-python")
        notes.append("commlens-python skipped: this build has no COMMLENS_PUREPYTHON "
                     "switch (the compiled modules load with it set)")
    workdir = tempfile.mkdtemp(prefix="commlens-instr-")
    keep = os.path.abspath(args.keep) if args.keep else os.path.join(workdir, "callgrind")
    with open(os.path.join(workdir, "bench.conf"), "w") as f:
        f.write(CONFIG)
    env = dict(os.environ, PYTHONHASHSEED="0", COMMLENS_SERVICE_NAME="bench",
               COMMLENS_EXPORT_URL="memory://", COMMLENS_SHIP_INTERVAL="3600")
    exporter = None
    if "oslo.metrics" in variants:
        exporter = common.start_oslo_metrics_exporter(
            os.path.join(workdir, "oslo-metrics.sock"), workdir)
    # runs[r][variant][side][kind] = instructions per message
    runs = []
    try:
        for run in range(args.runs):
            runs.append({})
            for variant in variants:
                runs[-1][variant] = {
                    side: _measure(variant, side, args.messages, workdir,
                                   os.path.join(keep, f"{run + 1}-{variant}-{side}"), env)
                    for side in SIDES}
                print(f"run {run + 1}/{args.runs}: {variant} counted", file=sys.stderr)
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _report(runs, variants, args.messages, notes)


def _report(runs, variants, messages, notes):
    figures = [(side, kind) for side in SIDES for kind in KINDS]
    header = f"{'variant':<21}" + "".join(f"{side + ' ' + kind:>14}{'ratio':>7}"
                                          for side, kind in figures)

    def mean(variant, side, kind):
        return sum(run[variant][side][kind] for run in runs) / len(runs)

    print(f"\nRPC cost per message on real RabbitMQ, counted by callgrind: instructions, "
          f"(window of {2 * messages} - window of {messages}) / {messages}, "
          f"mean of {len(runs)} runs; ratio = plain's / the variant's")
    print(header + f"{'runs differ':>13}")
    for variant in variants:
        cells, spread = [], 0.0
        for side, kind in figures:
            value = mean(variant, side, kind)
            cells.append(f"{value:>14.0f}{mean('plain', side, kind) / value:>7.3f}")
            values = [run[variant][side][kind] for run in runs]
            spread = max(spread, (max(values) - min(values)) / value)
        print(f"{variant:<21}" + "".join(cells) + f"{spread:>12.2%}")
    print("\nrun by run")
    print(header)
    for number, run in enumerate(runs, 1):
        for variant in variants:
            print(f"{f'{number}: {variant}':<21}" + "".join(
                f"{run[variant][side][kind]:>14.0f}"
                f"{run['plain'][side][kind] / run[variant][side][kind]:>7.3f}"
                for side, kind in figures))
    if "commlens" in variants:
        ratios = [mean("plain", side, kind) / mean("commlens", side, kind)
                  for side, kind in figures]
        print(f"\ntarget {TARGET:.2f} of plain, compiled: "
              + ", ".join(f"{side} {kind} {ratio:.3f}"
                          for (side, kind), ratio in zip(figures, ratios, strict=True))
              + (": met" if min(ratios) >= TARGET else ": NOT met"))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
