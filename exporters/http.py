"""The collector's HTTP face: /metrics, health probes, the JSON API and the
web dashboard (commlens.dashboards.web)."""

import re

import flask
from werkzeug import serving

from commlens.exporters import durations
from commlens.exporters import prometheus


def create_app(collector, intake=None, dashboard=None):
    from commlens.dashboards import web

    dashboard = dashboard or web.DashboardSettings()
    app = flask.Flask("commlens.collector")
    app.config["COMMLENS_COLLECTOR"] = collector
    if dashboard.token:
        web.require_token(app, dashboard.token)
    app.register_blueprint(web.create_blueprint(collector, dashboard, _duration_arg))

    @app.get("/metrics")
    def metrics():
        body, content_type = prometheus.render(collector, intake)
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
        limit = min(flask.request.args.get("limit", 1000, type=int), 10000)
        selected = [h for h in list(collector.hops)
                    if trace_id is None or h.get("trace_id") == trace_id]
        return {"hops": selected[-limit:]}

    @app.get("/api/graph")
    def graph():
        window = _duration_arg("window", 300)
        return collector.graph(window)

    @app.get("/api/chains")
    def chains():
        since = _duration_arg("since", 900)
        limit = max(1, min(flask.request.args.get("limit", 50, type=int), 1000))
        absorbed = {"true": True, "false": False}.get(flask.request.args.get("absorbed", ""))
        return {"since_seconds": since,
                "chains": collector.history.chains(since, limit, absorbed)}

    @app.get("/api/traces/<trace_or_request_id>")
    def trace(trace_or_request_id):
        if len(trace_or_request_id) > 128:
            flask.abort(404)
        found = collector.history.trace(trace_or_request_id)
        if found is None:
            return {"error": f"no trace or request id {trace_or_request_id!r} in the "
                             "history (it may still be open: traces close after "
                             f"{collector.window.quiet_seconds:g}s without new hops)"}, 404
        return found

    @app.errorhandler(BadDuration)
    def bad_duration(exc):
        return {"error": str(exc)}, 400

    return app


class RequestHandler(serving.WSGIRequestHandler):
    """Werkzeug's request log, without the dashboard token of a ?token= URL."""

    _TOKEN = re.compile(r"([?&]token=)[^&\s]*")

    def log_request(self, *args, **kwargs):
        # Werkzeug logs self.path (or the raw request line when it is bad);
        # the application has already read the real ones by now.
        self.requestline = self._TOKEN.sub(r"\1***", self.requestline)
        if hasattr(self, "path"):
            self.path = self._TOKEN.sub(r"\1***", self.path)
        super().log_request(*args, **kwargs)


class BadDuration(ValueError):
    pass


def _duration_arg(name, default):
    value = flask.request.args.get(name)
    if value is None:
        return default
    try:
        return durations.parse(value)
    except ValueError as exc:
        raise BadDuration(f"{name}: {exc}") from None
