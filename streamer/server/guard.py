"""Connections to an aiohttp server, bounded: at most `per_client` open at once from one address, the
first request's headers within `header_s` (a client that opens connections and never finishes its
headers cannot hold sockets and files), no pause of `header_s` in a request's body, and a malformed
request answered with a JSON 400 and one log line (no traceback, nothing of the request echoed back);
a client gone mid-request is one INFO line."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from http import HTTPStatus

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

HEADER_S = 10.0


class ConnectionGuard:
    def __init__(self, server: web.Server, per_client: int, header_s: float = HEADER_S):
        self._server = server
        self.per_client = per_client
        self.header_s = header_s
        self.open: Counter[str] = Counter()
        self.refused = 0
        self.timed_out = 0

    @classmethod
    def install(cls, runner: web.AppRunner, per_client: int, header_s: float = HEADER_S) -> ConnectionGuard:
        """Put a guard in front of a set-up runner's protocol factory (before its sites start)."""
        guard = cls(runner.server, per_client, header_s)
        runner._server = guard  # aiohttp has no public hook for its protocol factory
        return guard

    def __getattr__(self, name):  # the runner asks its server for connections, shutdown, ...
        return getattr(self._server, name)

    def __call__(self) -> web.RequestHandler:
        s = self._server
        return GuardedHandler(self, s, loop=s._loop, **s._kwargs)  # as web.Server does


class GuardedHandler(web.RequestHandler):
    __slots__ = ("_body_cut", "_body_timer", "_guard", "_ip", "_timer")

    def __init__(self, guard: ConnectionGuard, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard, self._ip, self._timer = guard, None, None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_cut = False  # closed here for a stalled body: already logged

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        g = self._guard
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else "?"
        if g.open[ip] >= g.per_client:
            g.refused += 1
            if g.refused == 1 or g.refused % 1000 == 0:
                log.warning("%s has %d connections open: more refused (server.max_connections_per_client; "
                            "%d refused so far)", ip, g.open[ip], g.refused)
            transport.close()
            return
        g.open[ip] += 1
        self._ip = ip
        self._timer = asyncio.get_running_loop().call_later(g.header_s, self._no_headers, transport)

    def _no_headers(self, transport: asyncio.BaseTransport) -> None:
        if self._request_count == 0 and not transport.is_closing():
            self._guard.timed_out += 1
            log.info("%s sent no complete request within %.0f s: connection closed", self._ip, self._guard.header_s)
            transport.close()

    async def _handle_request(self, request: web.BaseRequest, *args):
        # aiohttp waits for a body as long as its client likes: one stalled would hold the connection and
        # the handler reading it, so it must keep coming (overrides aiohttp's per-request hook)
        self._watch_body(request.content, request.content.total_bytes, asyncio.get_running_loop().time())
        try:
            return await super()._handle_request(request, *args)
        finally:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

    def _watch_body(self, body: StreamReader, seen: int, since: float) -> None:
        """Close the connection once no byte of the body has come for `header_s` (`seen` bytes had come
        by `since`); looked at four times in that span, so a pause is cut within 1.25 x `header_s`."""
        self._body_timer = None
        if body.is_eof() or self.transport is None or self.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if body.total_bytes != seen or self._reading_paused:  # paused: the wait is ours, not the client's
            seen, since = body.total_bytes, loop.time()
        elif loop.time() - since >= self._guard.header_s:
            self._guard.timed_out += 1
            self._body_cut = True
            log.info("%s sent nothing more of its request body for %.0f s: connection closed", self._ip,
                     self._guard.header_s)
            self.transport.close()
            return
        self._body_timer = loop.call_later(self._guard.header_s / 4, self._watch_body, body, seen, since)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._ip is not None:
            g, ip = self._guard, self._ip
            self._ip = None
            g.open[ip] -= 1
            if g.open[ip] <= 0:
                del g.open[ip]
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the client hung up mid-request (or was cut off above)
            if not self._body_cut:
                log.info("%s went away before its request was complete", request.remote)
        elif isinstance(exc, HttpProcessingError) or status < 500:
            log.info("malformed HTTP request from %s: %s", request.remote, type(exc).__name__ if exc else status)
        else:
            log.error("request from %s failed", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        what = "malformed HTTP request" if status == 400 else HTTPStatus(status).phrase.lower()
        resp = web.json_response({"error": what}, status=status)
        resp.force_close()
        return resp
