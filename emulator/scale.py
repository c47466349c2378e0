"""Scale emulation: many agents multiplexed over a few processes, on a real broker.

Two kinds of process, run by ``commlens emulate``:

- ``--role agents``: hosts ``--first``..``--first+--count`` emulated agents.
  Each is an RPC server with its own server queue (``compute.<host>`` or
  ``q-agent-notifier.<host>``), as a nova-compute or neutron agent has, and
  sends its periodic RPC every ``--interval`` seconds: a state report (call)
  and a resource update (cast). A few worker threads do the sending for all
  the process's agents, as a real fleet's timers would spread it.
- ``--role control``: the control plane under load, nova-conductor and
  neutron-server's plugin, answering reports and calling random agents.

Each prints ``READY``, serves until SIGTERM (or its parent is gone), then one
JSON line of what it measured in the window its stdin marks. With ``--plain`` the transport is ``rabbit://``
itself instead of ``commlens+rabbit://``: the same load without commlens.
"""

import argparse
import bisect
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
import warnings

COMPUTE, AGENT = "compute", "q-agent-notifier"
CONDUCTOR, PLUGIN = "conductor", "q-plugin"
_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Tally:
    """Counts and a latency histogram, thread-safe, printed as JSON at the end."""

    def __init__(self):
        # Reentrant: mark() runs from a signal handler, maybe inside add().
        self._lock = threading.RLock()
        self.counts = {}
        self.buckets = [0] * (len(_BOUNDS) + 1)
        self.hosts = set()
        # The conductor's handlers running at once, and the most there were
        # during the window: how full its executor pool got.
        self.in_flight = self.peak_in_flight = self.pool_size = 0
        self._window_start = self._window_end = None

    def add(self, what, seconds=None, host=None):
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            if seconds is not None:
                self.buckets[bisect.bisect_left(_BOUNDS, seconds)] += 1
            if host is not None:
                self.hosts.add(host)

    @contextlib.contextmanager
    def handling(self):
        """Counts a handler in flight while it runs."""
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def mark(self):
        """The emulator writes a line to our stdin once every process is up
        and again when its measured window ends: start-up and shutdown are
        left out. (A line read by a thread of its own: a signal handler
        would wait for the main thread, which may sit in an RPC call.)"""
        with self._lock:
            snapshot = (time.monotonic(), dict(self.counts), list(self.buckets))
            if self._window_start is None:
                self._window_start = snapshot
                self.peak_in_flight = self.in_flight  # the window's own peak
            elif self._window_end is None:
                self._window_end = snapshot

    def as_dict(self):
        with self._lock:
            end = self._window_end or (time.monotonic(), dict(self.counts), list(self.buckets))
            start = self._window_start or (None, {}, [0] * len(self.buckets))
            return {"counts": {k: v - start[1].get(k, 0) for k, v in end[1].items()},
                    "buckets": [a - b for a, b in zip(end[2], start[2], strict=True)],
                    "bounds": list(_BOUNDS), "hosts": len(self.hosts),
                    "peak_in_flight": self.peak_in_flight,
                    "window_seconds": end[0] - start[0] if start[0] else None}


def _transport(args, service):
    import oslo_messaging as om
    from oslo_config import cfg

    from commlens.emulator import controlplane

    url = args.transport if args.plain else controlplane.instrumented_url(args.transport, service)
    return om.get_rpc_transport(cfg.CONF, url=url)


def run_agents(args, tally, stop):
    import oslo_messaging as om

    kinds = [(COMPUTE, "nova-compute"), (AGENT, "neutron-openvswitch-agent")]
    transports = {service: _transport(args, service) for _, service in kinds}
    servers, agents = [], []

    class Agent:
        def __init__(self, host):
            self.host = host

        def ping(self, ctxt):
            tally.add("pinged")
            return self.host

    for n in range(args.first, args.first + args.count):
        topic, service = kinds[n % 2]
        host = f"host-{n:05d}"
        server = om.get_rpc_server(transports[service], om.Target(topic=topic, server=host),
                                   [Agent(host)], executor="threading")
        server.start()
        servers.append(server)
        agents.append((host, topic, service))

    conductor = om.get_rpc_client(transports["nova-compute"], om.Target(topic=CONDUCTOR),
                                  timeout=args.rpc_timeout)
    plugin = om.get_rpc_client(transports["neutron-openvswitch-agent"],
                               om.Target(topic=PLUGIN), timeout=args.rpc_timeout)

    def report(host, topic):
        client = conductor if topic == COMPUTE else plugin
        method = "compute_node_update" if topic == COMPUTE else "report_state"
        started = time.monotonic()
        try:
            client.call({}, method, host=host)
            tally.add("report_ok", time.monotonic() - started)
        except om.MessagingTimeout:
            tally.add("report_timeout", time.monotonic() - started)
        except Exception:
            tally.add("report_error")
        try:
            client.cast({}, "update_available_resource", host=host)
            tally.add("update_sent")
        except Exception:
            tally.add("update_error")

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        print("READY", flush=True)
        # Spread the agents' timers over the interval, as a fleet's would be.
        offsets = sorted((random.uniform(0, args.interval), i) for i in range(len(agents)))
        start = time.monotonic()
        cycle = 0
        pending = set()
        while not stop.is_set():
            for offset, i in offsets:
                due = start + cycle * args.interval + offset
                if stop.wait(max(0.0, due - time.monotonic())):
                    break
                pending = {f for f in pending if not f.done()}
                if len(pending) >= args.workers * 4:
                    tally.add("report_skipped")  # the control plane is too slow
                    continue
                host, topic, _service = agents[i]
                pending.add(pool.submit(report, host, topic))
            cycle += 1
    _stop_all(servers)
    for transport in transports.values():
        transport.cleanup()


def run_control(args, tally, stop):
    import oslo_messaging as om
    from oslo_config import cfg

    conductor_transport = _transport(args, "nova-conductor")
    plugin_transport = _transport(args, "neutron-server")

    class Conductor:
        def compute_node_update(self, ctxt, host):
            with tally.handling():
                # What a real conductor spends on its database per report.
                if args.processing:
                    time.sleep(args.processing)
                tally.add("compute_node_update", host=host)
            return "ok"

        def update_available_resource(self, ctxt, host):
            tally.add("update_available_resource")

    class Plugin:
        def report_state(self, ctxt, host):
            tally.add("report_state", host=host)
            return "ok"

        def update_available_resource(self, ctxt, host):
            tally.add("update_available_resource")

    servers = [
        om.get_rpc_server(conductor_transport, om.Target(topic=CONDUCTOR, server="c1"),
                          [Conductor()], executor="threading"),
        om.get_rpc_server(plugin_transport, om.Target(topic=PLUGIN, server="n1"),
                          [Plugin()], executor="threading"),
    ]
    # oslo.messaging's executor_thread_pool_size, or --conductor-pool.
    pool_size = args.conductor_pool or cfg.CONF.executor_thread_pool_size
    servers[0].start(override_pool_size=pool_size)
    servers[1].start()
    tally.pool_size = pool_size
    pinger = om.get_rpc_client(conductor_transport, om.Target(topic=COMPUTE), timeout=5)
    print("READY", flush=True)
    # The control plane also calls its agents, on their own server queues.
    while not stop.wait(1.0):
        host = f"host-{random.randrange(0, args.agents, 2):05d}"
        try:
            pinger.prepare(server=host).call({}, "ping")
            tally.add("ping_ok")
        except Exception:
            tally.add("ping_failed")
    _stop_all(servers)
    conductor_transport.cleanup()
    plugin_transport.cleanup()


def _stop_all(servers):
    """Stop RPC servers side by side: each stop sits out its listener's poll
    (about a second on rabbit), hundreds in a row would take minutes."""
    def stop(server):
        server.stop()
        server.wait()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(stop, servers))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("agents", "control"), required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--plain", action="store_true", help="without commlens")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--agents", type=int, default=0, help="agents in the whole fleet")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--rpc-timeout", type=float, default=10.0)
    parser.add_argument("--conductor-pool", type=int, default=0,
                        help="the conductor's executor_thread_pool_size (0: oslo's default)")
    parser.add_argument("--processing", type=float, default=0.0,
                        help="seconds the conductor spends on each state report")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("oslo_messaging", "amqp"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    from oslo_config import cfg
    cfg.CONF([], project="commlens-emulate", default_config_files=[])

    tally, stop = Tally(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=lambda: [tally.mark() for _ in sys.stdin], daemon=True).start()
    parent = os.getppid()
    threading.Thread(target=lambda: _watch_parent(parent, stop), daemon=True).start()
    started = time.monotonic()
    (run_agents if args.role == "agents" else run_control)(args, tally, stop)
    result = tally.as_dict()
    if args.role == "control":
        result["conductor_pool"] = {"size": tally.pool_size,
                                    "peak_in_flight": result["peak_in_flight"]}
    result.update(role=args.role, seconds=time.monotonic() - started,
                  cpu_seconds=time.process_time(), id=uuid.uuid4().hex[:6])
    print(json.dumps(result), flush=True)
    return 0


def _watch_parent(parent, stop):
    while not stop.wait(1.0):
        if os.getppid() != parent:
            stop.set()


if __name__ == "__main__":
    sys.exit(main())
