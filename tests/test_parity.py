"""Live and offline are one pipeline: the same voice gives the same frames through a live channel as
through `render` (a live voice starts with the channel's short lead of silence, `voice_lead`), fade
into speech included; and both play an avatar at its own speed (a 30 fps
avatar is not slowed to 25 fps)."""

import cv2
import numpy as np
import pytest
from scipy import signal

from streamer.audio import VoiceActivity, resample
from streamer.avatar.cache import demo_avatar, ping_pong, prepare
from streamer.lipsync.builtin import BuiltinEngine
from streamer.live.channel import CHUNK, FPS
from streamer.mouth import loop_step
from streamer.render import avatar_frames, plan, render_frames
from tests.conftest import ASTRONAUT, speak, write_video
from tests.test_channel import simulated_channel


def live_frames(avatar, voice48: np.ndarray, steps: int, speaking: bool = True, engine=None, delay_s: float = 0.3):
    """Frames 0..steps-1 of a channel fed `voice48` in 20 ms packets on a simulated clock; n0; the lead."""
    now, worker, ch = simulated_channel(avatar, voice=speaking, engine=engine, delay_s=delay_s)
    frames, n = {}, 0
    for k in range(0, voice48.size + 48000, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000
        if speaking:
            chunk = voice48[k : k + CHUNK]
            ch.push_voice(chunk if chunk.size == CHUNK else np.zeros(CHUNK, np.float32))
        assert worker.drain()
        while ch.start + n / FPS <= now[0] and n < steps:
            assert ch.frames.get(loop_step(n, avatar), timeout=5) is not None  # the decoder keeps up here
            frames[n] = ch.video_frame(n)
            n += 1
    n0 = ch.n0
    worker.close()
    ch.close()
    return frames, n0, ch.lead


@pytest.mark.parametrize("kind", ["builtin", "musetalk"])
def test_live_frames_equal_rendered_frames_for_the_same_voice(kind, tmp_path, request):
    avatar = demo_avatar(tmp_path)
    if kind == "musetalk":  # its whisper windows, streamed in blocks, against the same blocks offline
        from streamer.lipsync.musetalk import MuseTalkInfer

        engine = MuseTalkInfer(request.getfixturevalue("musetalk_dir"), device="cpu")
        engine.features.background = False  # encode in push: the simulated clock cannot wait for a thread
    else:
        engine = BuiltinEngine()
    x, rate = speak("One two three, lips and voice together.")
    speech = signal.resample_poly(x, 480, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(48000, np.float32), speech, np.zeros(48000, np.float32)])
    # MuseTalk: its 340 ms lookahead and room for its real call time on the simulated clock
    steps = round(voice.size / 48000 * FPS) + 21
    live, n0, lead = live_frames(avatar, voice, steps, engine=engine, delay_s=0.3 if kind == "builtin" else 0.8)
    assert lead == (630 if kind == "builtin" else 30)
    audio16 = resample(np.concatenate([np.zeros(lead, np.float32), voice]), 48000)  # as the channel hears it
    count = round(audio16.size / 16000 * FPS)
    windows, strength = plan(audio16, count, VoiceActivity(fps=FPS), features=engine.features)
    offline = list(render_frames(avatar, windows, strength, engine))
    idle = offline[0]
    compared = [i for i in range(count - 10) if i + n0 in live]
    assert len(compared) > count - 20
    moving_live = [i for i in compared if not np.array_equal(live[i + n0], idle)]
    moving_offline = [i for i in compared if not np.array_equal(offline[i], idle)]
    assert moving_live == moving_offline and len(moving_live) > 30  # the same frames move, fades included
    assert strength[moving_offline[0]] < 0.5  # the fade into speech is there (not a jump to full strength)
    diff = max(np.abs(live[i + n0].astype(int) - offline[i]).max() for i in compared)
    assert diff <= 2, diff  # streaming features equal offline ones to float rounding


@pytest.fixture(scope="module")
def avatar30(tmp_path_factory):
    """A 30 fps avatar whose frames carry their own index in a corner (6 bits, black or white blocks)."""
    img = cv2.imread(str(ASTRONAUT))
    frames = []
    for i in range(60):
        m = np.float32([[1.0, 0, -20 - 0.3 * i], [0, 1.0, -10]])
        f = cv2.warpAffine(img, m, (480, 400), borderMode=cv2.BORDER_REFLECT)
        for b in range(6):
            f[:24, 24 * b : 24 * b + 24] = 255 if i >> b & 1 else 0
        frames.append(f)
    path = tmp_path_factory.mktemp("media") / "thirty.mp4"
    write_video(path, frames, fps=30)
    return prepare(path, "thirty", tmp_path_factory.mktemp("avatars"), progress=False)


def index_of(frame) -> int:
    return sum(1 << b for b in range(6) if frame[6:18, 24 * b + 6 : 24 * b + 18].mean() > 128)


def test_a_30_fps_avatar_plays_at_its_own_speed_live_and_offline(avatar30):
    assert avatar30.fps == 30 and avatar30.frames == 60
    want = [ping_pong(int(n * 30 / 25 + 1e-6), 60) for n in range(120)]  # 4.8 s: forward, then back
    offline = [index_of(f) for _, _, f in avatar_frames(avatar30, 120)]
    live, _, _ = live_frames(avatar30, np.zeros(48000 * 5, np.float32), 120, speaking=False)
    assert offline == want
    assert [index_of(live[n]) for n in range(120)] == want
