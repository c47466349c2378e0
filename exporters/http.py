"""The collector's HTTP face: /metrics, health probes and the JSON API."""

import flask

from commlens.exporters import prometheus


def create_app(collector, intake=None):
    app = flask.Flask("commlens.collector")
    app.config["COMMLENS_COLLECTOR"] = collector

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

    return app
