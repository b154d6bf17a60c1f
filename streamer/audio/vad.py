"""Voice activity per video frame, from webrtcvad, with pre-roll and hangover.

A video frame i covers audio [i/fps, (i+1)/fps). It counts as speech when any VAD frame within
[start - hangover, end + preroll) was voiced, so word onsets are not cut (pre-roll looks ahead) and
endings are not clipped (hangover looks back). Its decision is ready once audio reaches
end + preroll: keep preroll within the mel lookahead and voice activity adds no delay.

webrtcvad alone calls loud steady noise (fans, hiss, hum at -20 dBFS) speech at any aggressiveness.
Speech comes in syllables, noise does not, so a VAD frame also needs energy `min_snr_db` above the
noise floor, the quietest frame of the last `floor_s` seconds (0 dB turns this gate off).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import webrtcvad

RATE = 16000


class VoiceActivity:
    def __init__(self, aggressiveness: int = 2, frame_ms: int = 20, preroll_ms: int = 40,
                 hangover_ms: int = 240, fps: float = 25, min_snr_db: float = 9.0, floor_s: float = 2.0):
        if frame_ms not in (10, 20, 30):
            raise ValueError("webrtcvad takes 10, 20 or 30 ms frames")
        self._vad = webrtcvad.Vad(aggressiveness)
        self.frame = RATE * frame_ms // 1000
        self.fps = fps
        self.preroll = RATE * preroll_ms // 1000
        self.hangover = RATE * hangover_ms // 1000
        self._pending = np.zeros(0, np.int16)
        self._voiced: list[bool] = []  # one per VAD frame, from VAD frame _v0 on
        self._v0 = 0
        self._quiet_until = 0  # VAD frames starting before this sample count are not speech (forget)
        self._next = 0  # next video frame to decide
        self._n = 0
        self.min_snr_db = min_snr_db
        self._energies: deque[float] = deque(maxlen=max(1, round(floor_s * 1000 / frame_ms)))

    def _bounds(self, i: int) -> tuple[int, int]:
        start = round(i * RATE / self.fps)
        end = round((i + 1) * RATE / self.fps)
        return start - self.hangover, end + self.preroll

    def samples_for(self, i: int) -> int:
        """Samples pushed when frame i is decided: the VAD frames up to its pre-roll's end, whole."""
        return -(-self._bounds(i)[1] // self.frame) * self.frame

    def push(self, samples: np.ndarray) -> list[tuple[int, bool]]:
        """16 kHz mono float audio in; (video frame, is_speech) for frames now decided."""
        pcm = np.minimum(np.asarray(samples, np.float32), 1)  # clipped to [-1, 1] (np.clip costs twice this)
        np.maximum(pcm, -1, out=pcm)
        pcm = (pcm * 32767).astype(np.int16)
        self._n += pcm.size
        self._pending = np.concatenate([self._pending, pcm])
        whole = self._pending.size // self.frame * self.frame
        for k in range(0, whole, self.frame):
            chunk = self._pending[k : k + self.frame]
            wide = chunk.astype(np.float64)
            energy = 10 * math.log10(wide @ wide / wide.size + 1.0)
            self._energies.append(energy)
            loud = energy >= min(self._energies) + self.min_snr_db
            start = (self._v0 + len(self._voiced)) * self.frame
            self._voiced.append(loud and start >= self._quiet_until and self._vad.is_speech(chunk.tobytes(), RATE))
        self._pending = self._pending[whole:]
        return self._decide((self._v0 + len(self._voiced)) * self.frame)

    def forget(self) -> None:
        """Barge-in: the audio heard so far no longer counts as speech (its hangover would otherwise
        keep the next frames speaking)."""
        self._voiced = [False] * len(self._voiced)
        # and the VAD frame half pushed now, with the next (a resampler upstream still holds a few samples)
        self._quiet_until = self._n + self.frame

    def flush(self) -> list[tuple[int, bool]]:
        """Decide the frames up to the end of the audio pushed so far."""
        last = int(np.ceil(self._n * self.fps / RATE))
        out = []
        while self._next < last:
            out.append((self._next, self._speech(self._next)))
            self._next += 1
        self._trim()
        return out

    def _trim(self) -> None:
        # keep only what frames still to decide look back at (a long session would grow this forever)
        drop = max(0, self._bounds(self._next)[0] // self.frame - self._v0)
        if drop > 1000:
            del self._voiced[:drop]
            self._v0 += drop

    def _speech(self, i: int) -> bool:
        lo, hi = self._bounds(i)
        a = max(0, lo // self.frame - self._v0)
        b = min(len(self._voiced), -(-hi // self.frame) - self._v0)
        return any(self._voiced[a:b])

    def _decide(self, analysed: int) -> list[tuple[int, bool]]:
        out = []
        while self._bounds(self._next)[1] <= analysed:
            out.append((self._next, self._speech(self._next)))
            self._next += 1
        self._trim()
        return out
