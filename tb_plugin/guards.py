"""Who may talk to the Health tab: Host, Origin and header checks for its routes.

TensorBoard's open-source server checks neither CSRF tokens nor the Host header, yet ``POST
control`` pauses or stops a training run and ``GET checkpoint`` hands out model weights. Three
attacks matter and each check below answers one:

* A foreign page POSTs to ``localhost:6006`` (CSRF). Browsers send a form or ``text/plain`` POST
  without asking; a custom header plus a JSON content type forces a CORS preflight, which
  TensorBoard never grants, so the request must carry both. Its ``Origin`` must also be ours.
* DNS rebinding: ``evil.example`` first resolves to the attacker, then to ``127.0.0.1``; the page
  is now same-origin with TensorBoard as far as the browser knows, so Origin checks pass. The Host
  header still says ``evil.example``: only names that can legitimately reach this server pass
  (loopback names, IP literals, the ``--host`` TensorBoard was bound to, this machine's names when
  bound to all interfaces, and names the user lists in ``--tbhealth_allowed_hosts``). An IP
  literal is safe to accept: rebinding needs a DNS name.
* Sandboxed or ``file://`` pages send ``Origin: null``: refused.

Everything here is pure (headers in, error text or None out) so tests can cover it directly.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

REQUEST_HEADER = "X-TBHealth-Request"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def allowed_hosts(bind_host: str | None, bind_all: bool, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names (lower case, no port) that requests to this server may carry.

    ``bind_host``/``bind_all`` are TensorBoard's ``--host``/``--bind_all``. Bound to every
    interface, the server is reached under this machine's own names, so they are added.
    """
    names = set(LOOPBACK_NAMES)
    names.update(h.strip().lower().strip("[]") for h in extra if h and h.strip())
    host = (bind_host or "").strip().lower().strip("[]")
    if host and host not in _WILDCARD_BINDS:
        names.add(host)
    if bind_all or (bind_host is not None and host in _WILDCARD_BINDS):
        for name in _machine_names():
            names.add(name.lower())
    return frozenset(names)


def _machine_names() -> list[str]:
    try:
        return [n for n in {socket.gethostname(), socket.getfqdn()} if n]
    except OSError:
        return []


def split_host(host_header: str) -> tuple[str, str]:
    """``("name", "port")`` of a Host header value; port ``""`` when absent. Lower case."""
    value = (host_header or "").strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return "", ""
        name, rest = value[1:end], value[end + 1 :]
        return name, rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, ""


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def check_host(host_header: str | None, allowed: frozenset[str]) -> str | None:
    """Why this Host header is refused, or None. Guards every data route against DNS rebinding."""
    name, port = split_host(host_header or "")
    if not name:
        return "request has no Host header"
    if port and not port.isdigit():
        return f"malformed Host header {host_header!r}"
    if name in allowed or _is_ip_literal(name):
        return None
    return (
        f"Host {name!r} is not this TensorBoard server's own; if you reach TensorBoard under this "
        f"name on purpose, start it with --tbhealth_allowed_hosts={name}"
    )


def check_origin(origin: str | None, host_header: str | None) -> str | None:
    """Why this Origin is refused, or None. No Origin (curl, the CLI) is fine: the Host check and
    the custom header still apply.

    Origin and Host must name the same host and port. A Host without a port matches an Origin on
    its scheme's default port, whichever the scheme: behind a TLS-terminating proxy the page is
    ``https://name`` while TensorBoard itself serves plain HTTP.
    """
    if origin is None:
        return None
    if origin.strip().lower() == "null":
        return "requests from an opaque origin (sandboxed page, file://) are refused"
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return f"malformed Origin header {origin!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"malformed Origin header {origin!r}"
    host_name, host_port = split_host(host_header or "")
    origin_port = port or _DEFAULT_PORTS[parts.scheme]
    if host_port:
        same_port = host_port.isdigit() and int(host_port) == origin_port
    else:
        same_port = origin_port == _DEFAULT_PORTS[parts.scheme]
    if parts.hostname.lower() != host_name or not same_port:
        return f"cross-origin request from {origin} refused"
    return None


def check_mutation(method: str, headers: Mapping[str, str], allowed: frozenset[str]) -> str | None:
    """Why a state-changing request is refused, or None (then it may go ahead).

    ``headers`` maps header names to values; lookups are case-insensitive when it is werkzeug's
    ``Headers``, and tests pass plain dicts with canonical names.
    """
    if method != "POST":
        return f"method {method} not allowed; use POST"
    if headers.get(REQUEST_HEADER) != "1":
        return f"missing header {REQUEST_HEADER}: 1 (the Health tab sends it; it blocks cross-site forms)"
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return f"Content-Type must be application/json, not {content_type or 'none'!r}"
    if (headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
        return "cross-site request refused"
    host = headers.get("Host")
    return check_host(host, allowed) or check_origin(headers.get("Origin"), host)


__all__ = [
    "REQUEST_HEADER", "LOOPBACK_NAMES", "allowed_hosts", "split_host", "check_host", "check_origin",
    "check_mutation",
]
