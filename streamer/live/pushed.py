"""Voice a program pushes (an agent's TTS, a file): queued as fast as it comes, fed to the channel at
real time on the channel's clock, as a microphone's packets would be, with silence between
utterances; utterance events (started, finished, interrupted) as the viewers hear them."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from streamer.audio import StreamResampler
from streamer.live.channel import CHUNK, VOICE_RATE, Channel

log = logging.getLogger(__name__)

RATES = (16000, 24000, 48000)
MAX_QUEUE_S = 30.0  # audio queued ahead of real time; a faster sender waits (backpressure)
TICK_S = CHUNK / VOICE_RATE  # 20 ms, one packet
# samples resampled at a time; a WebSocket message is fed in such pieces with the event loop let go between
# them (3 s of 16 kHz audio at once held it ~180 ms on a slow 2-core CPU: late mouths on every channel)
FEED_PIECE = 4800


@dataclass
class Utterance:
    number: int
    begin: int | None = None  # channel voice sample of its first sample, once fed
    end: int | None = None  # ... one past its last, once fed after the sender's end
    started: bool = False


class PushedVoice:
    """One program's voice on a channel. `feed` (PCM at `rate`), `end` and `clear` come from the
    sender; `run` feeds the channel; events go to `on_event(dict)` in order."""

    def __init__(self, channel: Channel, rate: int, on_event, max_queue_s: float = MAX_QUEUE_S):
        if rate not in RATES:
            raise ValueError(f"sample_rate must be one of {', '.join(map(str, RATES))}")
        self.channel = channel
        self.rate = rate
        self.on_event = on_event
        self.max_queue = int(max_queue_s * VOICE_RATE)
        self._resampler = StreamResampler(rate, target=VOICE_RATE)
        self._queue: deque = deque()  # 48 kHz int16 arrays (half the memory), and marks ("begin"/"end", u)
        self.queued = 0  # samples in _queue
        self.fed = 0  # samples given to the channel so far
        self._open: Utterance | None = None  # receiving audio now
        self._playing: deque[Utterance] = deque()  # fed or being fed, not yet finished
        self._count = 0
        self._room = asyncio.Event()
        self._room.set()
        self.played_s = 0.0  # of finished utterances, as heard

    # sender side

    def feed(self, pcm: np.ndarray) -> None:
        """Int16 mono samples at `rate`: the open utterance's next audio (opens one if none)."""
        if self._open is None:
            self._count += 1
            self._open = Utterance(self._count)
            self._queue.append(("begin", self._open))
        for i in range(0, pcm.size, FEED_PIECE):  # the resampler's work arrays grow with the piece: keep them small
            self._put(self._resampler.push(pcm[i : i + FEED_PIECE].astype(np.float32) / 32768))
        if self.queued >= self.max_queue:
            self._room.clear()

    def end(self) -> None:
        """The open utterance is complete (no-op when none is open)."""
        if self._open is None:
            return
        self._put(self._resampler.flush())
        self._queue.append(("end", self._open))
        self._open = None
        self._resampler = StreamResampler(self.rate, target=VOICE_RATE)

    def _put(self, x: np.ndarray) -> None:
        if x.size:
            self._queue.append(np.round(np.clip(x, -1, 1) * 32767).astype(np.int16))
            self.queued += x.size

    async def room(self) -> None:
        """Wait until the queue is below its bound."""
        await self._room.wait()

    def clear(self) -> None:
        """Barge-in: drop everything queued and everything in the channel not yet seen or heard; every
        unfinished utterance finishes, interrupted, at the position its listeners reached."""
        out = self.channel.output_sample()
        unfinished = list(self._playing)
        for item in self._queue:
            if isinstance(item, tuple) and item[0] == "begin":
                unfinished.append(item[1])
        if self._open is not None and self._open not in unfinished:
            unfinished.append(self._open)
        self._queue.clear()
        self.queued = 0
        self._room.set()
        self._playing.clear()
        self._open = None
        self._resampler = StreamResampler(self.rate, target=VOICE_RATE)
        self.channel.interrupt()
        for u in unfinished:
            self._finish(u, self._position(u, out), interrupted=True)

    # the channel side

    async def run(self) -> None:
        """Feed the channel at real time until cancelled: queued audio, else silence."""
        clock = self.channel.clock
        t0 = clock()
        while True:
            due = int((clock() - t0) / TICK_S) + 1  # packets due by now (the first right away)
            while self.fed < due * CHUNK:
                self.channel.push_voice(self._take(CHUNK))
            self._report()
            await asyncio.sleep(max(0.0, t0 + due * TICK_S - clock()))

    def _take(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        got = 0
        while got < n and self._queue:
            item = self._queue[0]
            if isinstance(item, tuple):
                kind, u = self._queue.popleft()
                if kind == "begin":
                    u.begin = self.fed + got
                    self._playing.append(u)
                else:
                    u.end = self.fed + got
                continue
            k = min(n - got, item.size)
            out[got : got + k] = item[:k] / np.float32(32768)
            got += k
            if k == item.size:
                self._queue.popleft()
            else:
                self._queue[0] = item[k:]
        self.queued -= got
        self.fed += n
        if self.queued < self.max_queue:
            self._room.set()
        return out

    def _report(self) -> None:
        """Events for what reached the viewers since the last tick."""
        out = self.channel.output_sample()
        if out is None:
            return
        while self._playing:
            u = self._playing[0]
            if not u.started and out >= u.begin:
                u.started = True
                self.on_event({"type": "playback_started", "utterance": u.number})
            if u.end is None or out < u.end:
                return
            self._playing.popleft()
            self._finish(u, (u.end - u.begin) / VOICE_RATE, interrupted=False)

    def _position(self, u: Utterance, out: int | None) -> float:
        if u.begin is None or out is None:
            return 0.0
        end = u.end if u.end is not None else self.fed
        return max(0, min(out, end) - u.begin) / VOICE_RATE

    def _finish(self, u: Utterance, position: float, interrupted: bool) -> None:
        self.played_s += position
        self.on_event({"type": "playback_finished", "utterance": u.number, "position": round(position, 3),
                       "interrupted": interrupted})
