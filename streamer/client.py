"""A small client for the WebSocket audio API (see streamer/server/push.py): a program's voice drives
a channel, with utterance events and barge-in.

    async with await Speaker.connect("http://127.0.0.1:8080", "demo", sample_rate=24000) as s:
        await s.send(pcm)            # mono samples at 24 kHz, any size (see `pcm16` for the types)
        await s.end()                # the utterance is complete
        ev = await s.wait("playback_finished")
        await s.clear()              # barge-in: mouth and voice stop now
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

import aiohttp
import numpy as np


class SpeakerError(Exception):
    """The server refused the connection or reported an error event."""


def pcm16(samples) -> np.ndarray:
    """Mono samples as int16: int16 as is; float in [-1, 1] (clipped); other integers as int16 values
    (a Python list of ints); bytes as s16le PCM, as the server takes them. ValueError otherwise."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        data = memoryview(samples).cast("B")  # (a memoryview of wider items: its bytes)
        if data.nbytes % 2:
            raise ValueError("bytes are 16-bit little-endian PCM: an odd number of bytes")
        return np.frombuffer(data, "<i2")
    x = np.asarray(samples)
    if x.ndim > 1 and x.size and x.size != max(x.shape):
        raise ValueError(f"mono samples: one channel, not an array of shape {x.shape}")
    x = x.reshape(-1)
    if x.dtype == np.int16:
        return x
    if np.issubdtype(x.dtype, np.signedinteger):
        if x.size and (x.min() < -32768 or x.max() > 32767):  # 32-bit PCM, say: not to be clipped to noise
            raise ValueError(f"{x.dtype} samples are taken as int16 values; these go beyond -32768..32767")
        return x.astype(np.int16)
    if np.issubdtype(x.dtype, np.floating):  # (in float32: float16 has no 32767, and +1.0 would wrap)
        x = np.nan_to_num(x.astype(np.float32, copy=False), nan=0.0)
        return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    raise ValueError(f"samples are int16 (or other signed integers), float in [-1, 1] or s16le bytes, not {x.dtype}"
                     " (unsigned 8-bit PCM: subtract 128, times 256)")


class Speaker:
    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, sample_rate: int,
                 max_ahead_s: float):
        self._http, self._ws = http, ws
        self.sample_rate = sample_rate
        self.max_ahead_s = max_ahead_s
        self.ready: dict = {}
        self._events: asyncio.Queue = asyncio.Queue()
        self._played_by = 0.0  # when what was sent so far will have played (estimate, for pacing)
        self._clears = 0  # a send in progress stops when this changes
        # The server numbers utterances from 1 as their first audio comes; an end() with no audio has no
        # utterance there, so its playback_finished is made here, after those of the utterances before it.
        self._open = False  # audio sent since the last end or clear
        self._opened = 0
        self._finished = 0  # the last utterance whose playback_finished came
        self._empty_ends: deque[int] = deque()  # for each end() with no audio: the utterances before it
        self.idle = asyncio.Event()  # every utterance sent has played out or was cleared (or the socket closed)
        self.idle.set()
        self._cleared = asyncio.Event()  # set (and replaced) by each clear(): a send waiting stops at once
        self._reader: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: str, channel: str = "default", sample_rate: int = 24000, token: str | None = None,
                      max_ahead_s: float = 10.0, connect_timeout_s: float = 5.0) -> Speaker:
        """Open `url`/ws/`channel` and start. max_ahead_s: send at most this far ahead of real time, so a
        `clear` is never stuck behind a long queue of audio (the server itself queues up to 30 s).
        connect_timeout_s: SpeakerError when the server has not answered (ready) by then."""
        if not max_ahead_s > 0:
            raise ValueError("max_ahead_s must be more than 0")
        deadline = time.monotonic() + connect_timeout_s
        ws_url = url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1) + f"/ws/{channel}"

        async def refused(resp: aiohttp.ClientResponse) -> None:  # a refused upgrade: the server says why
            if resp.status != 101:
                body = (await resp.content.read(4096)).decode(errors="replace")
                try:
                    reason = json.loads(body)["error"]
                except (ValueError, TypeError, KeyError):
                    reason = body.strip()[:200] or resp.reason
                raise SpeakerError(f"{ws_url}: HTTP {resp.status}: {reason}")

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = aiohttp.ClientSession(headers=headers, raise_for_status=refused)
        try:
            ws = await asyncio.wait_for(http.ws_connect(ws_url), connect_timeout_s)
        except asyncio.TimeoutError:
            await http.close()
            raise SpeakerError(f"{ws_url}: no answer within {connect_timeout_s:g} s") from None
        except aiohttp.WSServerHandshakeError as e:  # answered 101, but not as a WebSocket server does
            await http.close()
            raise SpeakerError(f"{ws_url}: not a WebSocket answer ({e.message})") from None
        except BaseException:
            await http.close()
            raise
        self = cls(http, ws, sample_rate, max_ahead_s)
        try:
            await ws.send_json({"type": "start", "sample_rate": sample_rate})
            self._reader = asyncio.ensure_future(self._read())
            self.ready = await self.wait("ready", timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await self.close()
            raise SpeakerError(f"{ws_url}: not ready within {connect_timeout_s:g} s") from None
        except BaseException:
            await self.close()
            raise
        return self

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                ev = msg.json()
                self._events.put_nowait(ev)
                if ev.get("type") == "playback_finished":
                    self._finished = max(self._finished, ev.get("utterance") or 0)
                    self._finish_empty()
                    if self._finished >= self._opened:
                        self.idle.set()
        self._events.put_nowait(None)
        self.idle.set()  # nothing more will play

    def _finish_empty(self) -> None:
        while self._empty_ends and self._empty_ends[0] <= self._finished:
            self._empty_ends.popleft()
            self._events.put_nowait({"type": "playback_finished", "utterance": None, "position": 0.0,
                                     "interrupted": False})

    async def send(self, samples) -> None:
        """Mono samples at `sample_rate` (see `pcm16`), sent as 1 s messages (shorter if `max_ahead_s` is)
        at most `max_ahead_s` ahead of real time; a clear() meanwhile drops what is not sent yet."""
        x = pcm16(samples).astype("<i2", copy=False)
        clears, cleared = self._clears, self._cleared
        step = max(self.sample_rate // 50, min(self.sample_rate, int(self.max_ahead_s * self.sample_rate)))
        for i in range(0, x.size, step):
            piece = x[i : i + step]
            now = time.monotonic()
            wait = self._played_by + piece.size / self.sample_rate - self.max_ahead_s - now
            if self._played_by > now and wait > 0:
                try:  # (a clear() from another task ends the wait)
                    await asyncio.wait_for(cleared.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            if self._clears != clears:
                return
            if not self._open:
                self._open = True
                self._opened += 1
                self.idle.clear()
            self._played_by = max(time.monotonic(), self._played_by) + piece.size / self.sample_rate
            await self._ws.send_bytes(piece.tobytes())

    async def end(self) -> None:
        """The utterance is complete. With no audio since the last end or clear there is none on the
        server: its playback_finished (utterance None, position 0) comes after those before it."""
        if not self._open:
            self._empty_ends.append(self._opened)
            self._finish_empty()
            return
        self._open = False
        await self._ws.send_json({"type": "end"})

    async def clear(self) -> None:
        self._played_by = time.monotonic()
        self._clears += 1
        self._cleared.set()
        self._cleared = asyncio.Event()
        self._open = False
        await self._ws.send_json({"type": "clear"})

    async def event(self, timeout: float | None = None) -> dict:
        """The next event from the server; SpeakerError on an error event or a closed socket,
        asyncio.TimeoutError after `timeout` seconds."""
        ev = await asyncio.wait_for(self._events.get(), timeout)
        if ev is None:
            self._events.put_nowait(None)
            raise SpeakerError(f"the server closed the connection (code {self._ws.close_code})")
        if ev.get("type") == "error":
            raise SpeakerError(ev.get("message", "error"))
        return ev

    async def wait(self, kind: str, timeout: float | None = None) -> dict:
        """Skip to the next event of `kind`; asyncio.TimeoutError when none came within `timeout` seconds."""
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
