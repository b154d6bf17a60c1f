"""`streamer serve --workers 2`: a front process and two media worker processes, run as a user runs
them, driven by real WebRTC peers: talk, WHIP, WHEP, limits, metrics, a worker killed mid-session,
and a clean shutdown."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy import signal as sps

from streamer.live.client import publish, talk, watch
from tests.conftest import speak
from tests.test_live import voice_back_ms

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def voice():
    x, rate = speak("Hello, I am a talking avatar and my lips move when I speak. " * 2)
    x48 = sps.resample_poly(x, 480, rate // 100).astype(np.float32)
    return np.concatenate([np.zeros(24000, np.float32), x48, np.zeros(48000, np.float32)])


def start_front(tmp_path, max_sessions=2, extra=()):
    cfg = tmp_path / "streamer.yaml"
    cfg.write_text(f"server:\n  token: {TOKEN}\n  max_sessions: {max_sessions}\n")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--workers", "2", "--port", "0",
                             "--config", str(cfg), "--avatars", str(tmp_path / "avatars"), *extra],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "w"), text=True)
    line = proc.stdout.readline()
    assert "open http://localhost:" in line, (line, (tmp_path / "serve.log").read_text()[-3000:])
    port = int(line.split("localhost:")[1].split("/")[0])
    return proc, f"http://127.0.0.1:{port}"


def get(url, path, token=TOKEN):
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read().decode()
        return json.loads(body) if r.headers["Content-Type"].startswith("application/json") else body


def by_worker(metrics_text, family):
    """{worker: summed value} of a family in the front's merged /metrics."""
    out = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name == family:
            for s in fam.samples:
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0) + s.value
    return out


def fps_of(got, after=0.0):
    t = np.array([a for a, _ in got.video if a >= after])
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    proc, url = start_front(tmp_path_factory.mktemp("front"))
    yield proc, url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_talk_whip_whep_and_limits_through_the_front(front, voice):
    proc, url = front
    seconds = voice.size / 48000

    async def main():
        out = {}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async def offer(channel, auth=True):
                from tests.test_live import _offer_sdp

                headers = {} if auth else {"Authorization": "Bearer wrong"}
                async with http.post(f"{url}/offer", json={"sdp": await _offer_sdp(), "type": "offer",
                                                          "channel": channel}, headers=headers) as r:
                    return r.status, await r.json()

            talker = asyncio.ensure_future(talk(url, voice, seconds, offer_extra={"channel": "a"}, token=TOKEN))
            viewer = asyncio.ensure_future(watch(url, "a", seconds - 2, token=TOKEN))  # shares channel a
            await asyncio.sleep(2)
            out["conflict"] = await offer("a")  # a second voice for channel a
            out["unauthorised"] = await offer("x", auth=False)
            whip = asyncio.ensure_future(publish(url, "b", voice, seconds - 2, token=TOKEN))  # WHIP voice on b
            b_viewer = asyncio.ensure_future(watch(url, "b", seconds - 3, token=TOKEN))
            await asyncio.sleep(1.5)
            out["full"] = await offer("c")  # two voices are the limit here
            out["metrics"] = get(url, "/metrics")
            out["talk"], out["view"], out["whip"], out["b_view"] = await asyncio.gather(talker, viewer, whip, b_viewer)
        return out

    out = asyncio.run(main())
    got, stats = out["talk"]
    assert 24 <= fps_of(got, got.video[0][0] + 1) <= 26
    # Five server processes and four peers share two cores here: a stalled event loop makes a track skip
    # a few frames now and then (each counted late). Inference itself is never the cause with this engine.
    speech = stats["lipsync_frames"] + stats["late_frames"]
    assert stats["lipsync_frames"] > 40 and stats["late_frames"] <= 0.08 * speech, stats
    assert stats["delay_off_ms_p95"] < 30, stats  # measured: the delays set, auto ones as they moved
    back = voice_back_ms(got, voice)  # what the talker meets, from outside: the same
    assert abs(back - stats["first_target_delay_ms"]) < 30, (back, stats)  # (the first sound's)
    viewed, _ = out["view"]
    assert fps_of(viewed, viewed.video[0][0] + 1) > 24 and len(viewed.audio) > 100
    b_got, _ = out["b_view"]
    assert len(b_got.video) > 50
    assert out["conflict"][0] == 409 and out["unauthorised"][0] == 401 and out["full"][0] == 503, out
    # channels a and b went to different workers; the merged metrics label every sample by worker
    channels = by_worker(out["metrics"], "streamer_channels")
    assert sorted(channels.values()) == [1, 1], channels
    assert by_worker(out["metrics"], "streamer_frames_lipsync")  # counters merged from both workers
    batches = by_worker(out["metrics"], "streamer_inference_batch_size")  # batches of the one service
    assert list(batches) == ["service"] and batches["service"] > 40, batches
    helps = [line for line in out["metrics"].splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))  # one HELP and TYPE per family


def test_programs_drive_channels_through_the_front(front, voice):
    """The WebSocket audio API and /speak reach the worker that holds the channel, events come back."""
    from streamer.client import Speaker, SpeakerError
    from tests.test_push import wav_bytes

    proc, url = front
    speech = voice[24000 : 24000 + 48000 * 2]

    async def main():
        async with await Speaker.connect(url, "prog", sample_rate=48000, token=TOKEN) as s:
            await s.send(speech)
            await s.end()
            started, finished = await s.event(timeout=10), await s.event(timeout=10)
            try:
                await Speaker.connect(url, "prog", token=TOKEN)
                conflict = None
            except SpeakerError as e:
                conflict = str(e)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.post(f"{url}/speak/file", data=wav_bytes(speech, 48000)) as r:
                spoke = r.status, await r.json()
            await asyncio.sleep(0.5)
            async with http.delete(f"{url}/speak/file") as r:
                stopped = r.status, await r.json()
            async with http.get(f"{url}/openapi.json") as r:
                doc = await r.json()
            # as one process answers: a refusal's close reason, a 405 naming what the path answers
            async with http.ws_connect(url.replace("http", "ws") + "/ws/bad") as ws:
                await ws.send_json({"type": "start", "sample_rate": 22050})
                ev, closed = await ws.receive_json(timeout=5), await ws.receive(timeout=5)
                refusal = ev["type"], ws.close_code, closed.extra
            methods = []
            for method, path in (("GET", "/offer"), ("PUT", "/session/x"), ("GET", "/speak/x")):
                async with http.request(method, f"{url}{path}") as r:
                    methods.append((r.status, r.headers.get("Allow")))
            for path in ("/offer", "/speak/x", "/whip/x"):
                async with http.options(f"{url}{path}") as r:
                    methods.append((r.status, r.headers.get("Accept-Post")))
        return started, finished, conflict, spoke, stopped, doc, refusal, methods

    started, finished, conflict, spoke, stopped, doc, refusal, methods = asyncio.run(main())
    assert refusal[:2] == ("error", 1008) and "sample_rate" in refusal[2], refusal
    assert methods == [(405, "OPTIONS, POST"), (405, "DELETE, GET, HEAD, OPTIONS"), (405, "DELETE, OPTIONS, POST"),
                       (204, "application/json"), (204, "audio/*, application/octet-stream"),
                       (204, "application/sdp")], methods
    assert started["type"] == "playback_started" and finished["type"] == "playback_finished"
    assert not finished["interrupted"] and abs(finished["position"] - 2.0) < 0.01, finished
    assert conflict and "409" in conflict
    assert spoke[0] == 202 and stopped[0] == 200 and stopped[1]["interrupted"], (spoke, stopped)
    assert "/ws/{channel}" in doc["paths"]


def test_a_killed_worker_ends_its_sessions_only(tmp_path, voice):
    proc, url = start_front(tmp_path)
    try:
        seconds = voice.size / 48000

        async def main():
            a = asyncio.ensure_future(talk(url, voice, seconds, offer_extra={"channel": "a"}, token=TOKEN))
            b = asyncio.ensure_future(talk(url, voice, seconds, offer_extra={"channel": "b"}, token=TOKEN))
            await asyncio.sleep(2.5)
            metrics = get(url, "/metrics")
            viewers = {}
            for fam in text_string_to_metric_families(metrics):
                if fam.name == "streamer_viewers":
                    viewers = {s.labels["channel"]: int(s.labels["worker"]) for s in fam.samples}
            pids = get(url, "/healthz")["worker_pids"]
            victim = pids[viewers["a"]]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            (got_a, stats_a), (got_b, stats_b) = await asyncio.gather(a, b)
            health = get(url, "/healthz")
            again, again_stats = await talk(url, voice[: 48000 * 4], 4, offer_extra={"channel": "a"}, token=TOKEN)
            return killed, victim, got_a, stats_a, got_b, stats_b, health, again, again_stats, get(url, "/metrics")

        killed, victim, got_a, stats_a, got_b, stats_b, health, again, again_stats, metrics = asyncio.run(main())
        assert "error" in stats_a and "worker" in stats_a["error"], stats_a  # 410: ended with its worker
        assert max(t for t, _ in got_a.video) < killed + 1.0  # nothing more came from the dead worker
        assert 24 <= fps_of(got_b, killed) <= 26  # the other channel never stopped
        assert stats_b["lipsync_frames"] > 60, stats_b
        assert health["workers"] == 2 and victim not in health["worker_pids"] and health["restarts"] == 1
        assert len(again.video) > 50 and again_stats["frames_sent"] > 50  # a new session right after works
        restarts = [s.value for f in text_string_to_metric_families(metrics) if f.name == "streamer_worker_restarts"
                    for s in f.samples]
        assert restarts == [1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_clean_shutdown_stops_every_worker(tmp_path):
    proc, url = start_front(tmp_path)
    pids = get(url, "/healthz")["worker_pids"]
    assert len(pids) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, pid


def test_concurrent_offers_are_admitted_up_to_the_limit_exactly(tmp_path):
    """Offers arriving together are each counted once: while being answered, then as sessions (found on
    a GPU box: 16 talkers at once against max 16 got 503s when both were counted)."""
    from tests.test_live import _offer_sdp

    proc, url = start_front(tmp_path, max_sessions=3)
    try:
        async def main():
            sdps = [await _offer_sdp() for _ in range(4)]
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                async def offer(k):
                    async with http.post(f"{url}/offer", json={"sdp": sdps[k], "type": "offer",
                                                              "channel": f"c{k}"}) as r:
                        return r.status

                return await asyncio.gather(*(offer(k) for k in range(4)))

        statuses = asyncio.run(main())
        assert sorted(statuses) == [200, 200, 200, 503], statuses
        assert get(url, "/healthz")["sessions"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_inference_service_restart_resumes_lipsync(tmp_path, voice):
    """Inference runs in one service process for all workers; killed mid-session, it is replaced, the
    workers reconnect by themselves, the video never stops and the mouths come back."""
    proc, url = start_front(tmp_path)
    try:
        long_voice = np.concatenate([voice, voice])
        seconds = long_voice.size / 48000

        async def main():
            a = asyncio.ensure_future(talk(url, long_voice, seconds, offer_extra={"channel": "a"}, token=TOKEN))
            await asyncio.sleep(3)
            before = get(url, "/healthz")
            os.kill(before["inference_pid"], signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(1.0)
            metrics_during = get(url, "/metrics")
            got, stats = await a
            return before, killed, metrics_during, got, stats, get(url, "/healthz")

        before, killed, during, got, stats, after = asyncio.run(main())
        assert 24 <= fps_of(got, killed) <= 26  # the video never stopped
        assert after["inference_pid"] != before["inference_pid"] and after["restarts"] == 1
        synced_during = sum(by_worker(during, "streamer_frames_lipsync").values())
        assert stats["lipsync_frames"] > synced_during + 25, (synced_during, stats)  # mouths came back
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_musetalk_on_a_video_avatar_through_the_front(tmp_path, voice, musetalk_dir, talk_video):
    """MuseTalk with media workers, on a video avatar prepared without the model: the front has its
    crops' latents computed before the inference service starts (which has a start deadline), the
    service reads them, a talker gets 25 fps and lip-synced mouths, and shutdown is clean. The delay is
    fixed and generous, and a few mouths are enough: on a slow 2-core CPU a toy MuseTalk call beside the
    rest took longer than the auto delay's 500 ms cap leaves, and it does ~5 frames a second there
    (test_live tests the auto delay and the share)."""
    from streamer.avatar.cache import prepare

    avatar = prepare(talk_video, "v", tmp_path / "avatars", progress=False)
    proc, url = start_front(tmp_path, extra=("--model", f"musetalk:{musetalk_dir}", "--device", "cpu",
                                             "--avatar", "v", "--delay-ms", "1200"))
    try:
        assert len(list(avatar.path.glob("musetalk-latents-*.npz"))) == 1
        got, stats = asyncio.run(talk(url, voice, voice.size / 48000, token=TOKEN))
        assert 24 <= fps_of(got, got.video[0][0] + 1) <= 26
        assert stats["lipsync_frames"] > 5, stats
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    computed = [line for line in log.splitlines() if "computing the latents of avatar v" in line]
    assert len(computed) == 1 and "[worker" not in computed[0], computed  # by the front, before the service
    assert "Traceback" not in log, log[-3000:]
