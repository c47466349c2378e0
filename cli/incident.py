"""Commands for the terminal during an incident: ``graph``, ``chains``, ``lost``, ``trace``.

They read a running collector's JSON API (``--collector``, default the
local one) and print readable tables, or the API's JSON with ``--json``.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from commlens.dashboards import formatting

DEFAULT_COLLECTOR = "http://127.0.0.1:9780"
# Output that is not a terminal (a pipe, a file) is as wide as its longest
# row: grep and awk see whole service names, never rich's 80 columns.
UNLIMITED_WIDTH = 100000
NO_VALUE = float("inf")


def _most(value):
    """Descending order for a number that may be missing (missing last)."""
    return -value if value is not None else NO_VALUE


# `commlens graph --sort`: the edge order, first key first; ties in caller,
# callee, protocol order so the output is stable.
GRAPH_SORTS = {
    "errors": lambda e: (-e["error_ratio"], -e["rate"]),
    "rate": lambda e: (-e["rate"],),
    "p50": lambda e: (_most(e.get("p50_seconds")),),
    "p99": lambda e: (_most(e.get("p99_seconds")),),
    "waiting": lambda e: (_most(e.get("waiting_replies")),),
    "timeouts": lambda e: (_most(e.get("timeouts")),),
    "caller": lambda e: (),
    "callee": lambda e: (e["server"],),
}


def _positive(value):
    import argparse

    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number of at least 1")
    return number


def add_commands(commands):
    graph = commands.add_parser("graph", help="who calls whom: rates, errors, latency, "
                                              "waiting replies")
    graph.add_argument("--window", default="5m", help="rates over this window (default 5m)")
    graph.add_argument("--sort", choices=sorted(GRAPH_SORTS), default="errors",
                       help="edge order: errors (error ratio, then rate; the default), "
                            "rate, p50, p99, waiting, timeouts (highest first), "
                            "caller or callee (by name)")
    graph.add_argument("--top", type=_positive, default=None, metavar="N",
                       help="only the first N edges in that order")
    graph.set_defaults(run=run_graph)

    chains = commands.add_parser("chains", help="error propagation chains, grouped")
    chains.add_argument("--since", default="15m", help="chains of this last period "
                                                       "(default 15m)")
    chains.add_argument("--limit", type=int, default=20)
    chains.set_defaults(run=run_chains)

    lost = commands.add_parser("lost", help="casts, fanouts and notifications sent but "
                                            "never received (a queue nobody reads)")
    lost.add_argument("--window", default="5m", help="sent over this window, ending a grace "
                                                     "period ago (default 5m)")
    lost.set_defaults(run=run_lost)

    trace = commands.add_parser("trace", help="a whole trace by trace id, or a whole "
                                              "request by request id (req-...): all "
                                              "its traces, joined, entry first")
    trace.add_argument("id", help="an OpenStack request id or a trace id")
    trace.set_defaults(run=run_trace)

    for command in (graph, chains, lost, trace):
        command.add_argument("--collector", default=os.environ.get(
            "COMMLENS_COLLECTOR_URL", DEFAULT_COLLECTOR),
            help=f"the collector's address (default {DEFAULT_COLLECTOR})")
        command.add_argument("--json", action="store_true", help="print the API's JSON")
        command.set_defaults(token=os.environ.get("COMMLENS_DASHBOARD_TOKEN"))


class ApiError(Exception):
    pass


def _get(args, path, **query):
    url = args.collector.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    # A collector started with --dashboard-token wants it; the environment is
    # the only way in, so it never shows in the process list.
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error")
        except Exception:
            message = None
        raise ApiError(message or f"the collector answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(f"cannot reach the collector at {args.collector}: {reason}") from None


def _run(render):
    def run(args):
        try:
            data = render.fetch(args)
        except ApiError as exc:
            print(f"commlens {args.command}: {exc}", file=sys.stderr)
            return 1
        _say_if_partial(args, data)
        if args.json:
            json.dump(data, sys.stdout, indent=2)
            print()
        else:
            render.show(_console(), data)
        return 0
    return run


def _say_if_partial(args, data):
    """A fleet's answer without some replicas says so, on stderr."""
    replicas = data.get("replicas") if isinstance(data, dict) else None
    if isinstance(replicas, dict) and replicas.get("missing"):
        missing = ", ".join(f"{m['peer']} ({m['error']})" for m in replicas["missing"])
        answered = ", ".join(replicas.get("answered", []))
        print(f"commlens {args.command}: partial answer: replicas {answered} answered; "
              f"not {missing}", file=sys.stderr)


def _console():
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=UNLIMITED_WIDTH)


_seconds = formatting.duration


def _when(timestamp):
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


class _Graph:
    @staticmethod
    def fetch(args):
        data = _get(args, "/api/graph", window=args.window)
        try:
            data["lost_messages"] = _get(args, "/api/lost-messages", window=args.window)
        except ApiError:
            pass  # a collector from before lost messages: the graph alone
        return sorted_edges(data, args.sort, args.top)

    @staticmethod
    def show(console, data):
        from rich.table import Table
        title = f"Communication graph, last {data['window_seconds']:.0f}s"
        if data.get("edges_total", len(data["edges"])) > len(data["edges"]):
            title += f", top {len(data['edges'])} of {data['edges_total']} edges"
        table = Table(title=title)
        for column in ("caller", "callee", "proto", "req/s", "err %", "p50", "p99",
                       "waiting", "timeouts", "queue ready/unacked/consumers",
                       "vs baseline"):
            table.add_column(column, justify="left" if column in (
                "caller", "callee", "proto", "vs baseline") else "right")
        origins = {n["service"]: n["origin"] for n in data.get("nodes", ())
                   if n.get("origin")}
        for edge in data["edges"]:
            queues = ", ".join(f"{name} {q['ready']}/{q['unacked']}/{q['consumers']}"
                               for name, q in (edge.get("queues") or {}).items())
            error = formatting.number(edge["error_ratio"] * 100)
            table.add_row(
                _with_origin(edge["client"], origins), _with_origin(edge["server"], origins),
                edge["protocol"],
                formatting.number(edge["rate"]),
                f"[red]{error}[/red]" if edge["error_ratio"] else error,
                _seconds(edge["p50_seconds"], edge.get("p50_estimated", False)),
                _seconds(edge["p99_seconds"], edge.get("p99_estimated", False)),
                _count(edge.get("waiting_replies")), _count(edge.get("timeouts")), queues,
                formatting.change(edge.get("change")))
        console.print(table)
        if data.get("baseline") is None and "baseline" in data:
            console.print("vs baseline: none yet (the collector has not heard long enough)")
        _show_silent_servers(console, data.get("silent_servers") or [])
        _show_silent_reporters(console, data.get("silent_reporters") or [])
        if data.get("lost_messages") is not None:
            _Lost.show(console, data["lost_messages"], quiet=True)


def _with_origin(service, origins):
    """A service, and ``[origin of N chains]`` where error chains start."""
    origin = origins.get(service)
    if not origin:
        return service
    where = ", ".join(origin["servers"])
    return (f"{service} [magenta]\\[origin of {origin['chains']} chains"
            f"{' on ' + where if where else ''}][/magenta]")


class _Lost:
    @staticmethod
    def fetch(args):
        return _get(args, "/api/lost-messages", window=args.window)

    @staticmethod
    def show(console, data, quiet=False):
        from rich.table import Table
        if data.get("unavailable"):
            if not quiet:
                console.print(f"Lost messages are not counted here: {data['unavailable']}.")
            return
        if not data["messages"]:
            if not quiet:
                console.print(f"No cast, fanout or notification went unreceived over the "
                              f"last {data['window_seconds']:.0f}s (grace "
                              f"{data['grace_seconds']:.0f}s).")
            return
        table = Table(title=f"Messages nobody received: sent over {data['window_seconds']:.0f}s "
                            f"until {data['grace_seconds']:.0f}s ago")
        for column in ("target", "method", "kind", "sent", "received", "unreceived",
                       "callers", "servers (sampled) / idle queues"):
            table.add_column(column, justify="right" if column in (
                "sent", "received", "unreceived") else "left")
        for row in data["messages"]:
            where = [f"{s['server']} ({s['unreceived']} of {s['sampled']})"
                     for s in row["servers"]]
            where += [f"queue {name}: {q['ready']} ready, no consumer"
                      for name, q in row["queues"].items()]
            table.add_row(row["target"], row["method"], row["kind"], str(row["sent"]),
                          str(row["received"]), f"[red]{row['unreceived']}[/red]",
                          ", ".join(row["callers"]), "\n".join(where))
        console.print(table)


def sorted_edges(data, sort="errors", top=None):
    """The graph with its edges in ``sort`` order (GRAPH_SORTS), the first
    ``top`` only; ``edges_total`` says how many there were."""
    key = GRAPH_SORTS[sort]
    edges = sorted(data["edges"], key=lambda e: (*key(e), e["client"], e["server"],
                                                 e["protocol"]))
    data = dict(data, edges=edges[:top] if top else edges)
    if top:
        data["edges_total"] = len(edges)
    return data


def _show_silent_servers(console, servers):
    """Calls addressed to one server (a host) that timed out: which host."""
    if not servers:
        return
    from rich.table import Table
    table = Table(title="Servers that stopped answering (calls to them timed out)")
    for column in ("target (server)", "timeouts", "first / last seen", "callers", "methods"):
        table.add_column(column, justify="right" if column == "timeouts" else "left")
    for row in servers:
        table.add_row(f"[red]{_named(row['target'], row['server'])}[/red]",
                      str(row["timeouts"]),
                      f"{_when(row['first_seen'])} / {_when(row['last_seen'])}",
                      ", ".join(row["callers"]), ", ".join(row["operations"]))
    console.print(table)


def _show_silent_reporters(console, reporters):
    """Periodic reporters (state reports) that stopped sending: which host."""
    if not reporters:
        return
    from rich.table import Table
    table = Table(title="Periodic reporters that went silent (no report for 3+ intervals)")
    for column in ("host", "reporter", "interval", "missed", "last seen"):
        table.add_column(column, justify="right" if column in ("interval", "missed")
                         else "left")
    for row in reporters:
        table.add_row(f"[red]{row['host']}[/red]",
                      f"{row['service']} -> {row['target']} {row['method']}",
                      f"{row['interval_seconds']:g}s", str(row["missed"]),
                      _when(row["last_seen"]) + (" (process exited)" if row["ended"] else ""))
    console.print(table)


def _named(service, server):
    """``compute (os-compute-1)``: a service or topic and the server it ran on, if known."""
    return f"{service} ({server})" if server else f"{service}"


def _count(value):
    return "-" if value is None else formatting.number(value)


class _Chains:
    @staticmethod
    def fetch(args):
        return _get(args, "/api/chains", since=args.since, limit=args.limit)

    @staticmethod
    def show(console, data):
        from rich.table import Table
        table = Table(title=f"Error chains, last {data['since_seconds']:.0f}s "
                            "(origin first)", show_lines=True)
        for column in ("count", "origin", "chain", "first / last seen", "examples"):
            table.add_column(column, justify="right" if column == "count" else "left")
        for chain in data["chains"]:
            origin = chain["origin"]
            path = "\n-> ".join(
                f"{h['service']} {h['operation']} ({h['error'] or 'ok'})"
                for h in chain["hops"] if h["side"] == "server" or h is chain["hops"][0])
            if chain["absorbed"]:
                path += "\n[yellow]absorbed: the caller succeeded[/yellow]"
            examples = "\n".join(e["request_id"] or e["trace_id"] for e in chain["examples"])
            table.add_row(str(chain["count"]),
                          f"{_named(origin['service'], origin.get('server'))}\n"
                          f"{origin['operation']}\n{origin['error']}",
                          path, f"{_when(chain['first_seen'])}\n{_when(chain['last_seen'])}",
                          examples)
        console.print(table)
        if not data["chains"]:
            console.print("No error chains in this period.")


class _Trace:
    @staticmethod
    def fetch(args):
        return _get(args, "/api/traces/" + urllib.parse.quote(args.id, safe=""))

    @staticmethod
    def show(console, data):
        from rich.table import Table
        hops = data["hops"]
        starts = [h["start"] for h in hops if h.get("start") is not None]
        zero = min(starts) if starts else 0.0
        traces = data.get("trace_ids") or [data["trace_id"]]
        title = f"Trace {data['trace_id']}"
        if data.get("entry_request_id") and not data.get("request_id"):
            title += f", request {data['entry_request_id']}"
        if data.get("request_id"):
            # A request id answers with the whole request: its traces
            # joined, the entry's first (exporters/history.py).
            title = (f"Request {data['request_id']}: " + (title if len(traces) == 1 else
                     f"{len(traces)} traces, entry {data['trace_id']}"))
        table = Table(title=title)
        for column in ("at", "service", "side", "proto", "operation", "peer/target",
                       "duration", "error", "request id"):
            table.add_column(column)
        for hop in hops:
            at = f"+{(hop['start'] - zero) * 1000:.1f} ms" if hop.get("start") else "-"
            # A server hop's server is where it ran; a client hop's, where it was sent.
            server = hop.get("server")
            table.add_row(at, _named(hop["service"], server if hop["side"] == "server" else None),
                          hop["side"], hop["protocol"], hop.get("operation") or "-",
                          hop.get("peer") if hop["side"] == "server"
                          else _named(hop.get("target"), server),
                          _seconds(hop.get("duration")),
                          f"[red]{hop['error']}[/red]" if hop.get("error") else "",
                          hop.get("request_id") or "")
        console.print(table)
        for chain in data["chains"]:
            origin = chain["origin"]
            console.print(f"chain: origin {_named(origin['service'], origin.get('server'))} "
                          f"{origin['operation']} "
                          f"{origin['error']} -> entry {chain['entry']['service']} "
                          f"{chain['entry']['operation']}"
                          + (" (absorbed)" if chain["absorbed"] else ""))


run_graph = _run(_Graph)
run_chains = _run(_Chains)
run_lost = _run(_Lost)
run_trace = _run(_Trace)
