"""``commlens grafana push`` against a local endpoint that plays Grafana's HTTP API.

Grafana's server cannot be installed on this machine, so this endpoint stands in
for it: it records every request and checks it against Grafana's documented
folder and dashboard API (https://grafana.com/docs/grafana/latest/developers/http_api/
folder/ and .../dashboard/): bearer token auth, JSON bodies, GET /api/folders/:uid,
POST /api/folders {uid, title}, POST /api/dashboards/db {dashboard (id null to
create, uid, title), folderUid, overwrite, message}. A real Grafana may reject
what this endpoint accepts; the dashboard JSON itself is checked against
Grafana 11.6's schema in test_grafana_dashboards.py.
"""

import json
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

from commlens.dashboards.grafana import load_dashboards
from peers.json_http import JsonRequestHandler

TOKEN = "glsa_commlensTestToken_0123456789abcdef"


class FakeGrafana(JsonRequestHandler):
    folders = None
    dashboards = None
    requests = None
    problems = None

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            self.problems.append(f"{self.path}: Content-Type {self.headers.get('Content-Type')}")
        return json.loads(raw)

    def _authorised(self):
        self.requests.append((self.command, self.path))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_json(401, {"message": "Unauthorized"})
            return False
        return True

    def do_GET(self):
        if not self._authorised():
            return
        if self.path.startswith("/api/folders/"):
            uid = self.path.rsplit("/", 1)[1]
            if uid in self.folders:
                return self.send_json(200, self.folders[uid])
            return self.send_json(404, {"message": "folder not found", "status": "not-found"})
        self.send_json(404, {"message": "Not found"})

    def do_POST(self):
        if not self._authorised():
            return
        body = self._body()
        if self.path == "/api/folders":
            if not body.get("title"):
                self.problems.append("folder without title")
            folder = {"id": len(self.folders) + 1, "uid": body.get("uid"),
                      "title": body.get("title"), "version": 1}
            self.folders[folder["uid"]] = folder
            return self.send_json(200, folder)
        if self.path == "/api/dashboards/db":
            dashboard = body.get("dashboard") or {}
            for key, ok in (("dashboard.id", dashboard.get("id") is None),
                            ("dashboard.uid", bool(dashboard.get("uid"))),
                            ("dashboard.title", bool(dashboard.get("title"))),
                            ("folderUid known", body.get("folderUid") in self.folders),
                            ("overwrite", body.get("overwrite") is True)):
                if not ok:
                    self.problems.append(f"/api/dashboards/db: {key}")
            uid = dashboard.get("uid")
            version = self.dashboards.get(uid, {}).get("version", 0) + 1
            self.dashboards[uid] = {"dashboard": dashboard, "version": version,
                                    "folderUid": body.get("folderUid")}
            return self.send_json(200, {"id": 7, "uid": uid, "status": "success",
                                      "version": version, "slug": uid,
                                      "url": f"/d/{uid}/{uid}"})
        self.send_json(404, {"message": "Not found"})


@pytest.fixture
def grafana():
    handler = type("Recording", (FakeGrafana,), {
        "folders": {}, "dashboards": {}, "requests": [], "problems": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def push(url, token=TOKEN, *extra):
    return subprocess.run([sys.executable, "-m", "commlens.cli.main", "grafana", "push",
                           "--url", url, *(("--token", token) if token else ()), *extra],
                          capture_output=True, text=True, timeout=60)


def test_push_creates_the_folder_and_every_dashboard(grafana):
    recorded, url = grafana
    result = push(url)
    assert result.returncode == 0, result.stderr
    assert recorded.problems == []
    assert recorded.folders["commlens"]["title"] == "commlens"
    committed = load_dashboards()
    assert sorted(recorded.dashboards) == sorted(d["uid"] for d in committed.values())
    for dashboard in committed.values():
        pushed = recorded.dashboards[dashboard["uid"]]
        assert pushed["folderUid"] == "commlens"
        assert pushed["dashboard"] == dict(dashboard, id=None)
    assert ("GET", "/api/folders/commlens") in recorded.requests
    for uid in recorded.dashboards:
        assert f"/d/{uid}/{uid}" in result.stdout
    assert TOKEN not in result.stdout + result.stderr


def test_pushing_again_updates_in_place(grafana):
    recorded, url = grafana
    assert push(url).returncode == 0
    assert push(url, TOKEN, "--folder", "Other title").returncode == 0
    assert [r for r in recorded.requests if r == ("POST", "/api/folders")] == \
        [("POST", "/api/folders")]
    assert {d["version"] for d in recorded.dashboards.values()} == {2}
    assert recorded.problems == []


def test_a_wrong_token_is_a_clear_error_that_does_not_echo_it(grafana):
    recorded, url = grafana
    result = push(url, "glsa_wrong_secret_token")
    assert result.returncode == 1
    assert "401" in result.stderr or "Unauthorized" in result.stderr
    assert "glsa_wrong_secret_token" not in result.stdout + result.stderr
    assert recorded.dashboards == {}


def test_missing_arguments_and_unreachable_grafana(grafana, tmp_path):
    result = push("http://127.0.0.1:9", TOKEN)
    assert result.returncode == 1 and "cannot reach" in result.stderr
    assert TOKEN not in result.stderr
    result = push("http://admin:hunter2@127.0.0.1:9", TOKEN)
    assert "hunter2" not in result.stdout + result.stderr
    result = push(grafana[1], None)
    assert result.returncode == 2 and "--token" in result.stderr
