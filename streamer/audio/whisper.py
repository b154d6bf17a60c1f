"""MuseTalk's audio features: whisper encoder hidden states, cut per video frame, offline and streaming.

As released (MuseTalk v1.5 `AudioProcessor`): 16 kHz audio -> whisper log-mel over a 30 s input ->
encoder hidden states of every layer (embedding + each block), one position per 20 ms; frame i
(25 fps) sees positions 2i-4 .. 2i+5 (2 frames either side), zeros before the start and past the
audio's end: a (10 * layers, d_model) window, 50 x 384 for whisper-tiny.

The encoder attends over its whole 30 s input, so a position's features depend on the audio after
it. The release encodes whole 30 s segments (offline only). Live, the audio after "now" does not
exist yet, so here positions are computed in blocks of `block_ms`: block b is encoded from the 30 s
of audio ending `context_ms` after the block's end. Offline uses the same blocks, so live and offline
are equal for any chunking; `context_ms` trades delay for how much of what follows the encoder hears.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RATE = 16000
POSITION = 320  # samples per encoder position (20 ms)
SPAN = 30 * RATE  # whisper's input: 30 s
PAD_LEFT = PAD_RIGHT = 2  # video frames of audio either side of a frame (v1.5)
MAX_PENDING = 50  # blocks a stream may have queued for the encoder; past that, new ones are skipped


def lookahead_s(block_ms: int, context_ms: int, fps: float = 25) -> float:
    """Audio needed past a frame's start before its window is complete, at these block settings."""
    # frame i needs positions up to step*(i + PAD_RIGHT + 1) - 1; the block holding it, then the context
    step = round(RATE / fps / POSITION)
    last = step * (PAD_RIGHT + 1)
    return ((last - 1 + block_ms // 20) * POSITION + context_ms * RATE // 1000) / RATE


class WhisperFeatures:
    """Per-frame whisper windows for one loaded encoder (shared by every stream of a process)."""

    def __init__(self, encoder, extractor, device: str, dtype, block_ms: int = 80, context_ms: int = 160,
                 fps: float = 25, config=None):
        """encoder None (with its `config`): the windows' geometry alone, for a process that only runs
        the UNet on windows made elsewhere (a server's inference service)."""
        if block_ms % 20 or context_ms % 20 or block_ms <= 0 or context_ms < 0:
            raise ValueError("block_ms and context_ms must be multiples of 20 ms (block_ms > 0)")
        self.encoder, self.extractor = encoder, extractor
        self.device, self.dtype = device, dtype
        self.fps = fps
        self.step = round(RATE / fps / POSITION)  # positions per video frame: 2
        self.block = block_ms // 20  # positions per block
        self.context = context_ms * RATE // 1000  # samples heard past a block's end
        config = encoder.config if encoder is not None else config
        layers = config.encoder_layers + 1
        self.width = self.step * (PAD_LEFT + PAD_RIGHT + 1)  # positions per window: 10
        self.state_shape = (layers, config.d_model)  # one position's features
        self.shape = (self.width * layers, config.d_model)
        self.lookahead_s = lookahead_s(block_ms, context_ms, fps)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="whisper")
        self._times: deque[float] = deque(maxlen=25)  # recent block encode times
        self._streams: weakref.WeakSet[WhisperStream] = weakref.WeakSet()

    @property
    def compute_s(self) -> float:
        """The wait between a window's last audio and the window: a block's encode time (median of
        recent ones; 0 before the first), times the open streams sharing the encoder thread, since a
        block may queue behind one of each."""
        if not self._times:
            return 0.0
        with self._lock:  # streams open on the event loop while a channel is built in an executor
            streams = list(self._streams)
        sharing = sum(1 for s in streams if not s.closed and s.background)
        return float(np.median(self._times)) * max(1, sharing)

    def warmup(self) -> None:
        """Encode a silent block three times: the first call sets the kernels up; the faster of the
        others is the first estimate (a server's processes start at once and contend for the cores
        then; real blocks' times take over as they come)."""
        n = (self.block * POSITION) + self.context
        self.encode(np.zeros(n, np.float32), 0, n, 0)
        self._times.clear()
        for _ in range(2):
            self.encode(np.zeros(n, np.float32), 0, n, 0)
        best = min(self._times)
        self._times.clear()
        self._times.append(best)

    # the encoder

    def encode(self, audio: np.ndarray, start: int, end: int, block: int) -> np.ndarray:
        """Features (positions, layers, d_model) of block `block`, encoded from audio[start:end] (absolute
        samples of the stream; `audio` holds exactly those). Positions past `end` are zeros."""
        import torch

        if self.encoder is None:
            raise RuntimeError("these whisper features were loaded without the encoder (geometry only)")
        t = time.perf_counter()
        feats = self.extractor(audio, sampling_rate=RATE, return_tensors="np").input_features
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(feats).to(self.device, self.dtype)
            states = self.encoder(x, output_hidden_states=True).hidden_states
            p0, p1 = block * self.block, (block + 1) * self.block
            first = start // POSITION
            # only this block's positions leave the device (all 1500 would be 11 MB a block)
            out = torch.stack([h[0, p0 - first : p1 - first] for h in states], dim=1).float().cpu().numpy()
        valid = max(0, end // POSITION - p0)  # the release trims at floor(samples / 320)
        out[valid:] = 0
        self._times.append(time.perf_counter() - t)
        return out

    def window_of(self, block: int, end: int) -> tuple[int, int]:
        """The audio (start, end) block `block` is encoded from, when `end` samples exist (end of stream)
        or more (then the block's own end plus the context)."""
        stop = min(end, (block + 1) * self.block * POSITION + self.context)
        start = max(0, math.ceil((stop - SPAN) / POSITION) * POSITION)
        return start, stop

    def windows(self, positions: np.ndarray, frames: range, first: int = 0) -> np.ndarray:
        """(len(frames), *shape) windows from positions[k] = features of position first + k (zeros
        before 0 and past the end; the frames must not read positions from 0 to `first`)."""
        out = np.zeros((len(frames), self.width, *positions.shape[1:]), np.float32)
        for k, i in enumerate(frames):
            lo = self.step * (i - PAD_LEFT)
            a, b = max(lo, first), min(lo + self.width, first + len(positions))
            if b > a:
                out[k, a - lo : b - lo] = positions[a - first : b - first]
        return out.reshape(len(frames), *self.shape)

    # offline and streaming

    def blocks(self, samples: int) -> int:
        """Blocks in a stream of `samples` (the last one may be partial)."""
        return -(-(samples // POSITION) // self.block)

    def offline(self, audio16: np.ndarray, frames: int) -> np.ndarray:
        return ClipWindows(self, audio16, frames)[range(frames)]

    def for_clip(self, audio16: np.ndarray, frames: int) -> ClipWindows:
        return ClipWindows(self, audio16, frames)

    background = True  # streams encode on the encoder thread (False: in push, for simulated clocks)

    def stream(self, background: bool | None = None) -> WhisperStream:
        stream = WhisperStream(self, self.background if background is None else background)
        with self._lock:
            self._streams.add(stream)
        return stream

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)


class ClipWindows:
    """`offline`'s windows of a clip, made as they are asked for: only the blocks the latest request
    reads are kept, not the whole clip's windows (77 KB a frame for whisper-tiny: 1.2 GB for 10 min),
    and the encoder's time falls inside render's progress. Asked in rising frame order (as render
    does), each block is encoded once."""

    def __init__(self, features: WhisperFeatures, audio16: np.ndarray, frames: int):
        self.features = features
        self.audio = np.asarray(audio16, np.float32).reshape(-1)
        self.frames = frames
        self.blocks = features.blocks(self.audio.size)
        self._done: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.frames

    def __getitem__(self, index) -> np.ndarray:
        f = self.features
        frames = [int(i) for i in np.atleast_1d(index)]
        if not frames:
            return np.zeros((0, *f.shape), np.float32)
        lo = max(0, f.step * (min(frames) - PAD_LEFT))
        hi = f.step * (max(frames) - PAD_LEFT) + f.width  # positions lo .. hi-1 are read
        first, last = lo // f.block, min(self.blocks, -(-hi // f.block))
        for b in [b for b in self._done if b < first or b >= last]:
            del self._done[b]
        for b in range(first, last):
            if b not in self._done:
                start, stop = f.window_of(b, self.audio.size)
                self._done[b] = f.encode(self.audio[start:stop], start, stop, b)
        parts = [self._done[b] for b in range(first, last)]
        positions = np.concatenate(parts) if parts else np.zeros((0, *f.state_shape), np.float32)
        out = f.windows(positions, frames, first * f.block)
        return out[0] if np.ndim(index) == 0 else out


class WhisperStream:
    """`offline` as audio arrives: each block is encoded once its audio and context are in (on the
    features' encoder thread when `background`, so the event loop never waits), and each frame's window
    is handed out once the blocks it reads are done."""

    def __init__(self, features: WhisperFeatures, background: bool = True):
        self.f = features
        self.background = background
        self._audio = np.zeros(0, np.float32)  # from absolute sample _a0 on
        self._a0 = 0
        self._n = 0
        self._next_block = 0
        self._pending: deque[tuple[int, Future | None]] = deque()
        self._pos = np.zeros((0, *features.state_shape), np.float32)  # positions from _p0 on
        self._p0 = 0
        self._next = 0  # next frame
        self.skipped = 0
        self.closed = False

    @property
    def samples(self) -> int:
        return self._n

    def push(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        if self.closed:
            raise RuntimeError("push after flush")
        x = np.asarray(samples, np.float32).reshape(-1)
        if x.size:
            self._audio = np.concatenate([self._audio, x])
            self._n += x.size
        f = self.f
        while (self._next_block + 1) * f.block * POSITION + f.context <= self._n:
            self._schedule(self._next_block, self._n)
            self._next_block += 1
        self._trim_audio()
        return self._collect(wait=not self.background)

    def flush(self) -> list[tuple[int, np.ndarray]]:
        """End of stream: the last blocks from the audio there is, and every frame that has audio."""
        if self.closed:
            return []
        self.closed = True
        f = self.f
        blocks = f.blocks(self._n)
        while self._next_block < blocks:
            self._schedule(self._next_block, self._n)
            self._next_block += 1
        out = self._collect(wait=True)
        frames = -(-self._n // (f.step * POSITION))
        if self._next < frames:  # their windows reach past the audio: zeros there
            rng = range(self._next, frames)
            out += list(zip(rng, f.windows(self._pos, rng, self._p0)))
            self._next = frames
        return out

    def _schedule(self, block: int, available: int) -> None:
        start, stop = self.f.window_of(block, available)
        audio = self._audio[start - self._a0 : stop - self._a0]
        if not self.background:
            self._pending.append((block, _done(self.f.encode(audio, start, stop, block))))
        elif sum(1 for _, fut in self._pending if fut is not None and not fut.done()) >= MAX_PENDING:
            self.skipped += 1  # the encoder cannot keep up: these frames would be late anyway
            if self.skipped == 1:
                log.warning("whisper encoder behind by %d blocks: skipping audio features", MAX_PENDING)
            self._pending.append((block, None))
        else:
            self._pending.append((block, self.f.submit(self.f.encode, audio.copy(), start, stop, block)))

    def _result(self, fut: Future | None) -> np.ndarray:
        """A block's features; zeros for one skipped or failed (every block keeps its place)."""
        if fut is not None:
            try:
                return fut.result()
            except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory: this block's frames lose their mouth
                self.skipped += 1
                log.error("whisper encoder failed on a block (%s: %s); its frames get no audio features",
                          type(e).__name__, e)
        return np.zeros((self.f.block, *self.f.state_shape), np.float32)

    def close(self) -> None:
        """The voice is gone: queued blocks are not encoded (other streams share the encoder)."""
        self.closed = True
        for _, fut in self._pending:
            if fut is not None:
                fut.cancel()
        self._pending.clear()

    def _trim_audio(self) -> None:
        start, _ = self.f.window_of(self._next_block, self._n + SPAN)  # the next block reads from here on...
        end_start, _ = self.f.window_of(self._next_block, self._n)  # ...or from here, if the stream ends now
        keep = min(start, end_start, self._n)
        if keep - self._a0 > RATE:
            self._audio = self._audio[keep - self._a0 :]
            self._a0 = keep

    def _collect(self, wait: bool) -> list[tuple[int, np.ndarray]]:
        f = self.f
        parts = []
        while self._pending and (wait or self._pending[0][1] is None or self._pending[0][1].done()):
            _, fut = self._pending.popleft()
            parts.append(self._result(fut))
        if parts:
            self._pos = np.concatenate([self._pos, *parts])
        done = self._p0 + len(self._pos)  # positions known
        ready = max(0, (done - f.step * (PAD_RIGHT + 1)) // f.step + 1)  # frames whose window is in
        if ready <= self._next:
            return []
        rng = range(self._next, ready)
        out = list(zip(rng, f.windows(self._pos, rng, self._p0)))
        self._next = ready
        keep = max(self._p0, f.step * (self._next - PAD_LEFT))
        self._pos = self._pos[keep - self._p0 :]
        self._p0 = keep
        return out


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def load_whisper(folder: Path, device: str, dtype, block_ms: int = 80, context_ms: int = 160,
                 warmup: bool = True, with_encoder: bool = True) -> WhisperFeatures:
    """The encoder and feature extractor of a `whisper/` folder (config.json, weights,
    preprocessor_config.json), nothing fetched from the network. with_encoder False: its config alone
    (the windows' geometry; no weights loaded)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    if not with_encoder:
        config = WhisperConfig.from_pretrained(str(folder), local_files_only=True)
        return WhisperFeatures(None, None, device, dtype, block_ms, context_ms, config=config)

    extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    model = WhisperModel.from_pretrained(str(folder), local_files_only=True)
    encoder = model.get_encoder().to(device, dtype).eval()
    features = WhisperFeatures(encoder, extractor, device, dtype, block_ms, context_ms)
    if warmup:
        features.warmup()
    return features
