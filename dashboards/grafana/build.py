"""Build the Grafana dashboards with grafana-foundation-sdk and write them as JSON.

    python -m commlens.dashboards.grafana.build [OUTPUT_DIR]

The JSON in generated/ is committed; a test rebuilds it and fails on drift, so
change this file and run it, never the JSON. Every query uses the metric names
of DESIGN.md's contract; a datasource variable picks the Prometheus.
"""

import json
import pathlib
import sys

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import heatmap, nodegraph, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prom_model

from commlens.dashboards.grafana import GENERATED

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RPC_SERVICES = 'service=~"$service", target=~"$target"'
ERROR_CHAIN_LABELS = ("origin_service, origin_operation, origin_error, entry_service, "
                      "entry_operation")


def query(expr, legend=None, ref_id="A", instant=False, table_format=False, heatmap_format=False,
          exemplar=False):
    """``exemplar``: show the histogram's trace-id exemplars (the collector's
    OpenMetrics exposition; Prometheus with exemplar storage)."""
    target = prom.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    if exemplar:
        target = target.exemplar(True)
    if legend:
        target = target.legend_format(legend)
    if instant:
        target = target.instant()
    if table_format:
        target = target.format(prom_model.PromQueryFormat.TABLE)
    if heatmap_format:
        target = target.format(prom_model.PromQueryFormat.HEATMAP)
    return target


def graph_panel(title, *targets, unit="short", width=12, height=8, description=""):
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
             .unit(unit).span(width).height(height).fill_opacity(10)
             .legend(common_builders.VizLegendOptions().show_legend(True)
                     .display_mode(common.LegendDisplayMode.TABLE)
                     .placement(common.LegendPlacement.BOTTOM)
                     .calcs(["mean", "max", "lastNotNull"])))
    for target in targets:
        panel = panel.with_target(target)
    return panel


def table_panel(title, target, width=12, height=8, description="", transformations=()):
    panel = (table.Panel().title(title).description(description).datasource(DATASOURCE)
             .span(width).height(height).with_target(target))
    for transformation in transformations:
        panel = panel.with_transformation(transformation)
    return panel


def organize(rename, exclude=("Time",)):
    return model.DataTransformerConfig(
        id_val="organize",
        options={"excludeByName": {name: True for name in exclude}, "renameByName": rename})


def variables(builder, service_metric):
    """The datasource variable, and service / target picked from label values."""
    return (builder
            .with_variable(_label_variable("service", "Service",
                                           f"label_values({service_metric}, service)"))
            .with_variable(_label_variable("target", "Target topic / service",
                                           "label_values(commlens_rpc_sent_total"
                                           '{service=~"$service"}, target)')))


def _label_variable(name, label, values_query):
    return (gd.QueryVariable(name).label(label).datasource(DATASOURCE).query(values_query)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def base(uid, title, description):
    """A commlens dashboard with its datasource variable, tags and cross-links."""
    return (gd.Dashboard(title).uid(uid).description(description)
            .tags(["commlens", "openstack"]).editable().refresh("30s")
            .time("now-1h", "now").timezone("browser")
            .link(gd.DashboardLink("commlens").type(model.DashboardLinkType.DASHBOARDS)
                  .tags(["commlens"]).as_dropdown(True).include_vars(True).keep_time(True))
            .with_variable(gd.DatasourceVariable("datasource").label("Prometheus")
                           .type("prometheus")))


def overview():
    # Grafana's Node Graph takes one edges frame whose fields are id, source
    # and target (Grafana 9.3+ derives the nodes from it): label_replace turns
    # the Tempo-compatible service-graph labels into those fields, label_join
    # names each edge.
    edges = query(
        'label_join(label_replace(label_replace('
        "sum by (client, server, connection_type) "
        "(rate(traces_service_graph_request_total[$__rate_interval])), "
        '"source", "$1", "client", "(.*)"), "target", "$1", "server", "(.*)"), '
        '"id", "->", "client", "server")',
        ref_id="edges", instant=True, table_format=True)
    graph = (nodegraph.Panel().title("Communication graph").datasource(DATASOURCE)
             .description("Services and their REST and RPC edges, requests per second "
                          "(traces_service_graph_request_total).")
             .span(24).height(12).with_target(edges)
             .edges(nodegraph.EdgeOptions().main_stat_unit("reqps"))
             .with_transformation(organize({"Value": "mainstat"},
                                           exclude=("Time", "client", "server"))))
    return (variables(base("commlens-overview", "commlens / Overview",
                           "The communication graph of the control plane, its worst edges "
                           "and the RPC calls waiting for a reply."),
                      "commlens_rpc_sent_total")
            .with_row(gd.Row("Graph"))
            .with_panel(graph)
            .with_row(gd.Row("Worst edges"))
            .with_panel(table_panel(
                "Top edges by errors (per second)",
                query("topk(10, sum by (client, server, connection_type) "
                      "(rate(traces_service_graph_request_failed_total[$__rate_interval])) > 0)",
                      instant=True, table_format=True),
                transformations=[organize({"Value": "errors/s"})]))
            .with_panel(table_panel(
                "Top edges by p99 latency (seconds)",
                query("topk(10, histogram_quantile(0.99, sum by (client, server, le) "
                      "(rate(traces_service_graph_request_client_seconds_bucket"
                      "[$__rate_interval]))))",
                      instant=True, table_format=True),
                transformations=[organize({"Value": "p99 (s)"})]))
            .with_row(gd.Row("Waiting replies"))
            .with_panel(graph_panel(
                "RPC calls waiting for a reply, by target",
                query(f"sum by (target) (commlens_rpc_waiting_replies{{{RPC_SERVICES}}})",
                      "{{target}}"),
                width=24,
                description="Calls sent whose reply has not arrived. A line that keeps "
                            "rising is a topic whose consumers stopped or slowed down.")))


def rpc():
    received = (f"sum by (target, method) (rate(commlens_rpc_received_total"
                f"{{{RPC_SERVICES}}}[$__rate_interval]))")
    sent = (f"sum by (target, method, kind) (rate(commlens_rpc_sent_total"
            f"{{{RPC_SERVICES}}}[$__rate_interval]))")

    def buckets(by=""):
        return (f"sum by ({by}le) (rate(commlens_rpc_reply_wait_seconds_bucket"
                f'{{{RPC_SERVICES}, outcome="ok"}}[$__rate_interval]))')
    wait_heatmap = (heatmap.Panel().title("Reply wait (successful calls)")
                    .datasource(DATASOURCE).span(12).height(8)
                    .with_target(query(buckets(), "{{le}}", heatmap_format=True))
                    .calculate(False).y_axis(heatmap.YAxisConfig().unit("s")))
    return (variables(base("commlens-rpc", "commlens / RPC",
                           "oslo.messaging RPC seen by commlens: what each service sends "
                           "and receives, the replies it waits for and how calls fail."),
                      "commlens_rpc_sent_total")
            .with_row(gd.Row("Traffic"))
            .with_panel(graph_panel("Received per second, by topic and method",
                                    query(received, "{{target}}.{{method}}"), unit="reqps"))
            .with_panel(graph_panel("Sent per second, by topic, method and kind",
                                    query(sent, "{{target}}.{{method}} ({{kind}})"),
                                    unit="reqps"))
            .with_row(gd.Row("Replies"))
            .with_panel(graph_panel(
                "Waiting replies", query(
                    f"sum by (service, target, method) (commlens_rpc_waiting_replies"
                    f"{{{RPC_SERVICES}}})", "{{service}} -> {{target}}.{{method}}")))
            .with_panel(wait_heatmap)
            .with_panel(graph_panel(
                "Reply wait p50 / p99, by topic",
                query(f"histogram_quantile(0.5, {buckets('target, ')})",
                      "p50 {{target}}"),
                query(f"histogram_quantile(0.99, {buckets('target, ')})",
                      "p99 {{target}}", ref_id="B", exemplar=True),
                unit="s", width=24))
            .with_row(gd.Row("Failures"))
            .with_panel(graph_panel(
                "Timeouts per second",
                query(f"sum by (service, target, method) (rate(commlens_rpc_call_errors_total"
                      f'{{{RPC_SERVICES}, outcome="timeout"}}[$__rate_interval]))',
                      "{{service}} -> {{target}}.{{method}}"), unit="reqps"))
            .with_panel(graph_panel(
                "Remote errors per second, by exception",
                query(f"sum by (target, method, error) (rate(commlens_rpc_call_errors_total"
                      f'{{{RPC_SERVICES}, outcome="remote_error"}}[$__rate_interval]))',
                      "{{target}}.{{method}}: {{error}}"), unit="reqps")))


def rest():
    selector = 'service=~"$service"'
    requests = f"commlens_http_requests_total{{{selector}}}"
    durations = (f"sum by (service, route, le) (rate(commlens_http_request_duration_seconds_bucket"
                 f'{{{selector}, outcome="ok"}}[$__rate_interval]))')
    return (variables(base("commlens-rest", "commlens / REST",
                           "REST APIs seen by commlens's WSGI middleware: rate, 5xx ratio "
                           "and latency by service and route."),
                      "commlens_http_requests_total")
            .with_panel(graph_panel(
                "Requests per second, by service and route",
                query(f"sum by (service, method, route) (rate({requests}[$__rate_interval]))",
                      "{{service}} {{method}} {{route}}"), unit="reqps"))
            .with_panel(graph_panel(
                "5xx ratio, by service",
                query(f'sum by (service) (rate(commlens_http_requests_total{{{selector}, '
                      f'code=~"5.."}}[$__rate_interval])) / sum by (service) '
                      f"(rate({requests}[$__rate_interval]))", "{{service}}"),
                unit="percentunit"))
            .with_panel(graph_panel(
                "Latency p50 / p99 of successful requests, by service and route",
                query(f"histogram_quantile(0.5, {durations})", "p50 {{service}} {{route}}"),
                query(f"histogram_quantile(0.99, {durations})", "p99 {{service}} {{route}}",
                      ref_id="B", exemplar=True),
                unit="s", width=24))
            .with_panel(table_panel(
                "Status codes in the range, by service, route and caller",
                query(f"sum by (service, caller, method, route, code) "
                      f"(increase({requests}[$__range])) > 0",
                      instant=True, table_format=True),
                width=24, transformations=[organize({"Value": "requests"})])))


def chains():
    by_chain = f"sum by ({ERROR_CHAIN_LABELS})"
    return (base("commlens-chains", "commlens / Error chains",
                 "Where errors start and where they surface: commlens_error_chain_total, "
                 "one row per chain shape (origin -> entry).")
            .with_panel(table_panel(
                "Error chains in the range",
                query(f"sort_desc({by_chain} (increase(commlens_error_chain_total[$__range])) "
                      "> 0)", instant=True, table_format=True),
                width=24, height=10,
                description="Each row is a chain shape. The web dashboard and "
                            "`commlens chains` show the full path and example request ids.",
                transformations=[organize({
                    "origin_service": "origin service", "origin_operation": "origin operation",
                    "origin_error": "origin error", "entry_service": "entry service",
                    "entry_operation": "entry operation", "Value": "errors"})]))
            .with_panel(graph_panel(
                "Error chains per second",
                query(f"{by_chain} (rate(commlens_error_chain_total[$__rate_interval]))",
                      "{{origin_service}} {{origin_error}} -> {{entry_service}}"),
                unit="reqps", width=24))
            .with_panel(graph_panel(
                "Failures absorbed by a retry or a fallback, per second",
                query("sum by (origin_service, origin_error, entry_service) "
                      "(rate(commlens_error_chain_absorbed_total[$__rate_interval]))",
                      "{{origin_service}} {{origin_error}} -> {{entry_service}}"),
                unit="reqps", width=24)))


DASHBOARDS = {
    "commlens-overview.json": overview,
    "commlens-rpc.json": rpc,
    "commlens-rest.json": rest,
    "commlens-chains.json": chains,
}


def render():
    """Every dashboard as the JSON text that is committed."""
    return {name: json.dumps(_finished(build()), indent=2, sort_keys=True) + "\n"
            for name, build in DASHBOARDS.items()}


def _finished(builder):
    dashboard = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    # Grafana needs a unique id per panel for links and the panel editor; the
    # SDK leaves them unset (rows at 0), so number them in order.
    for number, panel in enumerate(dashboard["panels"], start=1):
        panel["id"] = number
    # The SDK writes the interval variable's auto settings on every variable;
    # Grafana 11.6's schema knows them on none, so they go.
    for variable in dashboard["templating"]["list"]:
        for key in ("auto", "auto_count", "auto_min"):
            variable.pop(key, None)
    return dashboard


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    output = pathlib.Path(argv[0]) if argv else GENERATED
    output.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (output / name).write_text(text)
        print(f"wrote {output / name}")


if __name__ == "__main__":
    main()
