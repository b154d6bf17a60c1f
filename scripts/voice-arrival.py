#!/usr/bin/env python3
"""How long a talker's voice takes to come back, and how many mouths are in time, when the network
loses some of its packets. One talker, builtin engine, a server in this process, real peers.

    python scripts/voice-arrival.py [--lose-every K [--lose-run R]] [--jitter-ms J] [--aiortc-buffer]

`--lose-every K`: every K-th voice packet is lost on the way to the server (50: 2%), with the R - 1
after it (`--lose-run`, default 1). `--jitter-ms J`: each packet is held on the way for an exponential
random time of mean J ms.
`--aiortc-buffer`: the server keeps aiortc's own audio jitter buffer, as before `streamer/live/wire.py`.

Prints the voice's round trip as the talker meets it (from when its first sound was spoken, as a
microphone's packet would carry it, to when its packet came back to the client;
two Opus encodes add their 6.5 ms lookahead each), the server's own figure, and the speech frames
lip-synced in time (BENCHMARKS.md, "The voice off the wire").
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import numpy as np
from aiohttp import web

import streamer.server.app as app
from streamer.avatar.cache import demo_avatar
from streamer.bench import _espeak_voice
from streamer.config import load_config
from streamer.lipsync.builtin import BuiltinEngine
from streamer.live.client import round_trip_s, talk


async def main(args) -> None:
    avatar = demo_avatar("/tmp/voice-arrival-avatars")
    speech = _espeak_voice()[: 48000 * 10]
    voice = np.concatenate([np.zeros(48000, np.float32), speech, np.zeros(48000, np.float32)])
    server = app.Server(load_config(None, {}), BuiltinEngine(), avatar)
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        got, stats = await talk(url, voice, voice.size / 48000, lose_every=args.lose_every, lose_run=args.lose_run,
                                jitter_s=args.jitter_ms / 1000)
    finally:
        await runner.cleanup()
    back = round_trip_s(got, voice)
    speech_frames = stats["lipsync_frames"] + stats["late_frames"]
    print(f"{'aiortc buffer' if args.aiortc_buffer else 'off the wire'}, every {args.lose_every or '-'} lost "
          f"({args.lose_run} in a row), jitter {args.jitter_ms:g} ms: "
          f"voice back after {1000 * back:.0f} ms (target {stats['target_delay_ms']} ms, server's "
          f"figure p50 {stats['delay_ms_p50']} / p95 {stats['delay_ms_p95']} ms), "
          f"{stats['lipsync_frames']} of {speech_frames} speech frames in time")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lose-every", type=int, default=0)
    p.add_argument("--lose-run", type=int, default=1)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--aiortc-buffer", action="store_true")
    args = p.parse_args()
    if args.aiortc_buffer:
        app.unbuffered = lambda receiver, clock: None
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args))
