"""``commlens emulate`` on the real broker: many agents, bounded series."""

import json
import subprocess
import sys

import pytest

from support import free_port

pytestmark = pytest.mark.slow


def _emulate(agents, *extra):
    done = subprocess.run(
        [sys.executable, "-m", "commlens.cli.main", "emulate", "--agents", str(agents),
         "--processes", "4", "--interval", "3", "--duration", "8",
         "--listen", f"127.0.0.1:{free_port()}", "--json", *extra],
        capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_200_agents_all_report_and_the_series_do_not_grow_with_them(rabbitmq):
    report = _emulate(200)
    assert report["agents_seen_by_control_plane"] == 200
    assert report["report_timeouts"] == 0 and report["report_errors"] == 0
    # 200 agents reporting every 3 s for 8 s, give or take a timer.
    assert report["reports_ok"] >= 400
    assert report["control_plane_rpc_per_second"] > 40
    assert report["reply_wait_p99_seconds"] is not None
    assert report["max_queue_ready"] is not None  # the management API answered
    assert report["collector"]["rss_mib"] > 0
    assert report["series_with_host_labels"] == 0

    few = _emulate(8)
    assert few["agents_seen_by_control_plane"] == 8
    # Per-agent series would add hundreds. An outcome one run saw and the other
    # did not (a ping timing out on a loaded CI machine) adds a reply-wait
    # histogram (19 lines) and its error counter: allow two of those.
    assert abs(report["prometheus_series"] - few["prometheus_series"]) <= 42


def test_bad_arguments_are_clear_errors():
    done = subprocess.run([sys.executable, "-m", "commlens.cli.main", "emulate",
                           "--transport", "fake://", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs --transport rabbit://" in done.stderr


def test_more_agents_than_the_broker_has_files_for_is_refused_before_anything_starts(rabbitmq):
    """Past its open-files limit RabbitMQ breaks for everyone (queue declarations
    time out until it is restarted): emulate says so and starts nothing."""
    done = subprocess.run(
        [sys.executable, "-m", "commlens.cli.main", "emulate", "--agents", "1000000",
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "RabbitMQ allows" in done.stderr and "1000000 agents need about" in done.stderr
    assert "guest" not in done.stderr


def test_a_large_run_is_refused_when_the_broker_limit_cannot_be_read(rabbitmq):
    """No management API to ask: a run beyond RabbitMQ's usual 1,024 files is
    refused rather than risk breaking the broker for everyone."""
    done = subprocess.run(
        [sys.executable, "-m", "commlens.cli.main", "emulate", "--agents", "5000",
         "--rabbitmq-management-url", f"http://guest:guest@127.0.0.1:{free_port()}/",
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "limit could not be read" in done.stderr and "5000 agents need about" in done.stderr
    assert "guest" not in done.stderr
