"""A real Pipecat pipeline drives a channel through `StreamerAvatar`: its TTS audio lip-syncs the avatar
for a WHEP viewer, and an InterruptionFrame stops mouth and voice at once."""

import asyncio
import time

import numpy as np
import pytest

pipecat = pytest.importorskip("pipecat",
                              reason="Pipecat is in the `pipecat` extra (make install adds it on CPU machines)")

from pipecat.frames.frames import EndFrame, InterruptionFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from streamer.integrations.pipecat import StreamerAvatar  # noqa: E402
from streamer.live.client import watch  # noqa: E402
from tests.test_live import _until, avatar, serving  # noqa: E402,F401
from tests.test_push import RATE, assert_rests, loudness, motion, tts  # noqa: E402,F401


def tts_frames(x: np.ndarray, rate: int) -> list:
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    step = rate // 50  # 20 ms frames, as TTS services send
    return [TTSStartedFrame()] + [TTSAudioRawFrame(pcm[i : i + step].tobytes(), rate, 1)
                                  for i in range(0, pcm.size, step)] + [TTSStoppedFrame()]


def test_a_pipecat_agent_drives_the_avatar_and_barges_in(avatar, tts):
    seconds = tts.size / RATE

    async def main():
        async with serving(avatar) as (server, url):
            viewer = asyncio.ensure_future(watch(url, "agent", 2 * seconds + 5))
            await asyncio.sleep(1.0)
            events = []
            task = PipelineWorker(Pipeline([StreamerAvatar(url, "agent", on_event=events.append)]))
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(task)
            run = asyncio.ensure_future(runner.run())
            await task.queue_frames(tts_frames(tts, RATE))  # all at once, faster than real time
            assert await _until(lambda: any(e["type"] == "playback_finished" for e in events), seconds + 5)
            await task.queue_frames(tts_frames(np.concatenate([tts, tts]), RATE))
            assert await _until(lambda: len([e for e in events if e["type"] == "playback_started"]) == 2, 5)
            await asyncio.sleep(1.5)
            interrupted_at = time.monotonic()
            await task.queue_frame(InterruptionFrame())
            assert await _until(lambda: len([e for e in events if e["type"] == "playback_finished"]) == 2, 5)
            await asyncio.sleep(1.0)
            third_at = time.monotonic()
            await task.queue_frames(tts_frames(tts[: RATE], RATE) + [EndFrame()])  # last words, then the end
            await asyncio.wait_for(run, 15)
            got, _ = await viewer
            ended = await _until(lambda: not [s for s in server.sessions.values() if s.kind == "ws"], 5)
            return events, interrupted_at, third_at, got, ended

    events, interrupted_at, third_at, got, ended = asyncio.run(main())
    kinds = [(e["type"], e.get("interrupted")) for e in events]
    assert kinds == [("playback_started", None), ("playback_finished", False),
                     ("playback_started", None), ("playback_finished", True),
                     ("playback_started", None), ("playback_finished", False)], events  # the last words played out
    assert abs(events[1]["position"] - len(tts) / RATE) < 0.001
    assert 1.3 < events[3]["position"] < 1.8
    t, change = motion(got, avatar)
    at, rms = loudness(got)
    before = (t > interrupted_at - 1.0) & (t < interrupted_at)
    assert change[before].max() > 8 and rms[(at > interrupted_at - 0.5) & (at < interrupted_at)].max() > 0.02
    after = interrupted_at + 0.1
    rest, quiet = (t > after) & (t < third_at), (at > after) & (at < third_at)
    assert_rests(change[rest])
    assert rms[quiet].max() < 0.005
    assert ended


class Seen(FrameProcessor):
    """The frames that came down the pipeline, by type."""

    def __init__(self):
        super().__init__()
        self.kinds: list[str] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        self.kinds.append(type(frame).__name__)
        await self.push_frame(frame, direction)


def test_a_pipecat_agent_goes_on_after_the_server_ends_its_session(avatar, tts):
    """The server ends the session (DELETE /session, a restart) while an utterance is open: the frames
    that follow still go down the pipeline, the next audio connects again, and the end is prompt."""

    async def main():
        async with serving(avatar) as (server, url):
            events, seen = [], Seen()
            task = PipelineWorker(Pipeline([StreamerAvatar(url, "agent", on_event=events.append), seen]))
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(task)
            run = asyncio.ensure_future(runner.run())
            await task.queue_frames(tts_frames(tts[: RATE], RATE)[:-1])  # no TTSStoppedFrame yet
            assert await _until(lambda: events and events[-1]["type"] == "playback_started", 5), events
            await server.close_session(next(s.id for s in server.sessions.values() if s.kind == "ws"))
            await asyncio.sleep(0.5)
            await task.queue_frames([TTSStoppedFrame(), InterruptionFrame()])
            forwarded = await _until(lambda: {"TTSStoppedFrame", "InterruptionFrame"} <= set(seen.kinds), 2)
            await task.queue_frames(tts_frames(tts[: RATE // 2], RATE))
            again = await _until(lambda: events[-1] == {"type": "playback_finished", "utterance": 1,
                                                         "position": 0.5, "interrupted": False}, 5)
            ended_at = time.monotonic()
            await task.queue_frame(EndFrame())
            await asyncio.wait_for(run, 15)
            return forwarded, again, time.monotonic() - ended_at, events

    forwarded, again, end_s, events = asyncio.run(main())
    assert forwarded
    assert again, events  # a new session, its utterance played out
    assert end_s < 3.0, end_s  # (was 15 s: waiting for a playback_finished that could not come)
