"""``commlens demo``: an emulated control plane, its collector, faults to inject.

Embedded by default: the control plane over oslo.messaging's ``fake://``
driver, shipping over ``memory://`` to a collector in this same process that
serves the dashboard, /metrics, the JSON API and the fault control on ``--listen``. With
``--transport rabbit://...`` each part of the plane is a process of its own
talking over that broker and shipping over AMQP to this process's collector.

Faults at run time: ``POST /api/demo/faults/<name>`` turns one on,
``DELETE`` turns it off, ``GET /api/demo`` lists them.
"""

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings

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
    demo.add_argument("--computes", type=int, default=4, help="nova-compute services (4)")
    demo.add_argument("--users", type=int, default=8, help="concurrent API users (8)")
    demo.add_argument("--no-live", action="store_true",
                      help="print a status line every 5 s instead of the live table")
    demo.set_defaults(run=run_demo)


def run_demo(args):
    from werkzeug import serving

    from commlens.emulator import controlplane
    from commlens.emulator import faults as faults_mod
    from commlens.emulator import workload as workload_mod
    from commlens.exporters import collector as collector_mod
    from commlens.exporters import http
    from commlens.exporters import intake as intake_mod
    from commlens.exporters import urls
    from commlens.tracer import recorder as recorder_mod

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
    logging.getLogger("commlens.exporters.shipping").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from oslo_config import cfg
    cfg.CONF([], project="commlens-demo", default_config_files=[])

    if embedded:
        # Everything the services ship stays in this process.
        export_url = os.environ["COMMLENS_EXPORT_URL"] = "memory://"
        plane = controlplane.ControlPlane(args.transport, computes=args.computes)
    else:
        plane = _ProcessPlane(args)
        export_url = plane.export_url
    collector = collector_mod.Collector()
    intake = intake_mod.make_intake(export_url, collector)
    faults = faults_mod.Faults(on_change=lambda name, on: _apply(plane, faults, name, on))
    plane.faults = faults
    app = http.create_app(collector, intake)
    _add_fault_control(app, faults)
    host, port = args.listen
    try:
        server = serving.make_server(host, port, app, threaded=True,
                                     request_handler=http.RequestHandler)
    except OSError as exc:
        print(f"commlens demo: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 2

    intake.start()
    collector.start_sweeper()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in args.fault:
        faults.set(name)
    try:
        plane.start()
    except Exception as exc:
        print(f"commlens demo: the control plane did not start: {exc}", file=sys.stderr)
        plane.stop()
        intake.stop()
        server.shutdown()
        return 1
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


def _apply(plane, faults, name, on):
    if name == "broker-restart":
        if on:
            # Every connection closed, as a broker restart does; the fault
            # clears itself: the services reconnect by themselves.
            subprocess.run(["rabbitmqctl", "close_all_connections", "commlens demo"],
                           capture_output=True, timeout=30, check=False)
            threading.Timer(0.1, lambda: faults.set("broker-restart", False)).start()
        return
    plane.apply(name, on)


class _ProcessPlane:
    """The control plane over RabbitMQ: each group of parts in its own process,
    shipping over AMQP to a demo exchange this process's collector consumes."""

    def __init__(self, args):
        import oslo_messaging as om
        from oslo_config import cfg

        from commlens.exporters import urls

        self._args = args
        run = uuid.uuid4().hex[:8]
        amqp = urls.amqp_url_from_transport(om.TransportURL.parse(cfg.CONF, args.transport))
        self.export_url = f"{amqp}?exchange=commlens-demo-{run}&queue=commlens.demo-{run}"
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
        for group in controlplane.GROUPS:
            command = [sys.executable, "-m", "commlens.emulator.service", "--group", group,
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


def _add_fault_control(app, faults):
    import flask

    from commlens.emulator import faults as faults_mod

    @app.get("/api/demo")
    def demo_status():
        return {"faults": faults.active(), "known": faults_mod.FAULTS}

    @app.route("/api/demo/faults/<name>", methods=["POST", "DELETE"])
    def demo_fault(name):
        try:
            faults.set(name, flask.request.method == "POST")
        except faults_mod.UnknownFault as exc:
            return {"error": str(exc)}, 404
        return {"faults": faults.active()}


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


def _show_status(collector, faults, stop, args):
    deadline = time.monotonic() + args.duration if args.duration else None
    previous, previous_at = {}, time.monotonic()

    def table():
        nonlocal previous, previous_at
        from rich.table import Table

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
                           f"{row['waiting']:g}")
        previous, previous_at = rows, now
        return result

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
