import asyncio
import time

import numpy as np
import pytest

from streamer.client import Speaker, SpeakerError, pcm16
from streamer.live.client import VoiceSource
from streamer.live.tracks import OpusPackets
from tests.test_live import avatar, serving  # noqa: F401


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


def test_a_long_send_is_paced_so_a_clear_stops_it_at_once(avatar):
    """60 s in one send(): sent at most max_ahead_s ahead, so the server reads the clear at once (not
    after the 30 s it queues) and the send stops there."""

    async def main():
        async with serving(avatar) as (_, url), await Speaker.connect(url, "big", 48000) as s:
            sender = asyncio.ensure_future(s.send((np.sin(np.arange(48000 * 60) / 10) * 8000).astype(np.int16)))
            await s.wait("playback_started", 5)
            await asyncio.sleep(1.0)
            cleared_at = time.monotonic()
            await s.clear()
            ev = await s.wait("playback_finished", 5)
            finished_s = time.monotonic() - cleared_at
            await asyncio.wait_for(sender, 1.5)  # within one paced message
            return ev, finished_s

    ev, finished_s = asyncio.run(main())
    assert ev["interrupted"] and 0.8 < ev["position"] < 2.0, ev
    assert finished_s < 1.0, finished_s  # (was 27.8 s: the server read the clear after 30 s of queued audio)


def test_an_end_with_no_audio_finishes_at_once_after_the_utterances_before_it(avatar):
    async def main():
        async with serving(avatar) as (_, url), await Speaker.connect(url, "demo", 24000) as s:
            await s.send(np.zeros(0, np.int16))  # a TTS chunk that came out empty: no utterance on the server
            await s.end()
            empty = await s.wait("playback_finished", 1)
            await s.send(np.full(12000, 0.1, np.float32))
            await s.end()
            await s.end()  # nothing sent since: an empty one, after the one before it
            return empty, await s.wait("playback_finished", 5), await s.wait("playback_finished", 1)

    empty, spoken, empty_after = asyncio.run(main())
    assert empty == empty_after == {"type": "playback_finished", "utterance": None, "position": 0.0,
                                    "interrupted": False}
    assert spoken == {"type": "playback_finished", "utterance": 1, "position": 0.5, "interrupted": False}


def test_connect_gives_up_on_a_server_that_never_answers():
    async def main():
        held = []  # the connections, open and unanswered
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        try:
            with pytest.raises(SpeakerError, match="no answer within 0.5 s"):
                await Speaker.connect(f"http://127.0.0.1:{port}", "x", connect_timeout_s=0.5)
        finally:
            server.close()
            for w in held:
                w.close()
        return time.monotonic() - started

    assert asyncio.run(main()) < 1.5


def test_a_refused_connection_says_the_servers_reason(avatar):
    async def main():
        async with serving(avatar) as (_, url), await Speaker.connect(url, "demo"):
            with pytest.raises(SpeakerError, match="HTTP 409: channel demo already has a voice"):
                await Speaker.connect(url, "demo")
            with pytest.raises(SpeakerError, match="HTTP 400: channel names are 1-64 letters"):
                await Speaker.connect(url, "bad.name")

    asyncio.run(main())


def test_samples_of_each_accepted_type_are_the_same_int16_and_others_are_refused():
    pcm = (np.sin(np.arange(1600) / 5) * 8000).astype(np.int16)
    for x in (pcm, pcm.astype(np.int32), pcm.tolist(), pcm.tobytes(), pcm / 32767, (pcm / 32767)[:, None]):
        np.testing.assert_array_equal(pcm16(x), pcm)
    for x in (memoryview(pcm), (pcm / 32767).astype(np.float16)):  # a buffer of samples; half floats
        assert np.abs(pcm16(x).astype(np.int32) - pcm).max() <= (0 if isinstance(x, memoryview) else 16)
    np.testing.assert_array_equal(pcm16(np.array([1.0, -1.0, np.nan], np.float16)), [32767, -32767, 0])
    assert pcm16(np.zeros((0, 1))).size == 0
    for bad in (pcm.astype(np.int32) << 16, pcm.tobytes()[1:], np.zeros((100, 2)), np.array(["a"]),
                (pcm // 256 + 128).astype(np.uint8), np.array([True])):
        with pytest.raises(ValueError):  # 32-bit PCM, half a sample, stereo, text: not clipped into noise
            pcm16(bad)
