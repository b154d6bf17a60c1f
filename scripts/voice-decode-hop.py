#!/usr/bin/env python3
"""CPU a received voice packet costs decoded on aiortc's decoder thread (a thread hop, a task made on
the loop, a wake-up of it) against decoded at once on the event loop (`streamer/live/wire.py`).

    python scripts/voice-decode-hop.py

Real Opus packets of a tone, 2000 of each, the loop turning once between packets.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import numpy as np
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import decoder_worker

from streamer.live.tracks import OpusPackets

N = 2000


def packets() -> list[bytes]:
    t = np.arange(960 * 500) / 48000
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000 * (1 + np.sin(t * 3)) / 2).astype(np.int16)
    opus = OpusPackets()
    return [bytes(opus.encode(pcm[k * 960 : (k + 1) * 960], k * 960)) for k in range(500)]


async def through_thread(data: list[bytes]) -> tuple[float, float]:
    """As aiortc does: the packet to a decoder thread, its frame back onto the loop."""
    loop, jobs, frames = asyncio.get_running_loop(), queue.Queue(), asyncio.Queue()
    codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    thread = threading.Thread(target=decoder_worker, args=(loop, jobs, frames, threading.Event()))
    thread.start()
    c0, w0 = time.process_time(), time.perf_counter()
    for k in range(N):
        jobs.put((codec, JitterFrame(data=data[k % len(data)], timestamp=k * 960)))
        await frames.get()
        await asyncio.sleep(0)  # the loop does other things between packets
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    jobs.put(None)
    await frames.get()
    thread.join()
    return cpu / N, wall / N


async def on_the_loop(data: list[bytes]) -> tuple[float, float]:
    """As `wire.VoiceArrivals` does: decoded where it arrives, its frame put on the track's queue."""
    frames, decoder = asyncio.Queue(), OpusDecoder()
    c0, w0 = time.process_time(), time.perf_counter()
    for k in range(N):
        for frame in decoder.decode(JitterFrame(data=data[k % len(data)], timestamp=k * 960)):
            frames.put_nowait(frame)
        await frames.get()
        await asyncio.sleep(0)
    return (time.process_time() - c0) / N, (time.perf_counter() - w0) / N


def main() -> None:
    data = packets()
    for _ in range(3):
        for name, how in (("decoder thread (aiortc)", through_thread), ("on the event loop", on_the_loop)):
            cpu, wall = asyncio.run(how(data))
            print(f"{name:24s} cpu {1e6 * cpu:6.1f} us  wall {1e6 * wall:6.1f} us a packet")


if __name__ == "__main__":
    main()
