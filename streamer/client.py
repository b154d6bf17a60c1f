"""A small client for the WebSocket audio API (see streamer/server/push.py): a program's voice drives
a channel, with utterance events and barge-in.

    async with await Speaker.connect("http://127.0.0.1:8080", "demo", sample_rate=24000) as s:
        await s.send(pcm)            # int16 (or float in [-1, 1]) mono samples at 24 kHz, any size
        await s.end()                # the utterance is complete
        ev = await s.wait("playback_finished")
        await s.clear()              # barge-in: mouth and voice stop now
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np


class SpeakerError(Exception):
    """The server refused the connection or reported an error event."""


class Speaker:
    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, sample_rate: int,
                 max_ahead_s: float):
        self._http, self._ws = http, ws
        self.sample_rate = sample_rate
        self.max_ahead_s = max_ahead_s
        self.ready: dict = {}
        self._events: asyncio.Queue = asyncio.Queue()
        self._played_by = 0.0  # when what was sent so far will have played (estimate, for pacing)
        self._reader: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: str, channel: str = "default", sample_rate: int = 24000, token: str | None = None,
                      max_ahead_s: float = 10.0) -> Speaker:
        """Open `url`/ws/`channel` and start. max_ahead_s: send at most this far ahead of real time, so a
        `clear` is never stuck behind a long queue of audio (the server itself queues up to 30 s)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = aiohttp.ClientSession(headers=headers)
        ws_url = url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1) + f"/ws/{channel}"
        try:
            ws = await http.ws_connect(ws_url)
        except aiohttp.WSServerHandshakeError as e:
            await http.close()
            raise SpeakerError(f"{ws_url}: HTTP {e.status} {e.message}") from None
        except BaseException:
            await http.close()
            raise
        self = cls(http, ws, sample_rate, max_ahead_s)
        try:
            await ws.send_json({"type": "start", "sample_rate": sample_rate})
            self._reader = asyncio.ensure_future(self._read())
            self.ready = await self.wait("ready", timeout=10)
        except BaseException:
            await self.close()
            raise
        return self

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._events.put_nowait(msg.json())
        self._events.put_nowait(None)

    async def send(self, samples) -> None:
        """Mono samples at `sample_rate`: int16, or float in [-1, 1]."""
        x = np.asarray(samples)
        if x.dtype != np.int16:
            x = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
        ahead = self._played_by - time.monotonic()
        if ahead > self.max_ahead_s:
            await asyncio.sleep(ahead - self.max_ahead_s)
        self._played_by = max(time.monotonic(), self._played_by) + x.size / self.sample_rate
        for i in range(0, x.size, self.sample_rate):  # at most 1 s a message
            await self._ws.send_bytes(x[i : i + self.sample_rate].astype("<i2").tobytes())

    async def end(self) -> None:
        await self._ws.send_json({"type": "end"})

    async def clear(self) -> None:
        self._played_by = time.monotonic()
        await self._ws.send_json({"type": "clear"})

    async def event(self, timeout: float | None = None) -> dict:
        """The next event from the server; SpeakerError on an error event or a closed socket."""
        ev = await asyncio.wait_for(self._events.get(), timeout)
        if ev is None:
            self._events.put_nowait(None)
            raise SpeakerError(f"the server closed the connection (code {self._ws.close_code})")
        if ev.get("type") == "error":
            raise SpeakerError(ev.get("message", "error"))
        return ev

    async def wait(self, kind: str, timeout: float | None = None) -> dict:
        """Skip to the next event of `kind`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ev = await self.event(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if ev["type"] == kind:
                return ev

    async def close(self) -> None:
        await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._http.close()

    async def __aenter__(self) -> Speaker:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
