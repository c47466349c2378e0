"""Grafana dashboards as code: no drift from build.py, valid for Grafana 11.6 and 13.2.

Grafana's server cannot run on this machine. The schema check type-checks every
dashboard with TypeScript against @grafana/schema, the types Grafana generates
from its own dashboard and panel schemas (the dashboard kind, and each panel
plugin's Options): an unknown field or a wrong type fails it. It checks the
release the dashboards are built for (11.6, the foundation SDK's newest
builders) and the current one (13.2, whose classic dashboard JSON they are).
"""

import json
import shutil
import subprocess

import pytest

from commlens.dashboards.grafana import GENERATED, load_dashboards

build = pytest.importorskip("commlens.dashboards.grafana.build",
                            reason="grafana-foundation-sdk needs Python >= 3.11")

SCHEMA_CHECK = GENERATED.parent / "schema-check"
PANELS = {"nodeGraph": ("nodegraph", "NodeGraph"), "timeseries": ("timeseries", "TimeSeries"),
          "table": ("table", "Table"), "heatmap": ("heatmap", "Heatmap")}


class Schema:
    """Where one @grafana/schema release keeps the classic dashboard's types."""

    def __init__(self, release, index, raw, dashboard, panel):
        self.release = release
        package = SCHEMA_CHECK / "node_modules" / f"grafana-schema-{release}"
        # The panel types import the package's common types as '@grafana/schema';
        # installed under an alias, that name must be mapped to this release.
        self.index = package / index
        self.raw = package / raw
        self.dashboard = dashboard
        self.panel = panel  # (folder, PanelName) -> module path

    def panel_options(self, plugin):
        folder, name = PANELS[plugin]
        return self.panel(folder, name)


SCHEMAS = [
    Schema("11.6", "dist/esm/index.d.ts", "dist/esm/raw", "dashboard/x/dashboard_types.gen",
           lambda folder, name: f"composable/{folder}/panelcfg/x/{name}PanelCfg_types.gen"),
    Schema("13.2", "dist/types/index.d.ts", "dist/types/raw", "dashboard/x/types.gen",
           lambda folder, name: f"composable/{folder}/panelcfg/x/types.gen"),
]


def test_committed_json_is_what_build_py_generates():
    rendered = build.render()
    assert sorted(rendered) == sorted(p.name for p in GENERATED.glob("*.json"))
    for name, text in rendered.items():
        assert (GENERATED / name).read_text() == text, (
            f"{name} drifted from build.py: run python -m commlens.dashboards.grafana.build")


def _typecheck(dashboards, tmp_path, schema=SCHEMAS[0]):
    tsc = SCHEMA_CHECK / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "scripts/setup installs the schema check (npm ci in " \
                         f"{SCHEMA_CHECK.relative_to(GENERATED.parent.parent.parent)})"
    lines = [f'import type {{ Dashboard }} from "{schema.raw}/{schema.dashboard}";',
             # The schema's enums are TypeScript string enums; JSON holds their
             # values, so compare against the values ("table", not LegendDisplayMode.Table).
             "type Json<T> = T extends string ? `${T}` : T extends Array<infer U> ? "
             "Array<Json<U>> : T extends object ? { [K in keyof T]: Json<T[K]> } : T;"]
    for plugin in PANELS:
        lines.append(f'import type {{ Options as {plugin}Options }} from '
                     f'"{schema.raw}/{schema.panel_options(plugin)}";')
    for index, (name, dashboard) in enumerate(sorted(dashboards.items())):
        lines.append(f"// {name}\nexport const dashboard{index}: Json<Dashboard> = "
                     f"{json.dumps(dashboard)};")
        for panel in dashboard.get("panels", []):
            if panel["type"] in PANELS and "options" in panel:
                lines.append(f"export const dashboard{index}panel{panel['id']}: "
                             f"Json<{panel['type']}Options> = {json.dumps(panel['options'])};")
    source = tmp_path / "dashboards.ts"
    source.write_text("\n".join(lines) + "\n")
    config = tmp_path / "tsconfig.json"
    config.write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "target": "es2022",
                            "moduleResolution": "node", "baseUrl": str(tmp_path),
                            "paths": {"@grafana/schema": [str(schema.index)]}},
        "files": [str(source)]}))
    return subprocess.run([str(tsc), "--project", str(config)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: f"grafana-{s.release}")
def test_dashboards_pass_the_grafana_schema(tmp_path, schema):
    result = _typecheck(load_dashboards(), tmp_path, schema)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: f"grafana-{s.release}")
@pytest.mark.parametrize("damage", ["unknown field", "wrong type", "bad panel option"])
def test_schema_check_catches_a_broken_dashboard(tmp_path, damage, schema):
    dashboards = load_dashboards()
    overview = dashboards["commlens-overview.json"]
    if damage == "unknown field":
        overview["refreshEvery"] = "30s"
    elif damage == "wrong type":
        overview["panels"][1]["gridPos"]["w"] = "wide"
    else:
        overview["panels"][1]["options"]["edges"]["mainStatUnit"] = 7
    result = _typecheck(dashboards, tmp_path, schema)
    assert result.returncode != 0
    assert "error TS" in result.stdout


def test_dashboards_cover_what_operators_look_at():
    dashboards = load_dashboards()
    # Every dashboard together; and the RPC dashboard on its own answers slow
    # vs starved vs backed up and how close calls run to their timeout (issue
    # 18): processing, the wait split, pool saturation, the timeout budget.
    wanted = {
        "all": ("traces_service_graph_request_total", "commlens_rpc_waiting_replies",
                "commlens_rpc_received_total", "commlens_rpc_sent_total",
                "commlens_rpc_reply_wait_seconds_bucket", "commlens_rpc_call_errors_total",
                "commlens_http_requests_total", "commlens_http_request_duration_seconds",
                "commlens_error_chain_total"),
        "commlens-rpc.json": (
            "commlens_rpc_processing_seconds_bucket", "commlens_rpc_pool_wait_seconds_sum",
            "commlens_rpc_processing_seconds_sum", "commlens_rpc_reply_wait_seconds_sum",
            "commlens_rpc_pool_saturation_peak", "commlens_rpc_handlers_in_flight",
            "commlens_rpc_executor_pool_size", "commlens_rpc_timeout_budget_used_bucket",
            "commlens_rpc_calls_over_half_timeout_total"),
    }
    for where, names in wanted.items():
        text = json.dumps(dashboards if where == "all" else dashboards[where])
        missing = [name for name in names if name not in text]
        assert not missing, (where, missing)
    panel_types = {panel["type"] for d in dashboards.values() for panel in d["panels"]}
    assert {"nodeGraph", "heatmap", "table", "timeseries"} <= panel_types
    for name, dashboard in dashboards.items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus", name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        assert dashboard["uid"].startswith("commlens-") and "commlens" in dashboard["tags"]


def test_no_host_label_is_queried():
    """Bounded labels (docs/metrics.md): no dashboard groups by a host or instance."""
    for dashboard in load_dashboards().values():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                assert "host" not in target["expr"] and "instance" not in target["expr"]


def test_dashboard_queries_run_on_a_real_prometheus(tmp_path):
    """Every query parses and runs on Debian's Prometheus (variables filled in)."""
    promtool = shutil.which("promtool")
    assert promtool, "scripts/setup installs Debian's prometheus package"
    # promtool's rule checker parses PromQL without a server: one recording
    # rule per dashboard query.
    rules = []
    for dashboard in load_dashboards().values():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                rules.append({"record": f"check:{len(rules)}", "expr": dashboard_query(
                    target["expr"])})
    (tmp_path / "queries.yml").write_text(json.dumps({"groups": [{"name": "q",
                                                                  "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(tmp_path / "queries.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def dashboard_query(expr):
    """A dashboard query with Grafana's variables replaced the way Grafana does."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
            .replace("$service", ".*").replace("$target", ".*"))




def test_provisioning_files_point_grafana_at_the_dashboards():
    import yaml

    provisioning = GENERATED.parent / "provisioning"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "commlens.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    [provider] = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert provider["folderUid"] == "commlens"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
