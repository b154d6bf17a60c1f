"""Avatar frames by loop step for a live channel, decoded ahead on a thread and released once sent."""

from __future__ import annotations

import logging
import threading

import numpy as np

from streamer.avatar.cache import Avatar

log = logging.getLogger(__name__)


class FrameStore:
    def __init__(self, avatar: Avatar, capacity: int = 24):
        self.avatar = avatar
        self.capacity = capacity
        self._frames: dict[int, np.ndarray] = {}
        self._cond = threading.Condition()
        self._low = 0
        self._closed = False
        self._reader = None
        # decoded now, so a channel always has a frame to show (build channels off the event loop)
        self.first = next(iter(avatar.read_frames(0, count=1)))[2]
        self._still = self.first if avatar.frames == 1 else None
        if self._still is None:
            self._thread = threading.Thread(target=self._run, name=f"decode-{avatar.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        self._reader = self.avatar.read_frames(0)
        try:
            self._decode()
        except Exception:  # noqa: BLE001 - said loudly: the channel goes on holding its last frame
            log.exception("decoding avatar %s failed: its channels hold their last frame", self.avatar.name)
        finally:
            self._reader.close()

    def _decode(self) -> None:
        for step, _, frame in self._reader:
            with self._cond:
                while not self._closed and step >= self._low + self.capacity:
                    self._cond.wait(0.5)
                if self._closed:
                    return
                if step >= self._low:
                    self._frames[step] = frame
                    self._cond.notify_all()

    def get(self, step: int, timeout: float = 0.0) -> np.ndarray | None:
        """Frame at loop step `step`, waiting up to `timeout` s for the decoder; None if not there."""
        if self._still is not None:
            return self._still
        with self._cond:
            if timeout > 0:
                self._cond.wait_for(lambda: step in self._frames or self._closed or step < self._low, timeout)
            return self._frames.get(step)

    def release(self, below: int) -> None:
        """Steps under `below` are done with: free them and let the decoder run on."""
        if self._still is not None:
            return
        with self._cond:
            if below > self._low:
                for k in [k for k in self._frames if k < below]:
                    del self._frames[k]
                self._low = below
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._still is None:
            self._thread.join(timeout=5)
