"""A service (RPC server and client in one process) whose shipping cannot get out.

``--mode eventlet`` monkey-patches as nova-compute and neutron agents still
do and uses the eventlet executor; ``--mode threading`` uses threads. The
export URL points at a port that accepts TCP and never speaks AMQP, so every
ship attempt hangs until pika's socket timeout. Meanwhile a ticker measures
how late it wakes up, and the RPC traffic must flow: prints one JSON line.
"""

import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=("eventlet", "threading"), required=True)
parser.add_argument("--url", required=True)
parser.add_argument("--topic", required=True)
args = parser.parse_args()

if args.mode == "eventlet":
    import eventlet
    eventlet.monkey_patch()

import threading  # noqa: E402
import time  # noqa: E402

import oslo_messaging as om  # noqa: E402
from oslo_config import cfg  # noqa: E402

from commlens.tracer import recorder as recorder_mod  # noqa: E402

cfg.CONF([], project="commlens-load")


class Endpoint:
    def echo(self, ctxt, value):
        return value

    def slow(self, ctxt, seconds):
        time.sleep(seconds)
        return seconds

    def note(self, ctxt):
        pass


def spawn(fn, *a):
    if args.mode == "eventlet":
        return eventlet.spawn(fn, *a)
    thread = threading.Thread(target=fn, args=a, daemon=True)
    thread.start()
    return thread


def join(handle):
    if args.mode == "eventlet":
        return handle.wait()
    handle.join()


transport = om.get_rpc_transport(cfg.CONF, url=args.url)
server = om.get_rpc_server(transport, om.Target(topic=args.topic, server="s"),
                           [Endpoint()], executor=args.mode)
server.start()
client = om.get_rpc_client(transport, om.Target(topic=args.topic), timeout=30)

lags = []
running = [True]


def ticker():
    while running[0]:
        before = time.monotonic()
        time.sleep(0.02)
        lags.append(time.monotonic() - before - 0.02)


ticker_handle = spawn(ticker)
results = []


def worker(seconds):
    # Long enough for several ship attempts to hang and time out meanwhile.
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        results.append(client.call({}, "echo", value=i) == i)
        client.cast({}, "note")
        i += 1


started = time.monotonic()
workers = [spawn(worker, 5) for _ in range(4)]
for handle in workers:
    join(handle)

# A caller killed while it waits for its reply (eventlet's kill, or an
# exception raised in the waiting thread): the gauge must not stay up.
killed_outcome = None
if args.mode == "eventlet":
    victim = eventlet.spawn(client.call, {}, "slow", seconds=3)
    eventlet.sleep(0.5)
    victim.kill()
    killed_outcome = "killed"
time.sleep(0.5)
elapsed = time.monotonic() - started
running[0] = False
join(ticker_handle)

recorder = recorder_mod.get_recorder()
snapshot = recorder.snapshot(interval=1.0)
counters = {(name, tuple(labels)): value for name, labels, value in snapshot["counters"]}
gauges = {(name, tuple(labels)): value for name, labels, value in snapshot["gauges"]}
service = recorder.service
print(json.dumps({
    "ok_calls": sum(results),
    "max_lag": max(lags),
    "elapsed": elapsed,
    "sent_calls": counters.get(("commlens_rpc_sent_total", (service, args.topic, "echo", "call"))),
    "received_calls": counters.get(("commlens_rpc_received_total",
                                    (service, service, args.topic, "echo", "call"))),
    "sent_casts": counters.get(("commlens_rpc_sent_total", (service, args.topic, "note", "cast"))),
    "waiting_slow": gauges.get(("commlens_rpc_waiting_replies", (service, args.topic, "slow"))),
    "ship_failures": counters.get(("commlens_agent_ship_failures_total", (service,)), 0),
    "killed": killed_outcome,
}), flush=True)
server.stop()
server.wait()
