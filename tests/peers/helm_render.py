"""Render the chart with Helm's own library and print the manifests, as JSON.

Runs in .venv-helm (helm-sdkpy needs Python >= 3.12); the tests call it in a
subprocess:

    helm_render.py lint CHART
    helm_render.py render CHART VALUES_JSON   -> {"objects": [...], "notes": NOTES.txt}

No ``helm`` binary can be installed here and helm-sdkpy has no ``template``
action, so ``render`` installs the chart into a Kubernetes API that this script
plays on loopback: it answers discovery for the kinds the chart uses, stores
nothing and records every object Helm creates. Those objects are what
``helm template`` would print, rendered by Helm itself. Helm's own release
record (sent as protobuf) is left out.
"""

import asyncio
import json
import sys
import tempfile
import threading
from http.server import ThreadingHTTPServer

import helm_sdkpy
from json_http import JsonRequestHandler

RESOURCES = {
    "/api/v1": [("configmaps", "ConfigMap"), ("secrets", "Secret"), ("services", "Service"),
                ("persistentvolumeclaims", "PersistentVolumeClaim")],
    "/apis/apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
    "/apis/monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor"),
                                       ("prometheusrules", "PrometheusRule")],
}


class FakeKubernetes(JsonRequestHandler):
    created = []

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            return self.send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        if path == "/api":
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            groups = [{"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                       "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}}
                      for g in ("apps", "monitoring.coreos.com")]
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                    "groups": groups})
        if path in RESOURCES:
            return self.send_json(200, {
                "kind": "APIResourceList", "groupVersion": path.removeprefix("/apis/")
                .removeprefix("/api/"),
                "resources": [{"name": name, "singularName": "", "namespaced": True,
                               "kind": kind, "verbs": ["create", "get", "list", "update",
                                                       "patch", "delete"]}
                              for name, kind in RESOURCES[path]]})
        if path.endswith("/secrets") or path.endswith("s") and "labelSelector" in self.path:
            return self.send_json(200, {"kind": "List", "apiVersion": "v1", "items": [],
                                    "metadata": {}})
        self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404, "message": "not found"})

    def _body(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if "protobuf" in self.headers.get("Content-Type", ""):
            # Only Helm's own release record comes as protobuf (client-go's
            # typed Secret client); the chart's objects come as JSON.
            return None
        return json.loads(data)

    def _stored(self, status, body):
        if body is None:
            body = {"kind": "Secret", "apiVersion": "v1",
                    "metadata": {"name": "helm-release", "namespace": "openstack"}}
        body.setdefault("metadata", {}).setdefault("resourceVersion", "1")
        self.send_json(status, body)

    def do_POST(self):
        body = self._body()
        if body is not None:
            self.created.append(json.loads(json.dumps(body)))
        self._stored(201, body)

    def do_PUT(self):
        self._stored(200, self._body())


def render(chart, values):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubernetes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as kubeconfig:
        kubeconfig.write(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {
                "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        kubeconfig.flush()
        config = helm_sdkpy.Configuration(namespace="openstack", kubeconfig=kubeconfig.name)
        release = asyncio.run(helm_sdkpy.Install(config).run(
            "commlens", chart, values=values, wait=False, timeout=60))
    server.shutdown()
    return {"objects": FakeKubernetes.created, "notes": release["info"]["notes"]}


def lint(chart):
    config = helm_sdkpy.Configuration(namespace="openstack")
    return asyncio.run(helm_sdkpy.Lint(config).run(chart))


def main():
    command, chart = sys.argv[1:3]
    if command == "lint":
        result = lint(chart)
    else:
        result = render(chart, json.loads(sys.argv[3]))
    json.dump(result, sys.stdout, indent=1, default=str)


if __name__ == "__main__":
    main()
