"""WHIP from another WebRTC stack: GStreamer's webrtcbin (RSA certificate, libnice) publishes speech,
an aiortc WHEP viewer watches the lips move."""

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

from streamer.live.client import watch
from tests.conftest import speak, write_wav
from tests.test_channels import mouth_activity
from tests.test_live import _until, avatar, serving  # noqa: F401 - fixture

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).parent / "gst_whip.py"


def _gstreamer_ready() -> bool:
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0'); "
             "from gi.repository import Gst; Gst.init(None); "
             "assert all(Gst.ElementFactory.find(e) for e in ('webrtcbin', 'opusenc', 'nicesrc', 'clocksync'))")
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode == 0


def test_gstreamer_webrtcbin_publishes_and_a_whep_viewer_sees_the_lips(avatar, tmp_path):  # noqa: F811
    if not _gstreamer_ready():
        pytest.fail("GStreamer's webrtcbin is needed: apt-get install python3-gi gir1.2-gst-plugins-bad-1.0 "
                    "gstreamer1.0-plugins-bad gstreamer1.0-plugins-good gstreamer1.0-nice (.ci/run does)")
    x, rate = speak("Hello from GStreamer. This is a different WebRTC stack, talking to the avatar now.")
    pcm = np.concatenate([np.zeros(rate // 2), x, np.zeros(rate)])
    wav = write_wav(tmp_path / "gst.wav", pcm, rate)
    seconds = len(pcm) / rate + 0.5

    async def main():
        async with serving(avatar) as (server, url):
            viewer = asyncio.ensure_future(watch(url, "gst", seconds + 1.5))
            await _until(lambda: "gst" in server.channels, 5)
            proc = await asyncio.create_subprocess_exec(SYSTEM_PYTHON, str(SCRIPT), f"{url}/whip/gst", str(wav),
                                                        str(seconds), stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
            seen, _ = await viewer
            return proc.returncode, out.decode(), seen

    code, out, seen = asyncio.run(main())
    assert code == 0 and "a=setup:passive" in out and "connection connected" in out, out
    act = mouth_activity(seen.video, avatar)
    assert np.mean(act > 8) > 0.2, np.round(act, 1)
    assert max(np.abs(a).max() for _, a in seen.audio) > 0.05  # the viewer hears the publisher's voice
