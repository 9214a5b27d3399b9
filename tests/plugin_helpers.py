"""Shared pieces of the Health-tab tests: real trainings, TensorBoard's own WSGI app, a real
TensorBoard process. Nothing here fakes a component; it only starts the real ones."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tensorboard import program
from tensorboard.backend import application
from tensorboard.plugins.core import core_plugin
from werkzeug.test import Client

from tbhealth.run.rundir import RunDir
from tbhealth_plugin.guards import REQUEST_HEADER
from tbhealth_plugin.plugin import HealthLoader

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits.yaml"
PREFIX = "/data/plugin/tbhealth"
# One torch thread per training: these models are tiny, and on a 2-core CI machine that runs
# several processes at once, torch's default thread pool makes an epoch ~20x slower.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CONTROL_HEADERS = {REQUEST_HEADER: "1", "Content-Type": "application/json"}


def tbhealth_exe() -> str:
    """The ``tbhealth`` console script of the interpreter running the tests."""
    exe = Path(sys.executable).with_name("tbhealth")
    return str(exe) if exe.exists() else (shutil.which("tbhealth") or "tbhealth")


def train(logdir: Path, name: str, *overrides: str, config: Path = DIGITS, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``tbhealth train`` to completion; fails the test with its output if it does not exit 0."""
    cmd = [tbhealth_exe(), "train", str(config), "--logdir", str(logdir), "--name", name]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=TRAIN_ENV)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def start_training(logdir: Path, name: str, *overrides: str, config: Path = DIGITS,
                   output: Path | None = None) -> subprocess.Popen:
    """Start ``tbhealth train`` in the background (a live run); the caller stops it.

    Its output goes to a pipe, or to the file ``output`` for long runs (a full pipe would block it).
    """
    cmd = [tbhealth_exe(), "train", str(config), "--logdir", str(logdir), "--name", name]
    for o in overrides:
        cmd += ["--set", o]
    if output is None:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=TRAIN_ENV)
    with open(output, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, env=TRAIN_ENV)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_state(logdir: Path, name: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    rd = RunDir(logdir / name)

    def check():
        s = rd.read_status()
        return s if s and s["state"] in states else None

    return wait_for(check, timeout, f"run {name} to reach {states}")


# --------------------------------------------------------------------------- shared real runs

#: ``r1``: 3 epochs with StepLR(step_size=1) so the LR falls at epochs 2 and 3 (gamma 0.3 from 0.003).
FINISHED_R1 = ("epochs=3", "scheduler.kwargs.step_size=1")
#: ``r2``: a learning rate far too high, so the health engine raises alerts (and may stop it:
#: divergence's default action); started after r1.
FINISHED_R2 = ("epochs=3", "optimizer.lr=5")
_shared: dict[str, Path] = {}


def finished_runs(tmp_path_factory) -> Path:
    """A logdir with two finished real trainings, ``r1`` and ``r2``; trained once per session.

    The two trainings run side by side; r2 starts once r1 wrote its first status, so r2 is the
    newer run (its start time is later) whatever the machine's load.
    """
    if "finished" not in _shared:
        logdir = tmp_path_factory.mktemp("finished")
        p1 = start_training(logdir, "r1", *FINISHED_R1)
        wait_for(lambda: RunDir(logdir / "r1").exists() or p1.poll() is not None, 240, "r1's first status",
                 interval=0.05)
        p2 = start_training(logdir, "r2", *FINISHED_R2)
        for name, proc in (("r1", p1), ("r2", p2)):
            out, _ = proc.communicate(timeout=300)
            state = (RunDir(logdir / name).read_status() or {}).get("state")
            assert proc.returncode == 0 and state in ("completed", "stopped"), (
                f"training {name} exited {proc.returncode} in state {state}:\n{out}")
        _shared["finished"] = logdir
    return _shared["finished"]


def start_live(logdir: Path, name: str, *overrides: str) -> subprocess.Popen:
    """A training that runs until told to stop, once it reports ``training``."""
    output = logdir.parent / f"{logdir.name}-{name}.out"
    proc = start_training(logdir, name, "epochs=100000", *overrides, output=output)
    try:
        wait_for_state(logdir, name, ("training",), timeout=240)  # a loaded CI box imports torch slowly
    except AssertionError:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"live run {name} did not start:\n{output.read_text()}") from None
    return proc


def control_and_wait(logdir: Path, name: str, command: str, timeout: float = 120) -> dict:
    """Send ``command`` the way the CLI does and return the trainer's acknowledgement."""
    rd = RunDir(logdir / name)
    rid = rd.request_control(command, source="test")
    ack = rd.wait_for_ack(rid, timeout)
    assert ack is not None, f"no acknowledgement of {command} from {name} in {timeout}s"
    return ack


def end_live(proc: subprocess.Popen, logdir: Path, name: str, timeout: float = 60) -> None:
    """Stop a live run through its control channel (killing it only if that fails)."""
    if proc.poll() is None:
        try:
            RunDir(logdir / name).request_control("stop", source="test")
            proc.wait(timeout)
        except Exception:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- TensorBoard's WSGI app


def tb_flags(logdir: Path, *extra: str):
    """TensorBoard's parsed flags, with the Health tab's own flags defined by its loader."""
    tb = program.TensorBoard(plugins=[core_plugin.CorePluginLoader, HealthLoader], assets_zip_provider=lambda: None)
    tb.configure(argv=["", "--logdir", str(logdir), "--load_fast", "false", "--reload_interval", "0",
                       "--reload_task", "blocking", *extra])
    return tb


def make_app(logdir: Path, *extra: str):
    """TensorBoard's own application over ``logdir`` (data loaded once, synchronously) with only
    the core plugin and the Health tab, as a werkzeug test client."""
    tb = tb_flags(logdir, *extra)
    provider, multiplexer = tb._make_data_provider()
    app = application.TensorBoardWSGIApp(tb.flags, tb.plugin_loaders, provider, None, multiplexer)
    return Client(app)


def post_control(client: Client, body, headers: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    return client.post(PREFIX + "/control", data=data, headers=CONTROL_HEADERS if headers is None else headers)


# --------------------------------------------------------------------------- a real TensorBoard process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    tb = Path(sys.executable).with_name("tensorboard")
    cmd = [str(tb), "--logdir", str(logdir), "--port", str(port), "--reload_interval", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_listing(port: int, timeout: float = 60) -> dict:
    """``/data/plugins_listing`` once the server answers it."""

    def fetch():
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/data/plugins_listing", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    return wait_for(fetch, timeout, f"TensorBoard on port {port}", interval=0.1)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> str:
    """Terminate ``proc`` (if still running) and return what it printed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    out = proc.stdout.read() if proc.stdout else ""
    return out or ""


# --------------------------------------------------------------------------- runs the Health tab's views are about

VANISHING = REPO / "examples" / "vanishing.yaml"
DIVERGE = REPO / "examples" / "diverge.yaml"
#: 20 sigmoid layers: the first ~13 layers' gradients vanish (one rule, many layers).
VANISHING_20 = ("model.kwargs.hidden=[" + ",".join(["32"] * 20) + "]",)
#: StepLR cutting the rate every epoch for 34 epochs: 33 reductions, down to ~1e-21.
MANY_LR_CUTS = ("epochs=34", "scheduler.kwargs.step_size=1", "scheduler.kwargs.gamma=0.28")
#: A learning rate that kills units and gradients (alerts) on a run that is paused, resumed and
#: checkpointed while the LR falls every 2 epochs: every kind of event.
EVENTFUL = ("optimizer.lr=0.5", "scheduler.kwargs.step_size=2", "scheduler.kwargs.gamma=0.5", "logging.every_steps=2")


def eventful_run(logdir: Path, name: str = "eventful") -> Path:
    """A real training steered like a user would: pause, resume, checkpoint, then stop."""
    proc = start_live(logdir, name, *EVENTFUL)
    try:
        wait_for(lambda: (RunDir(logdir / name).read_status() or {}).get("epoch", 0) >= 3, 120, f"{name} in epoch 3")
        for command in ("pause", "resume", "checkpoint"):
            assert control_and_wait(logdir, name, command)["status"] == "done", command
        wait_for(lambda: (RunDir(logdir / name).read_status() or {}).get("epoch", 0) >= 6, 120, f"{name} in epoch 6")
        assert control_and_wait(logdir, name, "stop")["status"] == "done"
        proc.wait(60)
    finally:
        end_live(proc, logdir, name)
    return logdir / name


def tab_runs(tmp_path_factory) -> Path:
    """A logdir with the runs the tab's views are about, trained once per session:
    ``vanishing20``, ``steplr`` (33 LR reductions), ``diverged`` (stopped by the divergence
    rule) and ``eventful`` (alerts, controls and LR changes)."""
    if "tab" not in _shared:
        logdir = tmp_path_factory.mktemp("tab")
        procs = [start_training(logdir, "vanishing20", *VANISHING_20, config=VANISHING),
                 start_training(logdir, "steplr", *MANY_LR_CUTS)]
        eventful_run(logdir)
        procs.append(start_training(logdir, "diverged", config=DIVERGE))
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"training exited {proc.returncode}:\n{out}"
        _shared["tab"] = logdir
    return _shared["tab"]


# --------------------------------------------------------------------------- the tab in headless Chromium

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def tab_in_chromium(port: int):
    """``(page, errors)``: headless Chromium at 1400x1000 on the Health tab of the TensorBoard at
    ``port``, and the page's uncaught JavaScript errors so far (a test asserts there are none)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://localhost:{port}/#tbhealth")
        try:
            yield page, errors
        finally:
            browser.close()


def frame(page):
    return page.frame_locator("iframe")


def tid(name: str) -> str:
    return f'[data-testid="{name}"]'


def row(page, run: str):
    return frame(page).locator(f'{tid("run-row")}[data-run="{run}"]')


def shoot(page, name: str, height: int = 1000) -> None:
    """Screenshot with a viewport tall enough that the tab's iframe shows everything."""
    page.mouse.move(1, height - 1)  # no hover effects (Plotly's mode bar) in the picture
    page.set_viewport_size({"width": 1400, "height": height})
    page.wait_for_timeout(1500)  # Plotly relayouts on resize
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    page.set_viewport_size({"width": 1400, "height": 1000})


@contextlib.contextmanager
def evidence(page, name: str):
    """On failure, leave a screenshot of what the browser showed in test-artifacts/."""
    try:
        yield
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / f"failed-{name}.png"), full_page=True)
        raise
