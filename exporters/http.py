"""The collector's HTTP face: /metrics, health probes, the JSON API and the
web dashboard (commlens.dashboards.web)."""

import math
import re
import socket
import urllib.parse

import flask
from werkzeug import exceptions
from werkzeug import serving

from commlens.exporters import durations
from commlens.exporters import fleet as _fleet
from commlens.exporters import lost
from commlens.exporters import prometheus
from commlens.exporters import silent


def make_server(host, port, app):
    """The threaded server for ``app`` on ``host:port``; OSError (with its
    strerror) when the address cannot be had. werkzeug's own bind prints the
    reason and exits with status 1 itself; binding here lets the commands
    say it in their one line and exit 2."""
    family = serving.select_address_family(host, port)
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(serving.get_sockaddr(host, port, family))
        listening.listen(serving.LISTEN_QUEUE)
        # The server takes a duplicate of the listening socket's descriptor.
        return serving.make_server(host, port, app, threaded=True,
                                   request_handler=RequestHandler, fd=listening.fileno())
    finally:
        listening.close()


def create_app(collector, intake=None, dashboard=None, fleet=None):
    """``fleet``: this replica's peers (exporters/fleet.py); the graph, chains,
    traces and silent servers are then the whole fleet's, unless a request
    asks for this replica's own share (``?scope=replica``, what peers ask)."""
    from commlens.dashboards import web

    dashboard = dashboard or web.DashboardSettings()
    app = _App("commlens.collector")
    app.config["COMMLENS_COLLECTOR"] = collector
    if dashboard.token:
        web.require_token(app, dashboard.token)

    def asked_fleet():
        """The Fleet to answer with, or None for this replica's own share."""
        if fleet is None or flask.request.args.get(_fleet.SCOPE) == _fleet.REPLICA_SCOPE:
            return None
        return fleet

    def own_share():
        return fleet is not None and asked_fleet() is None

    app.register_blueprint(web.create_blueprint(collector, dashboard, _duration_arg,
                                                asked_fleet, own_share))

    if fleet is not None:
        @app.after_request
        def name_the_replica(response):
            # Peers learn who answered (and a peer URL that is this replica).
            response.headers[_fleet.REPLICA_HEADER] = fleet.replica
            return response

    @app.get("/metrics")
    def metrics():
        body, content_type = prometheus.render(collector, intake,
                                               flask.request.headers.get("Accept"), fleet)
        return flask.Response(body, content_type=content_type)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        ready = intake is None or intake.connected
        return {"ready": ready}, (200 if ready else 503)

    @app.get("/api/processes")
    def processes():
        return {"processes": collector.processes()}

    @app.get("/api/hops")
    def hops():
        trace_id = flask.request.args.get("trace_id")
        limit = _limit_arg("limit", 1000, MAX_HOPS_LIMIT)
        selected = [h for h in list(collector.hops)
                    if trace_id is None or h.get("trace_id") == trace_id]
        return {"hops": selected[-limit:]}

    @app.get("/api/graph")
    def graph():
        window = _duration_arg("window", 300)
        if asked_fleet():
            return fleet.graph(window)
        return collector.graph(window, histograms=own_share())

    @app.get("/api/chains")
    def chains():
        since = _duration_arg("since", 900)
        limit = _limit_arg("limit", 50, MAX_CHAINS_LIMIT)
        absorbed = {"true": True, "false": False}.get(flask.request.args.get("absorbed", ""))
        if asked_fleet():
            return fleet.chains(since, limit, absorbed)
        return {"since_seconds": since,
                "chains": collector.history.chains(since, limit, absorbed)}

    @app.get("/api/advice")
    def advice():
        if flask.request.args.get(_fleet.SCOPE) == _fleet.REPLICA_SCOPE:
            # A replica answering for its fleet asks for this one's raw
            # inputs at the sampling marks it chose (exporters/advice.py, share).
            return collector.advice_share(_time_arg("then"), _time_arg("before"))
        window, baseline = _duration_arg("window", 60), _duration_arg("baseline", 900)
        if asked_fleet():
            return fleet.advice(window, baseline)
        return collector.advice(window, baseline)

    @app.get("/api/silent-servers")
    def silent_servers():
        since = _duration_arg("since", 900)
        limit = _limit_arg("limit", silent.DEFAULT_LIMIT, silent.MAX_LIMIT)
        if asked_fleet():
            return fleet.silent_servers(since, limit)
        return {"since_seconds": since,
                "servers": collector.silent_servers.top(since, limit),
                # Not windowed: silent now, for up to an hour (exporters/reporters.py).
                "reporters": collector.silent_reporters.top(limit)}

    @app.get("/api/lost-messages")
    def lost_messages():
        window = _duration_arg("window", lost.DEFAULT_WINDOW_SECONDS)
        if window > lost.MAX_WINDOW_SECONDS:
            raise BadArgument(f"window: at most {lost.MAX_WINDOW_SECONDS:g}s")
        limit = _limit_arg("limit", lost.DEFAULT_LIMIT, lost.MAX_LIMIT)
        if asked_fleet():
            return fleet.lost_messages(window, limit)[0]
        if own_share():
            # A peer asks for this replica's counts, with the fleet's grace.
            grace = _duration_arg("grace", collector.lost_grace())
            return dict(collector.lost_share(window, grace),
                        grace_needed_seconds=collector.lost_grace())
        return collector.lost_messages(window, limit)[0]

    @app.get("/api/baseline-totals")
    def baseline_totals():
        # What a replica answering for its fleet asks of its peers: this
        # collector's edge and method totals at a baseline window's ends.
        return collector.baseline_share(_time_arg("start"), _time_arg("end"))

    @app.get("/api/traces/<trace_or_request_id>")
    def trace(trace_or_request_id):
        if len(trace_or_request_id) > 128:
            flask.abort(404)
        status = None
        if asked_fleet():
            found, status = fleet.trace(trace_or_request_id)
        else:
            found = collector.history.trace(trace_or_request_id)
        if found is None:
            answer = {"error": f"no trace or request id {trace_or_request_id!r} in the "
                               "history (it may still be open: traces close after "
                               f"{collector.window.quiet_seconds:g}s without new hops)"}
            if status is not None:
                answer["replicas"] = status
            return answer, 404
        return found if status is None else dict(found, replicas=status)

    @app.errorhandler(BadArgument)
    def bad_argument(exc):
        return {"error": str(exc)}, 400

    return app


class _App(flask.Flask):
    def log_exception(self, exc_info):
        # Flask names the request by its path, which a client chose (and may
        # have put the dashboard token in): name it by its route instead.
        rule = flask.request.url_rule
        self.logger.error("Exception on %s [%s]", rule.rule if rule else "(no route)",
                          flask.request.method, exc_info=exc_info)


_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                      "CONNECT"))


class RequestHandler(serving.WSGIRequestHandler):
    """Werkzeug's request log, with nothing of the URL a client chose in it.

    The dashboard token can arrive in a URL (``?token=``, percent-encoded as
    ``?%74oken=``, in a fragment, in a mistyped path), so a request is logged
    by the route it matched, never by its path or query string; a request
    line that does not parse is logged as malformed, without its content.
    """

    def handle_one_request(self):
        # A kept-alive connection keeps the last request's path: forget it,
        # so that a malformed line after a good one is not logged as that.
        self.path = None
        super().handle_one_request()

    def send_error(self, code, message=None, explain=None):
        # http.server puts the raw request line in the message of a bad
        # request ("Bad request syntax ('GET /?token=...')"), logs it and
        # sends it back: keep only the status's own phrase.
        super().send_error(code, None, explain)

    def log_request(self, code="-", size="-"):
        if self.path is None or not self.command:
            line = "(malformed request line)"
        else:
            # Werkzeug hands any method to the application: a client chose it too.
            method = self.command if self.command in _METHODS else "(unknown method)"
            line = f"{method} {self._route()} {self.request_version}"
        self.log("info", '"%s" %s %s', line, code, size)

    def _route(self):
        url_map = getattr(self.server.app, "url_map", None)
        if url_map is None:
            return "(path not logged)"
        path = urllib.parse.unquote(re.split("[?#]", self.path, maxsplit=1)[0], errors="replace")
        try:
            rule, _args = url_map.bind("collector").match(path, method=self.command,
                                                          return_rule=True)
        except exceptions.HTTPException:  # no route, or a redirect to one
            return "(no route)"
        return rule.rule


class BadArgument(ValueError):
    """A query parameter the JSON API refuses with a 400."""


class BadDuration(BadArgument):
    pass


# The most a list endpoint returns at once (a larger limit is clamped).
MAX_HOPS_LIMIT = 10000
MAX_CHAINS_LIMIT = 1000
_INTEGER = re.compile(r"-?[0-9]{1,30}")


def _limit_arg(name, default, cap):
    """A count of items to return: from 1 to ``cap`` (more is clamped to it)."""
    value = flask.request.args.get(name)
    if value is None:
        return default
    if not _INTEGER.fullmatch(value) or int(value) < 1:
        raise BadArgument(f"{name}: expected a whole number from 1 to {cap}, got {value[:40]!r}")
    return min(int(value), cap)


def _time_arg(name):
    """A required wall-clock time, in seconds since the epoch."""
    value = flask.request.args.get(name)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise BadArgument(f"{name}: expected seconds since the epoch") from None
    if not math.isfinite(seconds):
        raise BadArgument(f"{name}: expected seconds since the epoch")
    return seconds


def _duration_arg(name, default):
    value = flask.request.args.get(name)
    if value is None:
        return default
    try:
        return durations.parse(value)
    except ValueError as exc:
        raise BadDuration(f"{name}: {exc}") from None
