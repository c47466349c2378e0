"""Merging replicas' answers (exporters/fleet.py), and a peer that never
answers: graph rates add up, percentiles come from the added buckets (never
averaged), chains group by key, a split trace's hops are joined, and a
hanging peer costs the deadline, no more."""

import socket
import threading
import time

from commlens.exporters import collector as collector_mod
from commlens.exporters import fleet
from commlens.exporters import graph
from commlens.tracer import metrics

_N = len(metrics.LATENCY_BUCKETS) + 1


def _latency(bucket, count, value):
    counts = [0] * _N
    counts[bucket] = count
    return {"counts": counts, "low": value, "high": value}


def _edge(rate, requests, failed, latency, waiting=0.0):
    return {"client": "nova-api", "server": "nova-conductor", "protocol": "rpc",
            "rate": rate, "requests": requests, "failed": failed, "timeouts": 0.0,
            "waiting_replies": waiting, "measured_by": "server",
            "latency": latency, "ok_latency": latency}


def _node(service, rate_in, rate_out, processes):
    return {"service": service, "rate_in": rate_in, "rate_out": rate_out,
            "failed_in": 0.0, "processes": processes, "instrumented": True,
            "user_agent": None}


def test_graph_rates_add_and_percentiles_come_from_the_added_buckets():
    fast = metrics.LATENCY_BUCKETS.index(0.01)
    slow = metrics.LATENCY_BUCKETS.index(1.0)
    # Replica one: 90 fast calls; replica two: 10 slow ones. Their p99s
    # averaged would be about half a second; the fleet's p99 is a slow call
    # and its p50 a fast one.
    one = {"edges": [_edge(9.0, 90, 0, _latency(fast, 90, 0.01), waiting=2)],
           "nodes": [_node("nova-api", 0, 9.0, 1), _node("nova-conductor", 9.0, 0, 2)]}
    two = {"edges": [_edge(1.0, 10, 5, _latency(slow, 10, 0.9), waiting=1)],
           "nodes": [_node("nova-api", 0, 1.0, 2), _node("nova-conductor", 1.0, 0, 1)]}
    merged = fleet.merge_graphs([one, two])
    (edge,) = merged["edges"]
    assert edge["rate"] == 10.0 and edge["requests"] == 100 and edge["failed"] == 5
    assert edge["error_ratio"] == 0.05
    assert edge["waiting_replies"] == 3
    assert edge["p50_seconds"] == 0.01
    # In the slow calls' bucket, within the extremes of them all.
    low, high = edge["p99_range_seconds"]
    assert low >= 0.5 and high == 0.9 and low <= edge["p99_seconds"] <= high
    assert edge["ok_p99_seconds"] == edge["p99_seconds"]
    nodes = {n["service"]: n for n in merged["nodes"]}
    assert nodes["nova-conductor"]["rate_in"] == 10.0
    assert nodes["nova-api"]["processes"] == 3


def test_chains_merge_by_key_with_counts_added_and_first_and_last_seen_widened():
    def row(count, first, last, trace):
        return {"key": "k1", "origin": {"service": "a"}, "entry": {"service": "b"},
                "absorbed": False, "hops": [], "count": count, "first_seen": first,
                "last_seen": last, "examples": [{"trace_id": trace, "request_id": None}]}
    other = dict(row(7, 5.0, 6.0, "t3"), key="k2")
    merged = fleet.merge_chains([[row(2, 10.0, 20.0, "t1")], [row(3, 5.0, 15.0, "t2"), other]])
    assert [(c["key"], c["count"], c["first_seen"], c["last_seen"]) for c in merged] == [
        ("k2", 7, 5.0, 6.0), ("k1", 5, 5.0, 20.0)]
    assert [e["trace_id"] for e in merged[1]["examples"]] == ["t1", "t2"]
    # The same answer whichever replica merges.
    assert merged == fleet.merge_chains([[row(3, 5.0, 15.0, "t2"), other],
                                         [row(2, 10.0, 20.0, "t1")]])


def test_a_trace_split_between_replicas_is_joined_and_its_chain_derived_again():
    trace_id = "ab" * 16

    def hop(span, parent, service, side, start):
        return {"trace_id": trace_id, "span_id": span, "parent_id": parent,
                "service": service, "side": side, "protocol": "rpc", "peer": None,
                "target": "conductor", "operation": "build", "kind": "call",
                "outcome": "error", "error": "Boom", "start": start, "duration": 0.1,
                "request_id": None, "global_request_id": None, "server": None}
    entry, call, served = (hop("1" * 16, None, "nova-api", "server", 1.0),
                           hop("2" * 16, "1" * 16, "nova-api", "client", 1.1),
                           hop("3" * 16, "2" * 16, "nova-conductor", "server", 1.2))
    one = {"trace_id": trace_id, "trace_ids": [trace_id], "seen": 5.0, "start": 1.0,
           "duration": 0.3, "hops": [entry, call], "chains": []}
    two = {"trace_id": trace_id, "trace_ids": [trace_id], "seen": 6.0, "start": 1.2,
           "duration": 0.1, "hops": [served, call], "chains": []}
    joined = fleet.merge_traces([None, two, one])
    assert [h["span_id"] for h in joined["hops"]] == ["1" * 16, "2" * 16, "3" * 16]
    assert joined["seen"] == 6.0
    (chain,) = joined["chains"]
    assert chain["origin"]["service"] == "nova-conductor"
    assert chain["entry"]["service"] == "nova-api"
    assert fleet.merge_traces([None, None]) is None


def test_silent_servers_merge_by_topic_and_server():
    def row(timeouts, first, last, caller):
        return {"target": "compute", "server": "host-1", "timeouts": timeouts,
                "first_seen": first, "last_seen": last, "callers": [caller],
                "operations": ["build"]}
    (merged,) = fleet.merge_silent_servers([[row(2, 3.0, 4.0, "a")], [row(5, 1.0, 2.0, "b")]])
    assert (merged["timeouts"], merged["first_seen"], merged["last_seen"]) == (7, 1.0, 4.0)
    assert merged["callers"] == ["a", "b"]


def test_method_rows_merge_with_error_ratio_from_added_requests():
    fast = metrics.LATENCY_BUCKETS.index(0.01)
    rows = [{"methods": [{"operation": "conductor.build", "rate": 1.0, "requests": 10,
                          "errors": 0, "timeouts": 0, "waiting_replies": 1,
                          "ok_latency": _latency(fast, 10, 0.01)}], "series": []},
            {"methods": [{"operation": "conductor.build", "rate": 3.0, "requests": 30,
                          "errors": 4, "timeouts": 1, "waiting_replies": 2,
                          "ok_latency": _latency(fast, 26, 0.01)}], "series": []}]
    (row,) = fleet.merge_details(rows, ("operation",))["methods"]
    assert (row["rate"], row["errors"], row["waiting_replies"]) == (4.0, 4, 3)
    assert row["error_ratio"] == 0.1
    assert row["p50_seconds"] == 0.01


def test_a_peer_that_never_answers_costs_the_deadline_and_is_named():
    # A peer that accepts the connection and never says a word.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    hanging = f"http://127.0.0.1:{listener.getsockname()[1]}"
    replicas = fleet.Fleet(collector_mod.Collector(), "0", [hanging, refused], timeout=0.5)
    try:
        started = time.monotonic()
        answer = replicas.chains(900, 50)
        elapsed = time.monotonic() - started
    finally:
        replicas.close()
        stop.set()
        thread.join(2)
        for connection in accepted:
            connection.close()
        listener.close()
    assert elapsed < 3.0
    assert answer["chains"] == []
    status = answer["replicas"]
    assert status["answered"] == ["0"] and status["partial"] is True
    assert {m["peer"]: m["error"] for m in status["missing"]} == {
        hanging: "timeout", refused: "Connection refused"}


def test_a_latency_a_peer_sends_that_does_not_fit_counts_as_none():
    assert graph.latency_from_json({"counts": [1, 2]}).counts == [0] * _N
    assert graph.latency_from_json(None).low is None


def test_peer_addresses_are_checked_and_never_echo_a_password(monkeypatch):
    import pytest

    from commlens.cli import main

    monkeypatch.delenv("COMMLENS_PEERS", raising=False)
    args = main.build_parser().parse_args(
        ["collector", "--replica", "1", "--peer", "http://a:9780/", "--peer", "http://b:9780"])
    assert main._peers(args) == ["http://a:9780", "http://b:9780"]
    monkeypatch.setenv("COMMLENS_PEERS", "http://c:9780, http://d:9780")
    assert main._peers(main.build_parser().parse_args(["collector"])) == [
        "http://c:9780", "http://d:9780"]
    bad = main.build_parser().parse_args(["collector", "--peer", "http://u:secret@e:9780/x"])
    with pytest.raises(SystemExit) as exc:
        main._peers(bad)
    assert "secret" not in str(exc.value) and "expected http://host:port" in str(exc.value)


def test_peers_without_a_replica_name_are_refused(tmp_path, capsys):
    from commlens.cli import main

    code = main.main(["collector", "--peer", "http://127.0.0.1:1", "--history",
                      str(tmp_path / "h.sqlite"), "--export-url",
                      "amqp://guest:guest@127.0.0.1:5672/"])
    assert code == 2
    assert "--peer needs --replica" in capsys.readouterr().err
