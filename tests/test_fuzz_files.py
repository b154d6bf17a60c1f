"""Corrupt files, fuzzed: media for `prepare` and `render`, checkpoints and ONNX models, each a valid
file with bytes overwritten and/or cut short (hypothesis). A user must get one line and exit code 2,
or, where what is left still decodes, a normal result: never a traceback, never a half-written
output, nothing written outside its folder."""

import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamer.avatar.cache import DEMO_IMAGE as ASTRONAUT
from streamer.avatar.cache import demo_avatar
from streamer.cli import main
from streamer.errors import UserError
from tests.conftest import write_audio

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_MODELS = settings(FUZZ, max_examples=12)  # 30-60 MB each: fewer


def damage(data: bytes, edits: list[tuple[float, int]], cut: float | None) -> bytes:
    """`data` with bytes overwritten at the given fractions of its length, then cut at `cut`."""
    out = bytearray(data)
    for where, value in edits:
        out[min(len(out) - 1, int(where * len(out)))] = value
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


damages = st.tuples(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=40),
                    st.one_of(st.none(), st.floats(0, 1)))


def run(argv, capsys) -> tuple[int, str]:
    """`streamer ARGV` in this process: its exit code and what it printed to stderr. Anything raised
    other than through the CLI's one-line errors fails the test (a user would see a traceback)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err and "/site-packages/" not in err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    t = np.arange(16000) / 16000
    write_audio(root / "voice.m4a", 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0), 16000)
    write_audio(root / "voice.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    img = cv2.resize(cv2.imread(str(ASTRONAUT)), (160, 160))
    cv2.imwrite(str(root / "face.jpg"), img)
    with av.open(str(root / "face.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 160, 160, "yuv420p"
        for i in range(6):
            for p in s.encode(av.VideoFrame.from_ndarray(np.roll(img, i, axis=1), format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    demo_avatar(root / "avatars")
    return root


def _outside(folder: Path, before: set) -> set:
    return {p.name for p in folder.iterdir()} - before


@pytest.mark.parametrize("source", ["voice.m4a", "voice.wav"])
@FUZZ
@given(hurt=damages)
@example(hurt=([(0.9, 1)], None))  # found by a longer run: an m4a whose audio stream had no codec left
def test_render_of_damaged_audio(files, source, hurt, tmp_path_factory, capsys):
    work = tmp_path_factory.mktemp("render")
    audio = work / source
    audio.write_bytes(damage((files / source).read_bytes(), *hurt))
    out = work / "out.mp4"
    code, err = run(["render", "--avatars", files / "avatars", "--audio", audio, "--out", out, "-q"], capsys)
    if code == 0:
        with av.open(str(out)) as c:  # a whole, playable file
            assert sum(1 for _ in c.decode(video=0)) > 0
    else:
        assert code == 2 and one_line(err), err
        assert not out.exists()
    assert {p.name for p in work.iterdir()} <= {source, "out.mp4"}  # no temporary left behind


@pytest.mark.parametrize("source", ["face.mp4", "face.jpg"])
@FUZZ
@given(hurt=damages)
def test_prepare_of_damaged_sources(files, source, hurt, tmp_path_factory, capsys):
    work = tmp_path_factory.mktemp("prepare")
    src = work / source
    src.write_bytes(damage((files / source).read_bytes(), *hurt))
    avatars = work / "avatars"
    flag = "--video" if source.endswith(".mp4") else "--image"
    code, err = run(["prepare", flag, src, "--name", "x", "--avatars", avatars, "-q"], capsys)
    if code == 0:
        assert (avatars / "x").is_dir()
    else:
        assert code == 2 and one_line(err), err
        assert not avatars.exists() or list(avatars.iterdir()) == []
    assert {p.name for p in work.iterdir()} <= {source, "avatars"}


@pytest.mark.parametrize("kind", ["pth", "onnx"])
@FUZZ_MODELS
@given(hurt=damages)
def test_damaged_models_are_refused_in_one_sentence_or_run(released_checkpoint, exported, kind, hurt,
                                                            tmp_path_factory):
    from streamer.lipsync.engine import Wav2LipInfer

    good = released_checkpoint if kind == "pth" else exported["fp32"]
    model = tmp_path_factory.mktemp("model") / good.name
    model.write_bytes(damage(good.read_bytes(), *hurt))
    try:
        eng = Wav2LipInfer(model, device="cpu", warmup=False)
    except UserError as e:
        assert "\n" not in str(e) and "site-packages" not in str(e), str(e)
        return
    # what still loads (a flipped weight, a cut in an unused tail) must run
    out = eng.predict(np.zeros((1, 1, 80, 16), np.float32), np.zeros((1, 6, eng.face_size, eng.face_size), np.float32))
    assert out.shape == (1, 3, eng.face_size, eng.face_size)
    assert os.listdir(model.parent) == [model.name]


def _with_bad_tag(path: Path, write) -> Path:
    """`write(path, metadata)` makes a file; its title tag is then made invalid UTF-8 (found by the fuzz
    above on a fresh machine: FFmpeg hands tags over as they are, PyAV decoded them strictly)."""
    write(path, {"title": "TAGTAGTAGTAG"})
    data = path.read_bytes()
    assert b"TAGTAGTAGTAG" in data
    path.write_bytes(data.replace(b"TAGTAGTAGTAG", b"\x80" * 12))
    return path


def _mp4(path: Path, metadata: dict) -> None:
    img = cv2.resize(cv2.imread(str(ASTRONAUT)), (160, 160))
    with av.open(str(path), "w") as c:
        c.metadata.update(metadata)
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 160, 160, "yuv420p"
        for p in [*s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")), *s.encode()]:
            c.mux(p)


def _m4a(path: Path, metadata: dict) -> None:
    with av.open(str(path), "w") as c:
        c.metadata.update(metadata)
        s = c.add_stream("aac", rate=16000, layout="mono")
        t = np.arange(16000) / 16000
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None], format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)


def test_a_damaged_tag_does_not_stop_render_prepare_or_an_upload(files, tmp_path, capsys):
    from streamer.server.push import decode_audio

    audio = _with_bad_tag(tmp_path / "tagged.m4a", _m4a)
    video = _with_bad_tag(tmp_path / "tagged.mp4", _mp4)
    code, err = run(["render", "--avatars", files / "avatars", "--audio", audio, "--out", tmp_path / "o.mp4", "-q"],
                    capsys)
    assert code == 0, err
    code, err = run(["prepare", "--video", video, "--name", "t", "--avatars", tmp_path / "avatars", "-q"], capsys)
    assert code == 0, err
    assert decode_audio(audio.read_bytes()).size > 40000  # what POST /speak does with an upload
