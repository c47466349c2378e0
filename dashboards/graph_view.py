"""The communication graph as a picture: select what to show, lay it out with Graphviz.

The collector's graph JSON (``Collector.graph``) goes in; an SVG comes out,
laid out by Graphviz's ``dot`` (Debian package ``graphviz``) on the server, so
the browser gets a finished picture and no layout code runs in it. Every node
and edge carries an ``id`` (``node:SERVICE``, ``edge:CLIENT->SERVER:PROTOCOL``)
and classes (health, protocol, ``found``) that the page's script hooks clicks on.

RPC edges are solid with a filled arrow, REST edges dashed with an open one;
thickness grows with the rate, colour is health; a node's badge counts the
replies waited for and the timeouts of the calls into it.

Layout: up to LAYERED_MAX_EDGES edges, ``dot`` lays the graph out in layers,
callers left of callees, each edge labelled. Denser graphs (a whole region:
30 services, 100 edges) go to ``neato``, a force layout that keeps node boxes
apart (overlap=prism) and stays compact where layers would grow thousands of
points wide through call cycles; their rate labels are external and Graphviz
drops those that would collide (the numbers stay in tooltips and the click-
through table).
"""

import collections
import html
import math
import shutil
import subprocess

from commlens.dashboards import filters
from commlens.dashboards import formatting
from commlens.dashboards import health

DOT_TIMEOUT_SECONDS = 20
LAYERED_MAX_EDGES = 40
MAX_DEPTH = 10


class GraphvizMissing(RuntimeError):
    """dot is not installed or failed; the message says what to do."""


class UnknownService(ValueError):
    pass


def edge_id(edge):
    return f"{edge['client']}->{edge['server']}:{edge['protocol']}"


def select(graph, focus=None, depth=1, hide=None, find=None):
    """(nodes, edges, found ids) after focus, hide and find.

    ``focus`` keeps one service and its neighbours ``depth`` steps away, in
    either direction; ``hide`` removes what matches a filter expression (a
    hidden node takes its edges along); ``find`` marks what matches.
    """
    nodes = {node["service"]: node for node in graph["nodes"]}
    edges = list(graph["edges"])
    if focus:
        if focus not in nodes:
            raise UnknownService(f"no service {focus!r} in the graph of this window")
        keep = _neighbourhood(focus, edges, max(0, min(depth, MAX_DEPTH)))
        nodes = {name: node for name, node in nodes.items() if name in keep}
        edges = [e for e in edges if e["client"] in keep and e["server"] in keep]
    if hide:
        hidden = filters.parse(hide)
        hidden_nodes = {name for name, node in nodes.items()
                        if hidden(filters.node_fields(node, edges))}
        nodes = {name: node for name, node in nodes.items() if name not in hidden_nodes}
        edges = [e for e in edges if e["client"] not in hidden_nodes
                 and e["server"] not in hidden_nodes and not hidden(filters.edge_fields(e))]
    found = set()
    if find:
        wanted = filters.parse(find)
        found |= {"node:" + name for name, node in nodes.items()
                  if wanted(filters.node_fields(node, edges))}
        found |= {"edge:" + edge_id(e) for e in edges if wanted(filters.edge_fields(e))}
    return list(nodes.values()), edges, found


def _neighbourhood(focus, edges, depth):
    adjacent = collections.defaultdict(set)
    for edge in edges:
        adjacent[edge["client"]].add(edge["server"])
        adjacent[edge["server"]].add(edge["client"])
    keep, frontier = {focus}, {focus}
    for _ in range(depth):
        frontier = {n for f in frontier for n in adjacent[f]} - keep
        keep |= frontier
    return keep


DEFAULT_TOLERANCES = health.Tolerances()


def layout_engine(edges):
    return "dot" if len(edges) <= LAYERED_MAX_EDGES else "neato"


def to_dot(nodes, edges, found=frozenset(), tolerances=DEFAULT_TOLERANCES):
    layered = layout_engine(edges) == "dot"
    layout = ("rankdir=LR, nodesep=0.35, ranksep=1.1" if layered else
              'overlap=prism, sep="+14", splines=true, forcelabels=false')
    label = "label" if layered else "xlabel"
    lines = ["digraph commlens {",
             f'  graph [{layout}, bgcolor="transparent", fontname="Helvetica", pad=0.3];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11, '
             'fillcolor="#ffffff", penwidth=2, margin="0.12,0.06"];',
             '  edge [fontname="Helvetica", fontsize=9, arrowsize=0.7];']
    for node in sorted(nodes, key=lambda n: n["service"]):
        name = node["service"]
        fields = filters.node_fields(node, edges)
        waiting, timeouts = fields["waiting"], fields["timeouts"]
        state = tolerances.classify(node["error_ratio"], node["rate_in"], waiting)
        classes = [state] + (["found"] if "node:" + name in found else [])
        # Not instrumented (Kiali's unknown nodes): dashed and grey, known
        # only from its callers, or only by its client's User-Agent.
        outside = not node.get("instrumented", True)
        if outside:
            classes.append("uninstrumented")
        origin = node.get("origin")
        classes += ["origin"] if origin else ["passes-on"] if node.get("passes_errors_on") else []
        lines.append(
            f"  {_q(name)} [id={_q('node:' + name)}, class={_q(' '.join(classes))}, "
            + ('style="rounded,filled,dashed", fillcolor="#f4f4f4", ' if outside else "")
            + f"color={_q(ORIGIN_COLOUR if origin else health.COLOURS[state])}, "
            + ("peripheries=2, " if origin else "")
            + f"penwidth={4 if 'found' in classes or origin else 2}, "
            f"tooltip={_q(_node_tooltip(node, waiting, timeouts, state))}, "
            f"label=<{_node_label(node, waiting, timeouts)}>];")
    for edge in sorted(edges, key=edge_id):
        state = tolerances.classify(edge["error_ratio"], edge["rate"],
                                    edge.get("waiting_replies", 0.0))
        ident = "edge:" + edge_id(edge)
        classes = [edge["protocol"], state] + (["found"] if ident in found else [])
        rpc = edge["protocol"] == "rpc"
        lines.append(
            f"  {_q(edge['client'])} -> {_q(edge['server'])} [id={_q(ident)}, "
            f"class={_q(' '.join(classes))}, color={_q(health.COLOURS[state])}, "
            f"fontcolor={_q(health.COLOURS[state])}, "
            f"style={'solid' if rpc else 'dashed'}, arrowhead={'normal' if rpc else 'empty'}, "
            f"penwidth={_thickness(edge['rate']) + (2 if ident in found else 0):.1f}, "
            f"{label}={_q(_edge_label(edge))}, tooltip={_q(_edge_tooltip(edge, state))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_source, engine="dot"):
    program = shutil.which(engine)
    if program is None:
        raise GraphvizMissing(f"Graphviz's {engine} is not installed (Debian: apt install "
                              "graphviz; scripts/setup installs it)")
    try:
        result = subprocess.run([program, "-Tsvg"], input=dot_source, capture_output=True,
                                text=True, timeout=DOT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise GraphvizMissing(f"{engine} took over {DOT_TIMEOUT_SECONDS}s to lay the graph "
                              "out; narrow it with focus or hide") from None
    if result.returncode != 0:
        raise GraphvizMissing(f"{engine} failed: {result.stderr.strip()[:300]}")
    svg = result.stdout
    # Drop the XML prolog and DOCTYPE: the SVG goes inline into the page.
    return svg[svg.index("<svg"):]


def _thickness(rate):
    return 1.0 + min(5.0, math.log10(1.0 + rate) * 2.0)


_rate = formatting.rate
_percent = formatting.percent


def _latency(edge, name):
    """An edge's percentile of successful calls, ``~`` in front of an estimate."""
    return formatting.duration(edge.get(f"ok_{name}_seconds"),
                               edge.get(f"ok_{name}_estimated", False))


def _edge_label(edge):
    parts = [_rate(edge["rate"])]
    if edge["error_ratio"] > 0:
        parts.append(f"{_percent(edge['error_ratio'])} err")
    if edge.get("waiting_replies"):
        parts.append(f"{edge['waiting_replies']:.0f} waiting")
    return " · ".join(parts)


def _edge_tooltip(edge, state):
    by_client = (", counted by the caller: the server is not instrumented"
                 if edge.get("measured_by") == "client" else "")
    return (f"{edge['client']} -> {edge['server']} ({edge['protocol'].upper()}, {state}): "
            f"{_rate(edge['rate'])}, {_percent(edge['error_ratio'])} errors, "
            f"p50 {_latency(edge, 'p50')}, p99 {_latency(edge, 'p99')} "
            f"(successful calls{by_client}; ~ marks an estimate)"
            + (f"; vs baseline: {formatting.change(edge['change'])}" if "change" in edge else ""))


def _outside_note(node):
    """How a node that does not report itself is known, or None."""
    if node.get("instrumented", True):
        return None
    if node.get("user_agent"):
        return f"unknown caller ({node['user_agent']})"
    return "not instrumented"


def _node_tooltip(node, waiting, timeouts, state):
    note = _outside_note(node)
    return (f"{node['service']} ({state}{', ' + note if note else ''}): "
            f"in {_rate(node['rate_in'])}, out "
            f"{_rate(node['rate_out'])}, {_percent(node['error_ratio'])} errors, "
            f"{waiting:.0f} replies waited for, {timeouts:.0f} timeouts"
            + (f"; {_origin_text(node['origin'])}" if node.get("origin") else "")
            + ("; passes errors on: no chain starts here" if node.get("passes_errors_on")
               else ""))


# Where chains start: a colour no health state uses, so the eye goes to the
# origin before the services it broke (issue 18 item 5).
ORIGIN_COLOUR = "#6a1b9a"


def _origin_text(origin):
    """``origin of 12 chains (compute-1)``."""
    where = ", ".join(origin["servers"] or origin["topics"])
    count = origin["chains"]
    return f"origin of {count} chain{'s' if count != 1 else ''}" + (f" ({where})" if where else "")


def _node_label(node, waiting, timeouts):
    note = _outside_note(node)
    title = (html.escape(note) if node.get("user_agent")
             else f"<B>{html.escape(node['service'])}</B>")
    rows = [f"<TR><TD>{title}</TD></TR>"]
    if note and not node.get("user_agent"):
        rows.append(f'<TR><TD><FONT POINT-SIZE="8" COLOR="#666666">{note}</FONT></TD></TR>')
    rows.append(f"<TR><TD><FONT POINT-SIZE=\"9\">in {_rate(node['rate_in'])}"
                f" · {_percent(node['error_ratio'])} err</FONT></TD></TR>")
    if node.get("origin"):
        rows.append(f'<TR><TD BGCOLOR="{ORIGIN_COLOUR}"><FONT COLOR="white" POINT-SIZE="9">'
                    f"<B>{html.escape(_origin_text(node['origin']))}</B></FONT></TD></TR>")
    elif node.get("passes_errors_on"):
        rows.append('<TR><TD><FONT POINT-SIZE="8" COLOR="#666666">passes errors on'
                    "</FONT></TD></TR>")
    if waiting or timeouts:
        badge = " · ".join(text for value, text in (
            (waiting, f"{waiting:.0f} waiting"), (timeouts, f"{timeouts:.0f} timeouts"))
            if value)
        rows.append(f'<TR><TD BGCOLOR="#ef6c00"><FONT COLOR="white" POINT-SIZE="9">'
                    f"{badge}</FONT></TD></TR>")
    return f'<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1">{"".join(rows)}</TABLE>'


def _q(text):
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'
