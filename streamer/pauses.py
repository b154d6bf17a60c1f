"""Short garbage-collector pauses in the serving processes.

CPython's full collection walks every object the process holds, with the interpreter lock held
throughout, so the event loop stalls for all of it. Measured on the team's CPU: 21 ms in a media
worker (115k objects), 58 ms in the Wav2Lip ONNX inference service (250k), 100-200 ms in a process
that also holds torch and the test tools; a frame lasts 40 ms, so such a pause skips frames and
makes mouths late. Nearly all of those objects are the modules, models and caches loaded at start,
which live as long as the process: once it is ready they are set aside (`gc.freeze`), and a full
collection walks only what was made since."""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> None:
    """Call once a process has loaded and warmed up, just before it serves. Everything alive now is
    exempt from later collections (reference counting still frees it; a cycle it later becomes part
    of is never collected: startup objects rarely do). Calling it again (a test process starts many
    servers) first collects what the earlier call set aside."""
    t = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug("%d objects set aside from the garbage collector in %.0f ms", gc.get_freeze_count(),
              1000 * (time.perf_counter() - t))
