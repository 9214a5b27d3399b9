"""The Health tab's frontend files, held in memory and served by the plugin's own routes.

TensorBoard has no static-file handler for plugins, and the page may load nothing from other
origins (CSP, and offline machines): the ES modules ship in ``static/`` and plotly.js comes from
the installed ``plotly`` wheel. Both are read once; plotly (about 5 MB) is gzipped once too,
instead of on every request as ``http_util.Respond`` would.
"""

from __future__ import annotations

import gzip
import threading
from importlib import resources

STATIC_PACKAGE = "tbhealth_plugin"
_JS = "text/javascript; charset=utf-8"
#: Served file name -> content type. Nothing outside this table is ever read from disk.
STATIC_FILES = {
    **{name: _JS for name in (
        "index.js", "model.js", "views.js", "overview.js", "runpage.js", "controls.js", "alerts.js", "plotting.js",
        "charts.js", "events.js", "layers.js", "compare.js",
    )},
    "style.css": "text/css; charset=utf-8",
}
PLOTLY_FILE = "plotly.min.js"
PLOTLY_CONTENT_TYPE = _JS

_lock = threading.Lock()
_cache: dict[str, bytes] = {}


def static_file(name: str) -> bytes:
    """The bytes of ``static/<name>`` (a name from ``STATIC_FILES``), cached after the first read."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    data = _cache.get(name)
    if data is None:
        data = resources.files(STATIC_PACKAGE).joinpath("static", name).read_bytes()
        _cache[name] = data
    return data


def plotly_gzipped() -> bytes:
    """plotly.js from the installed ``plotly`` package, gzip-compressed once per process."""
    data = _cache.get(PLOTLY_FILE)
    if data is None:
        with _lock:
            data = _cache.get(PLOTLY_FILE)
            if data is None:
                from plotly.offline import get_plotlyjs  # imported on first use: TB starts faster

                data = gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=6, mtime=0)
                _cache[PLOTLY_FILE] = data
    return data

