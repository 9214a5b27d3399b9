"""The Health tab: a TensorBoard plugin that shows and steers tbhealth runs.

TensorBoard imports this module at start-up through the ``tensorboard_plugins`` entry point; an
ImportError here would stop TensorBoard from starting, so it imports only light, always-present
modules (no torch) and ``HealthLoader.load`` never raises. Each route is a thin werkzeug handler:
it parses the request, runs the pure function from ``api``/``scalars`` and serialises the answer.
Routes are documented in ``http_api.md``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers, wsgi

logger = logging.getLogger(__name__)

try:  # a broken install must hide the tab, not stop TensorBoard (an ImportError here would)
    from tbhealth.run.names import list_run_dirs
    from tbhealth_plugin import api, assets, config, events, guards, layers, scalars
except Exception as _e:  # noqa: BLE001
    IMPORT_ERROR: Exception | None = _e
else:
    IMPORT_ERROR = None

PLUGIN_NAME = "tbhealth"

ROUTE_RUNS = "/runs"
ROUTE_STATUS = "/status"
ROUTE_ALERTS = "/alerts"
ROUTE_LOGS = "/logs"
ROUTE_SCALARS = "/scalars"
ROUTE_CHECKPOINT = "/checkpoint"
ROUTE_CONTROL = "/control"
ROUTE_ACK = "/ack"
ROUTE_CONFIG = "/config"
ROUTE_EVENTS = "/events"
ROUTE_LAYERS = "/layers"
ROUTE_PLOTLY = "/plotly.min.js"

#: How long ``is_active`` trusts its last look at the logdir.
ACTIVE_CACHE_S = 5.0
#: Largest ``POST control`` body accepted.
MAX_BODY_BYTES = 4096
JSON = "application/json"


class HealthLoader(base_plugin.TBLoader):
    """Adds the Health tab's flags and builds the plugin; a failure only hides the tab."""

    def define_flags(self, parser):
        group = parser.add_argument_group(PLUGIN_NAME)
        group.add_argument(
            "--tbhealth_read_only",
            action="store_true",
            help="Health tab: show runs but hide and refuse pause/resume/stop/checkpoint.",
        )
        group.add_argument(
            "--tbhealth_allowed_hosts",
            default="",
            metavar="NAMES",
            help="Health tab: extra comma-separated host names this server is reached under "
            "(reverse proxy, DNS alias). Loopback names and IP addresses are always allowed.",
        )

    def load(self, context):
        if IMPORT_ERROR is not None:
            logger.error("tbhealth: Health tab disabled: %s: %s (reinstall tbhealth)",
                         type(IMPORT_ERROR).__name__, IMPORT_ERROR)
            return None
        try:
            return HealthPlugin(context)
        except Exception:  # never break TensorBoard start-up
            logger.exception("tbhealth: Health tab disabled: the plugin failed to load")
            return None


def _handler(check_host: bool = True) -> Callable:
    """Turn ``method(self, request) -> Response`` into a route that never lets an error escape.

    ``ApiError`` becomes a 4xx JSON ``{"error": ...}``; anything else is a bug: logged, 500.
    """

    def wrap(method: Callable) -> Callable:
        @wrappers.Request.application
        def route(self, request):
            try:
                if check_host:
                    refusal = guards.check_host(request.headers.get("Host"), self._allowed_hosts)
                    if refusal:
                        raise api.ApiError(403, refusal)
                return method(self, request)
            except api.ApiError as e:
                return http_util.Respond(request, {"error": e.message}, JSON, code=e.status)
            except Exception:
                logger.exception("tbhealth: %s %s failed", request.method, request.path)
                return http_util.Respond(
                    request, {"error": "internal error in the Health tab; see TensorBoard's log"}, JSON, code=500
                )

        route.__name__ = method.__name__
        return route

    return wrap


def _require_get(request) -> None:
    if request.method not in ("GET", "HEAD"):
        raise api.ApiError(405, f"method {request.method} not allowed; use GET")


class HealthPlugin(base_plugin.TBPlugin):
    """Serves the Health tab: run overview, run page data and the control endpoint."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context):
        self._context = context
        self._logdir = getattr(context, "logdir", None) or None
        self._provider = getattr(context, "data_provider", None)
        flags = getattr(context, "flags", None)
        self._read_only = bool(getattr(flags, "tbhealth_read_only", False))
        extra = str(getattr(flags, "tbhealth_allowed_hosts", "") or "").split(",")
        self._allowed_hosts = guards.allowed_hosts(
            getattr(flags, "host", None), bool(getattr(flags, "bind_all", False)), extra
        )
        self._reload_interval = getattr(flags, "reload_interval", None)
        self._active: tuple[float, bool] = (-float("inf"), False)
        self._active_lock = threading.Lock()

    # -- TBPlugin interface --------------------------------------------------------------------

    def get_plugin_apps(self):
        apps = {
            ROUTE_RUNS: self._serve_runs,
            ROUTE_STATUS: self._serve_status,
            ROUTE_ALERTS: self._serve_alerts,
            ROUTE_LOGS: self._serve_logs,
            ROUTE_SCALARS: self._serve_scalars,
            ROUTE_CHECKPOINT: self._serve_checkpoint,
            ROUTE_CONTROL: self._serve_control,
            ROUTE_ACK: self._serve_ack,
            ROUTE_CONFIG: self._serve_config,
            ROUTE_EVENTS: self._serve_events,
            ROUTE_LAYERS: self._serve_layers,
            ROUTE_PLOTLY: self._serve_plotly,
        }
        for name in assets.STATIC_FILES:
            apps["/" + name] = self._serve_static
        return apps

    def is_active(self):
        """Whether any run under the logdir has tbhealth state; looked up at most every few seconds
        because TensorBoard asks on every plugin listing."""
        now = time.monotonic()
        checked_at, active = self._active
        if now - checked_at < ACTIVE_CACHE_S or not self._logdir:
            return active
        with self._active_lock:
            try:
                active = bool(list_run_dirs(self._logdir))
            except Exception:
                logger.warning("tbhealth: could not scan the logdir", exc_info=True)
                active = False
            self._active = (now, active)
        return active

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Health", disable_reload=False)

    # -- data routes ----------------------------------------------------------------------------

    def _json(self, request, payload):
        """JSON response. Serialised here when the payload is strict JSON already (most are:
        ``schema`` spells NaN as a string), which skips TensorBoard's recursive ``Cleanse`` pass:
        a third of ``GET runs``' time with 500 runs. Anything else goes the general way."""
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            return http_util.Respond(request, payload, JSON)
        return http_util.Respond(request, body, JSON)

    @_handler()
    def _serve_runs(self, request):
        _require_get(request)
        return self._json(request, api.runs_impl(self._logdir))

    @_handler()
    def _serve_status(self, request):
        _require_get(request)
        return self._json(request, api.status_impl(self._logdir, request.args.get("run")))

    @_handler()
    def _serve_alerts(self, request):
        _require_get(request)
        after = api.parse_offset(request.args.get("after"), "after")
        return self._json(request, api.alerts_impl(self._logdir, request.args.get("run"), after))

    @_handler()
    def _serve_logs(self, request):
        _require_get(request)
        offset = api.parse_offset(request.args.get("offset"), "offset")
        return self._json(request, api.logs_impl(self._logdir, request.args.get("run"), offset))

    @_handler()
    def _serve_scalars(self, request):
        _require_get(request)
        _, name = api.open_run(self._logdir, request.args.get("run"))
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        patterns = scalars.parse_tag_filter(request.args.get("tags"))
        return self._json(request, scalars.scalars_impl(self._provider, ctx, eid, name, patterns))

    @_handler()
    def _serve_checkpoint(self, request):
        _require_get(request)
        name = request.args.get("name")
        f, size = api.checkpoint_impl(self._logdir, request.args.get("run"), name)
        headers = [
            ("Content-Length", str(size)),
            ("Content-Disposition", f'attachment; filename="{name}"'),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
        ]
        body = wsgi.wrap_file(request.environ, f) if request.method == "GET" else None
        if body is None:
            f.close()
        return wrappers.Response(body, status=200, headers=headers, mimetype="application/octet-stream", direct_passthrough=True)

    @_handler()
    def _serve_control(self, request):
        refusal = guards.check_mutation(request.method, request.headers, self._allowed_hosts)
        if refusal:
            raise api.ApiError(405 if request.method != "POST" else 403, refusal)
        if self._read_only:
            raise api.ApiError(403, "TensorBoard runs with --tbhealth_read_only: controls are disabled")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise api.ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = request.stream.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise api.ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise api.ApiError(400, 'body is not valid JSON; send {"run": "...", "command": "..."}') from None
        return self._json(request, api.control_impl(self._logdir, body, self._read_only))

    @_handler()
    def _serve_ack(self, request):
        _require_get(request)
        return self._json(request, api.ack_impl(self._logdir, request.args.get("run"), request.args.get("id")))

    @_handler()
    def _serve_config(self, request):
        _require_get(request)
        return self._json(request, config.config_impl(
            self._logdir, request.args.get("run"), read_only=self._read_only, reload_interval=self._reload_interval))

    def _provider_reads(self, request) -> tuple[Callable, Callable]:
        """``list_tags(run)`` and ``read_series(run, tags, downsample)`` bound to this request's
        experiment: what the route modules read TensorBoard's scalars through."""
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)

        def list_tags(run):
            return scalars.list_tags(self._provider, ctx, eid, run)

        def read_series(run, tags, downsample=scalars.DOWNSAMPLE):
            return scalars.read_series(self._provider, ctx, eid, run, tags, downsample)

        return list_tags, read_series

    @_handler()
    def _serve_events(self, request):
        _require_get(request)
        _, read_series = self._provider_reads(request)
        return self._json(request, events.events_impl(self._logdir, request.args.get("run"), read_series))

    @_handler()
    def _serve_layers(self, request):
        _require_get(request)
        metrics = layers.parse_metrics(request.args.get("metrics"))
        list_tags, read_series = self._provider_reads(request)
        return self._json(request, layers.layers_impl(self._logdir, request.args.get("run"), list_tags, read_series, metrics))

    # -- frontend files -------------------------------------------------------------------------

    @_handler(check_host=False)
    def _serve_static(self, request):
        _require_get(request)
        name = request.path.rsplit("/", 1)[-1]
        try:
            data = assets.static_file(name)
        except KeyError:
            raise api.ApiError(404, f"no file {name!r}") from None
        return http_util.Respond(request, data, assets.STATIC_FILES[name])

    @_handler(check_host=False)
    def _serve_plotly(self, request):
        _require_get(request)
        return http_util.Respond(
            request, assets.plotly_gzipped(), assets.PLOTLY_CONTENT_TYPE, content_encoding="gzip", expires=3600
        )
