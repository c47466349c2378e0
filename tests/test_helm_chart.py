"""The Helm chart, checked as far as this machine allows.

No ``helm`` binary can be installed here. Helm's own library (helm-sdkpy, in
.venv-helm on Python 3.12) lints the chart and renders it: it installs into a
Kubernetes API played on loopback that records what Helm sends
(tests/peers/helm_render.py). The core objects are validated against
Kubernetes 1.31's schemas by kubernetes-validate (offline); the Prometheus
Operator kinds have no bundled schema, so their fields are checked here, and the
PrometheusRule must carry exactly the rules file that promtool tests.
"""

import json
import pathlib
import shutil
import subprocess

import pytest
import yaml

from commlens.dashboards.grafana import load_dashboards

ROOT = pathlib.Path(__file__).parent.parent
CHART = ROOT / "helm" / "commlens"
HELM_VENV = ROOT / ".venv-helm" / "bin"
RENDER = ROOT / "tests" / "peers" / "helm_render.py"
RULES = ROOT / "dashboards" / "alerts" / "commlens.rules.yml"
KUBERNETES_VERSION = "1.31.0"
EXISTING_SECRET = {"broker": {"existingSecret": "commlens-broker-url"}}


def _helm_python():
    python = HELM_VENV / "python"
    assert python.exists(), "scripts/setup creates .venv-helm (Python 3.12, helm-sdkpy)"
    return str(python)


def _run(*args, chart=CHART):
    return subprocess.run([_helm_python(), str(RENDER), *args[:1], str(chart), *args[1:]],
                          capture_output=True, text=True, timeout=120)


_renders = {}


def render(values, chart=CHART):
    key = (json.dumps(values, sort_keys=True), str(chart))
    if key not in _renders:
        result = _run("render", json.dumps(values), chart=chart)
        _renders[key] = result
    result = _renders[key]
    assert result.returncode == 0, result.stderr[-2000:]
    rendered = json.loads(result.stdout)
    objects = {(o["kind"], o["metadata"]["name"]): o for o in rendered["objects"]}
    objects["NOTES"] = rendered["notes"]
    return objects


def _manifests(objects):
    return {key: o for key, o in objects.items() if key != "NOTES"}


def _collector(objects):
    return objects[("StatefulSet", "commlens")]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("files, line_length", [
    ([CHART / "Chart.yaml", CHART / "values.yaml", RULES,
      *sorted((ROOT / "dashboards" / "grafana" / "provisioning").rglob("*.yaml"))],
     {"max": 120}),
    # promtool's input series and expected annotations are one line each.
    (sorted((ROOT / "dashboards" / "alerts" / "tests").glob("*.yml")), "disable"),
], ids=["chart-rules-provisioning", "promtool-tests"])
def test_yaml_files_pass_yamllint(files, line_length):
    config = json.dumps({"extends": "default", "rules": {
        "line-length": line_length, "document-start": "disable",
        "truthy": {"check-keys": False}}})
    result = subprocess.run([str(HELM_VENV / "yamllint"), "-s", "-d", config, *map(str, files)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_lints_the_chart():
    result = _run("lint")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["Errors"] is None, report
    # Severity 1 is Helm's INFO (an icon is recommended); 2 and up are warnings and errors.
    assert all(message["Severity"] < 2 for message in report["Messages"]), report


def test_lint_catches_a_broken_template(tmp_path):
    chart = tmp_path / "commlens"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "templates" / "broken.yaml").write_text("kind: ConfigMap\nmetadata: {{ .Values.x }\n")
    report = json.loads(_run("lint", chart=chart).stdout)
    assert report["Errors"], report
    assert any(m["Path"].startswith("templates/") and m["Severity"] >= 2
               for m in report["Messages"]), report


def _validate(objects, tmp_path):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(list(_manifests(objects).values())))
    return subprocess.run([str(HELM_VENV / "kubernetes-validate"), "-k", KUBERNETES_VERSION,
                           "--strict", str(manifest)], capture_output=True, text=True)


@pytest.mark.parametrize("values", [
    EXISTING_SECRET,
    {"broker": {"url": "amqp://commlens:pw@rabbitmq.openstack:5672/"}, "replicaCount": 3,
     "dashboardToken": {"existingSecret": "commlens-dashboard"},
     "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}}},
    dict(EXISTING_SECRET, history={"persistence": {"enabled": True}}),
    dict(EXISTING_SECRET, replicaCount=3, history={"persistence": {"enabled": True}},
         rabbitmqManagement={"existingSecret": "rabbitmq-management"},
         prometheusRule={"labels": {"release": "kube-prometheus-stack"}}),
], ids=["existing-secret", "url-replicas-token", "persistent-history",
        "replicas-persistent-management"])
def test_rendered_manifests_validate_against_kubernetes_schemas(values, tmp_path):
    objects = render(values)
    result = _validate(objects, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    core = [key for key in _manifests(objects)
            if key[0] not in ("ServiceMonitor", "PrometheusRule")]
    for kind, name in core:
        assert f"passed for resource {kind.lower()}/{name}" in result.stdout, (kind, result.stdout)


def test_validation_can_fail(tmp_path):
    objects = render(EXISTING_SECRET)
    objects[("StatefulSet", "commlens")]["spec"]["replicas"] = "two"
    objects[("Service", "commlens")]["spec"]["portz"] = []
    result = _validate(objects, tmp_path)
    assert result.returncode != 0
    assert "statefulset/commlens" in result.stdout + result.stderr


def test_deployment_runs_the_collector_with_probes_and_the_broker_url_from_a_secret():
    objects = render(EXISTING_SECRET)
    container = _collector(objects)
    assert container["command"] == ["commlens", "collector"]
    assert "--listen=0.0.0.0:9780" in container["args"]
    assert not any(a.startswith("--replica") for a in container["args"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert env["COMMLENS_EXPORT_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "commlens-broker-url", "key": "url"}
    assert "COMMLENS_DASHBOARD_TOKEN" not in env
    assert not any(kind == "Secret" for kind, _ in _manifests(objects))
    assert container["resources"]["requests"] and container["securityContext"][
        "readOnlyRootFilesystem"]


def test_replicas_token_and_a_created_secret():
    objects = render({"broker": {"url": "amqp://commlens:pw@rabbitmq.openstack:5672/"},
                      "replicaCount": 3,
                      "dashboardToken": {"existingSecret": "commlens-dashboard"},
                      "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}}})
    container = _collector(objects)
    assert "--replica=$(POD_NAME)" in container["args"]
    assert objects[("StatefulSet", "commlens")]["spec"]["replicas"] == 3
    env = {e["name"]: e for e in container["env"]}
    assert env["COMMLENS_DASHBOARD_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
        "commlens-dashboard"
    secret = objects[("Secret", "commlens-broker")]
    assert secret["stringData"]["url"] == "amqp://commlens:pw@rabbitmq.openstack:5672/"
    # The password lives in the Secret only.
    rest = json.dumps([o for key, o in _manifests(objects).items() if key[0] != "Secret"])
    assert "pw@" not in rest
    monitor = objects[("ServiceMonitor", "commlens")]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_scrapes_the_service_as_job_commlens():
    objects = render(EXISTING_SECRET)
    service = objects[("Service", "commlens")]
    monitor = objects[("ServiceMonitor", "commlens")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "commlens"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


def test_prometheus_rule_is_exactly_the_tested_rules_file():
    rule = render(EXISTING_SECRET)[("PrometheusRule", "commlens")]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_dashboards_config_map_is_labelled_for_the_grafana_sidecar():
    config_map = render(EXISTING_SECRET)[("ConfigMap", "commlens-dashboards")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"]["grafana_folder"] == "commlens"
    committed = load_dashboards()
    assert sorted(config_map["data"]) == sorted(committed)
    for name, text in config_map["data"].items():
        assert json.loads(text) == committed[name]


def test_optional_objects_can_be_turned_off():
    objects = render(dict(EXISTING_SECRET, serviceMonitor={"enabled": False},
                          prometheusRule={"enabled": False},
                          grafanaDashboards={"enabled": False}))
    assert {kind for kind, _ in _manifests(objects)} == {"StatefulSet", "Service"}


@pytest.mark.parametrize("values, message", [
    ({}, "set broker.existingSecret"),
])
def test_bad_values_get_a_clear_error(values, message):
    result = _run("render", json.dumps(values))
    assert result.returncode != 0
    assert message in result.stderr


def test_notes_say_how_to_reach_the_dashboard_and_warn_without_a_token():
    notes = render(EXISTING_SECRET)["NOTES"]
    assert "port-forward svc/commlens 9780" in notes
    assert "http://127.0.0.1:9780/dashboard/" in notes
    assert "WARNING: no dashboardToken.existingSecret" in notes
    guarded = render(dict(EXISTING_SECRET, dashboardToken={"existingSecret": "dash"}))["NOTES"]
    assert "WARNING" not in guarded and "?token=" in guarded


REPLICAS = dict(EXISTING_SECRET, replicaCount=3)


def test_replica_names_are_the_pods_ordinals_stable_across_rollouts():
    objects = render(REPLICAS)
    assert not any(kind == "Deployment" for kind, _ in _manifests(objects))
    statefulset = objects[("StatefulSet", "commlens")]
    # A StatefulSet's pods are <name>-<ordinal>: the replica name a rollout
    # gives back to the pod it replaces, so its queue is consumed again.
    assert "--replica=$(POD_NAME)" in _collector(objects)["args"]
    env = {e["name"]: e for e in _collector(objects)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert statefulset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert statefulset["spec"]["serviceName"] == "commlens-peers"


def test_replicas_are_wired_to_their_peers_through_a_headless_service():
    objects = render(REPLICAS)
    peers = [a for a in _collector(objects)["args"] if a.startswith("--peer=")]
    assert peers == [f"--peer=http://commlens-{i}.commlens-peers.openstack.svc:9780"
                     for i in range(3)]
    headless = objects[("Service", "commlens-peers")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    selector = objects[("StatefulSet", "commlens")]["spec"]["selector"]["matchLabels"]
    assert headless["spec"]["selector"] == selector
    # Prometheus scrapes each pod once: the ServiceMonitor does not select it.
    monitor = objects[("ServiceMonitor", "commlens")]["spec"]["selector"]["matchLabels"]
    assert not monitor.items() <= headless["metadata"]["labels"].items()
    single = render(EXISTING_SECRET)
    assert ("Service", "commlens-peers") not in single
    assert not any(a.startswith(("--peer", "--replica")) for a in _collector(single)["args"])


def test_each_replica_keeps_its_own_history_volume_across_rollouts():
    objects = render(dict(REPLICAS, history={"persistence": {"enabled": True,
                                                             "size": "5Gi"}}))
    spec = objects[("StatefulSet", "commlens")]["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "history"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert "history" not in {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert {"name": "history", "mountPath": "/var/lib/commlens"} in \
        _collector(objects)["volumeMounts"]
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in _manifests(objects))
    ephemeral = render(REPLICAS)[("StatefulSet", "commlens")]["spec"]
    assert "volumeClaimTemplates" not in ephemeral
    assert {"name": "history", "emptyDir": {}} in ephemeral["template"]["spec"]["volumes"]


def test_the_management_url_comes_from_a_secret_never_the_pod_spec():
    objects = render(dict(EXISTING_SECRET, rabbitmqManagement={
        "existingSecret": "rabbitmq-management", "secretKey": "management-url"}))
    container = _collector(objects)
    env = {e["name"]: e for e in container["env"]}
    assert env["COMMLENS_RABBITMQ_MANAGEMENT_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "rabbitmq-management", "key": "management-url"}
    assert not any("management" in a for a in container["args"])
    assert "COMMLENS_RABBITMQ_MANAGEMENT_URL" not in {
        e["name"] for e in _collector(render(EXISTING_SECRET))["env"]}


def test_the_otlp_endpoint_value_turns_the_span_export_on():
    endpoint = "http://tempo-distributor.monitoring.svc:4318"
    env = {e["name"]: e for e in _collector(render(dict(EXISTING_SECRET, otlp={
        "endpoint": endpoint})))["env"]}
    assert env["COMMLENS_OTLP_ENDPOINT"]["value"] == endpoint
    assert "COMMLENS_OTLP_ENDPOINT" not in {
        e["name"] for e in _collector(render(EXISTING_SECRET))["env"]}


def test_prometheus_rule_carries_the_labels_prometheus_selects_rules_by():
    rule = render(dict(EXISTING_SECRET, prometheusRule={
        "labels": {"release": "kube-prometheus-stack"}}))[("PrometheusRule", "commlens")]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "commlens"
