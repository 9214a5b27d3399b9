"""The Health tab in a real browser against a real TensorBoard and real trainings.

One TensorBoard process serves a logdir with two finished runs and one live training; headless
Chromium drives the tab the way a user does. The tests run in file order and share the page:
overview, run page, pause/resume, checkpoint download, stop. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tbhealth.run.rundir import RunDir
from tests.plugin_helpers import (
    end_live, evidence, finished_runs, frame, free_port, row, shoot, start_live, start_tensorboard, stop_process,
    tab_in_chromium, tid, wait_for, wait_for_listing,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(600)]

#: The LR halves every 3 epochs: the first reduction comes within seconds, and there are still
#: few enough for the chart to label each one while the test looks.
LIVE = ("scheduler.kwargs.step_size=3", "scheduler.kwargs.gamma=0.5", "logging.every_steps=5")
T = 60_000  # ms: generous, two CPU cores run TensorBoard, Chromium and a training at once


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("e2e") / "runs"
    shutil.copytree(finished_runs(tmp_path_factory), logdir)
    proc = start_live(logdir, "live", *LIVE)
    port = free_port()
    tb = start_tensorboard(logdir, port)
    try:
        listing = wait_for_listing(port)
        yield {"logdir": logdir, "port": port, "trainer": proc, "listing": listing}
    finally:
        end_live(proc, logdir, "live")
        stop_process(tb)


@pytest.fixture(scope="module")
def browser_page(board):
    with tab_in_chromium(board["port"]) as page_and_errors:
        yield page_and_errors


@pytest.fixture(scope="module")
def browser(browser_page):
    return browser_page[0].context.browser


def badge_state(locator) -> str:
    return locator.get_attribute("data-state")


def test_health_tab_is_listed(board, browser_page):
    page, _ = browser_page
    entry = board["listing"]["tbhealth"]
    assert entry["enabled"] and entry["tab_name"] == "Health"
    page.get_by_role("tab", name=re.compile("health", re.I)).wait_for(timeout=T)


def test_overview_shows_the_live_and_the_finished_runs(board, browser_page):
    page, _ = browser_page
    live, r1 = row(page, "live"), row(page, "r1")
    live.wait_for(timeout=T)
    assert badge_state(live.locator(tid("state-badge"))) == "training"
    assert badge_state(r1.locator(tid("state-badge"))) == "completed"
    assert re.fullmatch(r"\d+/100000", live.locator(tid("run-epoch")).inner_text())
    assert r1.locator(tid("run-epoch")).inner_text() == "3/3"
    assert r1.locator(tid("run-val-acc")).inner_text().endswith("%")
    names = frame(page).locator(tid("run-row")).evaluate_all("rows => rows.map(r => r.dataset.run)")
    assert names[0] == "live" and set(names) == {"live", "r1", "r2"}  # newest first
    shoot(page, "overview", 700)


def test_alert_banners_and_remembered_dismissal(board, browser_page):
    page, _ = browser_page
    f = frame(page)
    alerts = RunDir(board["logdir"] / "r2").read_alerts()
    active = [a for a in alerts if not a.get("resolved")]
    assert active, "r2 trains with a learning rate of 5 and should end with an active alert"
    episodes = {(a["rule"], a.get("rank")) for a in active}  # one banner per rule (and rank)
    row(page, "r2").locator(tid("run-link")).click()
    banners = f.locator(tid("alert-banner"))
    wait_for(lambda: banners.count() == len(episodes), 30, "one banner per open rule episode")
    text = f.locator(tid("alert-banners")).inner_text()
    assert all(rule in text for rule, _ in episodes) and any(a["message"] in text for a in active)
    f.locator(f'{tid("alert-history")} summary').click()
    assert f.locator(tid("alert-row")).count() == len(alerts)
    f.locator(f'{tid("chart-steps")} svg.main-svg').first.wait_for(timeout=T)
    shoot(page, "run-alerts", 1400)
    dismissed = banners.first.get_attribute("data-alert-id")
    banners.first.locator(tid("alert-dismiss")).click()
    assert banners.count() == len(episodes) - 1
    page.reload()
    with evidence(page, "reload"):
        row(page, "r2").locator(tid("run-link")).click()
        s = RunDir(board["logdir"] / "r2").read_status()
        epoch = f"{s['epoch']}/{s['total_epochs']}"
        wait_for(lambda: f.locator(tid("status-epoch")).inner_text() == epoch, 30, "r2 status after reload")
    page.wait_for_timeout(500)
    assert banners.count() == len(episodes) - 1
    assert f.locator(f'{tid("alert-banner")}[data-alert-id="{dismissed}"]').count() == 0
    f.locator(tid("back-link")).click()
    row(page, "live").wait_for(timeout=T)


def test_run_page_shows_status_progress_cards_curves_lr_markers_and_logs(board, browser_page):
    page, _ = browser_page
    f = frame(page)
    row(page, "live").locator(tid("run-link")).click()
    f.locator(tid("run-page")).wait_for(timeout=T)
    assert f.locator(tid("run-title")).inner_text() == "live"
    wait_for(lambda: badge_state(f.locator(tid("run-state"))) == "training", 30, "training badge")
    assert re.fullmatch(r"\d+/100000", f.locator(tid("status-epoch")).inner_text())
    assert f.locator(tid("status-gpu")).inner_text() == "no GPU"
    assert "%" in f.locator(tid("status-cpu")).inner_text()
    assert re.match(r"Epoch \d+/100000 – Batch \d+/\d+", f.locator(tid("progress-epoch-label")).inner_text())
    # Cards get values once the first epoch is done; the LR falls at epoch 2 and TB reloads every second.
    f.locator(tid("lr-reduction")).first.wait_for(state="attached", timeout=T * 2)
    assert re.fullmatch(r"Epoch \d+: LR reduced to [0-9.e-]+", f.locator(tid("lr-reduction")).first.text_content())
    for card in ("card-train-loss", "card-val-loss", "card-train-acc", "card-val-acc", "card-lr"):
        assert f.locator(f"{tid(card)} {tid('card-value')}").inner_text() not in ("", "—"), card
    for chart in ("chart-loss", "chart-acc", "chart-lr"):
        f.locator(f"{tid(chart)} svg.main-svg").first.wait_for(timeout=T)
    assert f.locator(f'{tid("chart-loss")} .scatterlayer .trace').count() >= 2  # train and val (+ events)
    # every reduction is a marker with its label as hover text, none as text on the chart
    marked = f.locator(tid("chart-lr")).evaluate("el => el.data.filter(t => t.name === 'LR reduced').flatMap(t => t.text)")
    assert marked and all("LR reduced to" in t for t in marked)
    assert not f.locator(tid("chart-lr")).evaluate("el => (el.layout.annotations || []).length")
    assert f.locator(tid("log-line")).count() > 0
    assert "Epoch 1/100000 done" in f.locator(tid("logs")).inner_text()
    assert re.fullmatch(r"\d+ warnings?", f.locator(tid("log-warnings")).inner_text())


def test_logs_follow_the_tail_unless_scrolled_up(browser_page):
    page, _ = browser_page
    f = frame(page)
    logs, lines = f.locator(tid("logs")), f.locator(tid("log-line"))
    wait_for(lambda: logs.evaluate("el => el.scrollHeight > el.clientHeight + 40"), 90, "logs to overflow their box")
    at_bottom = "el => el.scrollHeight - el.scrollTop - el.clientHeight < 8"
    assert logs.evaluate(at_bottom), "new lines keep the tail in view"
    logs.evaluate("el => { el.scrollTop = 10; }")  # the user scrolls up to read
    n = lines.count()
    wait_for(lambda: lines.count() > n, 30, "more log lines")
    assert logs.evaluate("el => el.scrollTop") == 10, "a user who scrolled up is left where they are"
    logs.evaluate("el => { el.scrollTop = el.scrollHeight; }")
    n = lines.count()
    wait_for(lambda: lines.count() > n, 30, "more log lines")
    assert logs.evaluate(at_bottom)


def test_pause_then_resume(board, browser_page):
    page, _ = browser_page
    f = frame(page)
    f.locator(tid("btn-pause")).click()
    f.locator(f'{tid("control-outcome")}[data-status="done"]').wait_for(timeout=T)
    assert f.locator(tid("control-outcome")).inner_text().startswith("pause done")
    wait_for(lambda: badge_state(f.locator(tid("run-state"))) == "paused", 30, "paused badge")
    assert RunDir(board["logdir"] / "live").read_status()["state"] == "paused"
    assert f.locator(tid("btn-pause")).is_hidden() and f.locator(tid("btn-resume")).is_visible()
    f.locator(tid("btn-resume")).click()
    wait_for(lambda: f.locator(tid("control-outcome")).inner_text().startswith("resume done"), 60, "resume ack")
    wait_for(lambda: badge_state(f.locator(tid("run-state"))) == "training", 30, "training badge")


def test_save_checkpoint_offers_a_working_download(board, browser_page):
    page, _ = browser_page
    f = frame(page)
    f.locator(tid("btn-checkpoint")).click()
    link = f.locator(tid("checkpoint-link"))
    link.wait_for(timeout=T)
    href = link.get_attribute("href")
    name = re.search(r"name=([^&]+)", href).group(1)
    on_disk = RunDir(board["logdir"] / "live").checkpoint_file(name)
    assert on_disk is not None
    response = page.request.get(f"http://localhost:{board['port']}/data/plugin/tbhealth/{href}")
    assert response.status == 200 and len(response.body()) == on_disk.stat().st_size > 0
    with page.expect_download(timeout=T) as download:
        link.click()
    assert download.value.suggested_filename == name
    shoot(page, "run", 3000)


def set_tensorboard_theme(page, name: str) -> None:
    """Pick a theme with TensorBoard's own header menu (it toggles body.dark-mode)."""
    page.locator("app-header-dark-mode-toggle-component button").click()
    page.get_by_role("menuitem", name=name, exact=True).click()


def test_dark_theme_follows_tensorboard(browser_page):
    page, _ = browser_page
    html = frame(page).locator("html")
    assert html.get_attribute("data-theme") == "light"
    set_tensorboard_theme(page, "Dark")
    try:
        wait_for(lambda: html.get_attribute("data-theme") == "dark", 20, "dark theme")
        shoot(page, "run-dark", 3000)
    finally:
        set_tensorboard_theme(page, "Light")
    wait_for(lambda: html.get_attribute("data-theme") == "light", 20, "light theme again")


def test_stop_asks_for_confirmation_then_the_trainer_exits(board, browser_page):
    page, errors = browser_page
    f = frame(page)
    f.locator(tid("btn-stop")).click()
    dialog = f.locator(tid("confirm-stop"))
    dialog.wait_for(timeout=T)
    f.locator(tid("confirm-stop-cancel")).click()
    assert dialog.count() == 0 and board["trainer"].poll() is None  # cancel does nothing
    f.locator(tid("btn-stop")).click()
    f.locator(tid("confirm-stop-yes")).click()
    assert board["trainer"].wait(90) == 0
    wait_for(lambda: badge_state(f.locator(tid("run-state"))) == "stopped", 30, "stopped badge")
    assert f.locator(tid("btn-pause")).is_disabled()
    f.locator(tid("back-link")).click()
    wait_for(lambda: badge_state(row(page, "live").locator(tid("state-badge"))) == "stopped", 30, "overview badge")
    assert not errors, errors


def test_read_only_board_hides_the_controls(board, browser):
    """A second TensorBoard on the same logdir, started with --tbhealth_read_only."""
    port = free_port()
    tb = start_tensorboard(board["logdir"], port, "--tbhealth_read_only")
    page = browser.new_page()
    try:
        wait_for_listing(port)
        page.goto(f"http://localhost:{port}/#tbhealth")
        row(page, "r1").locator(tid("run-link")).click()
        f = frame(page)
        f.locator(tid("controls-readonly")).wait_for(timeout=T)
        assert f.locator(tid("btn-pause")).count() == 0 and f.locator(tid("btn-stop")).count() == 0
    finally:
        page.close()
        stop_process(tb)
