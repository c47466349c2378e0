"""``commlens grafana push``: put the committed dashboards into a running Grafana.

Grafana's HTTP API, with the standard library: the folder by uid (created
when missing), then each dashboard through POST /api/dashboards/db with
overwrite, so pushing again updates in place. No client library: the one
there was (grafana-client 4 and 5) brings niquests and urllib3-future, which
installs its own ``urllib3`` over the real one, under the requests and
keystoneauth1 of the OpenStack services the collector may be installed beside
(issue 17, item 10).
"""

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from commlens.tracer import urls

FOLDER_UID = "commlens"


def add_command(commands):
    grafana = commands.add_parser("grafana", help="Grafana dashboards")
    actions = grafana.add_subparsers(dest="grafana_command", required=True)
    push = actions.add_parser(
        "push", help="create or update the commlens dashboards in a Grafana")
    push.add_argument("--url", default=os.environ.get("GRAFANA_URL"),
                      help="Grafana's base URL, e.g. https://grafana.example:3000 "
                           "(default: GRAFANA_URL)")
    push.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                      help="a service account token with the Editor role "
                           "(default: GRAFANA_TOKEN; prefer it to the flag, which "
                           "other users can see in the process list)")
    push.add_argument("--folder", default="commlens",
                      help="folder title to put the dashboards in (default commlens)")
    push.set_defaults(run=run_push)


class GrafanaError(Exception):
    """Grafana answered with an error status: its status and message, never the token."""

    def __init__(self, status, message):
        super().__init__(f"{status} {message}")
        self.status = status


def run_push(args):
    from commlens.dashboards.grafana import load_dashboards

    if not args.url:
        print("commlens grafana push: --url (or GRAFANA_URL) is required", file=sys.stderr)
        return 2
    if not args.token:
        print("commlens grafana push: --token (or GRAFANA_TOKEN) is required",
              file=sys.stderr)
        return 2
    where = urls.redact(args.url)
    api = GrafanaApi(args.url, args.token)
    try:
        _ensure_folder(api, args.folder)
        for name, dashboard in load_dashboards().items():
            answer = api.request("POST", "/api/dashboards/db", {
                "dashboard": dict(dashboard, id=None),
                "folderUid": FOLDER_UID,
                "overwrite": True,
                "message": "commlens grafana push",
            })
            print(f"{name}: {answer.get('status', 'pushed')}, version "
                  f"{answer.get('version', '?')}, {where.rstrip('/')}{answer.get('url', '')}")
    except GrafanaError as exc:
        print(f"commlens grafana push: {where}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        # ValueError: http.client's InvalidURL (a bad port); the message has no token.
        print(f"commlens grafana push: cannot reach {where}: {exc}", file=sys.stderr)
        return 1
    return 0


class GrafanaApi:
    """JSON requests to one Grafana with a service account token."""

    def __init__(self, url, token, timeout=10):
        # The token authenticates; user:password in the URL is dropped (and
        # never printed: urls.redact).
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        self.base = urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise GrafanaError(exc.code, _message(exc)) from None


def _message(http_error):
    try:
        return json.loads(http_error.read()).get("message") or http_error.reason
    except (ValueError, AttributeError, OSError):
        return http_error.reason


def _ensure_folder(api, title):
    try:
        api.request("GET", f"/api/folders/{FOLDER_UID}")
    except GrafanaError as exc:
        if exc.status != 404:
            raise
        api.request("POST", "/api/folders", {"uid": FOLDER_UID, "title": title})
