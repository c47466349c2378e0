"""The graph's find/hide expressions: ``rate > 10``, ``err% > 5``, ``waiting > 0``,
``service = nova-conductor``, joined with ``and`` / ``or`` (``and`` binds tighter).

Fields of nodes and edges alike:

- ``rate``: requests per second (into a node; along an edge)
- ``err%``: error percentage
- ``waiting``: RPC replies being waited for (into a node; along an edge)
- ``timeouts``: RPC timeouts in the window
- ``p99``: 99th percentile latency of successful calls, milliseconds (edges)
- ``service``: the node's name; an edge matches when either end does
- ``protocol``: ``rpc`` or ``http`` (edges; a node matches when any of its edges does)

Operators: ``>``, ``>=``, ``<``, ``<=``, ``=``, ``!=``; text fields take ``=``
and ``!=`` only, with ``*`` as a wildcard (``service = nova-*``).
"""

import fnmatch
import operator
import re

NUMBER_FIELDS = {"rate", "err%", "waiting", "timeouts", "p99"}
TEXT_FIELDS = {"service", "protocol"}
OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
             "=": operator.eq, "!=": operator.ne}
MAX_LENGTH = 500
_TERM = re.compile(r"^\s*(?P<field>[a-z%0-9]+)\s*(?P<op>>=|<=|!=|=|>|<)\s*(?P<value>\S+)\s*$")


class FilterError(ValueError):
    """The expression cannot be understood; the message says where and why."""


def parse(expression):
    """A predicate over a dict of field values (see ``node_fields``/``edge_fields``)."""
    if len(expression) > MAX_LENGTH:
        raise FilterError(f"expression longer than {MAX_LENGTH} characters")
    alternatives = []
    for alternative in re.split(r"\s+or\s+", expression.strip()):
        alternatives.append([_term(t) for t in re.split(r"\s+and\s+", alternative)])
    return lambda fields: any(all(term(fields) for term in terms) for terms in alternatives)


def _term(text):
    match = _TERM.match(text)
    if not match:
        raise FilterError(f"{text.strip()!r}: expected FIELD OP VALUE, e.g. 'rate > 10' "
                          f"or 'service = nova-conductor'")
    field, op, value = match["field"], match["op"], match["value"]
    if field in NUMBER_FIELDS:
        try:
            number = float(value)
        except ValueError:
            raise FilterError(f"{text.strip()!r}: {field} takes a number, not {value!r}") \
                from None
        compare = OPERATORS[op]
        return lambda fields: _numbers(fields.get(field), compare, number)
    if field in TEXT_FIELDS:
        if op not in ("=", "!="):
            raise FilterError(f"{text.strip()!r}: {field} takes = or != only")
        wanted = op == "="
        return lambda fields: any(fnmatch.fnmatchcase(v, value)
                                  for v in fields.get(field, ())) == wanted
    known = ", ".join(sorted(NUMBER_FIELDS | TEXT_FIELDS))
    raise FilterError(f"{text.strip()!r}: unknown field {field!r} (known: {known})")


def _numbers(value, compare, number):
    return value is not None and compare(value, number)


def node_fields(node, edges):
    """Filter fields of a graph node, with the edges that touch it."""
    inbound = [e for e in edges if e["server"] == node["service"]]
    return {"rate": node["rate_in"], "err%": 100.0 * node["error_ratio"],
            "waiting": sum(e.get("waiting_replies", 0.0) for e in inbound),
            "timeouts": sum(e.get("timeouts", 0.0) for e in inbound), "p99": None,
            "service": (node["service"],),
            "protocol": tuple({e["protocol"] for e in edges
                               if node["service"] in (e["client"], e["server"])})}


def edge_fields(edge):
    p99 = edge.get("ok_p99_seconds", edge.get("p99_seconds"))
    return {"rate": edge["rate"], "err%": 100.0 * edge["error_ratio"],
            "waiting": edge.get("waiting_replies", 0.0), "timeouts": edge.get("timeouts", 0.0),
            "p99": None if p99 is None else 1000.0 * p99,
            "service": (edge["client"], edge["server"]), "protocol": (edge["protocol"],)}
