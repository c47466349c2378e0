"""A single collector on the real RabbitMQ killed with SIGKILL (what the OOM
killer or a lost node does: no handler runs, open traces are not saved) and
started again on its history file: the hops it had taken and acknowledged
come back from the history's journal, what was shipped meanwhile from its
queue; every trace complete, chains and counter totals exact, nothing
counted twice, even a message the broker delivers again after it was
journalled (docs/architecture.md, "A hop is acknowledged once it is durable").
"""

import contextlib
import uuid

import pika
import pytest

from commlens.exporters import journal as journal_mod
from commlens.tracer import recorder as recorder_mod
from support import add_error_traces, collector_ready, free_port, run_collector, ship_recorders
from support import wait_for

pytestmark = pytest.mark.slow

# Long enough that the traces are still open when the collector is killed.
TRACE_QUIET = "6s"


def _export_url():
    run = uuid.uuid4().hex[:8]
    return (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-killed-{run}"
            f"&queue=commlens.killed-{run}", f"commlens.killed-{run}")


def _start(stack, export_url, tmp_path, port):
    collector = stack.enter_context(run_collector(
        export_url, tmp_path, ["--trace-quiet", TRACE_QUIET], port=port))
    wait_for(lambda: collector_ready(collector), timeout=30, message="collector")
    return collector


def _killed_with_open_traces(stack, tmp_path, count):
    """A collector that took ``count`` traces from three processes and was
    killed with SIGKILL with them open in its window, none stored. Returns
    (export URL, queue, port, the processes' recorders, the trace ids)."""
    export_url, queue = _export_url()
    port = free_port()
    recorders = [recorder_mod.Recorder(f"svc-{i}") for i in range(3)]
    collector = _start(stack, export_url, tmp_path, port)
    trace_ids = add_error_traces(recorders, count)
    ship_recorders(export_url, recorders)
    wait_for(lambda: collector.metrics().value("commlens_collector_open_traces") == count,
             timeout=30, interval=0.05, message=f"{count} open traces")
    assert collector.json("/api/chains?since=1h")["chains"] == []
    collector.process.kill()
    collector.process.wait(30)
    return export_url, queue, port, recorders, trace_ids


def _chains_counted(collector):
    return sum(c["count"] for c in collector.json("/api/chains?since=1h&limit=1000")["chains"])


def _assert_complete(collector, trace_ids):
    for trace_id in trace_ids:
        trace = collector.trace(trace_id)
        assert len({h["span_id"] for h in trace["hops"]}) == len(trace["hops"]) == 3, trace_id
        assert len(trace["chains"]) == 1


def test_a_collector_killed_with_open_traces_loses_nothing_and_counts_nothing_twice(
        rabbitmq, tmp_path):
    with contextlib.ExitStack() as stack:
        export_url, _queue, port, recorders, open_traces = _killed_with_open_traces(
            stack, tmp_path, 20)
        # Shipped while no collector runs: waits in the queue.
        meanwhile = add_error_traces(recorders, 10)
        ship_recorders(export_url, recorders)

        second = _start(stack, export_url, tmp_path, port)  # the same history file
        wait_for(lambda: _chains_counted(second) >= 30, timeout=60, message="30 chains")
        assert _chains_counted(second) == 30
        _assert_complete(second, open_traces + meanwhile)
        metrics = second.metrics()
        # The hops of the open traces came back from the journal, the others
        # from the queue, each once.
        assert metrics.value("commlens_collector_hops_total", outcome="reloaded") == 60
        assert metrics.value("commlens_collector_hops_total", outcome="assembled") == 30
        assert metrics.value("commlens_collector_hops_total") == 90
        assert metrics.value("commlens_error_chain_total") == 30
        # Counter totals: every process shipped twice, one call each time.
        wait_for(lambda: second.metrics().value("commlens_rpc_sent_total") == 6, timeout=30,
                 message="every process's totals")
        assert "read back from" in second.log()


def test_a_message_journalled_and_then_delivered_again_counts_once(rabbitmq, tmp_path):
    """Killed after the journal was written and before the broker had the
    acknowledgement: the next start reads the message back from the journal
    and the broker delivers it again, marked as redelivered."""
    with contextlib.ExitStack() as stack:
        export_url, queue, port, _recorders, trace_ids = _killed_with_open_traces(
            stack, tmp_path, 5)
        journalled = [body for _number, body in journal_mod.Journal(
            str(tmp_path / f"history-{port}.sqlite.journal")).read()]
        assert journalled
        # Back in the queue as if never acknowledged: taken by a consumer
        # that dies before acknowledging, so the broker marks them redelivered.
        connection = pika.BlockingConnection(pika.URLParameters(
            "amqp://guest:guest@127.0.0.1:5672/"))
        channel = connection.channel()
        for body in journalled:
            channel.basic_publish("", queue, body)
        taken = []
        wait_for(lambda: taken.append(channel.basic_get(queue)[0]) or
                 len([m for m in taken if m is not None]) == len(journalled),
                 timeout=30, message="the copies taken")
        connection.close()

        second = _start(stack, export_url, tmp_path, port)
        wait_for(lambda: _chains_counted(second) >= 5, timeout=60, message="5 chains")
        _assert_complete(second, trace_ids)
        metrics = second.metrics()
        assert metrics.value("commlens_collector_hops_total", outcome="reloaded") == 15
        assert metrics.value("commlens_collector_hops_total", outcome="redelivered") == 15
        assert metrics.value("commlens_collector_hops_total", outcome="duplicate") == 0
        assert metrics.value("commlens_collector_hops_total", outcome="assembled") == 0
        assert _chains_counted(second) == 5
        assert metrics.value("commlens_error_chain_total") == 5
