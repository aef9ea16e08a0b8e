"""Bearer keys, the request-body limit and CORS: small pieces the server puts in front of every route.

The settings are read from a callable on every request, so a hot reload that changes `api_key`,
`request_body_limit_bytes` or `allowed_origins` takes effect at once.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Awaitable, Callable, Optional

from rwkv_app.infer.protocol import APIError

ASGIApp = Callable[..., Awaitable[None]]


def check_bearer(authorization: Optional[str], key: Optional[str]) -> None:
    """No key configured: open. Otherwise `Authorization: Bearer KEY`, compared in constant time."""
    if key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme != "Bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                       type="authentication_error", code="invalid_api_key")


def check_admin(authorization: Optional[str], admin_key: Optional[str], api_key: Optional[str],
                client_host: Optional[str]) -> None:
    """The admin key (else the API key); with no key at all, admin routes answer loopback clients only."""
    key = admin_key if admin_key is not None else api_key
    if key is None:
        if not _is_loopback(client_host):
            raise APIError(403, "admin routes need `admin_api_key` (or `api_key`) when called from another host",
                           type="permission_error")
        return
    check_bearer(authorization, key)


def _is_loopback(host: Optional[str]) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def send_error(send, error: APIError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()] + list(extra_headers)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Counts body bytes as they arrive (a chunked body has no Content-Length) and answers 413 past the limit.

    uvicorn has no limit of its own. The body is read here in full before the app runs (our bodies are JSON the app
    would buffer anyway), then replayed; after it, `receive` passes through so disconnects are still seen.
    """

    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        too_large = APIError(413, f"Request body exceeds the limit of {limit} bytes", code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_error(send, too_large, [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_error(send, too_large, [(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class CORSMiddleware:
    """Cross-origin access for the origins in `allowed_origins` ("*" = any); everything else is denied."""

    def __init__(self, app: ASGIApp, origins: Callable[[], list[str]]):
        self.app, self.origins = app, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if not origin:
            return await self.app(scope, receive, send)
        allowed = self.origins()
        ok = "*" in allowed or origin in allowed
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if preflight:
            if not ok:
                return await send_error(send, APIError(403, f"origin {origin!r} is not allowed",
                                                       type="permission_error"))
            out = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                   (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                   (b"access-control-allow-headers",
                    headers.get(b"access-control-request-headers", b"authorization, content-type")),
                   (b"access-control-max-age", b"600"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 204, "headers": out})
            return await send({"type": "http.response.body", "body": b""})
        if not ok:
            return await self.app(scope, receive, send)  # no CORS headers: the browser keeps the answer from the page

        async def with_cors(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            await send(message)

        await self.app(scope, receive, with_cors)
