"""How close calls run to their timeout (issue 18, item 3): real RabbitMQ,
real oslo.messaging, a peer process, the collector's /metrics and /api/graph.

The caller is this process ("test-client"); tests/conftest.py runs it over
the compiled send path or its Python twin (``--implementation``).
"""

import oslo_messaging as om
import pytest

from support import COMMLENS_URL, wait_for

pytestmark = pytest.mark.slow

BUDGET = "commlens_rpc_timeout_budget_used"
OVER_HALF = "commlens_rpc_calls_over_half_timeout_total"


def _buckets(metrics, **labels):
    """{le: cumulative count} of the budget histogram's series."""
    return {ls["le"]: value for ls, value in metrics.series(BUDGET + "_bucket", **labels)}


def test_calls_are_measured_against_the_timeout_they_were_given(
        collector, start_peer, rpc_client, topic, conf):
    # A server of its own: the edge holds this test's calls only.
    start_peer(COMMLENS_URL, topic, service="peer-budget-a")
    # rpc_response_timeout (60 s by default) for the client without its own.
    plain = rpc_client(COMMLENS_URL, topic)
    for i in range(4):
        assert plain.call({}, "echo", value=i) == i
    # prepare(timeout=2): a call that takes 1.3 s uses about 65 % of it.
    prepared = rpc_client(COMMLENS_URL, topic, timeout=2)
    assert prepared.call({}, "slow", seconds=1.3) == 1.3
    # One that does not answer within its 1 s: past all of it.
    short = rpc_client(COMMLENS_URL, topic, timeout=1)
    with pytest.raises(om.MessagingTimeout):
        short.call({}, "slow", seconds=2.5)

    labels = dict(service="test-client", target=topic)
    collector.wait_metric(BUDGET + "_count", 6, **labels)
    metrics = collector.metrics()
    echo = _buckets(metrics, method="echo", **labels)
    assert echo["0.1"] == echo["+Inf"] == 4  # milliseconds of 60 s
    slow = _buckets(metrics, method="slow", **labels)
    assert slow["0.5"] == 0 and slow["0.75"] == 1  # 1.3 s of 2 s
    assert slow["0.9"] == 1
    assert slow["+Inf"] == 2  # the timed-out call: 1.0 or above
    assert metrics.value(OVER_HALF, method="slow", **labels) == 2
    assert metrics.value(OVER_HALF, method="echo", **labels) == 0
    # The sum is the fractions' (seconds divided by seconds).
    used_sum = metrics.value(BUDGET + "_sum", method="slow", **labels)
    assert 0.65 + 1.0 <= used_sum < 0.65 + 1.0 + 0.5

    # Each call's client hop carries the timeout it was given; casts none.
    plain.cast({}, "count_cast")
    hops = wait_for(lambda: (lambda found: found if len(found) >= 7 else None)(
        collector.hops(service="test-client", target=topic, side="client")),
        message="client hops")
    timeouts = {(h["operation"], h["kind"], h["timeout"]) for h in hops}
    assert timeouts == {("echo", "call", float(conf.rpc_response_timeout)),
                        ("slow", "call", 2.0), ("slow", "call", 1.0),
                        ("count_cast", "cast", None)}

    # /api/graph: the edge's budget over the window.
    def budget():
        edges = collector.json("/api/graph?window=300")["edges"]
        found = [e.get("timeout_budget") for e in edges
                 if e["client"] == "test-client" and e["server"] == "peer-budget-a"
                 and e["protocol"] == "rpc"]
        return found[0] if found and found[0] and found[0]["calls"] == 6 else None

    edge = wait_for(budget, timeout=30, message="timeout_budget on the edge")
    assert edge["over_half"] == 2 and edge["over_half_ratio"] == pytest.approx(2 / 6)
    assert edge["over_half_per_second"] > 0
    assert edge["p99"] >= 1.0  # the timed-out call
    assert edge["p50"] <= 0.1
    # Three timeouts on one edge: the wait-weighted figure lies within them.
    assert 1.0 <= edge["timeout_seconds"] <= 60.0


def test_an_edge_whose_calls_share_a_timeout_shows_that_timeout(
        collector, start_peer, rpc_client, topic):
    start_peer(COMMLENS_URL, topic, service="peer-budget-b")
    client = rpc_client(COMMLENS_URL, topic, timeout=5)
    for seconds in (0.2, 0.5, 3.0):
        assert client.call({}, "slow", seconds=seconds) == seconds

    def budget():
        edges = collector.json("/api/graph?window=300")["edges"]
        found = [e.get("timeout_budget") for e in edges
                 if e["client"] == "test-client" and e["server"] == "peer-budget-b"]
        return found[0] if found and found[0] and found[0]["calls"] == 3 else None

    edge = wait_for(budget, timeout=30, message="timeout_budget on the edge")
    assert edge["timeout_seconds"] == pytest.approx(5.0, rel=1e-6)
    assert edge["over_half"] == 1  # 3 s of 5
    assert 0.5 < edge["p99"] <= 0.75
