"""The capacity sweep (emulator/sweep.py, ``commlens emulate --sweep``).

The verdicts on generated runs; then a real sweep of 20, 50 and 100 agents
on a RabbitMQ node of the test's own (tests/rabbit_node.py: the shared
broker's few open files are everyone's), with a conductor made small and
slow enough to saturate, a second sweep after a tuning change and the
comparison of the two.
"""

import json
import os
import struct
import subprocess
import sys

import pytest

from commlens.emulator import sweep
from rabbit_node import RabbitNode
from support import free_port


def _run(agents, p99, pool_peak=1, pool_size=64, ready=0, files=50, timeouts=0):
    return {"agents": agents, "interval": 10.0, "reply_wait_p50_seconds": p99 / 2,
            "reply_wait_p99_seconds": p99, "report_timeouts": timeouts, "reports_skipped": 0,
            "control_plane_rpc_per_second": agents / 10.0,
            "conductor_pool": {"size": pool_size, "peak_in_flight": pool_peak},
            "max_queue_ready": {"conductor": ready, "q-plugin": 0},
            "broker_open_files": {"used": files, "total": 1000}, "advice": []}


def test_a_sweep_says_where_waits_grow_and_what_saturates_first():
    runs = [_run(100, 0.05), _run(250, 0.05, pool_peak=20), _run(500, 0.5, pool_peak=62),
            _run(1000, 5.0, pool_peak=64, ready=400, files=400, timeouts=3)]
    verdict = sweep.analyse(runs)
    assert verdict["waits_grow_at"] == 500
    assert verdict["saturates_first"] == {"part": "conductor pool", "agents": 500,
                                          "utilisation": 62 / 64}
    assert "conductor pool saturates first, at 500 agents" in sweep.describe(verdict)


def test_a_sweep_with_room_to_spare_names_the_part_closest_to_saturating():
    runs = [_run(100, 0.05), _run(250, 0.05, files=300), _run(500, 0.1, files=600)]
    verdict = sweep.analyse(runs)
    assert verdict["waits_grow_at"] is None and verdict["saturates_first"] is None
    assert verdict["closest"]["part"] == "broker files"
    assert "nothing saturates" in sweep.describe(verdict)


def test_a_queue_backed_up_by_seconds_of_load_is_saturated():
    # 1,000 agents every 10 s offer 100 reports/s: 150 ready is 1.5 s of them.
    verdict = sweep.analyse([_run(100, 0.05), _run(1000, 0.05, ready=150)])
    assert verdict["saturates_first"]["part"] == "conductor queue"


def test_comparing_two_sweeps_shows_each_size_s_change():
    before = sweep.document([_run(100, 0.05), _run(500, 2.5, pool_peak=64)], {})
    after = sweep.document([_run(100, 0.05, pool_size=128),
                            _run(500, 0.25, pool_peak=64, pool_size=128),
                            _run(1000, 0.5)], {})
    rows, old, new = sweep.compare(before, after)
    changes = {(agents, label): change for agents, label, _a, _b, change in rows}
    assert changes[(500, "p99 wait s")] == pytest.approx(-2.25)
    assert changes[(500, "pool peak")] == pytest.approx(-0.5)
    assert 1000 not in {agents for agents, *_ in rows}  # swept only after
    assert old["saturates_first"]["agents"] == 500 and new["saturates_first"] is None


def test_loading_something_else_than_a_sweep_is_a_clear_error(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "commlens.snapshot/2"}))
    with pytest.raises(ValueError, match="not a sweep"):
        sweep.load(path)


# -- a real sweep ------------------------------------------------------------------

@pytest.fixture(scope="module")
def private_rabbit(tmp_path_factory):
    if not RabbitNode.available():
        pytest.fail("Debian's rabbitmq-server is missing: scripts/setup installs it")
    node = RabbitNode(tmp_path_factory.mktemp("sweep-rabbit"), name="commlens-sweep").start()
    yield node
    node.stop()


def _sweep(node, workdir, name, *extra):
    done = subprocess.run(
        [sys.executable, "-m", "commlens.cli.main", "emulate", "--transport", node.url,
         "--rabbitmq-management-url",
         f"http://guest:guest@127.0.0.1:{node.management_port}/",
         "--processes", "2", "--interval", "3", "--duration", "6",
         "--listen", f"127.0.0.1:{free_port()}", "--save", str(workdir / f"{name}.json"),
         "--plot", str(workdir / f"{name}.png"), *extra],
        capture_output=True, text=True, timeout=600, cwd=workdir,
        env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads((workdir / f"{name}.json").read_text())


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
def test_a_sweep_finds_the_small_conductor_pool_and_a_larger_one_moves_it(private_rabbit,
                                                                          tmp_path):
    """A conductor with 2 workers spending 0.1 s per report: 20 agents every
    3 s keep under one busy; 100 need more than three. The sweep names its
    pool and advises executor_thread_pool_size; with 16 workers the second
    sweep, compared with the first, shows the waits fall."""
    out, small = _sweep(private_rabbit, tmp_path, "before", "--sweep", "20,50,100",
                        "--conductor-pool", "2", "--processing", "0.1")
    assert [run["agents"] for run in small["runs"]] == [20, 50, 100]
    assert all(run["agents_seen_by_control_plane"] == run["agents"] for run in small["runs"])
    assert all(run["conductor_pool"]["size"] == 2 for run in small["runs"])
    assert all(run["broker_open_files"]["total"] > 0 for run in small["runs"])
    verdict = small["verdict"]
    assert verdict["saturates_first"]["part"] == "conductor pool"
    assert verdict["waits_grow_at"] in (50, 100)
    largest = small["runs"][-1]
    assert any(f["option"] == "[DEFAULT] executor_thread_pool_size"
               for f in largest["advice"]), largest["advice"]
    assert "saturates first" in out and "conductor pool" in out
    width, height = _png_size(tmp_path / "before.png")
    assert width >= 600 and height >= 400

    out, large = _sweep(private_rabbit, tmp_path, "after", "--sweep", "100",
                        "--conductor-pool", "16", "--processing", "0.1",
                        "--compare", str(tmp_path / "before.json"))
    assert "Compared with" in out and "p99 wait s" in out
    after, before = large["runs"][0], small["runs"][-1]
    assert after["reply_wait_p99_seconds"] < before["reply_wait_p99_seconds"]
    assert after["conductor_pool"]["peak_in_flight"] / 16 < 0.9
