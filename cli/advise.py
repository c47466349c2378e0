"""``commlens advise``: what to change, with the evidence, from a running collector.

Reads ``/api/advice`` (exporters/advice.py) and prints one row per finding,
most severe first; ``--json`` prints the API's answer for scripts.
"""

import os

from commlens.cli import incident

_COLOURS = {"critical": "red", "warning": "yellow", "info": "cyan"}


def add_command(commands):
    advise = commands.add_parser(
        "advise", help="tuning advice: what to change (rpc_response_timeout, "
                       "executor_thread_pool_size, workers...), with the evidence")
    advise.add_argument("--window", default="1m",
                        help="judge the last WINDOW (default 1m)")
    advise.add_argument("--baseline", default="15m",
                        help="against the BASELINE before it, for what grew (default 15m)")
    advise.add_argument("--collector", default=os.environ.get(
        "COMMLENS_COLLECTOR_URL", incident.DEFAULT_COLLECTOR),
        help=f"the collector's address (default {incident.DEFAULT_COLLECTOR})")
    advise.add_argument("--json", action="store_true", help="print the API's JSON")
    advise.set_defaults(run=run_advise, token=os.environ.get("COMMLENS_DASHBOARD_TOKEN"))


def who(subject):
    """``nova-api -> nova-conductor (topic conductor)``: a finding's subject."""
    text = subject.get("edge") or subject["service"]
    return text + (f" (topic {subject['topic']})" if subject.get("topic") else "")


def sureness(confidence):
    return (f"{confidence['level']}: {confidence['observations']:,} over "
            f"{confidence['seconds']:.0f}s")


def show_findings(console, findings, title):
    from rich.markup import escape
    from rich.table import Table

    if not findings:
        console.print(f"{title}: nothing to change.")
        return
    table = Table(title=title, show_lines=True)
    for column in ("severity", "subject", "finding", "recommendation", "option (set on)",
                   "how sure"):
        table.add_column(column)
    for finding in findings:
        colour = _COLOURS.get(finding["severity"], "white")
        option = finding["option"] or "-"
        if finding["set_on"]:
            option += f"\n({', '.join(finding['set_on'])})"
        # Options are written as in a configuration file ("[conductor] workers"),
        # which rich would read as markup.
        table.add_row(f"[{colour}]{finding['severity']}[/{colour}]\n{finding['rule']}",
                      *(escape(text) for text in (who(finding["subject"]), finding["finding"],
                                                  finding["recommendation"], option,
                                                  sureness(finding["confidence"]))))
    console.print(table)


class _Advice:
    @staticmethod
    def fetch(args):
        return incident._get(args, "/api/advice", window=args.window, baseline=args.baseline)

    @staticmethod
    def show(console, data):
        show_findings(console, data["findings"],
                      f"Tuning advice, last {data['window_seconds']:.0f}s "
                      f"(baseline: the {data['baseline_seconds']:.0f}s before)")


run_advise = incident._run(_Advice)
