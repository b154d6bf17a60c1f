"""Channels: many viewers (WHEP), voices from WHIP publishers, limits, auth, metrics."""

import asyncio
import re

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from prometheus_client.parser import text_string_to_metric_families

from streamer.live.channel import MIN_DELAY_S
from streamer.live.client import publish, talk, watch
from tests.test_live import _offer_sdp, _until, avatar, mouth, serving, voice  # noqa: F401 - fixtures


def mouth_activity(frames, av):
    source = next(iter(av.read_frames(0, count=1)))[2]
    return np.array([np.abs(mouth(f, av.boxes[0]) - mouth(source, av.boxes[0])).mean() for _, f in frames])


def test_whep_viewers_see_the_talk_channel(avatar, voice):  # noqa: F811
    wav, speech_s = voice

    async def main():
        async with serving(avatar) as (server, url):
            talker = asyncio.ensure_future(talk(url, wav, 1.0 + speech_s + 1.0, offer_extra={"channel": "studio"}))
            await _until(lambda: "studio" in server.channels, 5)
            (seen1, answer), (seen2, _) = await asyncio.gather(watch(url, "studio", 1.0 + speech_s),
                                                               watch(url, "studio", 1.0 + speech_s))
            viewers_after = server.channels["studio"].viewers if "studio" in server.channels else None
            got, stats = await talker
            closed = await _until(lambda: not server.channels, 5)
            return seen1, seen2, answer, viewers_after, got, stats, closed

    seen1, seen2, answer, viewers_after, got, stats, closed = asyncio.run(main())
    assert "m=video" in answer and "m=audio" in answer
    for seen in (seen1, seen2):
        times = np.array([t for t, _ in seen.video])
        assert len(times) > 60 and 23 <= (len(times) - 1) / (times[-1] - times[0]) <= 27
        act = mouth_activity(seen.video, avatar)
        assert np.mean(act > 8) > 0.2  # the viewer sees the lips move
        assert len(seen.audio) > 100 and max(np.abs(a).max() for _, a in seen.audio) > 0.05  # and hears the voice
    assert viewers_after == 1  # both viewers left (DELETE); the talker still watches its own channel
    assert stats["viewers"] == 1 and stats["lipsync_frames"] > 40
    assert closed  # the channel closes with its last session


def test_whip_publisher_drives_a_channel_a_whep_viewer_watches(avatar, voice):  # noqa: F811
    wav, speech_s = voice

    async def main():
        async with serving(avatar) as (server, url):
            viewer = asyncio.ensure_future(watch(url, "radio", 1.5 + speech_s + 1.0))
            await _until(lambda: "radio" in server.channels, 5)
            answer = await publish(url, "radio", wav, 1.0 + speech_s + 1.0)
            seen, _ = await viewer
            return answer, seen

    answer, seen = asyncio.run(main())
    assert "a=setup:passive" in answer and "a=setup:active" not in answer  # we are the DTLS server
    # the publisher may send Opus's FEC copies: a packet lost on the way comes back from the next
    opus = re.search(r"a=rtpmap:(\d+) opus/48000", answer).group(1)
    assert re.search(rf"a=fmtp:{opus} .*useinbandfec=1", answer), answer
    act = mouth_activity(seen.video, avatar)
    assert np.mean(act > 8) > 0.2
    assert max(np.abs(a).max() for _, a in seen.audio) > 0.05


def test_whip_whep_protocol_details(avatar):  # noqa: F811
    async def main():
        out = {}
        async with serving(avatar, **{"server.cors_origins": "https://player.example"}) as (server, url):
            async with aiohttp.ClientSession() as http:
                async with http.options(f"{url}/whep/x", headers={"Origin": "https://player.example"}) as r:
                    out["options"] = r.status, dict(r.headers)
                async with http.options(f"{url}/whep/x", headers={"Origin": "https://evil.example"}) as r:
                    out["foreign"] = dict(r.headers)
                async with http.patch(f"{url}/whip/x/abc", data="a=candidate") as r:
                    out["patch"] = r.status, r.headers.get("Allow")
                async with http.post(f"{url}/whip/x", data="v=0", headers={"Content-Type": "text/plain"}) as r:
                    out["type"] = r.status
                async with http.post(f"{url}/whip/..%2Fetc", data=await _offer_sdp(),
                                     headers={"Content-Type": "application/sdp"}) as r:
                    out["name"] = r.status
                async with http.delete(f"{url}/whep/x/nosuch") as r:
                    out["delete"] = r.status
                listen = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                listen.addTransceiver("audio", direction="recvonly")  # a viewer that only listens
                await listen.setLocalDescription(await listen.createOffer())
                async with http.post(f"{url}/whep/x", data=listen.localDescription.sdp,
                                     headers={"Content-Type": "application/sdp"}) as r:
                    out["audio_only"] = r.status, (await r.json())["error"]
                await listen.close()
                # a second voice on a busy channel is refused
                sdp = await _offer_sdp()
                async with http.post(f"{url}/whip/busy", data=sdp, headers={"Content-Type": "application/sdp"}) as r:
                    first = r.status, r.headers.get("Location")
                async with http.post(f"{url}/whip/busy", data=await _offer_sdp(),
                                     headers={"Content-Type": "application/sdp"}) as r:
                    out["busy"] = first[0], r.status
                async with http.delete(f"{url}{first[1]}") as r:
                    out["end"] = r.status
                out["channels"] = dict(server.channels)
        return out

    out = asyncio.run(main())
    status, headers = out["options"]
    assert (status == 204 and headers["Access-Control-Allow-Origin"] == "https://player.example"
            and "Location" in headers["Access-Control-Expose-Headers"])
    assert "Access-Control-Allow-Origin" not in out["foreign"]  # a site not configured gets no CORS
    assert out["patch"] == (405, "DELETE, OPTIONS")  # PATCH (trickle ICE) is refused: not in Allow
    assert out["type"] == 415 and out["name"] in (400, 404) and out["delete"] == 404
    assert out["audio_only"] == (400, "cannot use this offer: the offer does not receive video"), out["audio_only"]
    assert out["busy"] == (201, 409) and out["end"] == 200 and out["channels"] == {}


def test_token_and_metrics(avatar, voice):  # noqa: F811
    wav, _ = voice

    async def main():
        out = {}
        async with serving(avatar, **{"server.token": "s3cret"}) as (server, url):
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url}/offer", json={"sdp": await _offer_sdp(), "type": "offer"}) as r:
                    out["offer"] = r.status
                async with http.post(f"{url}/whep/x", data="v=0", headers={"Content-Type": "application/sdp",
                                                                             "Authorization": "Bearer wrong"}) as r:
                    out["whep"] = r.status
                async with http.get(f"{url}/metrics") as r:
                    out["metrics_open"] = r.status
                async with http.get(f"{url}/healthz") as r:
                    out["healthz"] = r.status
                async with http.get(f"{url}/") as r:
                    out["page"] = r.status
            got, _ = await talk(url, wav, 3.0, token="s3cret")
            await _until(lambda: not server.channels, 5)  # scraped after the channel closed: nothing lost
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http:
                async with http.get(f"{url}/metrics") as r:
                    out["metrics"] = r.status, r.headers["Content-Type"], await r.text()
            out["frames"] = len(got.video)
        return out

    out = asyncio.run(main())
    assert out["offer"] == 401 and out["whep"] == 401 and out["metrics_open"] == 401
    assert out["healthz"] == 200 and out["page"] == 200 and out["frames"] > 40
    status, ctype, text = out["metrics"]
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("streamer_sessions", "streamer_channels", "streamer_viewers", "streamer_frames_sent",
                 "streamer_frames_late", "streamer_inference_queue_depth", "streamer_inference_batch_size",
                 "streamer_delay_seconds"):
        assert name in families, (name, sorted(families))
    delay = {s.name: s.value for s in families["streamer_delay_seconds"].samples}
    assert delay["streamer_delay_seconds_count"] > 20
    assert MIN_DELAY_S < delay["streamer_delay_seconds_sum"] / delay["streamer_delay_seconds_count"] < 0.4
    batches = {s.name: s.value for s in families["streamer_inference_batch_size"].samples}
    assert batches["streamer_inference_batch_size_count"] > 10


def test_a_viewer_that_never_reads_costs_the_others_nothing(avatar, voice):  # noqa: F811
    """A WHEP viewer's process is frozen (SIGSTOP: it reads nothing, acknowledges nothing) while another
    viewer watches the same channel and a talker speaks on another: both keep 25 fps and every mouth."""
    import os
    import signal as sig
    import subprocess
    import sys

    wav, speech_s = voice

    async def main():
        async with serving(avatar) as (server, url):
            publisher = asyncio.ensure_future(talk(url, wav, 1.0 + speech_s + 2.0, offer_extra={"channel": "a"}))
            await _until(lambda: "a" in server.channels, 5)
            frozen = subprocess.Popen(  # noqa: ASYNC220 - a viewer in its own process, to freeze with SIGSTOP
                [sys.executable, "-c", "import asyncio, sys; from streamer.live.client import watch; "
                 f"asyncio.run(watch('{url}', 'a', 60))"])
            try:
                assert await _until(lambda: any(s.kind == "whep" for s in server.sessions.values()), 20)
                await asyncio.sleep(1.0)
                os.kill(frozen.pid, sig.SIGSTOP)
                other = asyncio.ensure_future(talk(url, wav, 1.0 + speech_s + 1.0, offer_extra={"channel": "b"}))
                (seen, _), (got_b, stats_b), (got_a, stats_a) = await asyncio.gather(
                    watch(url, "a", 1.0 + speech_s), other, publisher)
                still = [s.kind for s in server.sessions.values()]
            finally:
                frozen.kill()
                frozen.wait()
            return seen, got_b, stats_b, got_a, stats_a, still

    seen, got_b, stats_b, got_a, stats_a, still = asyncio.run(main())
    assert "whep" in still  # the frozen viewer was still connected meanwhile (ICE consent ends it later)
    for got in (seen, got_b, got_a):
        t = np.array([a for a, _ in got.video])
        t = t[t > t[0] + 1]
        assert 24 <= (len(t) - 1) / (t[-1] - t[0]) <= 26
    for stats in (stats_a, stats_b):
        assert stats["lipsync_frames"] > 40 and stats["late_frames"] <= 2, stats


def test_a_viewer_losing_10_percent_of_its_packets_still_sees_the_avatar(avatar, voice):  # noqa: F811
    """10% of the video packets to one WHEP viewer are lost (retransmissions too): NACKs and keyframe
    requests keep its picture going and lip-synced; the channel's talker and a clean viewer of it are
    unaffected, and the server keeps sending 25 fps."""
    wav, speech_s = voice

    async def main():
        async with serving(avatar) as (server, url):
            talker = asyncio.ensure_future(talk(url, wav, 1.5 + speech_s + 1.5, offer_extra={"channel": "a"}))
            await _until(lambda: "a" in server.channels, 5)
            (lossy, _), (clean, _) = await asyncio.gather(watch(url, "a", 1.0 + speech_s + 0.5, lose=0.1),
                                                          watch(url, "a", 1.0 + speech_s + 0.5))
            got, stats = await talker
        return lossy, clean, got, stats

    lossy, clean, got, stats = asyncio.run(main())

    def fps(seen):
        t = np.array([a for a, _ in seen.video])
        t = t[t > t[0] + 1]
        return (len(t) - 1) / (t[-1] - t[0])

    assert 24 <= fps(clean) <= 26 and 24 <= fps(got) <= 26
    assert fps(lossy) >= 20, fps(lossy)  # most frames recovered; a lost one is repaired, not frozen on
    assert np.mean(mouth_activity(lossy.video, avatar) > 8) > 0.2  # and the lips move for it too
    assert stats["lipsync_frames"] > 40 and stats["late_frames"] <= 2, stats


def test_viewers_of_a_channel_share_one_encode_and_each_sees_it_whole(avatar, voice):  # noqa: F811
    """A talker and three viewers on one channel: the VP8 ones (the talker, a viewer from the start, a
    viewer joining late and losing 5% of its packets) get the channel's one encode, one VP8 frame per
    video frame however many watch; an H.264-only viewer gets its own encode. Every one of them sees
    25 fps and the lips move; the late one sees a picture at once (a keyframe on its arrival); the
    lossy one's picture requests do not flood the others with keyframes."""
    wav, speech_s = voice
    seconds = 1.0 + speech_s + 1.0

    async def main():
        async with serving(avatar) as (server, url):
            talker = asyncio.ensure_future(talk(url, wav, seconds + 1.0, offer_extra={"channel": "a"}))
            await _until(lambda: "a" in server.channels, 5)
            early = asyncio.ensure_future(watch(url, "a", seconds))
            h264 = asyncio.ensure_future(watch(url, "a", seconds, codec="video/H264"))
            await asyncio.sleep(1.5)
            joined = asyncio.get_running_loop().time()
            late = asyncio.ensure_future(watch(url, "a", seconds - 1.5, lose=0.05))
            await asyncio.sleep(seconds - 2.0)
            ch = server.channels["a"]
            counts = ch.sent, ch.encoded, ch.keyframes
            async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as res:
                metrics = await res.text()
            (early_seen, _), (h264_seen, h264_answer), (late_seen, _) = await asyncio.gather(early, h264, late)
            got, stats = await talker
            return counts, metrics, early_seen, h264_seen, h264_answer, late_seen, joined, got, stats

    counts, metrics, early, h264, h264_answer, late, joined, got, stats = asyncio.run(main())
    sent, encoded, keyframes = counts
    assert "H264" in h264_answer and "VP8" not in h264_answer.split("m=video")[1]
    assert 0.9 * sent <= encoded <= sent  # once per frame, not once per VP8 viewer (three of them)
    assert 2 <= keyframes <= 3 + (seconds - 1.5) / 0.5, keyframes  # first, late viewer's, loss at <= 2/s
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert 0 <= families["streamer_video_encoded"].samples[0].value - encoded <= 3  # read a moment later
    assert late.video[0][0] - joined < 1.5  # a picture at once (set-up included): it got a keyframe

    def fps(seen):
        t = np.array([a for a, _ in seen.video])
        t = t[t > t[0] + 1]
        return (len(t) - 1) / (t[-1] - t[0])

    for seen in (got, early, h264):
        assert 24 <= fps(seen) <= 26, fps(seen)
        assert np.mean(mouth_activity(seen.video, avatar) > 8) > 0.2
    assert fps(late) >= 20, fps(late)
    assert np.mean(mouth_activity(late.video, avatar) > 8) > 0.2
    assert stats["lipsync_frames"] > 40 and stats["late_frames"] <= 2, stats


def test_channels_are_bounded_by_the_voice_and_viewer_limits(avatar):  # noqa: F811
    """Every channel is opened by a voice or a viewer, so `max_sessions` + `max_viewers` bound the
    channels (each holds an avatar's frames): viewers and voices of ever new channel names past the
    limits get 503 and open nothing."""

    async def main():
        async with serving(avatar, **{"server.max_sessions": 1, "server.max_viewers": 2}) as (server, url):
            statuses = {"whep": [], "whip": []}
            async with aiohttp.ClientSession() as http:
                for kind in ("whep", "whip"):
                    for k in range(4):
                        async with http.post(f"{url}/{kind}/{kind}{k}", data=await _offer_sdp(),
                                             headers={"Content-Type": "application/sdp"}) as r:
                            statuses[kind].append(r.status)
            return statuses, sorted(server.channels)

    statuses, channels = asyncio.run(main())
    assert statuses == {"whep": [201, 201, 503, 503], "whip": [201, 503, 503, 503]}, statuses
    assert channels == ["whep0", "whep1", "whip0"]
