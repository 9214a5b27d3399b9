"""The wheel: import names that carry the project's name, the tab's assets, both entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_only_project_named_modules(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next(tmp_path.glob("tbhealth-*.whl")))
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"tbhealth", "tbhealth_cli", "tbhealth_plugin"}, "no bare `cli` or `tb_plugin` in site-packages"
    for asset in ("index.js", "model.js", "views.js", "style.css"):
        assert f"tbhealth_plugin/static/{asset}" in names
    assert "tbhealth_plugin/http_api.md" in names
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tbhealth = tbhealth_cli.app:main" in entry_points
    assert "tbhealth = tbhealth_plugin.plugin:HealthLoader" in entry_points
