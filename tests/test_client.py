import asyncio

import numpy as np

from streamer.live.client import VoiceSource
from streamer.live.tracks import OpusPackets


def test_clients_sending_one_voice_share_its_packets_and_each_gets_what_its_own_encoder_would_make():
    t = np.arange(48000 * 3) / 48000
    voice = (0.3 * np.sin(2 * np.pi * 200 * t) * (t < 2.5)).astype(np.float32)  # the end padded with silence
    pause = (1.0, 0.5)

    async def sent(source, n=150):
        source.t0 = -1e9  # as a client that started long ago: no pacing wait
        return [(bytes(p), p.pts) for p in [await source.recv() for _ in range(n)]]

    a, b, other = VoiceSource(voice, pause), VoiceSource(voice, pause), VoiceSource(voice)
    assert a.encoded is b.encoded and other.encoded is not a.encoded
    got_a, got_b = asyncio.run(sent(a)), asyncio.run(sent(b))

    opus, pcm, want, j = OpusPackets(), np.round(voice * 32767).astype(np.int16), [], 0
    while len(want) < 150:
        if pause[0] <= j * 0.02 < sum(pause):
            j = round(sum(pause) / 0.02)
        chunk = pcm[j * 960 : (j + 1) * 960]
        p = opus.encode(np.pad(chunk, (0, 960 - chunk.size)), j * 960)
        j += 1
        if p is not None:
            want.append((bytes(p), p.pts))
    assert got_a == want and got_b == want
    assert max(b[1] - a[1] for a, b in zip(want, want[1:])) == 26 * 960  # the pause is in it: timestamps jump
