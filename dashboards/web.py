"""The web dashboard, served by the collector: a Flask blueprint.

Read-only: every route is a GET. The page (templates/dashboard.html) and its
script and style (static/) are commlens's own files served from the installed
package, so it works with no internet; the graph picture is an SVG laid out on
the server by Graphviz (graph_view.py).

Routes (besides the collector's JSON API, which the page also reads):

- ``/dashboard/``: the page
- ``/dashboard/graph.svg?window=&focus=&depth=&hide=&find=``: the graph
- ``/api/graph/node/<service>?window=``: what a service serves, by caller and
  method, and 15 minutes of its waiting replies and errors
- ``/api/graph/edge?client=&server=&protocol=&window=``: the same for one edge
"""

import dataclasses
import hmac

import flask

from commlens.dashboards import filters
from commlens.dashboards import graph_view
from commlens.dashboards import health

TOKEN_COOKIE = "commlens_token"
# Reachable without the token: Prometheus scrapes, Kubernetes probes.
OPEN_PATHS = frozenset(("/metrics", "/healthz", "/readyz"))


@dataclasses.dataclass(frozen=True)
class DashboardSettings:
    tolerances: health.Tolerances = health.Tolerances()
    # When set, the dashboard and the JSON API require it (Authorization:
    # Bearer, or once as ?token= on the page, which then keeps it in a cookie).
    token: str | None = None


def create_blueprint(collector, settings, duration_arg, asked_fleet=lambda: None,
                     own_share=lambda: False):
    """``asked_fleet()``: the Fleet to answer with (exporters/fleet.py), or
    None for this collector's own; ``own_share()``: a peer replica asks,
    wanting the latency buckets to merge."""
    blueprint = flask.Blueprint("dashboard", __name__, static_folder="static",
                                static_url_path="/dashboard/static",
                                template_folder="templates")

    @blueprint.get("/")
    def root():
        return flask.redirect(flask.url_for("dashboard.page"))

    @blueprint.get("/dashboard/")
    def page():
        tolerances = settings.tolerances
        return flask.render_template(
            "dashboard.html", degraded=tolerances.degraded, failing=tolerances.failing,
            colours=health.COLOURS, origin_colour=graph_view.ORIGIN_COLOUR)

    @blueprint.get("/dashboard/graph.svg")
    def graph_svg():
        args = flask.request.args
        fleet = asked_fleet()
        window = duration_arg("window", 300)
        graph = fleet.graph(window) if fleet else collector.graph(window)
        try:
            nodes, edges, found = graph_view.select(
                graph, focus=args.get("focus") or None, depth=args.get("depth", 1, type=int),
                hide=args.get("hide") or None, find=args.get("find") or None)
        except (filters.FilterError, graph_view.UnknownService) as exc:
            return {"error": str(exc)}, 400
        try:
            svg = graph_view.render_svg(
                graph_view.to_dot(nodes, edges, found, settings.tolerances),
                graph_view.layout_engine(edges))
        except graph_view.GraphvizMissing as exc:
            return {"error": str(exc)}, 503
        response = flask.Response(svg, content_type="image/svg+xml")
        response.headers["X-Commlens-Nodes"] = str(len(nodes))
        response.headers["X-Commlens-Edges"] = str(len(edges))
        response.headers["X-Commlens-Found"] = str(len(found))
        if fleet:
            # The page says when replicas did not answer (the SVG cannot).
            response.headers["X-Commlens-Missing-Replicas"] = str(
                len(graph["replicas"]["missing"]))
        return response

    @blueprint.get("/api/graph/node/<service>")
    def node_details(service):
        window = duration_arg("window", 300)
        fleet = asked_fleet()
        if fleet:
            return fleet.node_details(service, window)
        return collector.node_details(service, window, histograms=own_share())

    @blueprint.get("/api/graph/edge")
    def edge_details():
        args = flask.request.args
        missing = [k for k in ("client", "server", "protocol") if not args.get(k)]
        if missing:
            return {"error": f"missing {', '.join(missing)}"}, 400
        window = duration_arg("window", 300)
        fleet = asked_fleet()
        if fleet:
            return fleet.edge_details(args["client"], args["server"], args["protocol"], window)
        return collector.edge_details(args["client"], args["server"], args["protocol"],
                                      window, histograms=own_share())

    return blueprint


def require_token(app, token):
    """Guard everything but OPEN_PATHS with ``token``."""
    expected = token.encode()

    def presented():
        request = flask.request
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[len("Bearer "):]
        return request.args.get("token") or request.cookies.get(TOKEN_COOKIE)

    @app.before_request
    def check():
        request = flask.request
        if request.path in OPEN_PATHS or request.path.startswith("/dashboard/static/"):
            return None
        given = presented()
        if given is None or not hmac.compare_digest(given.encode(), expected):
            return {"error": "this collector requires its dashboard token: open "
                             "/dashboard/?token=TOKEN, or send Authorization: Bearer TOKEN"}, 401
        if "token" in request.args and request.path == "/dashboard/":
            # Keep the token out of the address bar and the history.
            response = flask.redirect(flask.url_for("dashboard.page"))
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="Strict",
                                secure=request.is_secure)
            return response
        return None
