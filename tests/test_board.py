"""`tbhealth board`: the TensorBoard command line, and (slow) a real TensorBoard started and stopped."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbhealth_cli.app import app
from tbhealth_cli.board import board_args, board_url

TBHEALTH = shutil.which("tbhealth") or str(Path(sys.executable).with_name("tbhealth"))


def test_board_args_suit_live_monitoring():
    args = board_args(Path("runs"), port=6010)
    assert args[:3] == [sys.executable, "-m", "tensorboard.main"]
    assert "--logdir=runs" in args and "--port=6010" in args and "--host=localhost" in args
    assert "--reload_interval=2" in args
    assert "--samples_per_plugin=text=0" in args
    assert "--tbhealth_read_only" not in args
    assert not any(a.startswith("--bind_all") for a in args)


def test_board_args_read_only_and_host():
    args = board_args("/data/runs", port=7000, host="0.0.0.0", read_only=True)
    assert "--tbhealth_read_only" in args and "--host=0.0.0.0" in args and "--logdir=/data/runs" in args
    assert not any(a.startswith("--bind_all") for a in args)


@pytest.mark.parametrize(
    ("host", "url"),
    [("localhost", "http://localhost:6006/#tbhealth"), ("0.0.0.0", "http://localhost:6006/#tbhealth"),
     ("10.1.2.3", "http://10.1.2.3:6006/#tbhealth"), ("::1", "http://[::1]:6006/#tbhealth")],
)
def test_board_url(host, url):
    assert board_url(6006, host) == url


def test_board_refuses_a_file_as_logdir(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    result = CliRunner().invoke(app, ["board", str(f)])
    assert result.exit_code == 2 and "is a file" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


@pytest.mark.slow
def test_board_serves_tensorboard_and_stops_on_ctrl_c(tmp_path):
    port = _free_port()
    out, err = (tmp_path / "out.txt").open("w+"), (tmp_path / "err.txt").open("w+")
    proc = subprocess.Popen([TBHEALTH, "board", str(tmp_path), "--port", str(port), "--read-only"],
                            stdout=out, stderr=err)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"board exited early: {(tmp_path / 'err.txt').read_text()[-2000:]}"
            try:
                status, body = _get(f"{base}/data/plugins_listing")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert status == 200
        assert "tbhealth" in json.loads(body)  # the Health tab is loaded
        _, env = _get(f"{base}/data/environment")
        assert json.loads(env)["data_location"] == str(tmp_path)
        _, config = _get(f"{base}/data/plugin/tbhealth/config")
        assert json.loads(config)["read_only"] is True  # --read-only reached the plugin

        proc.send_signal(signal.SIGINT)  # what Ctrl-C does; board forwards it to TensorBoard
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.seek(0)
    assert f"http://localhost:{port}/#tbhealth" in out.read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _get(f"{base}/data/plugins_listing")  # TensorBoard went with it
