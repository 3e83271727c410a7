"""What one HTTP client may cost the server, and who may call it.

``RequestGuard`` (ASGI middleware) checks the API key before anything else runs, and bounds each
request body: a declared ``Content-Length`` over the limit is refused at once (413), a body that
grows past it while being read is cut off (413), and one that has not fully arrived ``body_timeout``
seconds after the request began is given up (408). Those refusals close the connection, so the
client can't go on sending.

``HeadTimeoutH11Protocol`` (uvicorn) closes a connection that has not sent a whole request line and
headers within ``head_timeout`` seconds of opening, or of its previous response: idle or trickling
connections (slowloris) are dropped instead of being held open forever. uvicorn's keep-alive timer
alone can't do this: it is not armed for a new connection, and every byte received disarms it.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from loraforge.serve.http_errors import APIError

MAX_BODY_BYTES = 4 << 20
"""Largest request body accepted (4 MiB): far above any prompt that fits a context."""
BODY_TIMEOUT = 30.0
"""Seconds a request body may take to arrive, counted from the request head."""
HEAD_TIMEOUT = 10.0
"""Seconds a connection may take to send a request head, counted from opening or its previous response."""
KEEP_ALIVE_TIMEOUT = 5
"""Seconds uvicorn keeps an idle connection open after a response."""
MAX_HEAD_BYTES = 16 * 1024
"""Largest request line plus headers h11 buffers; a larger head is answered 400 and the connection closed."""
CLOSE = {"connection": "close"}


class RequestGuard:
    """ASGI middleware: the API key on every path but ``open_paths``, and bounded request bodies.

    ``api_key`` None means no key is needed. See the module docstring for the body limits.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, open_paths: frozenset[str], max_body_bytes: int,
                 body_timeout: float):
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"] not in self.open_paths and not self._authorized(headers):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large().response()(scope, receive, send)
        await self.app(scope, self._bounded(receive), send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.api_key.encode())

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="request_too_large",
                        headers=CLOSE)

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` that raises ``APIError`` (413, 408) while the body is too large or too slow; once the
        body is in, it passes messages through (a streaming response listens for the disconnect)."""
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        received = 0
        complete = False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                               code="request_timeout", headers=CLOSE) from None
            if message["type"] != "http.request":
                complete = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise self._too_large()
            complete = not message.get("more_body", False)
            return message

        return bounded_receive


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request head is late; see the module docstring.

    Pass ``functools.partial(HeadTimeoutH11Protocol, head_timeout=...)`` as uvicorn's ``http``.
    """

    def __init__(self, *args, head_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        """Close the connection unless a request is being answered (its body and response have their own bounds)."""
        self._head_timer = None
        answering = self.cycle is not None and not self.cycle.response_complete
        if not answering and not self.transport.is_closing():
            self.transport.close()
