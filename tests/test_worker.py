"""The inference worker on the real clock: it warms up every batch size it may use, it never locks
itself out after a slow call, and it skips what it cannot finish in time."""

import re
import threading
import time

import numpy as np
import pytest

from streamer.lipsync.builtin import BuiltinEngine
from streamer.live.worker import CallCost, InferenceWorker, Request, batch_sizes

SLACK_S = 0.09  # what a 300 ms delay leaves a frame after the model's lookahead and one packet


class SlowCalls(BuiltinEngine):
    """The builtin engine, with chosen calls taking `stall` seconds: a first call at a new shape (GPU
    kernel choice, lazy loading) or a stall of the machine."""

    def __init__(self, stall: float = 2.0, first_at_each_size: bool = False):
        super().__init__()
        self.stall = stall
        self.first_at_each_size = first_at_each_size
        self.seen: set[int] = set()
        self.stall_next = False
        self.calls = 0

    def predict_crops(self, windows, crops):
        self.calls += 1
        new = windows.shape[0] not in self.seen
        self.seen.add(windows.shape[0])
        if self.stall_next or (self.first_at_each_size and new):
            self.stall_next = False
            time.sleep(self.stall)
        return super().predict_crops(windows, crops)


class Sink:
    closed = False

    def __init__(self):
        self.got: dict[int, float] = {}
        self.lock = threading.Lock()

    def accept(self, step, face):
        assert face.shape == (96, 96, 3) and face.dtype == np.uint8
        with self.lock:
            self.got[step] = time.monotonic()


def talk_at_25fps(worker, sink, seconds, crop):
    """Submit a speech frame every 40 ms, each due SLACK_S later, as a live channel does. Returns
    {step: (submitted, deadline)}."""
    sent = {}
    t0 = time.monotonic()
    window = np.zeros((80, 16), np.float32)
    for step in range(int(seconds * 25)):
        now = time.monotonic()
        sent[step] = (now, now + SLACK_S)
        worker.submit(Request(sink, step, window, crop, now + SLACK_S))
        time.sleep(max(0.0, t0 + (step + 1) / 25 - time.monotonic()))
    worker.drain()
    return sent


def in_time(sink, sent, steps):
    return sum(1 for s in steps if s in sink.got and sink.got[s] <= sent[s][1]) / len(steps)


def test_batch_sizes():
    assert batch_sizes(1) == (1,)
    assert batch_sizes(8) == (1, 2, 4, 8)
    assert batch_sizes(12) == (1, 2, 4, 8, 12)


def test_call_cost_is_robust_to_one_slow_call():
    cost = CallCost()
    assert cost.estimate(4) == 0.0
    cost.add(2, 0.020)
    cost.add(2, 0.030)
    assert cost.estimate(2, high=True) == 0.030  # of two calls, the longer
    for s in (0.010, 0.011, 2.0, 0.010):
        cost.add(1, s)
    assert cost.estimate(1) < 0.012  # the median, not a mean a 2 s call would drag
    assert cost.estimate(1, high=True) == 0.011  # the second longest: still not the stall
    cost.add(1, 0.014)
    assert cost.estimate(1) == 0.011 and cost.estimate(1, high=True) == 0.014
    cost.add(4, 0.030)
    assert cost.estimate(2) == pytest.approx(0.025)  # measured
    assert cost.estimate(3) == pytest.approx(0.025 + 0.005 / 2)  # between the sizes measured
    assert cost.estimate(8) == pytest.approx(0.060)  # beyond: per frame as the largest


def test_warm_up_runs_every_batch_size_before_serving(caplog):
    engine = SlowCalls(stall=0.3, first_at_each_size=True)
    t = time.monotonic()
    with caplog.at_level("WARNING"):
        worker = InferenceWorker(engine, max_batch=8)
    warm = time.monotonic() - t
    try:
        assert engine.seen == {1, 2, 4, 8}
        assert set(worker.cost.known()) == {1, 2, 4, 8}
        assert all(s < 0.1 for s in worker.cost.known().values())  # the slow first calls are not the estimate
        assert warm >= 4 * 0.3
        assert "frames/s here" not in caplog.text  # fast enough: nothing to warn of
    finally:
        worker.close()


def test_an_engine_slower_than_25_fps_says_so_at_start(caplog):
    """A user on a slow machine learns at start why mouths will sometimes hold, and how often."""

    class TenFps(BuiltinEngine):
        def predict_crops(self, windows, crops):
            time.sleep(0.1 * len(windows))
            return super().predict_crops(windows, crops)

    with caplog.at_level("WARNING"):
        worker = InferenceWorker(TenFps(), max_batch=2)
    worker.close()
    warning = [r.getMessage() for r in caplog.records if "frames/s here" in r.getMessage()]
    assert len(warning) == 1
    rate, share = re.search(r"at most ([\d.]+) frames/s.* about (\d+)%", warning[0]).groups()
    assert 8 <= float(rate) <= 10 and 32 <= int(share) <= 40


def test_an_engine_too_slow_for_any_delay_in_reach_says_what_delay_would_do(caplog):
    """A call longer than the longest auto delay leaves after the audio's lookahead: throughput is not
    what limits, no mouth can be in time, and the user learns which delay would give them time."""

    class Slow(BuiltinEngine):
        def predict_crops(self, windows, crops):
            time.sleep(0.35)
            return super().predict_crops(windows, crops)

    with caplog.at_level("WARNING"):
        worker = InferenceWorker(Slow(), max_batch=1)
    worker.close()
    said = [r.getMessage() for r in caplog.records if "a call here" in r.getMessage()]
    assert len(said) == 1 and not [r for r in caplog.records if "frames/s here" in r.getMessage()]
    call, delay = re.search(r"takes (\d+) ms a call.* A delay of (\d+) ms", said[0]).groups()
    assert 350 <= int(call) <= 450 and int(delay) >= 212 + 2 * int(call)


@pytest.mark.parametrize("warm", [False, True], ids=["first-call-slow", "stall-after-warm-up"])
def test_worker_recovers_within_a_second_of_a_2s_call(warm):
    """Before: one 2 s call set the cost estimate to 2 s, every later frame was skipped as hopeless,
    so nothing was measured again and the session showed the idle mouth to the end."""
    engine = SlowCalls(stall=2.0)
    worker = InferenceWorker(engine, max_batch=4, warm=warm)
    engine.stall_next = True  # the first call made while serving takes 2 s
    crop = np.full((96, 96, 3), 128, np.uint8)
    sink = Sink()
    try:
        sent = talk_at_25fps(worker, sink, 4.5, crop)
    finally:
        worker.close()
    first_done = min(sink.got.values())
    assert first_done - sent[0][0] >= 2.0  # the stall happened
    after = [s for s, (t, _) in sent.items() if t >= first_done + 1.0]
    assert len(after) > 25
    assert in_time(sink, sent, after) >= 0.95, in_time(sink, sent, after)


def test_frames_that_cannot_be_done_in_time_are_skipped_and_the_rest_done():
    """An engine slower than real time (60 ms a frame against 40 ms between frames): the worker does
    what it can in time, about two frames in three, instead of everything late or nothing."""

    class Slow(BuiltinEngine):
        def predict_crops(self, windows, crops):
            time.sleep(0.06 * windows.shape[0])
            return super().predict_crops(windows, crops)

    worker = InferenceWorker(Slow(), max_batch=4)
    sink = Sink()
    try:
        sent = talk_at_25fps(worker, sink, 3.0, np.full((96, 96, 3), 128, np.uint8))
    finally:
        worker.close()
    share = in_time(sink, sent, list(sent))
    late = [s for s in sink.got if sink.got[s] > sent[s][1]]
    assert 0.45 <= share <= 0.75, share
    assert len(late) <= 3  # only the probes that measure again may come late
