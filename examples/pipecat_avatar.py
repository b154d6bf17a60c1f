"""A Pipecat pipeline whose voice is streamer's avatar: runnable with nothing but espeak-ng.

    streamer serve                                   # in one terminal
    python examples/pipecat_avatar.py --channel demo # in another; watch http://localhost:8080/viewer.html?channel=demo

A tiny TTS service (espeak-ng) turns text into TTSAudioRawFrames; `StreamerAvatar` sends them to the
channel. Halfway through the second sentence the script pushes an InterruptionFrame, as Pipecat does
when the user starts speaking: the avatar's mouth and voice stop at once. In a real agent, put
`StreamerAvatar` after your TTS service (Cartesia, ElevenLabs, Piper...) in place of this one.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess

import numpy as np
from pipecat.frames.frames import (EndFrame, Frame, InterruptionFrame, TextFrame, TTSAudioRawFrame, TTSStartedFrame,
                                   TTSStoppedFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from streamer.integrations.pipecat import StreamerAvatar

RATE = 22050  # espeak-ng's rate; StreamerAvatar resamples what the server does not take as it is


class EspeakTTS(FrameProcessor):
    """TextFrame in, TTSStarted/TTSAudioRaw (20 ms pieces)/TTSStopped out, faster than real time."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, TextFrame):
            await self.push_frame(frame, direction)
            return
        wav = subprocess.run(["espeak-ng", "--stdout", frame.text], capture_output=True, check=True).stdout
        pcm = np.frombuffer(wav[44:], np.int16)  # a WAV header, then 16-bit mono samples
        await self.push_frame(TTSStartedFrame())
        step = RATE // 50
        for i in range(0, pcm.size, step):
            await self.push_frame(TTSAudioRawFrame(pcm[i : i + step].tobytes(), RATE, 1))
        await self.push_frame(TTSStoppedFrame())


async def main(url: str, channel: str, token: str | None) -> None:
    events = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        print("server:", ev)

    worker = PipelineWorker(Pipeline([EspeakTTS(), StreamerAvatar(url, channel, token, on_event=on_event)]))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.ensure_future(runner.run())
    await worker.queue_frame(TextFrame("Hello! I am a voice agent, and streamer gives me a face."))
    while not any(e["type"] == "playback_finished" for e in events):
        await asyncio.sleep(0.1)
    await worker.queue_frame(TextFrame("Now I will tell you a very long story, but you can interrupt me at any time."))
    await asyncio.sleep(2.5)
    print("the user barges in: InterruptionFrame")
    await worker.queue_frame(InterruptionFrame())
    await asyncio.sleep(1.0)
    await worker.queue_frame(EndFrame())
    await run


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the streamer server")
    p.add_argument("--channel", default="demo", help="channel to drive (one voice per channel)")
    p.add_argument("--token", default=None, help="server.token, if the server has one")
    a = p.parse_args()
    asyncio.run(main(a.url, a.channel, a.token))
