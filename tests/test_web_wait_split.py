"""Where the wait goes, on the web dashboard in a real headless Chromium, against
``commlens demo --fault starved-conductor`` (its conductor's pool of 2 workers
is full): the edge details say starved and show the parts at p50 and p99;
a traced call's bar in the trace view is split into its parts.

Screenshots are kept in artifacts/dashboard/.
"""

import urllib.error

import pytest

from support import Demo, wait_for
from test_web_dashboard import SHOTS, browser  # noqa: F401  (the Chromium fixture)

pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

EDGE = "edge:nova-api->nova-conductor:rpc"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo = Demo(tmp_path_factory.mktemp("wait-split-demo"), "--fault", "starved-conductor")
    wait_for(demo.up, timeout=30, message="demo serving")
    yield demo
    demo.process.kill()
    demo.process.wait()


@pytest.fixture
def page(browser, demo):  # noqa: F811
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    yield page
    context.close()


def _starved(demo):
    for edge in demo.json("/api/graph?window=5m")["edges"]:
        if (edge["client"], edge["server"], edge["protocol"]) == (
                "nova-api", "nova-conductor", "rpc"):
            split = edge.get("wait_split")
            return split if split and split["dominant"] == "pool_wait" else None
    return None


def test_the_edge_details_say_a_starved_pool_at_a_glance(page, demo):
    wait_for(lambda: _starved(demo), timeout=60, message="the conductor starved")
    page.goto(demo.base + "/dashboard/#select=" + EDGE)
    page.wait_for_selector("#wait-split:not([hidden])", timeout=30000)
    wait_for(lambda: "Starved" in page.inner_text("#wait-split-verdict"), timeout=30)
    assert page.get_attribute("#wait-split-verdict", "class") == "starved"
    rows = page.locator("#wait-split-bars .split-row")
    wait_for(lambda: rows.count() == 2, timeout=30, message="p50 and p99 rows")
    assert page.get_attribute("#wait-split-bars .split-row >> nth=0", "data-percentile") == "p50"
    # Three parts, in proportion: the pool's is the widest at p99.
    widths = page.eval_on_selector_all(
        "#wait-split-bars .split-row[data-percentile=p99] .split-bar span",
        "els => els.map(e => [e.className, parseFloat(e.style.width)])")
    assert [name for name, _ in widths] == ["seg-queue", "seg-pool", "seg-processing"]
    assert max(widths, key=lambda w: w[1])[0] == "seg-pool"
    assert sum(width for _, width in widths) <= 100.5  # never past the bar
    figures = page.inner_text("#wait-split-bars")
    assert "queue" in figures and "pool" in figures and "processing" in figures
    pools = page.inner_text("#wait-split-pools")
    assert "pool of conductor" in pools and "of 2 workers busy" in pools
    page.screenshot(path=SHOTS / "wait-split-edge.png", full_page=True)

    # A REST edge has no split to show.
    page.click("#graph g.edge[id='edge:nova-api->keystone:http'] text")
    wait_for(lambda: "(HTTP)" in page.inner_text("#details-title"), timeout=10)
    assert page.is_hidden("#wait-split")
    assert page.console_errors == []


def _split_trace(demo):
    """A closed trace with a split call from nova-api to the conductor."""
    hops = demo.json("/api/hops?limit=5000")["hops"]
    for trace_id in {h["trace_id"] for h in hops if h["service"] == "nova-api"
                     and h["side"] == "client" and h["target"] == "conductor"}:
        try:
            trace = demo.json("/api/traces/" + trace_id)
        except urllib.error.HTTPError:
            continue  # still open
        if any(s["caller"] == "nova-api" for s in trace["wait_splits"]):
            return trace
    return None


def test_a_traced_call_shows_its_parts_in_the_trace_view(page, demo):
    trace = wait_for(lambda: _split_trace(demo), timeout=60, message="a split call traced")
    split = next(s for s in trace["wait_splits"] if s["caller"] == "nova-api")
    page.goto(demo.base + f"/dashboard/#tab=trace-tab&trace={trace['trace_id']}")
    row = f"#trace-hops .hop[data-span='{split['span_id']}']"
    page.wait_for_selector(row + " .bar.split", timeout=30000)
    assert page.get_attribute(row + " .bar", "data-dominant") == split["dominant"]
    parts = page.eval_on_selector_all(row + " .bar span", "els => els.map(e => e.className)")
    assert parts == ["seg-queue", "seg-pool", "seg-processing"]
    label = page.inner_text(row + " .label")
    assert "queue" in label and "pool" in label and "processing" in label
    page.screenshot(path=SHOTS / "wait-split-trace.png", full_page=True)
    assert page.console_errors == []
