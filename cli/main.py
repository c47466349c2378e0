"""The ``commlens`` command."""

import argparse
import logging
import os
import signal
import sys
import threading

DEFAULT_LISTEN = "127.0.0.1:9780"
DEFAULT_EXPORT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _listen_address(value):
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="commlens",
        description="See how an OpenStack control plane talks to itself.")
    parser.add_argument("--log-level", default=os.environ.get("COMMLENS_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    collector = commands.add_parser(
        "collector", help="receive what instrumented services ship; serve /metrics and the API")
    collector.add_argument("--listen", type=_listen_address, default=DEFAULT_LISTEN,
                           help=f"address for /metrics and the API (default {DEFAULT_LISTEN})")
    collector.add_argument("--export-url", default=os.environ.get("COMMLENS_EXPORT_URL"),
                           help="where agents ship: amqp://... (default: COMMLENS_EXPORT_URL, "
                                f"else {DEFAULT_EXPORT_URL.replace('guest:guest@', '<guest>@')})")
    collector.set_defaults(run=run_collector)
    return parser


def run_collector(args):
    from werkzeug import serving

    from commlens.exporters import collector as collector_mod
    from commlens.exporters import http
    from commlens.exporters import intake as intake_mod
    from commlens.exporters import shipping
    from commlens.exporters import urls

    export_url = args.export_url or DEFAULT_EXPORT_URL
    collector = collector_mod.Collector()
    try:
        intake = intake_mod.make_intake(export_url, collector)
    except shipping.ExportUrlError as exc:
        print(f"commlens collector: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen
    try:
        server = serving.make_server(host, port, http.create_app(collector, intake),
                                     threaded=True)
    except OSError as exc:
        print(f"commlens collector: cannot listen on {host}:{port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    intake.start()
    print(f"commlens collector: consuming {urls.redact(export_url)}; "
          f"metrics on http://{host}:{server.port}/metrics", flush=True)
    _serve_until_signalled(server)
    intake.stop()
    return 0


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
