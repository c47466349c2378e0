"""The web dashboard in a real headless Chromium (Debian's chromium, driven by
Playwright; never a downloaded browser) against ``commlens demo``.

Screenshots of every step are kept in artifacts/dashboard/.
"""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support import ARTIFACTS, EXPORT_URL, Demo, collector_ready, run_collector, wait_for

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SHOTS = ARTIFACTS / "dashboard"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: scripts/setup installs it"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo = Demo(tmp_path_factory.mktemp("dashboard-demo"))
    wait_for(demo.up, timeout=30, message="demo serving")
    yield demo
    demo.process.kill()
    demo.process.wait()


@pytest.fixture
def page(browser, demo):
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.goto(demo.base + "/dashboard/")
    yield page
    context.close()


def _node_ids(page):
    return set(page.eval_on_selector_all("#graph g.node", "els => els.map(e => e.id)"))


def test_graph_shows_the_services_of_the_running_control_plane(page, demo):
    services = {"nova-api", "nova-conductor", "nova-scheduler", "nova-compute",
                "neutron-server", "keystone"}

    def edge_classes():
        return page.eval_on_selector_all("#graph g.edge",
                                         "els => els.map(e => e.className.baseVal.split(' '))")

    # The page refreshes itself; no reload.
    wait_for(lambda: {f"node:{s}" for s in services} <= _node_ids(page)
             and {"rpc", "http"} <= {c for classes in edge_classes() for c in classes},
             timeout=40, interval=1, message="the control plane's services and edges")
    page.screenshot(path=SHOTS / "graph.png", full_page=True)
    # Everything the page loaded came from the collector: it works offline.
    assert all(url.startswith(demo.base) for url in page.requested), page.requested
    assert page.console_errors == []


def test_clicking_a_node_and_an_edge_shows_methods_and_fifteen_minutes(page):
    page.wait_for_selector("#graph g.node[id='node:nova-conductor']", timeout=30000)
    page.click("#graph g.node[id='node:nova-conductor']")
    page.wait_for_selector("#methods tbody tr")
    assert page.inner_text("#details-title") == "nova-conductor"
    methods = page.inner_text("#methods tbody")
    assert "nova-api → conductor.build_instances" in methods
    # The graph is sampled every 5 s; the details refresh with the page.
    wait_for(lambda: int(page.get_attribute("#spark-errors", "data-points")) >= 2,
             timeout=30, interval=1, message="points in the 15-minute series")
    assert page.locator("#spark-errors polyline").get_attribute("points").count(",") >= 2
    page.screenshot(path=SHOTS / "node-details.png", full_page=True)

    page.click("#graph g.edge[id='edge:nova-api->keystone:http'] text")  # its label
    wait_for(lambda: "keystone" in page.inner_text("#details-title"), timeout=10)
    assert "(HTTP)" in page.inner_text("#details-title")
    assert page.locator("#methods tbody tr").count() >= 1
    assert "/v3/" in page.inner_text("#methods tbody")


def test_an_rpc_edge_shows_how_close_its_calls_run_to_their_timeout(page):
    # The demo's RPC clients call with a 5 s timeout (emulator/controlplane.py):
    # the edge detail says so, with the share of it the calls used.
    edge = "#graph g.edge[id='edge:nova-api->nova-conductor:rpc'] text"
    page.wait_for_selector(edge, timeout=30000)
    page.click(edge)
    page.wait_for_selector("#timeout-budget:not([hidden])", timeout=30000)
    budget = page.locator("#timeout-budget dd")
    assert page.inner_text("#timeout-budget dd[data-budget='timeout']") == "5 s"
    assert page.inner_text("#timeout-budget dd[data-budget='used, p99']").endswith("%")
    assert " of " in page.inner_text("#timeout-budget dd[data-budget='calls over half']")
    assert budget.count() == 4
    page.screenshot(path=SHOTS / "edge-timeout-budget.png", full_page=True)
    # A REST edge has no timeout budget of oslo.messaging's.
    page.click("#graph g.edge[id='edge:nova-api->keystone:http'] text")
    wait_for(lambda: "(HTTP)" in page.inner_text("#details-title"), timeout=10)
    wait_for(lambda: page.locator("#timeout-budget").is_hidden(), timeout=10,
             message="the budget hidden for a REST edge")
    assert page.console_errors == []


def test_find_hide_and_focus(page):
    page.wait_for_selector("#graph g.node[id='node:nova-conductor']", timeout=30000)
    page.fill("#find", "service = nova-conductor")
    page.dispatch_event("#find", "change")
    page.wait_for_selector("#graph g.node.found")
    assert page.eval_on_selector_all("#graph g.node.found", "els => els.map(e => e.id)") == [
        "node:nova-conductor"]
    page.fill("#find", "rate >")
    page.dispatch_event("#find", "change")
    wait_for(lambda: "expected FIELD OP VALUE" in page.inner_text("#filter-error"), timeout=10)
    page.fill("#find", "")
    page.fill("#hide", "service = keystone")
    page.dispatch_event("#hide", "change")
    wait_for(lambda: "node:keystone" not in _node_ids(page), timeout=10)
    page.fill("#hide", "")
    page.dispatch_event("#hide", "change")
    page.select_option("#focus", "nova-scheduler")
    page.fill("#depth", "1")
    page.dispatch_event("#depth", "change")
    wait_for(lambda: _node_ids(page) == {"node:nova-scheduler", "node:nova-conductor"},
             timeout=10, message="focus on nova-scheduler, depth 1")
    page.screenshot(path=SHOTS / "focus.png", full_page=True)


def test_an_injected_error_appears_in_the_chains_without_a_reload(page, demo):
    page.click("button[data-tab=chains-tab]")
    page.wait_for_selector("#chains")
    demo.fault("neutron-error")
    try:
        # No reload here: the page refreshes itself every 10 seconds.
        wait_for(lambda: "PortBindingFailed" in page.inner_text("#chains tbody"),
                 timeout=60, interval=1, message="the neutron chain in the table")
    finally:
        demo.fault("neutron-error", on=False)
    first = page.locator("#chains tbody tr", has_text="PortBindingFailed").first
    path = first.locator(".chain-path").inner_text()
    assert path.startswith("neutron-server PUT /v2.0/ports/{id}") and "nova-api" in path
    page.screenshot(path=SHOTS / "chains.png", full_page=True)
    first.locator("a.request-id").first.click()
    page.wait_for_selector("#trace-hops .hop.failed")
    assert "nova-api POST /v2.1/servers" in page.inner_text("#trace-hops")


def test_a_stopped_compute_is_named_in_the_chains_and_the_silent_servers(page, demo):
    # A dozen state reports from each compute first: their rhythm is learned
    # (exporters/reporters.py), so compute-1's silence can be seen.
    wait_for(lambda: demo.metrics().value(
        "commlens_rpc_sent_total", service="nova-compute", target="conductor",
        method="compute_node_update", kind="call") >= 4 * 12, timeout=60,
        message="a dozen state reports from each compute")
    demo.fault("compute-down")
    try:
        # The page refreshes itself; compute-1 is the one the fault stops.
        wait_for(lambda: "compute (compute-1)" in page.inner_text("#silent-servers tbody"),
                 timeout=90, interval=1, message="compute-1 among the silent servers")
        assert page.is_visible("#silent-servers")
        # Its state reports stopped too: the periodic reporters name it.
        wait_for(lambda: "compute-1" in page.inner_text("#silent-reporters tbody"),
                 timeout=60, interval=1, message="compute-1 among the silent reporters")
        assert "compute_node_update" in page.inner_text("#silent-reporters tbody")
        assert page.is_visible("#silent-reporters")
        page.screenshot(path=SHOTS / "silent-servers.png", full_page=True)
        page.click("button[data-tab=chains-tab]")

        def paths():
            return page.eval_on_selector_all("#chains .chain-path", "els => els.map("
                                             "e => e.innerText.replace(/\\s+/g, ' '))")
        # The origin that did not answer comes first, as in ``commlens chains``.
        wait_for(lambda: any(p.startswith("compute (compute-1) build_and_run_instance "
                                          "(MessagingTimeout)") for p in paths()),
                 timeout=60, interval=1, message="the compute's chain, named, first")
        # Its origin column says what ``commlens chains`` does.
        origins = page.eval_on_selector_all("#chains .chain-origin", "els => els.map("
                                            "e => e.innerText.replace(/\\s+/g, ' '))")
        assert "compute (compute-1) build_and_run_instance MessagingTimeout" in origins
    finally:
        demo.fault("compute-down", on=False)
    page.screenshot(path=SHOTS / "chains-compute-down.png", full_page=True)
    assert page.console_errors == []


def test_request_id_search_opens_the_trace_timeline(page, demo):
    demo.fault("neutron-error")
    try:
        chain = wait_for(lambda: next((c for c in demo.json("/api/chains?since=15m")["chains"]
                                       if c["origin"]["service"] == "neutron-server"), None),
                         timeout=60, message="a neutron chain")
    finally:
        demo.fault("neutron-error", on=False)
    request_id = next(e["request_id"] for e in chain["examples"] if e["request_id"])
    page.fill("#search-input", request_id)
    page.click("#search-button")
    page.wait_for_selector("#trace-hops .hop")
    assert request_id in page.inner_text("#trace-title")
    assert page.locator("#trace-hops .hop").count() >= 5
    bars = page.eval_on_selector_all("#trace-hops .bar", "els => els.map(e => e.style.width)")
    assert all(b.endswith("%") for b in bars)
    page.screenshot(path=SHOTS / "trace.png", full_page=True)

    page.fill("#search-input", "req-00000000-0000-0000-0000-000000000000")
    page.click("#search-button")
    wait_for(lambda: "no trace or request id" in page.inner_text("#trace-title"), timeout=10)


def test_a_shared_link_opens_the_same_view(browser, demo):
    """The view is in the address: a link pasted in an incident channel opens
    on the same window, tab, filters and selection."""
    # A link to a focus the graph does not draw yet says so (a 400 the
    # console would report): wait until the demo's conductor is in it.
    wait_for(lambda: "nova-conductor" in [n["service"] for n in
                                          demo.json("/api/graph?window=15m")["nodes"]],
             timeout=40, message="nova-conductor in the graph")
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    page = context.new_page()
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    fragment = urllib.parse.urlencode({"window": "15m", "find": "service = nova-conductor",
                                       "focus": "nova-conductor", "depth": "2",
                                       "select": "node:nova-conductor"})
    page.goto(demo.base + "/dashboard/#" + fragment)
    wait_for(lambda: page.inner_text("#details-title") == "nova-conductor", timeout=40,
             interval=0.5, message="the selected node's details")
    assert page.input_value("#window") == "15m"
    assert page.input_value("#find") == "service = nova-conductor"
    assert page.input_value("#focus") == "nova-conductor"
    assert page.input_value("#depth") == "2"
    page.wait_for_selector("#graph g.node.found[id='node:nova-conductor']", timeout=30000)
    assert "node:nova-conductor" in page.eval_on_selector_all(
        "#graph g.selected", "els => els.map(e => e.id)")
    page.screenshot(path=SHOTS / "shared-view.png", full_page=True)

    # Changing the view changes the address, ready to be copied.
    page.select_option("#window", "1h")
    wait_for(lambda: "window=1h" in page.url, timeout=10, message="the window in the URL")
    page.click("#graph g.edge[id='edge:nova-api->nova-conductor:rpc'] text")
    wait_for(lambda: "select=edge%3Anova-api-%3Enova-conductor%3Arpc" in page.url,
             timeout=10, message="the selected edge in the URL")
    page.click("button[data-tab=chains-tab]")
    wait_for(lambda: "tab=chains-tab" in page.url, timeout=10, message="the tab in the URL")
    shared = page.url

    # The copied address opens the same view in another browser.
    other = browser.new_context(viewport={"width": 1500, "height": 950}).new_page()
    other.goto(shared)
    other.wait_for_selector("#chains-tab.active")
    assert other.input_value("#window") == "1h"
    wait_for(lambda: "nova-conductor (RPC)" in other.inner_text("#details-title"),
             timeout=30, message="the selected edge's details")
    other.context.close()
    assert errors == []
    context.close()


def test_percentages_and_rates_never_read_as_exponents(page):
    numbers = page.evaluate("[number(100), percent(1), rate(1234.5), ms(0.291), "
                            "ms(60.07, true), number(0.0001)]")
    assert numbers == ["100", "100%", "1,235/s", "291 ms", "~60.1 s", "<0.001"]


def test_the_dashboard_is_read_only(demo):
    for path in ("/dashboard/", "/dashboard/graph.svg", "/api/graph/node/nova-api"):
        request = urllib.request.Request(demo.base + path, method="POST", data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=5)
        assert error.value.code == 405


def test_a_token_guards_the_dashboard_and_api_but_not_metrics(browser, rabbitmq, tmp_path):
    token = "dashboard-secret-7f3a"
    with run_collector(EXPORT_URL, tmp_path, ["--dashboard-token", token]) as collector:
        wait_for(lambda: collector_ready(collector), timeout=30, message="collector ready")
        for path, expected in (("/metrics", 200), ("/healthz", 200), ("/api/graph", 401),
                               ("/dashboard/", 401), ("/api/chains", 401)):
            try:
                status = collector.get(path)[0]
            except urllib.error.HTTPError as error:
                status = error.code
            assert status == expected, path
        request = urllib.request.Request(collector.base_url + "/api/graph",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert "nodes" in json.load(response)
        context = browser.new_context()
        page = context.new_page()
        page.goto(collector.base_url + "/dashboard/")
        assert "requires its dashboard token" in page.inner_text("body")
        page.goto(collector.base_url + "/dashboard/?" + urllib.parse.urlencode({"token": token}))
        page.wait_for_selector("#graph")
        assert page.url == collector.base_url + "/dashboard/"
        wait_for(lambda: page.inner_text("#status").startswith("updated"), timeout=15)
        assert token not in page.content()
        context.close()
        assert token not in collector.log()

        def graph_command(env):
            return subprocess.run([sys.executable, "-m", "commlens.cli.main", "graph", "--json",
                                   "--collector", collector.base_url],
                                  capture_output=True, text=True, timeout=30,
                                  env=dict(os.environ, **env))
        assert "requires its dashboard token" in graph_command({}).stderr
        assert "nodes" in json.loads(graph_command(
            {"COMMLENS_DASHBOARD_TOKEN": token}).stdout)


def _conductor_advice(demo):
    """The findings about nova-conductor in the demo's /api/advice."""
    return [f for f in demo.json("/api/advice")["findings"]
            if f["subject"]["service"] == "nova-conductor"]


def test_advice_beside_the_graph_names_a_slow_conductor_and_its_option_then_clears(
        browser, tmp_path):
    """``slow-conductor`` injected into a running demo: within a minute the
    advice beside the graph, ``/api/advice`` and ``commlens advise`` name
    nova-conductor and the option to change; once the fault is removed the
    advice clears. A demo of its own: this takes a few minutes."""
    demo = Demo(tmp_path)
    try:
        wait_for(demo.up, timeout=30, message="demo serving")
        # A baseline: the calls to the conductor before the fault.
        wait_for(lambda: demo.metrics().value("commlens_rpc_received_total",
                                              service="nova-conductor") or 0, timeout=30)
        context = browser.new_context(viewport={"width": 1500, "height": 950})
        page = context.new_page()
        errors = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(demo.base + "/dashboard/")
        page.wait_for_selector("#advice-empty", state="visible", timeout=30000)
        # The window is the last minute: its baseline starts a minute in.
        wait_for(lambda: demo.json("/api/advice")["baseline_seconds"] >= 15, timeout=120,
                 interval=1, message="15 s of baseline")
        demo.fault("slow-conductor")
        try:
            found = wait_for(lambda: _conductor_advice(demo), timeout=60, interval=1,
                             message="advice about nova-conductor")
            assert all(f["option"] for f in found)
            item = page.locator("#advice-findings li", has_text="nova-conductor").first
            item.wait_for(timeout=30000)  # the page refreshes every 10 s
            text = item.inner_text()
            assert found[0]["option"] in text and "confidence" in text
            page.screenshot(path=SHOTS / "advice.png", full_page=True)
            # The demo's own status, every 5 s, ends with the advice too.
            wait_for(lambda: any(line.startswith("advice: ") and "nova-conductor" in line
                                 for line in demo.log_path.read_text().splitlines()),
                     timeout=20, interval=1, message="advice in the demo's status")
            table = subprocess.run(
                [sys.executable, "-m", "commlens.cli.main", "advise", "--collector",
                 demo.base], capture_output=True, text=True, timeout=60,
                env=dict(os.environ, COLUMNS="250"))
            assert table.returncode == 0, table.stderr
            # A table's cells wrap: the option's words, each whole.
            assert "nova-conductor" in table.stdout
            assert all(word in table.stdout for word in found[0]["option"].split())
            scripted = subprocess.run(
                [sys.executable, "-m", "commlens.cli.main", "advise", "--json",
                 "--collector", demo.base], capture_output=True, text=True, timeout=60)
            assert any(f["subject"]["service"] == "nova-conductor"
                       for f in json.loads(scripted.stdout)["findings"])
        finally:
            demo.fault("slow-conductor", on=False)
        # The window moves past the slow calls: nothing is left to change.
        wait_for(lambda: not _conductor_advice(demo), timeout=150, interval=2,
                 message="the conductor's advice to clear")
        wait_for(lambda: page.locator("#advice-findings li", has_text="nova-conductor")
                 .count() == 0, timeout=30, interval=1, message="the panel to clear")
        assert errors == []
        context.close()
    finally:
        demo.process.kill()
        demo.process.wait()


def test_a_replica_asks_its_peers_with_the_token_and_the_page_says_who_is_missing(
        browser, rabbitmq, tmp_path):
    from support import free_port

    import uuid

    token = "fleet-secret-51c2"
    # An exchange of its own: replicas' queues must not take a share of what
    # the other tests ship.
    run = uuid.uuid4().hex[:8]
    export_url = (f"amqp://guest:guest@127.0.0.1:5672/?exchange=commlens-dashfleet-{run}"
                  f"&queue=commlens.dashfleet-{run}")
    ports = [free_port() for _ in range(3)]  # the third never starts
    peers = [a for port in ports for a in ("--peer", f"http://127.0.0.1:{port}")]
    args = ["--dashboard-token", token, "--peer-timeout", "1s", *peers]
    with run_collector(export_url, tmp_path, ["--replica", "a", *args], port=ports[0]) as one, \
            run_collector(export_url, tmp_path, ["--replica", "b", *args], port=ports[1]):
        wait_for(lambda: collector_ready(one), timeout=30, message="replica a ready")
        request = urllib.request.Request(one.base_url + "/api/graph",
                                         headers={"Authorization": f"Bearer {token}"})

        def answered():
            with urllib.request.urlopen(request, timeout=10) as response:
                replicas = json.load(response)["replicas"]
            return replicas if replicas["answered"] == ["a", "b"] else None
        replicas = wait_for(answered, timeout=30, message="both replicas answer")
        assert [m["peer"] for m in replicas["missing"]] == [f"http://127.0.0.1:{ports[2]}"]
        context = browser.new_context()
        page = context.new_page()
        page.goto(one.base_url + "/dashboard/?" + urllib.parse.urlencode({"token": token}))
        page.wait_for_selector("#replicas", state="visible", timeout=30000)
        assert "1 replica(s) did not answer (Connection refused)" in page.inner_text("#replicas")
        context.close()
        assert token not in one.log()
# -- lost messages, change and origins (issue 18 items 4 and 5) -------------

def test_conductor_down_lists_the_casts_nobody_received(page, demo):
    # Rebuilds need instances: once users have some, the conductor goes.
    wait_for(lambda: demo.metrics().value("commlens_rpc_sent_total", target="conductor",
                                          method="rebuild_instance") >= 1,
             timeout=60, interval=1, message="rebuilds cast to the conductor")
    demo.fault("conductor-down")
    try:
        wait_for(lambda: "rebuild_instance" in page.inner_text("#lost-messages tbody"),
                 timeout=120, interval=1, message="the conductor's casts listed as lost")
        assert page.is_visible("#lost-messages")
        (row,) = [r for r in page.eval_on_selector_all(
            "#lost-messages tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
            if r[1] == "rebuild_instance"]
        target, _method, kind, sent, received, unreceived, callers, _where = row
        assert (target, kind, callers) == ("conductor", "cast", "nova-api")
        assert int(unreceived) == int(sent) - int(received) >= 1
        assert "no instrumented server" in page.inner_text("#lost-messages-note")
        page.screenshot(path=SHOTS / "lost-messages.png", full_page=True)
    finally:
        demo.fault("conductor-down", on=False)
    assert page.console_errors == []


def test_methods_tables_say_how_they_compare_with_the_baseline(page):
    page.wait_for_selector("#graph g.node[id='node:nova-conductor']", timeout=30000)
    page.click("#graph g.node[id='node:nova-conductor']")
    page.wait_for_selector("#methods tbody tr td.change")
    cells = page.eval_on_selector_all("#methods tbody td.change",
                                      "els => els.map(e => [e.innerText, e.title])")
    assert len(cells) == page.locator("#methods tbody tr").count()
    # A young demo has no baseline yet, and says so.
    assert all(text == "–" and title.startswith("no baseline yet") for text, title in cells)
    # With one, the words of ``commlens graph``.
    assert page.evaluate("changeText({rate: {baseline: 1, ratio: 3}, error_ratio: "
                         "{baseline: 0, difference: 0.1}, p99_seconds: {baseline: 0.01, "
                         "ratio: 12}, baseline_requests: 500, confident: true})"
                         ) == "rate ×3, err +10%, p99 ×12"


def test_the_origin_of_errors_stands_out_on_the_graph_and_in_the_chains(page, demo):
    demo.fault("neutron-error")
    try:
        wait_for(lambda: "origin" in (page.get_attribute(
            "#graph g.node[id='node:neutron-server']", "class") or ""),
            timeout=90, interval=1, message="neutron-server marked as the origin")
        assert "origin of" in page.text_content("#graph g.node[id='node:neutron-server']")
        # nova-api only passed the errors on.
        assert "passes-on" in page.get_attribute("#graph g.node[id='node:nova-api']", "class")
        page.screenshot(path=SHOTS / "origin.png", full_page=True)
        page.click("button[data-tab=chains-tab]")
        wait_for(lambda: "neutron-server" in page.inner_text("#chains tbody"), timeout=30,
                 interval=1, message="the neutron chain")
    finally:
        demo.fault("neutron-error", on=False)
    chains = demo.json("/api/chains?since=15m&limit=1000")["chains"]
    shown = page.eval_on_selector_all("#chains .chain-origin", "els => els.map("
                                      "e => e.innerText.replace(/\\s+/g, ' ').trim())")
    expected = [" ".join(filter(None, [
        f"{c['origin']['service']} ({c['origin']['server']})" if c["origin"]["server"]
        else c["origin"]["service"], c["origin"]["operation"], c["origin"]["error"]]))
        for c in chains]
    assert any(o.startswith("neutron-server PUT /v2.0/ports/{id}") for o in shown)
    assert shown and set(shown) <= set(expected)

    # A trace opened by its id names its entry's request, once.
    example = next(e for c in chains if c["origin"]["service"] == "neutron-server"
                   for e in c["examples"] if e["request_id"])
    page.fill("#search-input", example["trace_id"])
    page.click("#search-button")
    page.wait_for_selector("#trace-hops .hop")
    title = page.inner_text("#trace-title")
    assert f"request {example['request_id']}" in title
    assert title.count("req-") == 1
