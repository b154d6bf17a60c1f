"""Wav2Lip's audio features, exactly as the original computes them, offline and streaming.

The chain (original hparams, librosa 0.7): pre-emphasis 0.97; STFT with n_fft 800, hop 200,
periodic Hann, centred with reflect padding; magnitude; 80 Slaney mel bands 55-7600 Hz with Slaney
normalisation; 20*log10(max(1e-5, S)) - 20; clip(8 * (S + 100) / 100 - 4, -4, 4).
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
WINDOW_FRAMES = 16  # mel frames per model window (0.2 s)
PREEMPHASIS = 0.97
# Window i is complete once audio reaches 200 * (start_i + 15) + 400 samples; start_i <= 3.2 i at
# 25 fps, so a window needs at most this much audio past its video frame's time.
LOOKAHEAD_SAMPLES = HOP * (WINDOW_FRAMES - 1) + N_FFT // 2
LOOKAHEAD_S = LOOKAHEAD_SAMPLES / SAMPLE_RATE


# Slaney's mel scale: linear below 1 kHz, logarithmic above
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP, f / _F_SP)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


@functools.cache
def mel_basis() -> np.ndarray:
    """(80, 401) Slaney-scale, Slaney-normalised triangular filters (librosa.filters.mel defaults)."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return weights.astype(np.float32)


@functools.cache
def _hann() -> np.ndarray:
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)  # periodic, as scipy get_window(fftbins=True)


def preemphasis(wav: np.ndarray, prev: float = 0.0) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1], with x[-1] = prev (0 at the start of a stream)."""
    x = np.asarray(wav, dtype=np.float64)
    y = x.copy()
    y[0] -= PREEMPHASIS * prev
    y[1:] -= PREEMPHASIS * x[:-1]
    return y


def frames_to_mel(frames: np.ndarray) -> np.ndarray:
    """(N, 800) pre-emphasised, padded signal slices -> (80, N) normalised mel columns."""
    spec = np.abs(np.fft.rfft(frames * _hann(), axis=1)).astype(np.float32)
    mel = mel_basis() @ spec.T
    # 8 * ((20 log10(max(1e-5, S)) - 20 + 100) / 100) - 4, clipped to +-4: the same to float32 rounding,
    # in place (the live voice computes ~3 columns a call, where each numpy call's overhead is the cost)
    out = np.log10(np.maximum(mel, np.float32(1e-5), out=mel), out=mel)
    out *= np.float32(1.6)
    out += np.float32(2.4)
    return np.minimum(np.maximum(out, np.float32(-4), out=out), np.float32(4), out=out)


def _slices(padded: np.ndarray, count: int) -> np.ndarray:
    """The first `count` STFT frames of a padded signal that starts at the first frame's origin."""
    padded = np.ascontiguousarray(padded)
    count = max(0, min(count, (padded.size - N_FFT) // HOP + 1))
    step = padded.strides[0]
    return np.lib.stride_tricks.as_strided(padded, (count, N_FFT), (HOP * step, step), writeable=False)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """(80, 1 + len(wav) // 200) float32 features of 16 kHz mono float audio."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        return np.zeros((N_MELS, 0), np.float32)
    padded = np.pad(preemphasis(wav), N_FFT // 2, mode="reflect")
    count = 1 + wav.size // HOP
    return frames_to_mel(_slices(padded, count))


def window_start(i: int, fps: float) -> int:
    # The original computes int(i * (80. / fps)) with the float multiplier; keep its rounding.
    return int(i * (80.0 / fps))


def _window(mel: np.ndarray, start: int) -> np.ndarray:
    w = mel[:, start : start + WINDOW_FRAMES]
    if w.shape[1] < WINDOW_FRAMES:  # audio under 0.2 s: pad with silence (-4), the original would break
        w = np.pad(w, ((0, 0), (0, WINDOW_FRAMES - w.shape[1])), constant_values=-4)
    return w


def mel_windows(mel: np.ndarray, fps: float = 25) -> np.ndarray:
    """(N, 80, 16): one window per video frame by the original rule, last window included."""
    total = mel.shape[1]
    out = []
    i = 0
    while total:
        start = window_start(i, fps)
        if start + WINDOW_FRAMES > total:
            out.append(_window(mel, max(0, total - WINDOW_FRAMES)))
            break
        out.append(_window(mel, start))
        i += 1
    return np.stack(out) if out else np.zeros((0, N_MELS, WINDOW_FRAMES), np.float32)


class MelStream:
    """Streaming `mel_windows(melspectrogram(audio))`: push 16 kHz audio in any chunks, get each
    window as soon as its audio has arrived (LOOKAHEAD_S past its frame), same values as offline.

    Work per push is proportional to the new audio: only new STFT frames are computed and only the
    last ~0.25 s of audio and the mel columns still needed are kept.
    """

    lookahead_s = LOOKAHEAD_S
    lookahead_samples = LOOKAHEAD_SAMPLES

    def __init__(self, fps: float = 25):
        self.fps = fps
        self._x = np.zeros(0, np.float64)  # pre-emphasised audio from absolute sample _x0 on
        self._x0 = 0
        self._n = 0  # samples received
        self._prev = 0.0  # last raw sample, for pre-emphasis across pushes
        self._mel = np.zeros((N_MELS, 0), np.float32)  # columns from absolute mel frame _m0 on
        self._m0 = 0
        self._frames_done = 0  # STFT frames computed
        self._next = 0  # next window index
        self.closed = False

    @property
    def samples(self) -> int:
        return self._n

    def samples_for(self, i: int) -> int:
        """Samples pushed when window i comes out: its last STFT frame and that frame's half window."""
        return HOP * (window_start(i, self.fps) + WINDOW_FRAMES - 1) + N_FFT // 2

    def push(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        if self.closed:
            raise RuntimeError("push after flush")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if x.size:
            self._x = np.concatenate([self._x, preemphasis(x, self._prev)])
            self._prev = float(x[-1])
            self._n += x.size
        # Frame t covers signal samples 200t-400 .. 200t+399; the start reflection needs sample 400.
        ready = (self._n - N_FFT // 2) // HOP + 1 if self._n > N_FFT // 2 else 0
        self._compute_frames(ready, final=False)
        return self._emit(final=False)

    def flush(self) -> list[tuple[int, np.ndarray]]:
        """End of stream: the last frames (end reflection) and the remaining windows."""
        if self.closed:
            return []
        self.closed = True
        if self._n == 0:
            return []
        self._compute_frames(1 + self._n // HOP, final=True)
        return self._emit(final=True)

    def _signal(self, lo: int, hi: int, final: bool) -> np.ndarray:
        """Padded signal samples lo..hi-1, in coordinates of the unpadded signal (negative = before)."""
        n = self._n
        if lo >= 0 and not final:  # past the start reflection: a plain slice of what is kept
            return self._x[lo - self._x0 : hi - self._x0]
        idx = np.arange(lo, hi)
        if final and n <= N_FFT // 2:
            # Shorter than the padding: numpy's repeated reflection, on the whole (kept) signal.
            assert self._x0 == 0
            padded = np.pad(self._x, N_FFT // 2, mode="reflect")
            return padded[idx + N_FFT // 2]
        idx = np.abs(idx)  # start reflection: x[-k] = x[k]
        if final:
            idx = np.where(idx > n - 1, 2 * (n - 1) - idx, idx)  # end reflection
        return self._x[idx - self._x0]

    def _compute_frames(self, upto: int, final: bool) -> None:
        if upto <= self._frames_done:
            return
        t0 = self._frames_done
        sig = self._signal(HOP * t0 - N_FFT // 2, HOP * (upto - 1) + N_FFT // 2, final)
        cols = frames_to_mel(_slices(sig, upto - t0))
        self._mel = np.concatenate([self._mel, cols], axis=1)
        self._frames_done = upto
        keep_from = max(0, HOP * upto - N_FFT // 2)
        if keep_from > N_FFT // 2 + 1:  # the start reflection needs samples 1..400 until frames 0-1 exist
            self._x = self._x[keep_from - self._x0 :]
            self._x0 = keep_from

    def _emit(self, final: bool) -> list[tuple[int, np.ndarray]]:
        out = []
        total = self._frames_done
        while True:
            start = window_start(self._next, self.fps)
            if start + WINDOW_FRAMES > total:
                if final and total:
                    out.append((self._next, self._col(max(0, total - WINDOW_FRAMES))))
                    self._next += 1
                break
            out.append((self._next, self._col(start)))
            self._next += 1
        # The last window is mel[T-16:], which may start before the next window's start.
        keep = max(0, min(window_start(self._next, self.fps), total - WINDOW_FRAMES))
        if keep > self._m0:
            self._mel = self._mel[:, keep - self._m0 :]
            self._m0 = keep
        return out

    def _col(self, start: int) -> np.ndarray:
        return _window(self._mel, start - self._m0).copy()
