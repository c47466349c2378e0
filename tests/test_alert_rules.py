"""The alert rules, checked by Debian's promtool and evaluated by a real Prometheus.

promtool's unit tests (dashboards/alerts/tests/) give every alert input series
that fire it and series that must not, hand-written and generated noise
(dashboards/alerts/tests/noise.py); the end-to-end test runs Debian's Prometheus
against a real collector while a slow RPC endpoint makes replies wait.
"""

import concurrent.futures
import json
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

import pytest
import yaml

from support import COMMLENS_URL, free_port, wait_for

ROOT = pathlib.Path(__file__).parent.parent
RULES = ROOT / "dashboards" / "alerts" / "commlens.rules.yml"
RULE_TESTS = sorted((ROOT / "dashboards" / "alerts" / "tests").glob("*.test.yml"))
NOISE = ROOT / "dashboards" / "alerts" / "tests" / "noise.py"
# Where every alert's runbook_url points (the chart's prometheusRule.runbookBaseUrl
# moves them): docs/runbooks.md, a section per alert.
RUNBOOK_BASE = "https://github.com/commlens/commlens/blob/main/docs/runbooks.md"


def _tool(name):
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/setup installs Debian's prometheus package"
    return path


def _alerts():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules():
    result = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = subprocess.run([_tool("promtool"), "test", "rules", *map(str, RULE_TESTS)],
                            capture_output=True, text=True, cwd=RULES.parent / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("change, alert", [
    (("> 0.05\n        for: 5m", "> 0.5\n        for: 5m"), "CommlensRestErrorRatioHigh"),
    # The page on one timeout, or on one burst of them, that the issue saw.
    ((") >= 3\n          and\n          sum by (service, target, method) (rate("
      "commlens_rpc_call_errors_total", ") >= 1\n          and\n          sum by (service, "
      "target, method) (rate(commlens_rpc_call_errors_total"), "CommlensRpcTimeouts"),
    (("for: 6m\n        labels:\n          severity: critical",
      "for: 2m\n        labels:\n          severity: critical"), "CommlensRpcTimeouts"),
    # A new chain at its first occurrence.
    (("  commlens_error_chain_total\n          ) >= 3", "  commlens_error_chain_total\n"
      "          ) >= 1"), "CommlensErrorChainNew"),
    # Growing waits as they were: deriv over 5 minutes above 0.
    (("delta(quantile_over_time(0.5, commlens_rpc_waiting_replies[4m])[10m:]))",
      "deriv(commlens_rpc_waiting_replies[5m])) * 1e9"), "CommlensRpcReplyWaitsGrowing"),
    # The early warning without its minimum count.
    (("increase(commlens_rpc_calls_over_half_timeout_total[5m])\n          ) >= 3",
      "increase(commlens_rpc_calls_over_half_timeout_total[5m])\n          ) > 0"),
     "CommlensRpcCallsNearTimeout"),
])
def test_promtool_unit_tests_catch_a_broken_rule(tmp_path, change, alert):
    """The unit tests can fail: a rule with the wrong threshold or without
    its ``for:`` is caught (by the hand-written cases or the noise)."""
    broken = RULES.read_text().replace(*change)
    assert broken != RULES.read_text()
    (tmp_path / "tests").mkdir()
    (tmp_path / "commlens.rules.yml").write_text(broken)
    for test_file in RULE_TESTS:
        shutil.copy(test_file, tmp_path / "tests")
    result = subprocess.run([_tool("promtool"), "test", "rules",
                             *(p.name for p in RULE_TESTS)],
                            capture_output=True, text=True, cwd=tmp_path / "tests")
    assert result.returncode != 0
    assert f"alertname: {alert}," in result.stdout + result.stderr


def test_the_noise_test_file_is_what_its_generator_writes():
    result = subprocess.run([sys.executable, str(NOISE), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_noise_holds_the_rpc_and_chain_alerts_quiet_every_minute_and_firing_on_faults():
    """noise.test.yml checks, for each alert the issue saw fire on noise,
    every minute of 350 of generated noise, and a real fault within noise."""
    document = yaml.safe_load((RULES.parent / "tests" / "noise.test.yml").read_text())
    cases = [case for group in document["tests"] for case in group["alert_rule_test"]]
    for alert in ("CommlensRpcReplyWaitsGrowing", "CommlensRpcTimeouts",
                  "CommlensErrorChainNew", "CommlensRpcCallsNearTimeout"):
        quiet = {case["eval_time"] for case in cases
                 if case["alertname"] == alert and not case["exp_alerts"]}
        assert {f"{minute}m" for minute in range(1, 351)} <= quiet or alert == \
            "CommlensRpcCallsNearTimeout" and len(quiet) >= 350, alert
        assert any(case["exp_alerts"] for case in cases if case["alertname"] == alert), alert
    assert document["evaluation_interval"] == "30s"


def test_every_alert_is_tested_firing_and_quiet_and_has_a_runbook():
    tests = [yaml.safe_load(path.read_text()) for path in RULE_TESTS]
    cases = [case for document in tests for group in document["tests"]
             for case in group.get("alert_rule_test", [])]
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    for rule in _alerts():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no firing case"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no quiet case"
        for key in ("summary", "description", "runbook_url"):
            assert rule["annotations"].get(key), f"{name}: no {key}"
        # A full URL, the section of docs/runbooks.md that GitHub anchors
        # at the heading's name in lower case.
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}"
        assert re.search(rf"^### {name}$", runbooks, re.MULTILINE), \
            f"docs/runbooks.md has no runbook section for {name}"


@pytest.mark.slow
def test_real_prometheus_sees_reply_waits_grow_into_an_alert(
        collector, start_peer, rpc_client, topic, tmp_path):
    """Debian's Prometheus scrapes the collector every second and evaluates the
    real rules file while calls pile up on a slow endpoint."""
    host_port = collector.base_url.removeprefix("http://")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "commlens-collector",
                            "static_configs": [{"targets": [host_port]}]}],
    }))
    prometheus = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    api = f"http://127.0.0.1:{port}/api/v1"

    def alert_state():
        try:
            with urllib.request.urlopen(api + "/alerts", timeout=2) as response:
                alerts = json.load(response)["data"]["alerts"]
        except OSError:
            return None
        return next((a["state"] for a in alerts
                     if a["labels"].get("alertname") == "CommlensRpcReplyWaitsGrowing"
                     and a["labels"].get("target") == topic), None)

    start_peer(COMMLENS_URL, topic)
    client = rpc_client(COMMLENS_URL, topic, timeout=60)
    seen = threading.Event()
    try:
        wait_for(lambda: alert_state() is None and _scraped(api), timeout=30,
                 message="Prometheus up and scraping, no alert yet")
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            # One more call waiting every 0.5 s, for 25 s at most: the rule
            # wants growth beyond 5 + a quarter of the level, in the median
            # of the waits (a burst is not growth), so it is pending after
            # some 10 s of it at this scrape interval (1 s). The calls end
            # by themselves 30 s after they were made.
            def load():
                for _ in range(50):
                    if seen.wait(0.5):
                        return
                    pool.submit(client.call, {}, "slow", seconds=30)
            loader = threading.Thread(target=load)
            loader.start()
            state = wait_for(lambda: alert_state() in ("pending", "firing") and alert_state(),
                             timeout=60, interval=0.5,
                             message="the reply-wait alert pending or firing")
            seen.set()
            loader.join()
            assert state in ("pending", "firing")
    finally:
        seen.set()
        prometheus.terminate()
        prometheus.wait(10)


def _scraped(api):
    query = urllib.parse.urlencode({"query": 'up{job="commlens-collector"}'})
    try:
        with urllib.request.urlopen(f"{api}/query?{query}", timeout=2) as response:
            result = json.load(response)["data"]["result"]
    except OSError:
        return False
    return bool(result) and result[0]["value"][1] == "1"


ALERTMANAGER_EXAMPLE = RULES.parent / "alertmanager.example.yml"


def test_alertmanager_example_is_valid_and_pages_only_for_critical_alerts():
    amtool = _tool("amtool")
    check = subprocess.run([amtool, "check-config", str(ALERTMANAGER_EXAMPLE)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for rule in _alerts():
        expected = ("openstack-oncall" if rule["labels"]["severity"] == "critical"
                    else "openstack-team")
        routed = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_EXAMPLE}",
             f"--verify.receivers={expected}", f"alertname={rule['alert']}",
             f"severity={rule['labels']['severity']}"], capture_output=True, text=True)
        assert routed.returncode == 0, (rule["alert"], routed.stdout + routed.stderr)
