"""The server's guard, in front of every route (page and API): the Host check against DNS rebinding, the
Origin check against cross-site requests, HTTP Basic auth when --api-auth is set, and the request body limit. CORS headers come only from Starlette's CORSMiddleware,
added when --cors-allow-origins names origins."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import secrets
import socket

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def allowed_names(host: str) -> set[str]:
    """The host names a request may use for this server: loopback names, the --host value, and on a wildcard
    address this machine's own name. A web page of another name resolving to us (DNS rebinding) is refused;
    IP literals are fine (a page served from an IP address is the server's own origin)."""
    names = {n.lower() for n in LOOPBACK_NAMES}
    names.add(host.lower().strip("[]"))
    if host in _WILDCARDS:
        try:
            hostname = socket.gethostname().lower()
            names.update({hostname, socket.getfqdn().lower(), f"{hostname}.local"})
        except OSError:
            pass
    return names


def split_host(value: str) -> tuple[str, int | None]:
    """'name:port' / '[v6]:port' / 'name' -> (name, port); ValueError for a malformed value."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(value)
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(value)
        port = rest[1:] if rest else None
    else:
        name, sep, port = value.rpartition(":") if ":" in value else (value, "", None)
        if not sep:
            name = value
    if port is not None:
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(value)
        return name, int(port)
    return name, None


def _json(status: int, error: str, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> tuple:
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return status, head, body


class Guard:
    """ASGI middleware: Host check, Origin check, Basic auth, body size limit (checked in this order)."""

    def __init__(self, app, *, host: str, port: int, auth: tuple[str, str] | None, max_body: int,
                 origins: list[str] = ()) -> None:
        self.app = app
        self.names = allowed_names(host)
        self.port = port
        self.auth = auth
        self.max_body = max_body
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = (self._check_host(headers.get(b"host", b"").decode("latin-1"))
                   or self._check_origin(scope.get("method", ""), headers.get(b"origin"))
                   or self._check_auth(headers.get(b"authorization", b"").decode("latin-1")))
        if refusal is None:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                refusal = self._too_large(length.decode("latin-1"))
        if refusal is not None:
            return await _send(send, *refusal)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive)
            if refusal is not None:
                return await _send(send, *refusal)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    def _check_host(self, value: str):
        try:
            name, port = split_host(value)
        except ValueError:
            name, port = None, None
        if name is not None and (name in self.names or _is_ip(name)) and port in (None, self.port):
            return None
        accepted = ", ".join(sorted(f"{n}:{self.port}" for n in self.names if not n.startswith(":")))
        return _json(400, "bad host", f"Host header {value!r} is not this server's address; accepted: {accepted} "
                     "or an IP address (other names are refused against DNS rebinding; start the server with "
                     "--host NAME to serve under that name)")

    def _check_origin(self, method: str, origin: bytes | None):
        """A request that changes something (POST, PUT, PATCH, DELETE) sent by a page of another origin is
        refused: browsers send such "simple" requests (e.g. text/plain bodies) without a CORS preflight, so
        the missing CORS headers alone would not stop a foreign page from driving this server (CSRF).
        Browsers name the page's origin in the Origin header; clients such as webuiapi send none."""
        if origin is None or method in ("GET", "HEAD", "OPTIONS"):
            return None
        value = origin.decode("latin-1").rstrip("/").lower()
        if value in self.origins:
            return None
        scheme, sep, rest = value.partition("://")
        if sep and scheme in ("http", "https") and self._check_host(rest) is None:
            return None
        allowed = sorted(self.origins) or ["this server's own pages"]
        return _json(403, "foreign origin", f"Origin {value!r} may not send {method} requests here; accepted: "
                     f"{', '.join(allowed)} (--cors-allow-origins names more)")

    def _check_auth(self, value: str):
        if self.auth is None:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                user, password = "", ""
            # compare both parts in constant time, both always
            ok_user = secrets.compare_digest(user.encode(), self.auth[0].encode())
            ok_password = secrets.compare_digest(password.encode(), self.auth[1].encode())
            if ok_user and ok_password:
                return None
        return _json(401, "unauthorized", "this server needs HTTP Basic auth with the --api-auth user and password",
                     [(b"www-authenticate", b'Basic realm="latentloom"')])

    def _too_large(self, size: str):
        return _json(413, "request too large", f"the request body is {size} bytes; this server accepts at most "
                     f"{self.max_body} bytes (--max-body-mb)")

    async def _read_body(self, receive):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", _json(400, "disconnected", "the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", self._too_large(f"over {self.max_body}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then wait for the disconnect, as the server's own receive would

    return replay


async def _send(send, status: int, headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})
