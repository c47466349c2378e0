"""How close RPC calls run to their timeout, per edge of the graph.

Callers record each finished call's reply wait as a fraction of its timeout
(``commlens_rpc_timeout_budget_used``, tracer/metrics.py) and count the calls
past half of it (``commlens_rpc_calls_over_half_timeout_total``). Here those
series, recorded by topic and method, go onto the edges the graph draws,
paired with the services that answered them as graph.Consumers pairs every
caller series, so ``/api/graph`` edges carry a ``timeout_budget``
(docs/operator-guide.md): percentiles of the fraction, calls over half
per second, and the timeout the calls ran against.

The timeout itself is no label (its values are the operator's), so it is
read back from the sums: reply waits divided by the fractions they were,
over the same calls. That is the timeout exactly when the calls of an edge
share one (``rpc_response_timeout``, or one ``prepare(timeout=)``), and
their average weighted by wait when they do not.
"""

import collections

from commlens.exporters import graph
from commlens.tracer import metrics

_BOUNDS = metrics.BUDGET_BUCKETS
_CALL = "call"


class BudgetTotals:
    """Cumulative figures of one edge's calls at one moment: the fractions
    of their timeouts (a graph.Latency in the budget's buckets, with its
    sum), the calls over half, and the sum of their reply waits."""

    __slots__ = ("used", "used_sum", "over_half", "wait_sum")

    def __init__(self):
        self.used = graph.Latency([0] * (len(_BOUNDS) + 1))
        self.used_sum = 0.0
        self.over_half = 0.0
        self.wait_sum = 0.0


def budget_totals(counters, histograms, consumers):
    """{(client, server, "rpc"): BudgetTotals} from merged series, each
    caller series on the services ``consumers`` pairs it with."""
    edges = collections.defaultdict(BudgetTotals)

    def shares(labels):
        service, topic, method = labels[:3]
        return [(edges[(service, server, graph.RPC)], share)
                for server, share in consumers.servers(service, topic, method, _CALL)]

    for (name, labels), (counts, total, low, high) in histograms.items():
        if name == metrics.RPC_TIMEOUT_BUDGET.name:
            for totals, share in shares(labels):
                totals.used.add(counts, low, high, share)
                totals.used_sum += total * share
        elif name == metrics.RPC_REPLY_WAIT.name:
            for totals, share in shares(labels):
                totals.wait_sum += total * share
    for (name, labels), value in counters.items():
        if name == metrics.RPC_OVER_HALF_TIMEOUT.name:
            for totals, share in shares(labels):
                totals.over_half += value * share
    return dict(edges)


def add_timeout_budget(edges, current, baseline, seconds, histograms=False):
    """Set ``timeout_budget`` on the RPC edges of a graph (None where no
    call with a timeout ended in the window), from two ``budget_totals``
    maps ``seconds`` apart; ``histograms``: with what a peer replica merges
    (exporters/fleet.py)."""
    for edge in edges:
        if edge["protocol"] != graph.RPC:
            continue
        key = (edge["client"], edge["server"], edge["protocol"])
        edge["timeout_budget"] = edge_budget(current.get(key), baseline.get(key), seconds,
                                             histograms)


def edge_budget(now, then, seconds, histograms=False):
    """One edge's ``timeout_budget`` from its BudgetTotals now and ``seconds``
    earlier (None: before any); None when no call with a timeout ended."""
    if now is None:
        return None
    then = then or BudgetTotals()
    over_half = max(0.0, now.over_half - then.over_half)
    return _figures(now.used.since(then.used), over_half, over_half / max(seconds, 1e-3),
                    now.used_sum - then.used_sum, now.wait_sum - then.wait_sum, histograms)


def merge(budgets):
    """One ``timeout_budget`` from replicas' (each with its buckets and sums:
    ``histograms``), or None if none has one: counts and rates added,
    percentiles from the added buckets."""
    budgets = [b for b in budgets if isinstance(b, dict)]
    if not budgets:
        return None
    used = graph.Latency([0] * (len(_BOUNDS) + 1))
    over_half = per_second = used_sum = wait_sum = 0.0
    for budget in budgets:
        part = graph.latency_from_json(budget.get("used"), len(_BOUNDS) + 1)
        used.add(part.counts, part.low, part.high)
        over_half += _number(budget.get("over_half"))
        per_second += _number(budget.get("over_half_per_second"))
        used_sum += _number(budget.get("used_sum"))
        wait_sum += _number(budget.get("wait_sum"))
    return _figures(used, over_half, per_second, used_sum, wait_sum, histograms=False)


def _figures(used, over_half, per_second, used_sum, wait_sum, histograms):
    calls = sum(used.counts)
    if calls <= 0:
        return None
    budget = {"calls": calls, "over_half": over_half, "over_half_per_second": per_second,
              "over_half_ratio": min(1.0, over_half / calls),
              "timeout_seconds": wait_sum / used_sum if used_sum > 0 and wait_sum > 0 else None}
    for name, q in graph.PERCENTILES:
        value, low, high = graph.quantile(q, used, bounds=_BOUNDS)
        budget[name] = value
        budget[f"{name}_range"] = [low, high]
    if histograms:
        budget.update(used=graph.latency_json(used), used_sum=used_sum, wait_sum=wait_sum)
    return budget


def _number(value):
    return float(value) if isinstance(value, (int, float)) and value >= 0 else 0.0
