"""``commlens demo --fault ...`` gives advice that names the service and the
option to change within a minute, and removing the fault clears it.

The injected-at-run-time case (``waits_growing``, against a baseline) is in
tests/test_web_dashboard.py with the dashboard's view of it; here the fault
is on from the start, so there is no baseline to compare with: what names the
conductor is the timeout budget (``rpc_response_timeout``: 3 s waits of a 5 s
timeout), the executor pool (``starved-conductor``) and, for a conductor
that never consumed, calls to its topic that all time out.
"""

import pytest

from commlens.emulator import faults
from commlens.tracer import metrics
from support import Demo, wait_for

pytestmark = pytest.mark.slow


def _about(demo, service, rule):
    return [f for f in demo.json("/api/advice")["findings"]
            if f["subject"]["service"] == service and f["rule"] == rule]


def _advice_within_a_minute_then_cleared(tmp_path, fault, rule, option,
                                         service="nova-conductor"):
    demo = Demo(tmp_path, "--fault", fault)
    try:
        wait_for(demo.up, timeout=30, message="demo serving")
        found = wait_for(lambda: _about(demo, service, rule), timeout=60,
                         interval=1, message=f"{rule} advice naming {service}")
        assert found[0]["option"] == option
        demo.fault(fault, on=False)
        # The last minute holds no slow call any more: nothing to change.
        wait_for(lambda: not _about(demo, service, rule), timeout=150, interval=2,
                 message=f"the {rule} advice to clear")
        return found[0]
    finally:
        demo.process.kill()
        demo.process.wait()


@pytest.mark.skipif(not hasattr(metrics, "RPC_TIMEOUT_BUDGET"),
                    reason="needs the timeout budget (issue 18 item 3) in the agent")
def test_slow_conductor_from_the_start_advises_the_callers_rpc_response_timeout(tmp_path):
    finding = _advice_within_a_minute_then_cleared(
        tmp_path, "slow-conductor", "rpc_response_timeout", "[DEFAULT] rpc_response_timeout")
    assert finding["evidence"]["timeout_known_from"] == "timeout budget"
    assert abs(finding["evidence"]["timeout_seconds"] - 5.0) < 0.05  # the demo's timeout
    assert 0.5 <= finding["evidence"]["timeout_used_p999"] < 0.9


@pytest.mark.skipif("starved-conductor" not in faults.FAULTS,
                    reason="needs the pool metrics and the starved-conductor fault "
                           "(issue 18 item 2)")
def test_a_starved_conductor_advises_a_larger_executor_pool(tmp_path):
    finding = _advice_within_a_minute_then_cleared(
        tmp_path, "starved-conductor", "executor_thread_pool_size",
        "[DEFAULT] executor_thread_pool_size")
    assert finding["evidence"]["saturation_peak"] >= 0.9


def test_a_conductor_down_from_the_start_is_a_topic_with_no_consumer(tmp_path):
    """No conductor ever consumed: its topic is named (no service to name
    yet), and the calls that all timed out are the evidence."""
    finding = _advice_within_a_minute_then_cleared(
        tmp_path, "conductor-down", "queue_without_consumer", "[DEFAULT] transport_url",
        service="conductor")
    assert finding["subject"]["topic"] == "conductor"
    assert finding["evidence"]["timeouts"] >= 5
    assert "nova-api" in finding["evidence"]["callers"]
