"""Resampling mono audio (to 16 kHz unless told), offline and streaming, with no timing shift.

Both use scipy's `resample_poly` filter (Kaiser-windowed FIR, zero phase): output sample m is
centred on input time m / 16000 s, so lips computed from it line up with the voice. The streaming
form equals the offline one to float rounding; it holds back only the filter's half length
(30 input samples, 0.6 ms, at 48 kHz).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal

TARGET_RATE = 16000


def to_mono_float(samples: np.ndarray, channels: int = 1) -> np.ndarray:
    """Interleaved int16 (or float) samples -> mono float32 in [-1, 1]."""
    x = np.asarray(samples)
    scale = 1 / 32768 if x.dtype == np.int16 else 1.0
    x = x.reshape(-1, channels)
    if channels == 2:  # the live voice (Opus decodes to stereo): a fifth of the time of a mean
        return (x[:, 0].astype(np.float32) + x[:, 1]) * np.float32(scale / 2)
    x = x.astype(np.float32)
    mono = x.mean(axis=1) if channels > 1 else x[:, 0]
    return mono * np.float32(scale)


def _ratio(rate: int, target: int = TARGET_RATE) -> tuple[int, int]:
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    g = math.gcd(target, rate)
    return target // g, rate // g


def _filter(up: int, down: int) -> tuple[np.ndarray, int]:
    # scipy.signal.resample_poly's default design, so both forms are the same filter.
    half = 10 * max(up, down)
    h = signal.firwin(2 * half + 1, 1.0 / max(up, down), window=("kaiser", 5.0)) * up
    return h, half


def resample(x: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    """Whole-signal resampling of mono float audio from `rate` to `target`."""
    x = np.asarray(x, dtype=np.float32)
    up, down = _ratio(rate, target)
    if up == down:
        return x.copy()
    return signal.resample_poly(x, up, down).astype(np.float32)


class StreamResampler:
    """Push mono float audio at `rate` in any chunks; get samples at `target` equal to `resample`."""

    def __init__(self, rate: int, target: int = TARGET_RATE):
        self.rate = rate
        self.up, self.down = _ratio(rate, target)
        self._h, self._half = _filter(self.up, self.down) if self.up != self.down else (None, 0)
        self._reversed = None if self._h is None else self._h[::-1].copy()
        self._x = np.zeros(0, np.float64)  # input from absolute index _x0 on
        self._x0 = 0
        self._n = 0
        self._m = 0  # next output index
        self.closed = False

    @property
    def hold(self) -> float:
        """Input samples held back: an output sample needs this much input past its own time."""
        return self._half / self.up

    def inputs_for(self, count: int) -> int:
        """Input samples pushed when the first `count` outputs are out."""
        if self.up == self.down or count <= 0:
            return max(0, count)
        return -(-((count - 1) * self.down + self._half) // self.up) + 1

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.up == self.down:
            return x.copy()
        self._x = np.concatenate([self._x, x])
        self._n += x.size
        # y[m] needs inputs up to (m * down + half) // up
        last = (self._n - 1) * self.up - self._half  # largest m*down whose inputs have all arrived
        count = max(0, last // self.down + 1 - self._m) if last >= 0 else 0
        return self._produce(count)

    def flush(self) -> np.ndarray:
        """The rest, with silence after the end (as the offline form pads)."""
        self.closed = True
        if self.up == self.down:
            return np.zeros(0, np.float32)
        total = -(-self._n * self.up // self.down)
        return self._produce(max(0, total - self._m))

    def _produce(self, count: int) -> np.ndarray:
        if count <= 0:
            return np.zeros(0, np.float32)
        y = self._decimate(count) if self.up == 1 else self._gather(count)
        self._m += count
        # inputs no later output needs go
        keep = max(0, -(-(self._m * self.down + self._half - len(self._h) + 1) // self.up))
        if keep > self._x0:
            self._x = self._x[keep - self._x0 :]
            self._x0 = keep
        return y.astype(np.float32)

    def _gather(self, count: int) -> np.ndarray:
        """Outputs _m .. _m + count - 1, any ratio: each gathers its inputs and filter taps."""
        up, down, half, h = self.up, self.down, self._half, self._h
        m = np.arange(self._m, self._m + count)
        centre = m * down + half  # position in the upsampled, filtered signal
        taps = len(h)
        # inputs j with 0 <= centre - j*up < taps
        j_hi = centre // up
        j_lo = -(-(centre - taps + 1) // up)
        width = int((j_hi - j_lo).max()) + 1
        j = j_lo[:, None] + np.arange(width)[None, :]
        k = centre[:, None] - j * up
        valid = (k >= 0) & (k < taps) & (j >= 0) & (j < self._n)
        xi = np.clip(j - self._x0, 0, max(0, self._x.size - 1))
        vals = (np.where(valid, self._x[xi] if self._x.size else 0.0, 0.0)
                * np.where(valid, h[np.clip(k, 0, taps - 1)], 0))
        return vals.sum(axis=1)

    def _decimate(self, count: int) -> np.ndarray:
        """`_gather` for a whole-number ratio (48 kHz -> 16 kHz, the live voice): output m is input
        window m * down + half - taps + 1 .. m * down + half against the reversed filter; a fifth of
        the time of the general gather."""
        down, half, h = self.down, self._half, self._h
        taps = len(h)
        lo = self._m * down + half - taps + 1  # first input index used (negative: before the start)
        hi = (self._m + count - 1) * down + half + 1  # one past the last
        seg = np.zeros(hi - lo, np.float64)  # inputs outside [0, n) are zeros, as the offline form pads
        a, b = max(lo, self._x0), min(hi, self._n)
        if b > a:
            seg[a - lo : b - lo] = self._x[a - self._x0 : b - self._x0]
        step = seg.strides[0]
        windows = np.lib.stride_tricks.as_strided(seg, (count, taps), (down * step, step), writeable=False)
        return windows @ self._reversed
