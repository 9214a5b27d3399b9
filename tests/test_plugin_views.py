"""The Health tab's views of what happened and where, in headless Chromium against a real
TensorBoard over real trainings (tests/plugin_helpers.py ``tab_runs`` and ``finished_runs``):
events on the charts, the LR chart of a long step schedule, grouped alert banners, the
per-layer heatmap, finished short runs, and runs side by side. One test per deliverable of the
issue; each leaves a screenshot in test-artifacts/.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tbhealth.run.rundir import RunDir
from tests.plugin_helpers import (
    ARTIFACTS, evidence, finished_runs, frame, free_port, row, shoot, start_tensorboard, stop_process, tab_in_chromium,
    tab_runs, tid, wait_for, wait_for_listing,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(900)]

T = 60_000  # ms: two shared CPU cores run TensorBoard and Chromium at once


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("views") / "runs"
    shutil.copytree(tab_runs(tmp_path_factory), logdir)
    for name in ("r1", "r2"):
        shutil.copytree(finished_runs(tmp_path_factory) / name, logdir / name)
    port = free_port()
    tb = start_tensorboard(logdir, port)
    try:
        wait_for_listing(port)
        yield {"logdir": logdir, "port": port}
    finally:
        stop_process(tb)


@pytest.fixture(scope="module")
def page(board):
    with tab_in_chromium(board["port"]) as (page, errors):
        frame(page).locator(tid("overview")).wait_for(timeout=T)
        yield page
    assert not errors, errors


def go(page, route: str) -> None:
    """Open a route of the tab (``run=NAME``, ``compare=A,B``, or ``""`` for the overview)."""
    frame(page).locator("body").evaluate("(body, hash) => { location.hash = hash; }", route)


def plot(f, chart: str, expression: str):
    """Evaluate ``expression`` (JS, ``el`` is the Plotly div) on a chart once it has been drawn."""
    el = f.locator(tid(chart))
    wait_for(lambda: el.evaluate("el => !!el.data"), 60, f"{chart} to be drawn")
    return el.evaluate(f"el => {expression}")


def open_run(page, run: str, chart: str = "chart-loss"):
    go(page, f"run={run}")
    f = frame(page)
    wait_for(lambda: f.locator(tid("run-title")).inner_text() == run, 30, f"{run}'s page")
    wait_for(lambda: plot(f, chart, "el.data.some(t => t.x.length)"), 90, f"{run}'s {chart} with data")
    return f


def svg_texts(locator) -> list[str]:
    """The text of SVG elements (tick labels): they have no innerText."""
    return locator.evaluate_all("els => els.map(e => e.textContent)")


STRIP = "el.data.filter(t => t.yaxis === 'y5').map(t => ({name: t.name, text: t.text, n: t.x.length}))"


def test_events_on_charts_with_toggles_and_timeline(board, page):
    f = open_run(page, "eventful")
    with evidence(page, "events"):
        wait_for(lambda: len(plot(f, "chart-loss", STRIP)) == 3, 30, "alerts, controls and LR changes on the loss chart")
        strip = {t["name"]: t for t in plot(f, "chart-loss", STRIP)}
        controls = " ".join(strip["Control actions"]["text"])
        for command in ("pause done", "resume done", "checkpoint done", "stop done"):
            assert command in controls, controls
        assert "LR 0.5 → 0.25" in " ".join(strip["LR changes"]["text"])
        assert f.locator(tid("events-count-control")).inner_text() == "(4)"
        for chart in ("chart-acc", "chart-steps"):
            assert {t["name"] for t in plot(f, chart, STRIP)} == set(strip), chart
        lanes = plot(f, "chart-timeline", "el.layout.yaxis.categoryarray")
        assert "Control actions" in lanes and "LR changes" in lanes and any(lane.startswith("⚠ ") for lane in lanes)
        f.locator(tid("toggle-control")).uncheck()
        wait_for(lambda: "Control actions" not in {t["name"] for t in plot(f, "chart-loss", STRIP)}, 20, "controls hidden")
        assert "Control actions" not in plot(f, "chart-timeline", "el.layout.yaxis.categoryarray")
        f.locator(tid("toggle-control")).check()
        wait_for(lambda: len(plot(f, "chart-loss", STRIP)) == 3, 20, "controls shown again")
        marker = f.locator(f'{tid("chart-loss")} .scatterlayer .trace').last.locator(".point").first
        box = marker.bounding_box()  # Plotly's drag layer lies over its points: move the mouse there
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        hover = f.locator(f'{tid("chart-loss")} .hoverlayer')
        wait_for(lambda: "epoch" in (hover.text_content() or ""), 20, "the hover text of an event")
        page.screenshot(path=str(ARTIFACTS / "events-hover.png"))
    shoot(page, "events-on-charts", 2200)


def test_alert_history_filters_and_links_to_the_chart(board, page):
    f = open_run(page, "eventful")
    alerts = RunDir(board["logdir"] / "eventful").read_alerts()
    f.locator(f'{tid("alert-history")} summary').click()
    rows = f.locator(tid("alert-row"))
    wait_for(lambda: rows.count() == len(alerts), 30, "every alert in the history")
    rule = alerts[0]["rule"]
    f.locator(tid("alert-filter-rule")).select_option(rule)
    of_rule = sum(a["rule"] == rule for a in alerts)
    wait_for(lambda: rows.count() == of_rule, 20, f"the {rule} alerts only")
    f.locator(tid("alert-filter-status")).select_option("resolved")
    resolved = sum(a["rule"] == rule and a.get("resolved") for a in alerts)
    wait_for(lambda: rows.count() == resolved, 20, f"the resolved {rule} alerts only")
    f.locator(tid("alert-filter-rule")).select_option("")
    f.locator(tid("alert-filter-status")).select_option("")
    target = rows.first.get_attribute("data-alert-id")
    rows.first.locator(tid("alert-show")).click()
    charts = f.locator(tid("section-charts"))
    wait_for(lambda: charts.locator(".charts-wrap").get_attribute("data-highlight") == target, 20, "the alert highlighted")
    wait_for(lambda: plot(f, "chart-loss", "(el.layout.shapes || []).length") >= 1, 20, "a line at the alert on the loss chart")
    assert plot(f, "chart-timeline", "(el.layout.shapes || []).length") >= 1
    shoot(page, "alert-linked-to-chart", 2400)
    f.locator(tid("alert-show-banner")).first.click()  # a banner links to its alert too
    lead = f.locator(tid("alert-banner")).first.get_attribute("data-alert-id")
    wait_for(lambda: charts.locator(".charts-wrap").get_attribute("data-highlight") == lead, 20, "the banner's alert highlighted")


def test_lr_chart_of_a_long_step_schedule_stays_readable(board, page):
    f = open_run(page, "steplr", "chart-lr")
    with evidence(page, "lr"):
        assert plot(f, "chart-lr", "(el.layout.annotations || []).length") == 0  # no text on the chart
        marked = plot(f, "chart-lr", "el.data.find(t => t.name === 'LR reduced').text")
        assert len(marked) == 33 and marked[-1].endswith("e-21"), marked[-3:]
        ticks = svg_texts(f.locator(f'{tid("chart-lr")} .ytick text'))
        assert 3 <= len(ticks) <= 8 and len(set(ticks)) == len(ticks), ticks
        assert any("e" in t for t in ticks), ticks  # 1e-12, not 0.000000000001
        changes = f.locator(tid("lr-changes"))
        assert changes.get_attribute("open") is None  # collapsed
        assert f.locator(tid("lr-changes-summary")).inner_text() == "33 LR reductions"
        f.locator(tid("lr-changes-summary")).click()
        labels = f.locator(tid("lr-reduction")).all_inner_texts()
        assert len(labels) == 33 and not any(re.search(r"to 0$", label) for label in labels)
    shoot(page, "lr-many-reductions", 1800)


def test_deep_sigmoid_net_one_banner_and_dark_first_layers(board, page):
    f = open_run(page, "vanishing20")
    banners = f.locator(tid("alert-banner"))
    with evidence(page, "vanishing"):
        wait_for(lambda: banners.count() == 1, 30, "one banner for the whole vanishing-gradients episode")
        assert int(banners.first.get_attribute("data-layers")) >= 10
        assert re.search(r"\+\d+ layers: fc2, fc3", banners.first.inner_text())
        chart = f.locator(tid("chart-layers"))
        wait_for(lambda: plot(f, "chart-layers", "el.data.length === 1 && el.data[0].type === 'heatmap'"), 60, "the heatmap")
        rows = chart.get_attribute("data-rows").split("|")
        assert rows == [f"fc{i}" for i in range(1, 21)] + ["out"]
        assert "fc1" in chart.get_attribute("data-flagged").split("|")
        means = plot(f, "chart-layers", "el.data[0].z.map(r => r.reduce((a, b) => a + b, 0) / r.length)")
        assert means[0] < -10 < -3 < means[-1]  # log10 grad norm: first layer ~1e-17, last ~1e-1
        f.locator(tid("layers-metric-dead_units")).click()
        wait_for(lambda: chart.get_attribute("data-metric") == "dead_units", 20, "the dead-units heatmap")
        f.locator(tid("layers-metric-grad_norm")).click()
    shoot(page, "vanishing-20-layers", 2600)


def test_diverged_run_shows_the_critical_banner_first(board, page):
    f = open_run(page, "diverged", "chart-steps")
    banners = f.locator(tid("alert-banner"))
    wait_for(lambda: banners.count() >= 1, 30, "banners")
    assert banners.first.get_attribute("data-severity") == "critical"
    assert "divergence" in banners.first.inner_text()
    severities = [banners.nth(i).get_attribute("data-severity") for i in range(banners.count())]
    assert severities == sorted(severities, key=["critical", "warning", "info"].index)
    shoot(page, "diverged", 1400)


def test_finished_short_run_has_integer_epochs_and_no_live_readings(board, page):
    f = open_run(page, "r1")
    with evidence(page, "short"):
        wait_for(lambda: svg_texts(f.locator(f'{tid("chart-loss")} .xtick text')) == ["1", "2", "3"], 30,
                 "ticks at epochs 1, 2, 3 only")
        for cell in ("status-cpu", "status-ram", "status-disk", "status-gpu"):
            assert "run ended" in f.locator(tid(cell)).inner_text(), cell
        assert f.locator(tid("status-ended")).is_visible() and f.locator(tid("status-eta")).inner_text() == "done"
    shoot(page, "finished-3-epochs", 1600)


def test_runs_side_by_side(board, page):
    go(page, "")
    f = frame(page)
    for run in ("r1", "r2", "steplr"):
        row(page, run).locator(tid("run-select")).check()
    f.locator(tid("compare-selected")).click()
    f.locator(tid("compare-page")).wait_for(timeout=T)
    table = f.locator(tid("compare-row"))
    wait_for(lambda: table.count() == 3, 20, "a row per compared run")
    def states():
        return {table.nth(i).get_attribute("data-run"): table.nth(i).locator(tid("state-badge")).get_attribute("data-state")
                for i in range(table.count())}

    wait_for(lambda: states().get("r1") == "completed", 30, "the compared runs' states")
    assert set(states()) == {"r1", "r2", "steplr"} and "unknown" not in states().values()
    wait_for(lambda: plot(f, "compare-loss", "el.data.filter(t => t.x.length).length") >= 4, 60, "the compared curves")
    names = plot(f, "compare-loss", "el.data.map(t => t.name)")
    assert {"r1", "r2", "steplr", "r1 (train)"} <= set(names)
    assert plot(f, "compare-acc", "el.data.length") == 6
    shoot(page, "runs-side-by-side", 1000)
    f.locator(tid("back-link")).click()
    f.locator(tid("overview")).wait_for(timeout=T)
