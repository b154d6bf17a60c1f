"""web/index.html in a real browser: Debian's chromium, headless, with a fake microphone playing
generated speech, against `streamer serve` started as a user starts it."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import speak, write_wav

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HEADLESS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
FAKE_MIC = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def mic_from(wav) -> list[str]:
    """Chromium flags for a fake microphone that plays `wav` once when getUserMedia resolves."""
    return HEADLESS + FAKE_MIC + [f"--use-file-for-fake-audio-capture={wav}%noloop"]
ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"
PROBE = """async () => { const v = document.querySelector('video'); let fd = 0;
  (await window.pc.getStats()).forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'video') fd = r.framesDecoded; });
  return {t: v.currentTime, w: v.videoWidth, paused: v.paused, rvfc: window.rvfcCount, fd}; }"""  # noqa: E501 - the JS as sent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "workers-2"])
def server(tmp_path_factory, request):
    """`streamer serve` in one process, and as a front with two media workers and an inference service."""
    port = free_port()
    root = tmp_path_factory.mktemp("serve")
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--port", str(port), "--avatars",
                             str(root / "avatars"), "--workers", str(request.param)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail(f"streamer serve did not start:\n{(root / 'serve.log').read_text()}")
    yield url, root / "serve.log"
    proc.terminate()
    try:
        assert proc.wait(timeout=15) == 0 or proc.returncode == -15
    finally:
        proc.kill()
        log.close()


def test_page_plays_the_avatar_from_a_fake_microphone(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is needed for the browser test: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    url, log = server
    x, rate = speak("Hello avatar, please move your lips while I am talking to you right now.")
    # the fake microphone starts at getUserMedia, before the call is connected: lead with silence
    pcm = np.concatenate([np.zeros(int(1.5 * rate)), x, np.zeros(rate)])
    wav = write_wav(tmp_path / "speech.wav", pcm, rate)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=mic_from(wav))
        try:
            page = browser.new_page(viewport={"width": 800, "height": 900})
            page.goto(url)
            page.click("#start")
            page.wait_for_function("window.pcState === 'connected'", timeout=20000)
            page.wait_for_function("document.querySelector('video').videoWidth > 0", timeout=20000)
            a = page.evaluate(PROBE)
            page.wait_for_timeout(2000)
            b = page.evaluate(PROBE)
            assert b["t"] > a["t"] and b["fd"] > a["fd"] + 40, (a, b)  # ~25 fps for 2 s
            assert b["w"] == 512
            page.wait_for_function("document.getElementById('s-frames').textContent.match(/^[1-9]\\d* of/)",
                                   timeout=15000)
            page.wait_for_timeout(1500)
            stats = {k: page.inner_text(f"#s-{k}") for k in ("state", "fps", "server", "e2e", "frames", "lost",
                                                              "engine")}
            page.screenshot(path=str(ARTIFACTS / "browser.png"))
            print(stats)
            assert stats["state"] == "connected" and "builtin" in stats["engine"]
            assert "ms median" in stats["server"] and "ms" in stats["e2e"]
            assert stats["lost"] == "none"  # (nothing is lost on this machine's loopback)
            page.click("#stop")
            page.wait_for_function("document.getElementById('s-state').textContent === 'stopped'")
            assert page.inner_text("#s-fps") == "-" and page.evaluate("window.pcState") == "closed"
            # the server ends the next session: the page says so within its next stats poll (ICE took ~20 s)
            page.click("#start")
            page.wait_for_function("window.pcState === 'connected'", timeout=20000)
            rvfc = page.evaluate("window.rvfcCount")
            page.wait_for_timeout(1000)
            assert page.evaluate("window.rvfcCount") - rvfc <= 30  # one frame counter, not one per Start
            sid = page.evaluate("session")
            urllib.request.urlopen(urllib.request.Request(f"{url}session/{sid}", method="DELETE"), timeout=5)
            page.wait_for_function("document.getElementById('message').textContent.includes("
                                   "'The session ended on the server')", timeout=5000)
            assert page.inner_text("#s-state") == "stopped" and not page.is_disabled("#start")
        finally:
            browser.close()
    time.sleep(1)
    text = log.read_text()
    assert "session started" in text and "session ended" in text, text


def test_obs_viewer_page_watches_a_channel(server, tmp_path):
    import asyncio
    import threading

    import cv2
    from playwright.sync_api import sync_playwright
    from scipy import signal

    from streamer.live.client import talk

    url, _ = server
    x, rate = speak("This channel is watched by the viewer page, as OBS would show it.")
    x48 = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(48000, np.float32), x48, np.zeros(48000, np.float32)])
    result = {}
    talker = threading.Thread(target=lambda: result.update(
        stats=asyncio.run(talk(url.rstrip("/"), voice, 9.0, offer_extra={"channel": "tv"}))[1]))
    talker.start()
    time.sleep(1.0)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=HEADLESS + ["--autoplay-policy=no-user-gesture-required"])
            try:
                page = browser.new_page(viewport={"width": 640, "height": 480})
                page.goto(url + "viewer.html?channel=tv&key=%2300ff00")
                page.wait_for_function("window.pcState === 'connected'", timeout=20000)
                page.wait_for_function("document.querySelector('video').videoWidth > 0", timeout=20000)
                a = page.evaluate(PROBE)
                page.wait_for_timeout(2000)
                b = page.evaluate(PROBE)
                assert b["fd"] > a["fd"] + 40 and not b["paused"], (a, b)
                assert page.evaluate("document.querySelector('video').muted") is False  # audio for OBS's mixer
                shot = tmp_path / "viewer.png"
                page.screenshot(path=str(shot))
                page.screenshot(path=str(ARTIFACTS / "viewer.png"))
                img = cv2.imread(str(shot))
                assert tuple(img[5, 5]) == (0, 255, 0)  # the key colour around the avatar
                plain = browser.new_page(viewport={"width": 640, "height": 480})
                plain.goto(url + "viewer.html?channel=tv")
                plain.wait_for_function("document.querySelector('video').videoWidth > 0", timeout=20000)
                plain.screenshot(path=str(shot), omit_background=True)
                rgba = cv2.imread(str(shot), cv2.IMREAD_UNCHANGED)
                assert rgba.shape[2] == 4 and rgba[5, 5, 3] == 0  # transparent page around the avatar
                assert rgba[240, 320, 3] == 255  # and an opaque avatar
                # its session ended by the server: watching again in ~10 s (Chrome says "disconnected" after ~5 s
                # without answers; waiting for "failed" held the last frame 16-20 s)
                first = plain.evaluate("resource")
                urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + first, method="DELETE"), timeout=5)
                plain.wait_for_function(f"resource && resource !== {first!r} && window.pcState === 'connected'",
                                        timeout=20000)
                bad = browser.new_page()  # what retrying cannot mend is said on the page, not only in a console
                bad.goto(url + "viewer.html?channel=no%20such")
                bad.wait_for_function("document.getElementById('problem').textContent.includes('channel names')",
                                      timeout=10000)
            finally:
                browser.close()
    finally:
        talker.join(timeout=20)
    assert result["stats"]["viewers"] >= 1


WHIP_FROM_PAGE = """async (channel) => {
  const mic = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: false, noiseSuppression: false,
                                                                autoGainControl: false}});
  const pc = new RTCPeerConnection();
  window.whipPc = pc;
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendonly"});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => { if (pc.iceGatheringState === "complete") ok();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && ok(); setTimeout(ok, 3000); });
  const res = await fetch(`/whip/${channel}`, {method: "POST", headers: {"Content-Type": "application/sdp"},
                                               body: pc.localDescription.sdp});
  const answer = await res.text();
  await pc.setRemoteDescription({type: "answer", sdp: answer});
  return {status: res.status, location: res.headers.get("Location"), passive: answer.includes("a=setup:passive")};
}"""


def test_chromium_publishes_by_whip_and_a_whep_viewer_sees_the_lips(server, tmp_path):
    import asyncio

    from playwright.sync_api import sync_playwright

    from streamer.avatar.cache import Avatar
    from streamer.live.client import watch
    from tests.test_channels import mouth_activity

    url, log = server
    x, rate = speak("Chromium is publishing this voice with WHIP, and the avatar speaks it.")
    pcm = np.concatenate([np.zeros(int(0.5 * rate)), x, np.zeros(rate)])
    wav = write_wav(tmp_path / "whip.wav", pcm, rate)
    seen = {}
    import threading

    viewer = threading.Thread(target=lambda: seen.update(
        got=asyncio.run(watch(url.rstrip("/"), "chrome", len(pcm) / rate + 3.0))[0]))
    viewer.start()
    time.sleep(1.0)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=mic_from(wav))
            try:
                page = browser.new_page()
                page.goto(url + "viewer.html?channel=unused&muted=1")  # any page of the server's origin
                result = page.evaluate(WHIP_FROM_PAGE, "chrome")
                assert result["status"] == 201 and result["location"].startswith("/whip/chrome/")
                assert result["passive"]
                page.wait_for_function("window.whipPc.connectionState === 'connected'", timeout=20000)
                page.wait_for_timeout(int(1000 * len(pcm) / rate))
                status = page.evaluate("async (loc) => (await fetch(loc, {method: 'DELETE'})).status",
                                       result["location"])
                assert status == 200
            finally:
                browser.close()
    finally:
        viewer.join(timeout=30)
    root = Path(log).parent
    avatar = Avatar.load(root / "avatars", "astronaut")
    act = mouth_activity(seen["got"].video, avatar)
    assert np.mean(act > 8) > 0.15, np.round(act, 1)


def test_page_says_clearly_when_the_microphone_or_the_server_is_missing(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        # no fake microphone and no permission: getUserMedia is refused
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=HEADLESS)
        try:
            page = browser.new_context(permissions=[]).new_page()
            page.goto(url)
            page.click("#start")
            page.wait_for_function("document.getElementById('message').className === 'error'", timeout=10000)
            text = page.inner_text("#message")
            assert "microphone" in text.lower(), text
            assert page.is_enabled("#start")  # the user can try again
        finally:
            browser.close()
        # a microphone, but the server does not answer the offer
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=HEADLESS + FAKE_MIC)
        try:
            page = browser.new_page()
            page.goto(url)
            page.route("**/offer", lambda route: route.abort())
            page.click("#start")
            page.wait_for_function("document.getElementById('message').className === 'error'", timeout=10000)
            text = page.inner_text("#message")
            assert "cannot be reached" in text, text
            assert page.is_enabled("#start") and not page.is_enabled("#stop")
        finally:
            browser.close()
