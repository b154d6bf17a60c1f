"""One inference worker per engine: batches the speech frames of every live channel (one model, no
per-session copies), earliest deadline first, and skips the frames it can no longer finish in time.
Runs on its own thread, never on the event loop, and never waits on a channel: a request carries
everything inference needs (mel window and face crop), and the mouth goes back to the request's sink.
Blending is the channel's job."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamer.mouth import FPS

log = logging.getLogger(__name__)

MARGIN_S = 0.003  # a mouth must be in this long before its frame is sent
PROBE_AFTER_S = 0.2  # with nothing run for this long, run one frame anyway to measure again


class ResultSink(Protocol):
    """Where a request's mouth goes (a channel)."""

    closed: bool

    def accept(self, step: int, face: np.ndarray) -> None: ...


@dataclass(slots=True)
class Request:
    sink: ResultSink
    step: int  # output video frame
    window: np.ndarray  # the engine's audio window, e.g. (80, 16) mel
    crop: np.ndarray  # (S, S, 3) uint8 BGR face crop of the avatar frame
    deadline: float  # clock time the frame is sent


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the worker uses: powers of two up to `max_batch`, and `max_batch`. Few shapes,
    each warmed up before serving (a first call at a new shape can take seconds on a GPU)."""
    sizes = {max_batch}
    n = 1
    while n < max_batch:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes))


class CallCost:
    """Seconds an inference call takes by batch size: the median of the last few calls of each size,
    so one slow call (a first call at a new shape, a stall) moves nothing; and, for whether a call will
    be done by a deadline, the second longest of them (calls that vary, on a busy CPU, most often)."""

    def __init__(self, keep: int = 5):
        self._calls: dict[int, deque[float]] = {}
        self._keep = keep
        # kept as calls come: estimates are asked for far more often
        self._medians: dict[int, float] = {}
        self._highs: dict[int, float] = {}

    def add(self, n: int, seconds: float) -> None:
        calls = self._calls.setdefault(n, deque(maxlen=self._keep))
        calls.append(seconds)
        ordered = sorted(calls)
        self._medians = dict(sorted({**self._medians, n: float(np.median(ordered))}.items()))
        high = ordered[-2] if len(ordered) >= 3 else ordered[-1]  # (of two, the longer: not the shorter)
        self._highs = dict(sorted({**self._highs, n: high}.items()))

    def known(self) -> dict[int, float]:
        return dict(self._medians)

    def estimate(self, n: int, high: bool = False) -> float:
        """Seconds for a call of `n` frames (high: the second longest of the last calls, not the median);
        0.0 while nothing has been measured."""
        known = self._highs if high else self._medians
        if not known:
            return 0.0
        if n in known:
            return known[n]
        below = [k for k in known if k < n]
        above = [k for k in known if k > n]
        if below and above:
            lo, hi = below[-1], above[0]
            return known[lo] + (known[hi] - known[lo]) * (n - lo) / (hi - lo)
        if below:
            return known[below[-1]] * n / below[-1]
        return known[above[0]]


class InferenceWorker:
    def __init__(self, engine, max_batch: int = 8, queue_size: int = 256, clock=time.monotonic, warm: bool = True):
        self.engine = engine
        self.max_batch = max_batch
        self.sizes = batch_sizes(max_batch)
        self.clock = clock
        self.cost = CallCost()
        self._q: queue.Queue[Request | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.frames = 0
        self.dropped = 0
        self.failed = 0  # batches whose call raised
        self.failed_batches_run = 0  # ... in a row, now
        self.busy_s = 0.0  # in inference calls (with their host-side input and output conversion)
        self.on_batch = None  # called with each batch's size (metrics)
        self._open = 0  # requests submitted and not yet done or dropped
        self._idle = threading.Condition()
        self._last_run = clock()
        self._warm = warm
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()  # warmed up: serving starts from real figures


    def warm_up(self) -> float:
        """Make the slow first call at every batch size now, then measure each: the deadline logic starts
        from real figures, and no first call of a live session is slow. Runs on the worker's thread:
        onnxruntime's CUDA provider keeps per-thread state (handles, CUDA graphs). Returns seconds spent."""
        t0 = time.perf_counter()
        size = self.engine.face_size
        for n in self.sizes:
            mel = np.zeros((n, *self.engine.features.shape), np.float32)
            crops = np.full((n, size, size, 3), 128, np.uint8)
            self.engine.predict_crops(mel, crops)  # the slow one, not measured
            for _ in range(2):
                self._call(mel, crops)
        spent = time.perf_counter() - t0
        known = self.cost.known()
        per = ", ".join(f"{n}: {1000 * s / n:.1f}" for n, s in known.items())
        log.info("inference warmed up in %.1f s; ms per frame by batch size: %s", spent, per)
        rates = [n / s for n, s in known.items() if s > 0]
        best = max(rates) if rates else FPS
        from streamer.live.channel import AUTO_MAX_S  # (the channel module imports this one)

        features = self.engine.features
        ahead = features.lookahead_s + features.compute_s  # a frame's audio is in this long after its start
        call = known[min(known)] if known else 0.0  # the least a mouth waits for, once its audio is in
        if call > AUTO_MAX_S - ahead:  # throughput is not the limit then: no mouth can be in time
            log.warning("%s takes %.0f ms a call here; the auto delay (at most %.0f ms) leaves a mouth %.0f ms "
                        "once its audio is in: no speech frame will get its own mouth in time (the idle mouth "
                        "shows). A delay of %.0f ms or more (--delay-ms, setting live.delay_ms) gives them time",
                        self.engine.name, 1000 * call, 1000 * AUTO_MAX_S, 1000 * max(0.0, AUTO_MAX_S - ahead),
                        1000 * (ahead + 2 * call))
        elif best < FPS:  # said once, at start: a slow machine is expected to show held mouths
            log.warning("%s does at most %.1f frames/s here and a talker needs %d: about %.0f%% of one talker's "
                        "speech frames (less with more talkers) can get their own mouth; the others show the "
                        "last one if it is at most two frames old, else the idle mouth (counted in the page's "
                        "stats and /metrics)", self.engine.name, best, FPS, 100 * best / FPS)
        return spent

    def submit(self, req: Request) -> bool:
        with self._idle:
            self._open += 1
        try:
            self._q.put_nowait(req)
            return True
        except queue.Full:
            self.dropped += 1
            self._finished(1)
            return False

    def _finished(self, n: int) -> None:
        if n:
            with self._idle:
                self._open -= n
                self._idle.notify_all()

    def depth(self) -> int:
        return self._q.qsize()

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every request submitted so far is done (or dropped)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._idle:
                if self._open == 0:
                    return True
                self._idle.wait(0.05)
        return False

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            if self._warm:
                self.warm_up()
        except Exception:  # noqa: BLE001 - serving still works, with estimates from its first calls
            log.exception("inference warm-up failed")
        finally:
            self._ready.set()
        pending: list[Request] = []
        while True:
            if not pending:
                req = self._q.get()
                if req is None:
                    return
                pending.append(req)
            while True:  # everything queued now competes for the next batch
                try:
                    req = self._q.get_nowait()
                except queue.Empty:
                    break
                if req is None:
                    return
                pending.append(req)
            batch, pending = self._choose(pending)
            if not batch:
                continue
            try:
                self._infer(batch)
                if self.failed_batches_run:
                    log.warning("inference works again after %d failed batches", self.failed_batches_run)
                    self.failed_batches_run = 0
            except Exception:  # noqa: BLE001 - one bad batch must not kill the worker: those frames go idle
                self.failed += 1
                self.failed_batches_run += 1
                if self.failed_batches_run == 1:  # once per run of failures, not 25 tracebacks a second
                    log.exception("inference failed for %d frames; frames are shown idle until it works again",
                                  len(batch))
                elif self.failed_batches_run % 250 == 0:
                    log.error("inference still failing: %d batches in a row", self.failed_batches_run)
            finally:
                self._finished(len(batch))

    def _choose(self, pending: list[Request]) -> tuple[list[Request], list[Request]]:
        """The next batch, and what stays pending. Frames that cannot be done before they are sent are
        dropped (they show the previous or idle mouth): computing them anyway would make the next
        frames late too, and so on."""
        now = self.clock()
        open_ = sorted((r for r in pending if not r.sink.closed), key=lambda r: r.deadline)
        self._finished(len(pending) - len(open_))  # their channels are gone
        pending = open_
        # Whether a frame can be done in time goes by a long call, not a typical one: in overload the
        # earliest deadlines that fit are chosen, all at the edge, and with a median half of those calls
        # ended late (torch on a busy 2-core CPU: 14 of 43 frames run, calls 134-239 ms)
        cost = functools.partial(self.cost.estimate, high=True)
        doable = [r for r in pending if r.deadline >= now + cost(1) + MARGIN_S]
        hopeless = pending[: len(pending) - len(doable)]
        if not doable and now - self._last_run > PROBE_AFTER_S:
            # The estimate comes from past calls and a skipped frame measures nothing, so when it says
            # nothing can be done, run the frame most likely to make it anyway and measure again.
            doable = [r for r in hopeless[-1:] if r.deadline > now]
            hopeless = hopeless[:-1] if doable else hopeless
        self.dropped += len(hopeless)
        self._finished(len(hopeless))
        if not doable:
            return [], []
        # Earliest deadline first (fair across channels), in the batch that does the most frames in time:
        # a batch of n takes est(n), and frames not in it that are due before est(n) + est(1) are lost
        # with it. In overload that drops the most urgent frame to serve several in a larger batch,
        # instead of running one frame at a time at its deadline forever.
        best, batch = None, doable[:1]
        after = cost(1) + MARGIN_S
        for size in self.sizes:
            if size > len(doable):
                break
            took = cost(size)
            fits = [r for r in doable if r.deadline >= now + took + MARGIN_S][:size]
            if len(fits) < size:
                continue
            lost = sum(1 for r in doable if r.deadline < now + took + after) \
                - sum(1 for r in fits if r.deadline < now + took + after)
            score = (size - lost, size / max(took, 1e-9))
            if best is None or score > best:
                best, batch = score, fits
        chosen = {id(r) for r in batch}
        return batch, [r for r in doable if id(r) not in chosen]

    def _call(self, windows: np.ndarray, crops: np.ndarray) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        faces = self.engine.predict_crops(windows, crops)
        spent = time.perf_counter() - t
        self.cost.add(len(crops), spent)
        return faces, spent

    def _infer(self, batch: list[Request]) -> None:
        faces, spent = self._call(np.stack([r.window for r in batch]), np.stack([r.crop for r in batch]))
        for r, face in zip(batch, faces):
            r.sink.accept(r.step, face)
        self._last_run = self.clock()
        self.busy_s += spent
        self.batches += 1
        self.frames += len(batch)
        if self.on_batch:
            self.on_batch(len(batch))
