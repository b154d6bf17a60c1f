import os
import stat

import av
import numpy as np
import pytest

from streamer.avatar.cache import prepare
from tests.conftest import decode_video, run_cli, write_audio


@pytest.fixture(scope="module")
def avatars(talk_video, tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    prepare(talk_video, "anna", root, progress=False)
    return root


def probe(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        return {"fps": float(v.average_rate), "frames": frames, "audio_codec": a.codec_context.name,
                "video_codec": v.codec_context.name, "audio_s": float(a.duration * a.time_base)}


def test_render_builtin_mouth_moves_in_speech_only(avatars, talk_video, speech_m4a, tmp_path):
    audio, seconds = speech_m4a
    out = tmp_path / "out.mp4"
    proc = run_cli("render", "--avatar", "anna", "--avatars", avatars, "--audio", audio, "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr
    info = probe(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["fps"] == 25
    assert abs(info["frames"] / 25 - seconds) <= 1 / 25
    assert abs(info["audio_s"] - seconds) < 0.05

    from streamer.avatar.cache import Avatar, ping_pong

    a = Avatar.load(avatars, "anna")
    rendered = decode_video(out)
    source = decode_video(talk_video)
    mouth_change, far_change = [], []
    for i, frame in enumerate(rendered):
        src = source[ping_pong(i, a.frames)]
        x1, y1, x2, y2 = a.boxes[ping_pong(i, a.frames)]
        d = np.abs(frame.astype(np.int16) - src).mean(axis=2)
        far = d.copy()
        far[max(0, y1 - 8) : y2 + 8, max(0, x1 - 8) : x2 + 8] = 0
        far_change.append(far.mean())
        h = y2 - y1
        mouth_change.append(d[y1 + int(0.55 * h) : y1 + int(0.85 * h),
                              x1 + (x2 - x1) // 4 : x2 - (x2 - x1) // 4].mean())
    mouth_change = np.array(mouth_change)
    # H.264 at crf 18 (4:2:0) alone differs from the source by ~2 levels on this colourful image
    assert max(far_change) < 3  # outside the face the frames are the source, to codec precision
    quiet = np.r_[0:20, len(rendered) - 20 : len(rendered)]  # the silent second at each end
    talking = np.arange(30, len(rendered) - 30)
    assert mouth_change[quiet].max() < 4  # rests in silence (codec loss only)
    assert np.mean(mouth_change[talking] > 8) > 0.3  # opens and closes during speech
    assert mouth_change[:24].max() < 4 and mouth_change[24:30].max() > 8  # starts with the voice at 1.0 s


def test_render_with_a_wav2lip_onnx(avatars, exported, speech_m4a, tmp_path):
    audio, seconds = speech_m4a
    out = tmp_path / "neural.mp4"
    proc = run_cli("render", "--avatar", "anna", "--avatars", avatars, "--audio", audio, "--out", out,
                   "--model", exported["fp16"], "--batch-size", "32", "-q")
    assert proc.returncode == 0, proc.stderr
    info = probe(out)
    assert info["fps"] == 25 and abs(info["frames"] / 25 - seconds) <= 1 / 25


def test_render_bad_audio_fails_cleanly(avatars, tmp_path):
    empty = tmp_path / "empty.wav"
    write_audio(empty, np.zeros(0, np.float32), 16000)
    text = tmp_path / "notes.mp3"
    text.write_text("not audio at all")
    for audio, expect in ((empty, "no audio"), (text, "not a readable audio"),
                          (tmp_path / "nope.wav", "does not exist")):
        out = tmp_path / "x.mp4"
        proc = run_cli("render", "--avatar", "anna", "--avatars", avatars, "--audio", audio, "--out", out, "-q")
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.wav", "notes.mp3"]
    tone = tmp_path / "tone.wav"
    write_audio(tone, 0.3 * np.sin(np.arange(8000) * 0.1).astype(np.float32), 16000)
    proc = run_cli("render", "--avatar", "nobody", "--avatars", avatars, "--audio", tone, "--out", tmp_path / "y.mp4")
    assert proc.returncode == 2 and "not prepared" in proc.stderr


def test_render_checks_what_it_is_given_before_any_work(tmp_path):
    """Missing audio is said before the demo avatar is made in a new avatars folder, and no output name
    that is not a new or regular .mp4 file is written over, --force or not (renaming the finished file
    into place would replace a folder, a pipe or, as root, /dev/null)."""
    tone = tmp_path / "tone.wav"
    write_audio(tone, 0.3 * np.sin(np.arange(8000) * 0.1).astype(np.float32), 16000)
    fresh = tmp_path / "fresh_avatars"
    proc = run_cli("render", "--avatars", fresh, "--audio", tmp_path / "nope.wav", "--out", tmp_path / "o.mp4")
    assert proc.returncode == 2 and "audio" in proc.stderr and "does not exist" in proc.stderr, proc.stderr
    assert not fresh.exists() and not (tmp_path / "o.mp4").exists()
    (tmp_path / "folder.mp4").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")
    for out, expect in ((tmp_path / "folder.mp4", "not a regular file"), (tmp_path / "pipe.mp4", "not a regular file"),
                        (tmp_path / "x.avi", "must end in .mp4"), (tmp_path / "no" / "x.mp4", "does not exist")):
        proc = run_cli("render", "--avatars", fresh, "--audio", tone, "--out", out, "--force", "-q")
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "folder.mp4").is_dir() and stat.S_ISFIFO((tmp_path / "pipe.mp4").stat().st_mode)
    assert not fresh.exists() and not list(tmp_path.glob(".*part"))
    (tmp_path / "avatars_file").write_text("not a folder")
    proc = run_cli("render", "--avatars", tmp_path / "avatars_file", "--audio", tone, "--out", tmp_path / "o.mp4")
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, proc.stderr


def test_silent_audio_renders_the_idle_avatar(avatars, talk_video, tmp_path):
    quiet = tmp_path / "quiet.wav"
    write_audio(quiet, np.zeros(32000, np.float32), 16000)
    out = tmp_path / "quiet.mp4"
    proc = run_cli("render", "--avatar", "anna", "--avatars", avatars, "--audio", quiet, "--out", out, "-q")
    assert proc.returncode == 0 and "no speech" in proc.stderr
    rendered, source = decode_video(out), decode_video(talk_video)
    assert len(rendered) == 50
    assert max(np.abs(r.astype(np.int16) - s).mean() for r, s in zip(rendered, source)) < 3  # codec loss only
