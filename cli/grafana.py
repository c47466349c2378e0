"""``commlens grafana push``: put the committed dashboards into a running Grafana.

Uses grafana-client (the maintained successor of grafana-api) against
Grafana's HTTP API: the folder by uid (created when missing), then each
dashboard through POST /api/dashboards/db with overwrite, so pushing again
updates in place.
"""

import os
import sys

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


def run_push(args):
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    from commlens.dashboards.grafana import load_dashboards

    if not args.url:
        print("commlens grafana push: --url (or GRAFANA_URL) is required", file=sys.stderr)
        return 2
    if not args.token:
        print("commlens grafana push: --token (or GRAFANA_TOKEN) is required",
              file=sys.stderr)
        return 2
    where = urls.redact(args.url)
    api = GrafanaApi.from_url(args.url, credential=args.token, timeout=10)
    try:
        _ensure_folder(api, args.folder, GrafanaClientError)
        for name, dashboard in load_dashboards().items():
            answer = api.dashboard.update_dashboard({
                "dashboard": dict(dashboard, id=None),
                "folderUid": FOLDER_UID,
                "overwrite": True,
                "message": "commlens grafana push",
            })
            print(f"{name}: {answer.get('status', 'pushed')}, version "
                  f"{answer.get('version', '?')}, {where.rstrip('/')}{answer.get('url', '')}")
    except GrafanaException as exc:
        # The client's message names the status and Grafana's answer, never the token.
        print(f"commlens grafana push: {where}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"commlens grafana push: cannot reach {where}: {exc}", file=sys.stderr)
        return 1
    return 0


def _ensure_folder(api, title, client_error):
    try:
        api.folder.get_folder(FOLDER_UID)
    except client_error as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        api.folder.create_folder(title, uid=FOLDER_UID)
