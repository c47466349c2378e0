"""``commlens demo``: an emulated control plane, its collector, faults to inject.

Embedded by default: the control plane over oslo.messaging's ``fake://``
driver, shipping over ``memory://`` to a collector in this same process that
serves the dashboard, /metrics, the JSON API and the fault control on ``--listen``. With
``--transport rabbit://...`` each part of the plane is a process of its own
talking over that broker and shipping over AMQP to this process's collector.

Faults at run time: ``POST /api/demo/faults/<name>`` turns one on,
``DELETE`` turns it off, ``GET /api/demo`` lists them.

``broker-restart`` closes only the demo's own connections, through RabbitMQ's
management API: every connection of the demo carries a client-provided name
starting with ``commlens-demo-<run>``, which is what it looks for. The parts'
oslo.messaging connections get it from their program name (oslo.messaging
names a connection ``<program>:<pid>:<uuid>``), the AMQP shipping and the
collector's intake from the export URL's pika ``client_properties``.
"""

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings

from commlens.exporters import otlp

LOG = logging.getLogger(__name__)


def add_command(commands, listen_type, default_listen):
    from commlens.emulator import faults

    demo = commands.add_parser(
        "demo", help="an emulated OpenStack control plane, instrumented, with faults to inject")
    demo.add_argument("--listen", type=listen_type, default=default_listen,
                      help=f"address for the dashboard, /metrics, the API and fault control "
                           f"(default {default_listen})")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop by itself after this many seconds")
    demo.add_argument("--fault", action="append", default=[], choices=sorted(faults.FAULTS),
                      help="inject a fault from the start (repeatable): "
                           + "; ".join(f"{k}: {v}" for k, v in faults.FAULTS.items()))
    demo.add_argument("--transport", default="fake://",
                      help="fake:// (default, in this process) or rabbit://user:pw@host:5672/")
    demo.add_argument("--rabbitmq-management-url",
                      default=os.environ.get("COMMLENS_RABBITMQ_MANAGEMENT_URL"),
                      help="http://user:pw@host:15672/ for the broker-restart fault (default: "
                           "COMMLENS_RABBITMQ_MANAGEMENT_URL, else port 15672 on the "
                           "transport's broker with its credentials)")
    demo.add_argument("--queue-ttl", type=_queue_ttl,
                      default=os.environ.get("COMMLENS_QUEUE_TTL", "120"),
                      help="with --transport rabbit://: seconds a shipped message waits in "
                           "the collector's queue (default 120)")
    demo.add_argument("--computes", type=int, default=4, help="nova-compute services (4)")
    demo.add_argument("--users", type=int, default=8, help="concurrent API users (8)")
    demo.add_argument("--no-live", action="store_true",
                      help="print a status line every 5 s instead of the live table")
    otlp.add_arguments(demo)
    demo.set_defaults(run=run_demo)


def _queue_ttl(value):
    import argparse

    from commlens.exporters import intake

    try:
        return intake.queue_ttl(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_demo(args):

    from commlens.emulator import controlplane
    from commlens.emulator import faults as faults_mod
    from commlens.emulator import workload as workload_mod
    from commlens.exporters import collector as collector_mod
    from commlens.exporters import http
    from commlens.exporters import intake as intake_mod
    from commlens.tracer import recorder as recorder_mod
    from commlens.tracer import urls

    if args.transport.split("://")[0] not in ("fake", "rabbit"):
        print(f"commlens demo: --transport {urls.redact(args.transport)!r}: expected "
              "fake:// or rabbit://...", file=sys.stderr)
        return 2
    if "broker-restart" in args.fault and not args.transport.startswith("rabbit"):
        print("commlens demo: broker-restart needs --transport rabbit://...", file=sys.stderr)
        return 2
    embedded = args.transport.startswith("fake")
    os.environ.setdefault("COMMLENS_SHIP_INTERVAL", "1")
    # Successful traces sampled often enough to show whole ones in a short demo.
    os.environ.setdefault("COMMLENS_HOP_SAMPLE_RATIO", "0.05")
    # The emulated services' own error logs would flood the terminal during a
    # fault: what went wrong is what commlens shows.
    logging.getLogger("oslo_messaging").setLevel(logging.CRITICAL)
    logging.getLogger("commlens.tracer.shipping").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from oslo_config import cfg
    cfg.CONF([], project="commlens-demo", default_config_files=[])

    # Made before the services start: their first calls are traffic on the
    # graph (what a process older than its collector ships is carried in,
    # exporters/collector.py).
    collector = collector_mod.Collector()
    try:
        collector.span_export = otlp.from_arguments(args)
    except otlp.EndpointError as exc:
        print(f"commlens demo: {exc}", file=sys.stderr)
        return 2
    if embedded:
        # Everything the services ship stays in this process.
        export_url = os.environ["COMMLENS_EXPORT_URL"] = "memory://"
        plane = controlplane.ControlPlane(args.transport, computes=args.computes)
    else:
        plane = _ProcessPlane(args)
        export_url = plane.export_url
    intake = intake_mod.make_intake(export_url, collector, queue_ttl=args.queue_ttl)
    faults = faults_mod.Faults(on_change=lambda name, on: _apply(plane, faults, name, on))
    plane.faults = faults
    app = http.create_app(collector, intake)
    _add_fault_control(app, faults, plane)
    host, port = args.listen
    try:
        server = http.make_server(host, port, app)
    except OSError as exc:
        print(f"commlens demo: cannot listen on {host}:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2

    if collector.span_export is not None:
        collector.span_export.start()
    intake.start()
    collector.start_sweeper()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in args.fault:
        if name != "broker-restart":
            faults.set(name)
    try:
        plane.start()
    except Exception as exc:
        print(f"commlens demo: the control plane did not start: {exc}", file=sys.stderr)
        plane.stop()
        intake.stop()
        server.shutdown()
        return 1
    if "broker-restart" in args.fault:
        # Once the plane's connections exist: there is nothing to close before.
        try:
            faults.set("broker-restart")
        except FaultError as exc:
            print(f"commlens demo: {exc}", file=sys.stderr)
    users = workload_mod.Workload(plane.urls["nova-api"], users=args.users)
    users.start()
    base = f"http://{host}:{server.port}"
    print(f"commlens demo: an emulated control plane over {urls.redact(args.transport)}; "
          f"open the dashboard at {base}/dashboard/ (Prometheus: {base}/metrics, "
          f"JSON: {base}/api/graph, {base}/api/chains); inject faults with "
          f"curl -X POST {base}/api/demo/faults/<name>. Ctrl-C stops.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        _show_status(collector, faults, stop, args)
    finally:
        users.stop()
        plane.stop()
        # The services' last snapshot, while the collector still listens.
        recorder_mod.uninstall()
        intake.stop()
        collector.stop()
        server.shutdown()
    print("commlens demo: stopped", flush=True)
    return 0


class FaultError(RuntimeError):
    """A fault could not be injected; the message never holds a secret."""


def _apply(plane, faults, name, on):
    if name == "broker-restart":
        if on:
            if not hasattr(plane, "close_connections"):
                faults.set("broker-restart", False)
                raise FaultError("broker-restart needs --transport rabbit://...")
            # The fault clears itself: the services reconnect by themselves.
            threading.Timer(0.1, lambda: faults.set("broker-restart", False)).start()
            plane.close_connections()
        return
    plane.apply(name, on)


class _ProcessPlane:
    """The control plane over RabbitMQ: each group of parts in its own process,
    shipping over AMQP to a demo exchange this process's collector consumes."""

    def __init__(self, args):
        import oslo_messaging as om
        from oslo_config import cfg

        from commlens.tracer import urls

        self._args = args
        run = uuid.uuid4().hex[:8]
        transport_url = om.TransportURL.parse(cfg.CONF, args.transport)
        amqp = urls.amqp_url_from_transport(transport_url)
        self.connection_name = f"commlens-demo-{run}"
        client_properties = urllib.parse.quote(repr({"connection_name": self.connection_name}))
        self.export_url = (f"{amqp}?exchange=commlens-demo-{run}&queue=commlens.demo-{run}"
                           f"&client_properties={client_properties}")
        self._management_url = (args.rabbitmq_management_url
                                or urls.management_url_from_transport(transport_url))
        self.closed_connections = 0
        self._faults_topic = f"commlens-demo-faults-{run}"
        self._control = om.get_rpc_client(
            om.get_rpc_transport(cfg.CONF, url=args.transport),
            om.Target(topic=self._faults_topic, fanout=True))
        self._children = []
        self.urls = {}
        self.faults = None

    def start(self):
        from commlens.emulator import controlplane

        env = dict(os.environ, COMMLENS_EXPORT_URL=self.export_url)
        # Run as a program named after this demo: oslo.messaging names each
        # connection "<program>:<pid>:<uuid>", so the broker-restart fault
        # finds the parts' connections by that name.
        run_as = ("import runpy, sys; sys.argv[0] = %r; "
                  "runpy.run_module('commlens.emulator.service', run_name='__main__')"
                  % self.connection_name)
        for group in controlplane.GROUPS:
            command = [sys.executable, "-c", run_as, "--group", group,
                       "--transport", self._args.transport, "--computes",
                       str(self._args.computes), "--faults-topic", self._faults_topic,
                       "--urls", ",".join(f"{k}={v}" for k, v in self.urls.items())]
            for name in self.faults.active():
                command += ["--fault", name]
            child = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True,
                                     start_new_session=True)
            self._children.append(child)
            words = child.stdout.readline().split()
            if not words or words[0] != "READY":
                raise RuntimeError(f"{group} exited ({child.poll()})")
            self.urls.update(word.split("=", 1) for word in words[1:])

    def apply(self, name, on):
        if self._children:
            self._control.cast({}, "set_fault", name=name, on=on)

    def close_connections(self):
        """Close this demo's connections, as a broker restart would, and no
        one else's; the number closed, or FaultError with the reason."""
        from commlens.exporters import broker
        from commlens.tracer import urls

        try:
            listing, auth = broker._api(self._management_url,
                                        "/api/connections?columns=name,user_provided_name")
        except broker.BrokerUrlError as exc:
            raise FaultError(f"broker-restart: {exc}") from None
        where = urls.redact(self._management_url)
        try:
            request = urllib.request.Request(listing, headers={"Authorization": auth})
            with urllib.request.urlopen(request, timeout=10) as response:
                connections = json.loads(response.read(64 * 1024 * 1024))
        except (OSError, ValueError) as exc:
            raise FaultError(f"broker-restart: RabbitMQ's management API at {where} did not "
                             f"list connections ({_reason(exc)}); nothing was closed") from None
        ours = [c["name"] for c in connections if isinstance(c, dict)
                and _is_ours(c.get("user_provided_name"), self.connection_name)]
        if not ours:
            raise FaultError(f"broker-restart: no connection named {self.connection_name}* "
                             f"in RabbitMQ's management API at {where}; nothing was closed")
        closed = 0
        for name in ours:
            url, _ = broker._api(self._management_url,
                                 "/api/connections/" + urllib.parse.quote(name, safe=""))
            request = urllib.request.Request(url, method="DELETE", headers={
                "Authorization": auth, "X-Reason": "commlens demo: broker-restart fault"})
            try:
                with urllib.request.urlopen(request, timeout=10):
                    closed += 1
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # 404: it closed by itself meanwhile
                    LOG.warning("broker-restart: could not close a connection (%s)",
                                _reason(exc))
            except OSError as exc:
                LOG.warning("broker-restart: could not close a connection (%s)", _reason(exc))
        LOG.info("broker-restart: closed %d of this demo's connections (%s*)", closed,
                 self.connection_name)
        self.closed_connections = closed
        return closed

    def stop(self):
        for child in reversed(self._children):
            if child.poll() is None:
                child.terminate()
        for child in self._children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()




def _is_ours(connection_name, prefix):
    return isinstance(connection_name, str) and (
        connection_name == prefix or connection_name.startswith(prefix + ":"))


def _reason(exc):
    # An HTTPError's text is its status line; other errors name their kind
    # only: neither holds the URL's credentials.
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    return type(exc).__name__


def _add_fault_control(app, faults, plane):
    import flask

    from commlens.emulator import faults as faults_mod

    @app.get("/api/demo")
    def demo_status():
        status = {"faults": faults.active(), "known": faults_mod.FAULTS}
        if getattr(plane, "connection_name", None):
            status["connection_name"] = plane.connection_name
        return status

    @app.route("/api/demo/faults/<name>", methods=["POST", "DELETE"])
    def demo_fault(name):
        on = flask.request.method == "POST"
        try:
            faults.set(name, on)
        except faults_mod.UnknownFault as exc:
            return {"error": str(exc)}, 404
        except FaultError as exc:
            LOG.error("commlens demo: %s", exc)
            return {"error": str(exc)}, 502
        answer = {"faults": faults.active()}
        if name == "broker-restart" and on:
            answer["closed_connections"] = plane.closed_connections
        return answer


def _per_service(collector):
    """{service: {received, sent, errors, waiting}} cumulative, from the merged metrics."""
    from commlens.tracer import metrics

    counters, _histograms, gauges = collector.merged()
    rows = collections.defaultdict(lambda: collections.Counter())
    for (name, labels), value in counters.items():
        if name in (metrics.RPC_RECEIVED.name, metrics.HTTP_REQUESTS.name):
            rows[labels[0]]["received"] += value
            if name == metrics.HTTP_REQUESTS.name and labels[4][0] == "5":
                rows[labels[0]]["errors"] += value
        elif name in (metrics.RPC_SENT.name, metrics.HTTP_CLIENT_REQUESTS.name):
            rows[labels[0]]["sent"] += value
        elif name in (metrics.RPC_CALL_ERRORS.name, metrics.RPC_PROCESSING_ERRORS.name):
            rows[labels[0]]["errors"] += value
    for (name, labels), value in gauges.items():
        if name == metrics.RPC_WAITING_REPLIES.name:
            rows[labels[0]]["waiting"] += value
    return rows


def _advice_lines(collector):
    """The tuning advice of the last minute, a line a finding, under the
    status table (``commlens advise`` has the whole of it)."""
    from rich.markup import escape

    from commlens.cli import advise

    try:
        findings = collector.advice()["findings"]
    except Exception:
        # The status goes on without it; the API answers with the error.
        LOG.debug("demo: no advice for the status", exc_info=True)
        return []
    return [f"[{'red' if f['severity'] == 'critical' else 'yellow'}]advice[/]: "
            + escape(f"{advise.who(f['subject'])}: {f['finding']}; change "
                     f"{f['option'] or '-'} on {', '.join(f['set_on']) or '-'}")
            for f in findings]


def _show_status(collector, faults, stop, args):
    deadline = time.monotonic() + args.duration if args.duration else None
    previous, previous_at = {}, time.monotonic()

    def table():
        nonlocal previous, previous_at
        from rich.console import Group
        from rich.table import Table

        from commlens.dashboards import formatting

        now = time.monotonic()
        rows = _per_service(collector)
        seconds = max(now - previous_at, 1e-3)
        result = Table(title="commlens demo — faults: " + (", ".join(faults.active()) or "none"))
        for column in ("service", "received/s", "sent/s", "errors/s", "waiting replies"):
            result.add_column(column, justify="left" if column == "service" else "right")
        for service, row in sorted(rows.items()):
            before = previous.get(service, collections.Counter())
            rate = {k: max(0.0, row[k] - before[k]) / seconds for k in ("received", "sent",
                                                                        "errors")}
            errors = f"{rate['errors']:.1f}"
            result.add_row(service, f"{rate['received']:.1f}", f"{rate['sent']:.1f}",
                           f"[red]{errors}[/red]" if rate["errors"] else errors,
                           formatting.number(row['waiting']))
        previous, previous_at = rows, now
        return Group(result, *_advice_lines(collector))

    def finished():
        return stop.wait(1.0 if not args.no_live else 5.0) or (
            deadline is not None and time.monotonic() >= deadline)

    if args.no_live or not sys.stdout.isatty():
        from rich.console import Console
        console = Console(width=120)
        while not finished():
            console.print(table())
        return
    from rich.live import Live
    with Live(table(), refresh_per_second=1) as live:
        while not finished():
            live.update(table())
