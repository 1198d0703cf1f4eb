"""Response headers every answer carries, and the Content-Security-Policy of HTML pages.

- ``X-Content-Type-Options: nosniff``: a browser never second-guesses a JSON or PNG
  content type into HTML or script;
- ``Referrer-Policy: no-referrer``: page URLs never leak to other sites;
- HTML responses get a Content-Security-Policy. The attention page loads only from the
  service itself (its script and stylesheet; images from ``data:``/``blob:`` URLs the page
  makes itself); no inline script, no other origin, no framing. FastAPI's /docs and
  /redoc pages load Swagger UI / ReDoc from a CDN with an inline bootstrap script, so
  they get a policy that names exactly those sources (they render no user input).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
DOCS_CSP = (
    "default-src 'self'; "
    "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeadersMiddleware:
    """Adds :data:`COMMON_HEADERS` to every response and a CSP to HTML ones."""

    def __init__(self, app: ASGIApp, docs_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OURS]
                headers += COMMON_HEADERS
                content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if content_type.startswith(b"text/html"):
                    csp = DOCS_CSP if scope.get("path") in self.docs_paths else PAGE_CSP
                    headers.append((b"content-security-policy", csp.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


_OURS = {name for name, _ in COMMON_HEADERS} | {b"content-security-policy"}
