"""One inference worker per engine: batches the speech frames of every live channel (one model, no
per-session copies), earliest deadline first, drops the ones whose deadline has passed, blends the
results. Runs on its own thread, never on the event loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from streamer.lipsync.engine import face_input, to_images

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Job:
    channel: object  # streamer.live.channel.Channel
    step: int  # output video frame (avatar loop step)
    window: np.ndarray  # (80, 16)
    strength: float
    deadline: float  # clock time the frame is sent


class InferenceWorker:
    def __init__(self, engine, max_batch: int = 8, queue_size: int = 256, clock=time.monotonic):
        self.engine = engine
        self.max_batch = max_batch
        self.clock = clock
        self._q: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.frames = 0
        self.dropped = 0
        self.busy_s = 0.0
        self.on_batch = None  # called with each batch's size (metrics)
        self.frame_cost = 0.0  # seconds per frame, running estimate (inference + blend)
        self._open = 0  # jobs submitted and not yet done or dropped
        self._idle = threading.Condition()
        self._thread.start()

    def submit(self, job: Job) -> bool:
        with self._idle:
            self._open += 1
        try:
            self._q.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += 1
            self._finished(1)
            return False

    def _finished(self, n: int) -> None:
        with self._idle:
            self._open -= n
            self._idle.notify_all()

    def depth(self) -> int:
        return self._q.qsize()

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every job submitted so far is done (or dropped)."""
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
        pending: list[Job] = []
        while True:
            if not pending:
                job = self._q.get()
                if job is None:
                    return
                pending.append(job)
            while True:  # everything queued now competes for the next batch
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                pending.append(job)
            now = self.clock()
            # A frame that cannot be done before it is sent is skipped (it will show the idle mouth):
            # computing it anyway would make the next frames late too, and so on.
            live = [j for j in pending if j.deadline > now + self.frame_cost and not j.channel.closed]
            self.dropped += len(pending) - len(live)
            self._finished(len(pending) - len(live))
            # earliest deadline first: fair across channels, and the frame due soonest is never
            # stuck behind another channel's backlog
            live.sort(key=lambda j: j.deadline)
            n = self.max_batch
            if self.frame_cost > 0 and live:  # no bigger than the first frame's deadline allows
                n = max(1, min(n, int((live[0].deadline - now) / self.frame_cost)))
            batch, pending = live[:n], live[n:]
            if not batch:
                continue
            try:
                self._infer(batch)
            except Exception:  # noqa: BLE001 - one bad batch must not kill the worker: those frames go idle
                log.exception("inference failed for %d frames; they are shown idle", len(batch))
            finally:
                self._finished(len(batch))

    def _infer(self, jobs: list[Job]) -> None:
        t = time.perf_counter()
        size = self.engine.face_size
        crops = np.stack([j.channel.crop(j.step, size) for j in jobs])
        mel = np.stack([j.window for j in jobs])[:, None]
        preds = to_images(self.engine.predict(mel, face_input(crops)))
        for job, pred, crop in zip(jobs, preds, crops):
            job.channel.deliver(job.step, pred, crop, job.strength)
        spent = time.perf_counter() - t
        per = spent / len(jobs)
        self.frame_cost = per if self.frame_cost == 0 else 0.8 * self.frame_cost + 0.2 * per
        self.busy_s += spent
        self.batches += 1
        self.frames += len(jobs)
        if self.on_batch:
            self.on_batch(len(jobs))
