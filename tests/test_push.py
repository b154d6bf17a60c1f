"""Programs drive the avatar: the WebSocket audio API (`streamer.client.Speaker`) and /speak, watched by
a real WHEP viewer: real time from faster-than-real-time audio, in sync, events, barge-in, bad input."""

import asyncio
import io
import time

import aiohttp
import av
import numpy as np
import pytest
from scipy import signal

from streamer.client import Speaker, SpeakerError
from streamer.live.client import watch
from tests.conftest import speak
from tests.test_live import AIORTC_VIDEO_HOLD_S, _until, avatar, mouth, serving  # noqa: F401

RATE = 24000  # what TTS services commonly send


@pytest.fixture(scope="module")
def tts():
    x, rate = speak("Hello, I am a talking avatar and my lips move when I speak.")
    return signal.resample_poly(x, RATE // 100, rate // 100).astype(np.float32)


def motion(got, avatar):
    source = next(iter(avatar.read_frames(0, count=1)))[2]
    box = avatar.boxes[0]
    t = np.array([a for a, _ in got.video]) - AIORTC_VIDEO_HOLD_S
    return t, np.array([np.abs(mouth(f, box) - mouth(source, box)).mean() for _, f in got.video])


def assert_rests(change: np.ndarray) -> None:
    """The mouth rests in these frames: it does not open again while VP8 converges back to the idle
    mouth (a few frames under load: 8.9, 8.1, 7.1, ...), then is the idle mouth (codec noise: < 8).
    That the server's own frames are the idle ones at once, bit for bit, test_channel.py checks."""
    assert len(change) > 12 and change[:8].max() <= max(change[0], 8) + 1.0, change
    assert change[8:].max() < 8, change


def loudness(got):
    t = np.array([a for a, _ in got.audio])
    return t, np.array([np.sqrt(np.mean(a**2)) for _, a in got.audio])


def test_pushed_speech_plays_at_real_time_in_sync_and_stops_on_clear(avatar, tts):
    seconds = tts.size / RATE

    async def main():
        async with serving(avatar) as (server, url):
            viewer = asyncio.ensure_future(watch(url, "demo", 2 * seconds + 6))
            await asyncio.sleep(1.0)
            async with await Speaker.connect(url, "demo", sample_rate=RATE) as s:
                t0 = time.monotonic()
                await s.send(tts)  # all at once: faster than real time
                await s.end()
                sent_in = time.monotonic() - t0
                first = [await s.event(timeout=10), await s.event(timeout=seconds + 5)]
                first_t = time.monotonic() - t0
                await asyncio.sleep(1.0)
                await s.send(np.concatenate([tts, tts]))
                await s.end()
                started = await s.event(timeout=5)
                await asyncio.sleep(1.5)  # well into a word
                cleared_at = time.monotonic()
                await s.clear()
                finished = await s.event(timeout=5)
                async with aiohttp.ClientSession() as http, http.get(f"{url}/session/{s.ready['session']}") as r:
                    stats = await r.json()
            got, _ = await viewer
            return dict(sent_in=sent_in, first=first, first_t=first_t, started=started, finished=finished,
                        cleared_at=cleared_at, got=got, stats=stats, ready=s.ready)

    out = asyncio.run(main())
    got = out["got"]
    assert out["sent_in"] < 0.5 * seconds  # it was pushed faster than real time ...
    started, finished = out["first"]
    assert started == {"type": "playback_started", "utterance": 1}
    assert finished["type"] == "playback_finished" and not finished["interrupted"]
    assert abs(finished["position"] - seconds) < 0.01
    assert out["first_t"] > seconds  # ... and played at real time

    t, change = motion(got, avatar)
    at, rms = loudness(got)
    fps = (np.sum(t > t[0] + 1) - 1) / (t[-1] - (t[0] + 1))
    assert 24 <= fps <= 26, fps
    # first utterance: the mouth moves in speech, rests before it; voice and lips within a frame
    speech_t = at[rms > 0.02]
    u1 = (t > speech_t[0]) & (t < speech_t[0] + seconds - 0.3)
    assert np.mean(change[u1] > 8) > 0.3, change[u1]
    assert change[t < speech_t[0] - 0.3].max() < 8
    loud = np.array([rms[(at >= x) & (at < x + 0.04)].mean() if np.any((at >= x) & (at < x + 0.04)) else 0.0
                     for x in t])
    span = t < speech_t[0] + seconds + 0.5
    lags = range(-5, 6)
    score = [np.corrcoef(np.roll(loud[span], k)[10:-10], change[span][10:-10])[0, 1] for k in lags]
    assert abs(list(lags)[int(np.argmax(score))]) <= 1 and max(score) > 0.5, np.round(score, 2)

    # barge-in: from 100 ms after `clear` left the client (plus the receivers' own hold), mouth and voice rest
    assert out["started"]["utterance"] == 2
    fin = out["finished"]
    assert fin["utterance"] == 2 and fin["interrupted"] and 1.3 < fin["position"] < 1.8, fin
    c = out["cleared_at"]
    moving, sounding = t[(t > c - 1) & (change > 8)], at[(at > c - 1) & (rms > 0.005)]
    print(f"after clear: last moving mouth {1000 * (moving.max() - c):+.0f} ms, "
          f"last voice {1000 * (sounding.max() - c):+.0f} ms "
          f"(receive time less the receivers' hold), fps {fps:.2f}, stats {out['stats']}")
    after = c + 0.1
    assert t[-1] > c + 1 and at[-1] > c + 1, (t[-1] - c, at[-1] - c)  # the viewer kept receiving
    assert_rests(change[t > after])
    assert rms[at > after].max() < 0.005, rms[at > after]
    # ...and it was speaking right before the clear
    assert change[(t > out["cleared_at"] - 1.0) & (t < out["cleared_at"])].max() > 8
    assert rms[(at > out["cleared_at"] - 0.5) & (at < out["cleared_at"])].max() > 0.02
    # (on a slow 2-core CPU the first frames after the voice starts were 10-35 ms late in 2 of 3 runs, on 2e4cf85
    # too: the event loop held up as the session starts; not yet found. Any more is a regression)
    assert out["stats"]["lipsync_frames"] > 40 and out["stats"]["late_frames"] <= 2, out["stats"]


def test_bad_messages_get_an_error_event_and_a_close_and_the_server_goes_on(avatar, tts):
    async def main():
        async with serving(avatar, **{"server.token": "t0k"}) as (server, url):
            ws_url = url.replace("http", "ws") + "/ws/demo"
            auth = {"Authorization": "Bearer t0k"}
            results = []
            async with aiohttp.ClientSession(headers=auth) as http:
                for first, then in [({"type": "start", "sample_rate": 22050}, None),
                                    ("hello", None),
                                    ({"type": "start", "sample_rate": 16000}, b"\x00\x01\x02"),
                                    ({"type": "start", "sample_rate": 16000}, b"\x00" * (2 << 20)),
                                    ({"type": "start", "sample_rate": 16000}, "{nope"),
                                    ({"type": "start", "sample_rate": 16000.0}, None)]:
                    async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                        await (ws.send_json(first) if isinstance(first, dict) else ws.send_str(first))
                        if then is not None:
                            assert (await ws.receive_json(timeout=5))["type"] == "ready"
                            await (ws.send_bytes(then) if isinstance(then, bytes) else ws.send_str(then))
                        ev = await ws.receive_json(timeout=5)
                        closed = await ws.receive(timeout=5)
                        results.append((ev["type"], closed.type, ws.close_code))
                    assert await _until(lambda: not server.sessions, 3)
                refused = []
                for headers in ({}, {"Authorization": "Bearer wrong"}, {**auth, "Origin": "https://evil.example"}):
                    try:
                        async with aiohttp.ClientSession(headers=headers) as h, h.ws_connect(ws_url):
                            refused.append(None)
                    except aiohttp.WSServerHandshakeError as e:
                        refused.append(e.status)
                async with await Speaker.connect(url, "demo", token="t0k") as s:  # ended from outside
                    await s.send(np.zeros(0, np.int16))  # an empty message is nothing, not an utterance
                    async with http.delete(f"{url}/session/{s.ready['session']}") as r:
                        deleted = r.status
                    try:
                        await s.event(timeout=5)
                        ended_by_delete = False
                    except SpeakerError:
                        ended_by_delete = True
                async with await Speaker.connect(url, "demo", token="t0k") as s:  # still serving
                    try:
                        await Speaker.connect(url, "demo", token="t0k")
                        second = None
                    except SpeakerError as e:
                        second = str(e)
                    await s.send(tts[:RATE])
                    # a client that vanishes mid-utterance: its session ends, the channel is free
                    s._ws._writer.transport.abort()  # noqa: SLF001 - a killed process sends no close
                ended = await _until(lambda: not server.sessions and not server.channels, 5)
                return results, refused, second, ended, (deleted, ended_by_delete)

    results, refused, second, ended, by_delete = asyncio.run(main())
    assert by_delete == (204, True)  # DELETE /session/<id> ends the WebSocket too
    assert results == [("error", aiohttp.WSMsgType.CLOSE, 1008)] * 6, results
    assert refused == [401, 401, 403]
    assert second and "409" in second
    assert ended


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as f:
        st = f.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((np.clip(x, -1, 1) * 32767).astype(np.int16)[None],
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        for p in st.encode(frame):
            f.mux(p)
        for p in st.encode(None):
            f.mux(p)
    return buf.getvalue()


def test_speak_a_file_and_interrupt_it(avatar, tts):
    async def main():
        async with serving(avatar) as (server, url), aiohttp.ClientSession() as http:
            bad = await http.post(f"{url}/speak/demo", data=b"not audio at all")
            bad = (bad.status, (await bad.json())["error"])
            # FFmpeg's concat demuxer would read a server file named in the upload: not an audio format
            concat = await http.post(f"{url}/speak/demo", data=b"ffconcat version 1.0\nfile /etc/hostname\n")
            foreign = await http.post(f"{url}/speak/demo", data=wav_bytes(tts, RATE),
                                      headers={"Origin": "https://evil.example"})
            bad = bad + (concat.status, foreign.status)
            r = await http.post(f"{url}/speak/demo", data=wav_bytes(tts, RATE))
            ok = (r.status, await r.json())
            busy = (await http.post(f"{url}/speak/demo", data=wav_bytes(tts, RATE))).status
            await asyncio.sleep(1.0)
            r = await http.delete(f"{url}/speak/demo")
            stopped = (r.status, await r.json())
            gone = (await http.delete(f"{url}/speak/demo")).status
            freed = await _until(lambda: not server.sessions, 3)
            return bad, ok, busy, stopped, gone, freed

    bad, ok, busy, stopped, gone, freed = asyncio.run(main())
    assert bad[0] == 400 and "cannot read" in bad[1] and bad[2:] == (400, 403), bad
    assert ok[0] == 202 and abs(ok[1]["seconds"] - tts.size / RATE) < 0.01, ok
    assert busy == 409
    assert stopped[0] == 200 and stopped[1]["interrupted"] and 0.5 < stopped[1]["position"] < 1.0, stopped
    assert gone == 404 and freed


def test_an_upload_is_judged_by_its_length_before_it_is_resampled():
    """8 kB of WAV declaring 1 Hz would be hours of samples at 48 kHz (~100 MB kept per upload): refused
    from its header's rate, as a file over the length limit is from what it decodes."""
    import struct

    from streamer.server.push import MAX_SPEAK_S, decode_audio

    def wav(pcm: np.ndarray, rate: int) -> bytes:
        data = pcm.astype("<i2").tobytes()
        return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
                + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
                + b"data" + struct.pack("<I", len(data)) + data)

    noise = np.random.default_rng(0).integers(-2000, 2000, 4000)
    with pytest.raises(ValueError, match="1 Hz is not a voice"):
        decode_audio(wav(noise, 1))
    with pytest.raises(ValueError, match=f"at most {MAX_SPEAK_S:.0f} s"):
        decode_audio(wav(np.zeros(int(4000 * (MAX_SPEAK_S + 1))), 4000))
    assert decode_audio(wav(noise, 8000)).size == 4000 * 6  # half a second, at 48 kHz
