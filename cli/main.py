"""The ``commlens`` command."""

import argparse
import importlib.metadata
import importlib.util
import ipaddress
import logging
import os
import re
import signal
import sys
import threading

from commlens.cli import advise
from commlens.cli import demo
from commlens.cli import emulate
from commlens.cli import grafana
from commlens.cli import incident
from commlens.exporters import durations
from commlens.exporters import otlp

LOG = logging.getLogger("commlens.collector")
DEFAULT_LISTEN = "127.0.0.1:9780"
DEFAULT_EXPORT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_HISTORY = os.path.join(
    os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"),
    "commlens", "history.sqlite")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The collector's options that an environment variable can set (their
# default), by option: build_parser reads them, docs/configuration.md lists them.
ENVIRONMENT = {
    "--log-level": "COMMLENS_LOG_LEVEL",
    "--export-url": "COMMLENS_EXPORT_URL",
    "--queue-ttl": "COMMLENS_QUEUE_TTL",
    "--history": "COMMLENS_HISTORY",
    "--metrics-warm-up": "COMMLENS_METRICS_WARM_UP",
    "--rabbitmq-management-url": "COMMLENS_RABBITMQ_MANAGEMENT_URL",
    "--dashboard-token": "COMMLENS_DASHBOARD_TOKEN",
    "--peer": "COMMLENS_PEERS",
    "--peer-timeout": "COMMLENS_PEER_TIMEOUT",
    "--otlp-endpoint": "COMMLENS_OTLP_ENDPOINT",
}
# What `pip install 'commlens[collector]'` adds (pyproject's collector extra),
# by import name. Every command is the collector's or talks to it; inside a
# service only the agent is installed, and there a command says what to
# install instead of failing halfway with a traceback.
COLLECTOR_PACKAGES = ("flask", "prometheus_client", "rich")


def _listen_address(value):
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def _env(option, fallback=None):
    return os.environ.get(ENVIRONMENT[option], fallback)


def version():
    try:
        return importlib.metadata.version("commlens")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2: the usage
    block argparse prints first hides the line that says what is wrong."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _log_level(value):
    level = str(value).strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return level


def build_parser():
    parser = _Parser(
        prog="commlens",
        description="See how an OpenStack control plane talks to itself.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--log-level", type=_log_level, default=_env("--log-level", "INFO"),
                        help=f"{', '.join(LOG_LEVELS)} (default: COMMLENS_LOG_LEVEL, "
                             "else INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    collector = commands.add_parser(
        "collector", help="receive what instrumented services ship; serve /metrics and the API")
    collector.add_argument("--listen", type=_listen_address, default=DEFAULT_LISTEN,
                           help=f"address for /metrics and the API (default {DEFAULT_LISTEN})")
    collector.add_argument("--export-url", action="append", type=_export_urls,
                           default=None, metavar="URL",
                           help="where agents ship: amqp://user:password@host:5672/vhost, "
                                "the broker and vhost of the agents' export URL (by "
                                "default their transport URL's). Repeat it to consume "
                                "several vhosts at once (default: COMMLENS_EXPORT_URL, "
                                "one URL or several separated by spaces or commas, "
                                f"else {DEFAULT_EXPORT_URL.replace('guest:guest@', '<guest>@')})")
    collector.add_argument("--replica", type=_replica_name, default=None,
                           help="run as one of several collectors sharing the load "
                                "(a name unique among them, e.g. 1, 2)")
    collector.add_argument("--peer", action="append", default=None, metavar="URL",
                           help="another replica's address (http://host:9780), once per "
                                "replica: the API and dashboard then answer for them all. A "
                                "list of every replica, this one included, works too "
                                "(default: COMMLENS_PEERS, comma-separated)")
    collector.add_argument("--peer-timeout", type=_duration,
                           default=_env("--peer-timeout", "2s"),
                           help="how long an answer waits for a peer; one that is later "
                                "is named as missing in a partial answer (default 2s)")
    collector.add_argument("--queue-ttl", type=_queue_ttl,
                           default=_env("--queue-ttl", "120"),
                           help="seconds a shipped message waits for a collector in its "
                                "queue; what expires is counted on "
                                "commlens_collector_lost_total (default: COMMLENS_QUEUE_TTL, "
                                "else 120)")
    collector.add_argument("--history", default=_env("--history", DEFAULT_HISTORY),
                           help="SQLite file of traces and chains, and beside it "
                                "HISTORY.journal/, the hops of traces still open (a "
                                "collector killed takes them back when it starts again); "
                                "':memory:' for none (default: COMMLENS_HISTORY, else "
                                "$XDG_DATA_HOME/commlens/history.sqlite, "
                                "~/.local/share/commlens/history.sqlite without it)")
    collector.add_argument("--history-max-age", type=_duration, default="24h",
                           help="forget traces older than this (default 24h)")
    collector.add_argument("--history-max-traces", type=int, default=200000,
                           help="keep at most this many traces (default 200000)")
    collector.add_argument("--metrics-warm-up", type=_warm_up,
                           default=_env("--metrics-warm-up", "10s"),
                           help="/metrics shows the shipped counters and histograms this long "
                                "after the first snapshot, when every process has reported "
                                "(0 for at once; default: COMMLENS_METRICS_WARM_UP, else 10s)")
    collector.add_argument("--trace-quiet", type=_duration, default="5s",
                           help="a trace closes after this long without new hops (default 5s)")
    collector.add_argument("--lost-grace", type=_duration, default=None,
                           help="a cast, fanout or notification counts as unreceived once "
                                "this long has passed since it was sent (default: 3 ship "
                                "intervals of the slowest process, at least 15s; "
                                "docs/architecture.md)")
    collector.add_argument("--max-open-traces", type=int, default=50000,
                           help="traces assembled at once; the oldest closes early "
                                "past it (default 50000)")
    collector.add_argument("--rabbitmq-management-url",
                           default=_env("--rabbitmq-management-url"),
                           help="http://user:password@host:15672/ to show RPC queue "
                                "depths beside the graph (default: "
                                "COMMLENS_RABBITMQ_MANAGEMENT_URL)")
    collector.add_argument("--dashboard-token",
                           default=_env("--dashboard-token"),
                           help="require this token for the dashboard and the JSON API "
                                "(default: COMMLENS_DASHBOARD_TOKEN; /metrics and the probes "
                                "stay open). Set it whenever --listen is not a loopback address")
    collector.add_argument("--degraded-error-ratio", type=float, default=0.01,
                           help="the dashboard colours a node or edge degraded from this "
                                "error ratio (default 0.01)")
    collector.add_argument("--failing-error-ratio", type=float, default=0.05,
                           help="... and failing from this one (default 0.05)")
    otlp.add_arguments(collector)
    collector.set_defaults(run=run_collector)

    incident.add_commands(commands)
    advise.add_command(commands)
    demo.add_command(commands, _listen_address, DEFAULT_LISTEN)
    emulate.add_command(commands, _listen_address, DEFAULT_LISTEN)
    grafana.add_command(commands)
    return parser


def _export_urls(value):
    """One ``--export-url`` value (or COMMLENS_EXPORT_URL): one URL or several,
    each checked as the intake will read it; ArgumentTypeError without secrets."""
    from commlens.exporters import intake
    from commlens.tracer import shipping

    try:
        return [intake.check_export_url(url) for url in intake.split_export_urls(value)]
    except shipping.ExportUrlError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def export_urls(args):
    """The URLs the collector consumes: every --export-url, else
    COMMLENS_EXPORT_URL, else the local broker's ``/``."""
    if args.export_url:
        found = [url for urls in args.export_url for url in urls]
    elif _env("--export-url", "").strip():
        found = _export_urls(_env("--export-url"))
    else:
        found = [DEFAULT_EXPORT_URL]
    from commlens.tracer import urls

    seen = set()
    for url in found:
        if url in seen:
            raise argparse.ArgumentTypeError(f"export URL {urls.redact(url)!r} is given twice")
        seen.add(url)
    return found


def _duration(value):
    try:
        return durations.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _warm_up(value):
    """A duration, or 0 for none."""
    return 0.0 if str(value).strip() in ("0", "0s") else _duration(value)


def _queue_ttl(value):
    from commlens.exporters import intake

    try:
        return intake.queue_ttl(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _replica_name(value):
    if not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", value):
        raise argparse.ArgumentTypeError(f"{value!r}: letters, digits, '.', '_' or '-'")
    return value


def run_collector(args):
    from commlens.dashboards import health
    from commlens.dashboards import web
    from commlens.exporters import broker
    from commlens.exporters import collector as collector_mod
    from commlens.exporters import history as history_mod
    from commlens.exporters import http
    from commlens.exporters import intake as intake_mod
    from commlens.exporters import journal as journal_mod
    from commlens.exporters import traces
    from commlens.tracer import shipping

    try:
        export_url_list = export_urls(args)
    except argparse.ArgumentTypeError as exc:
        print(f"commlens collector: {exc}", file=sys.stderr)
        return 2
    try:
        dashboard = web.DashboardSettings(
            tolerances=health.Tolerances(args.degraded_error_ratio, args.failing_error_ratio),
            token=args.dashboard_token or None)
    except ValueError as exc:
        print(f"commlens collector: {exc}", file=sys.stderr)
        return 2
    try:
        collector = collector_mod.Collector(
            window=traces.TraceWindow(quiet_seconds=args.trace_quiet,
                                      max_open_traces=args.max_open_traces),
            history=history_mod.History(args.history, max_age_seconds=args.history_max_age,
                                        max_traces=args.history_max_traces),
            metrics_warm_up=args.metrics_warm_up, lost_grace=args.lost_grace,
            lost_messages=args.replica is None,
            # The hops of open traces beside a history on disk; none in memory.
            journal=(journal_mod.Journal(args.history + ".journal")
                     if args.history != ":memory:" else None))
        intake = intake_mod.make_intakes(export_url_list, collector, replica=args.replica,
                                         queue_ttl=args.queue_ttl)
        if args.rabbitmq_management_url:
            collector.queue_watcher = broker.QueueWatcher(args.rabbitmq_management_url)
        collector.span_export = otlp.from_arguments(args)
    except (shipping.ExportUrlError, history_mod.HistoryError, journal_mod.JournalError,
            broker.BrokerUrlError, otlp.EndpointError) as exc:
        print(f"commlens collector: {exc}", file=sys.stderr)
        return 2
    peers = _peers(args)
    fleet = None
    if peers:
        from commlens.exporters import fleet as fleet_mod

        if args.replica is None:
            print("commlens collector: --peer needs --replica (a name for this one)",
                  file=sys.stderr)
            return 2
        fleet = fleet_mod.Fleet(collector, args.replica, peers, timeout=args.peer_timeout,
                                token=dashboard.token)
    host, port = args.listen
    try:
        server = http.make_server(host, port, http.create_app(collector, intake, dashboard,
                                                               fleet))
    except OSError as exc:
        print(f"commlens collector: cannot listen on {host}:{port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        collector.history.close()
        return 2
    if collector.span_export is not None:
        collector.span_export.start()
    reloaded = collector.reload()
    if reloaded:
        LOG.info("commlens collector: %d hop messages of traces left open (the collector "
                 "before was killed) read back from %s.journal", reloaded, args.history)
    intake.start()
    collector.start_sweeper()
    if collector.queue_watcher is not None:
        collector.queue_watcher.start()
    exporting = collector.span_export
    print(f"commlens collector: consuming {intake.description}"
          f"{' as replica ' + args.replica if args.replica else ''}; "
          f"dashboard on http://{host}:{server.port}/dashboard/, "
          f"metrics on http://{host}:{server.port}/metrics; history in {args.history}"
          f"{'; spans to ' + exporting.description if exporting else ''}",
          flush=True)
    if not dashboard.token and not _loopback(host):
        LOG.warning("commlens collector: the dashboard and JSON API on %s are open to anyone "
                    "who can reach it; set --dashboard-token", host)
    _serve_until_signalled(server)
    if fleet is not None:
        fleet.close()
    intake.stop()
    collector.stop()
    collector.history.close()
    return 0


def _peers(args):
    """The peer URLs of --peer (or COMMLENS_PEERS); SystemExit on a bad one."""
    given = args.peer if args.peer is not None else [
        p for p in _env("--peer", "").split(",") if p.strip()]
    peers = []
    for peer in given:
        peer = peer.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+$", peer):
            from commlens.tracer import urls

            raise SystemExit(f"commlens collector: --peer {urls.redact(peer)!r}: expected "
                             "http://host:port")
        peers.append(peer)
    return peers


def _loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve_until_signalled(server):
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    thread.join(5)


def _collector_extra_missing():
    """True when a package of the collector extra cannot be imported."""
    for name in COLLECTOR_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                return True
        except (ImportError, ValueError):
            return True
    return False


def main(argv=None):
    args = build_parser().parse_args(argv)
    if _collector_extra_missing():
        print(f"commlens {args.command} needs the collector extra: "
              "pip install 'commlens[collector]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
