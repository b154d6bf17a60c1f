"""A live channel: one voice in, one avatar stream out, on one session clock.

Video frame n leaves at `start + n / 25`, audio chunk j (20 ms) at `start + j / 50`. When the first
voice packet arrives (time a0), the voice is pinned to the output: input video frame i (audio from
i / 25 s on) becomes output frame i + n0, input sample s becomes output sample s + 1920 n0, with
n0 = ceil((a0 + delay - start) * 25). The mapping never changes: a prediction not ready by its
frame's deadline is replaced by the idle frame, late voice by silence. So lips and voice cannot
drift apart and the delay cannot grow, however slow inference is.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque

import numpy as np

from streamer.audio import MelStream, StreamResampler, VoiceActivity
from streamer.audio.mel import LOOKAHEAD_S
from streamer.avatar.blend import blend
from streamer.avatar.cache import Avatar, crop, ping_pong
from streamer.live.frames import FrameStore
from streamer.live.worker import InferenceWorker, Job

log = logging.getLogger(__name__)

FPS = 25  # Wav2Lip's rate: mel windows are cut for 25 video frames a second
VOICE_RATE = 48000
SAMPLES_PER_FRAME = VOICE_RATE // FPS  # 1920
CHUNK = 960  # 20 ms of outgoing voice
MIN_DELAY_S = LOOKAHEAD_S + 0.02  # lookahead plus one packet


class Ramp:
    """Mouth strength per frame from speech decisions, fading over `fade` frames in and out."""

    def __init__(self, fade: int = 2):
        self.fade = fade
        self._run = 0  # speech frames in a row
        self._since = fade + 1  # frames since speech ended
        self._last = 0.0

    def next(self, speech: bool) -> float:
        step = 1 / (self.fade + 1)
        if speech:
            self._run += 1
            self._since = 0
            self._last = min(1.0, max(self._last, 0.0) + step) if self.fade else 1.0
        else:
            self._run = 0
            self._since += 1
            self._last = max(0.0, self._last - step) if self.fade else 0.0
        return self._last


class Channel:
    def __init__(self, name: str, avatar: Avatar, worker: InferenceWorker, delay_s: float = 0.3,
                 vad: VoiceActivity | None = None, fade: int = 2, clock=time.monotonic, session: str = ""):
        if delay_s < MIN_DELAY_S:
            raise ValueError(f"delay must be at least {MIN_DELAY_S * 1000:.0f} ms (the model's lookahead)")
        self.name = name
        self.session = session or name
        self.avatar = avatar
        self.worker = worker
        self.delay_s = delay_s
        self.clock = clock
        self.start = clock()
        self.closed = False
        self.frames = FrameStore(avatar)
        self._resampler = StreamResampler(VOICE_RATE)
        self._mel = MelStream(FPS)
        self._vad = vad or VoiceActivity(fps=FPS)
        self._ramp = Ramp(fade)
        self._windows: dict[int, np.ndarray] = {}
        self._speech: dict[int, bool] = {}
        self._next_i = 0
        self.n0: int | None = None
        self._voice = np.zeros(0, np.float32)  # received voice from absolute sample _voice0 on
        self._voice0 = 0
        self._received = 0
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=500)  # (first sample, arrival time)
        self._ready: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._held: np.ndarray | None = None
        # what users see: counters and recent delays
        self.sent = 0
        self.lipsync_frames = 0
        self.late = 0  # speech frames whose mouth was not ready in time
        self.speaking = False
        self.delays: deque[float] = deque(maxlen=750)  # voice in -> its frame out, seconds (30 s)
        self._expected: set[int] = set()

    # voice in (event loop; light work only)

    def push_voice(self, mono48: np.ndarray, arrival: float | None = None) -> None:
        """One received packet of 48 kHz mono float voice, in order."""
        if self.closed or mono48.size == 0:
            return
        arrival = self.clock() if arrival is None else arrival
        if self.n0 is None:
            first = arrival - mono48.size / VOICE_RATE  # when its first sample was spoken, as we see it
            self.n0 = max(0, math.ceil((first + self.delay_s - self.start) * FPS))
            # Re-phase the clock once, by under a frame, so the delay is exactly delay_s, not up to a
            # frame more; the tracks just send their next frame a little sooner.
            self.start = max(self.start - 1 / FPS, first + self.delay_s - self.n0 / FPS)
            log.info("[%s] voice started: output frame %d, delay %.0f ms", self.session, self.n0,
                     1000 * (self.start + self.n0 / FPS - first))
        self._arrivals.append((self._received, arrival))
        self._received += mono48.size
        with self._lock:
            self._voice = np.concatenate([self._voice, mono48.astype(np.float32)])
        audio16 = self._resampler.push(mono48)
        for i, w in self._mel.push(audio16):
            self._windows[i] = w
        for i, speech in self._vad.push(audio16):
            self._speech[i] = speech
        self._dispatch()

    def _dispatch(self) -> None:
        while self._next_i in self._windows and self._next_i in self._speech:
            i = self._next_i
            window, speech = self._windows.pop(i), self._speech.pop(i)
            self._next_i += 1
            self.speaking = speech
            strength = self._ramp.next(speech)
            if strength <= 0:
                continue
            step = i + self.n0
            deadline = self.start + step / FPS
            self._expected.add(step)
            self.worker.submit(Job(self, step, window, strength, deadline))

    # worker thread

    def crop(self, step: int, size: int) -> np.ndarray:
        src = ping_pong(step, self.avatar.frames)
        if self.avatar.crops.shape[1] == size:
            return np.asarray(self.avatar.crops[src])
        frame = self.frames.get(step, timeout=0.2)
        return crop(frame, self.avatar.boxes[src], size)

    def deliver(self, step: int, pred: np.ndarray, crop_img: np.ndarray, strength: float) -> None:
        frame = self.frames.get(step, timeout=0.2)
        if frame is None:
            return
        src = ping_pong(step, self.avatar.frames)
        out = blend(frame, self.avatar.boxes[src], pred, strength=strength, crop=crop_img)
        with self._lock:
            if not self.closed:
                self._ready[step] = out

    # tracks (event loop)

    def video_frame(self, step: int) -> np.ndarray:
        """The frame to send as output frame `step`, now: the lip-synced one if ready, else idle."""
        with self._lock:
            out = self._ready.pop(step, None)
            for k in [k for k in self._ready if k < step]:
                del self._ready[k]
        if step in self._expected:
            self._expected.discard(step)
            if out is None:
                self.late += 1
        for k in [k for k in self._expected if k < step]:
            self._expected.discard(k)
            self.late += 1
        if out is not None:
            self.lipsync_frames += 1
        else:
            out = self.frames.get(step)
            if out is None:
                out = self._held if self._held is not None else self.frames.get(step, timeout=1.0)
        self.frames.release(step)
        self._held = out
        self.sent += 1
        self._measure(step)
        return out

    def _measure(self, step: int) -> None:
        """Voice in -> lips out: when the voice for this frame arrived, and now, when its frame leaves."""
        if self.n0 is None or step < self.n0:
            return
        sample = (step - self.n0) * SAMPLES_PER_FRAME
        starts = [s for s, _ in self._arrivals]
        k = bisect.bisect_right(starts, sample) - 1
        if k < 0 or sample >= self._received:
            return
        first, arrival = self._arrivals[k]
        # the packet arrived when its last sample was in; this sample was spoken a little earlier
        packet_end = self._arrivals[k + 1][0] if k + 1 < len(self._arrivals) else self._received
        spoken = arrival - (packet_end - sample) / VOICE_RATE
        self.delays.append(self.clock() - spoken)

    def voice_chunk(self, j: int) -> np.ndarray:
        """Output voice samples [j*960, (j+1)*960): the input delayed by n0 frames; silence if none."""
        out = np.zeros(CHUNK, np.float32)
        if self.n0 is None:
            return out
        s = j * CHUNK - self.n0 * SAMPLES_PER_FRAME
        with self._lock:
            lo, hi = max(s, self._voice0), min(s + CHUNK, self._voice0 + self._voice.size)
            if hi > lo:
                out[lo - s : hi - s] = self._voice[lo - self._voice0 : hi - self._voice0]
            keep = max(self._voice0, s + CHUNK)  # what is sent is done with
            if keep > self._voice0:
                self._voice = self._voice[keep - self._voice0 :]
                self._voice0 = keep
        return out

    def stats(self) -> dict:
        d = np.array(self.delays) * 1000 if self.delays else np.zeros(0)
        return {"channel": self.name, "frames_sent": self.sent, "fps": round(self.sent / max(1e-9, self.clock() - self.start), 2),
                "lipsync_frames": self.lipsync_frames, "late_frames": self.late, "speaking": self.speaking,
                "delay_ms_p50": round(float(np.percentile(d, 50)), 1) if d.size else None,
                "delay_ms_p95": round(float(np.percentile(d, 95)), 1) if d.size else None,
                "target_delay_ms": round(self.delay_s * 1000)}

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._ready.clear()
        self.frames.close()
