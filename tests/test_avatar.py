import dataclasses
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from streamer.avatar.blend import blend, lower_face_mask
from streamer.avatar.cache import Avatar, PrepareSettings, keep_frames, ping_pong, prepare
from streamer.avatar.detect import FaceDetector
from streamer.errors import UserError
from streamer.lipsync.builtin import BuiltinEngine
from streamer.lipsync.engine import face_input, to_images
from tests.conftest import ASTRONAUT, decode_video, run_cli


def test_detector_finds_the_astronaut_with_landmarks():
    faces = FaceDetector().detect(cv2.imread(str(ASTRONAUT)))
    assert len(faces) == 1 and faces[0].score > 0.99
    x1, y1, x2, y2 = faces[0].box
    assert 150 < x1 < 200 and 30 < y1 < 90 and 250 < x2 < 300 and 150 < y2 < 200
    eyes, nose, mouth = faces[0].landmarks[:2], faces[0].landmarks[2], faces[0].landmarks[3:]
    assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()
    assert FaceDetector().detect(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)) == []


@pytest.fixture(scope="module")
def video_avatar(talk_video, tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    return prepare(talk_video, "anna", root, progress=False)


def test_prepare_video_caches_what_the_live_path_needs(video_avatar, talk_video):
    a = video_avatar
    assert a.frames == 75 and a.fps == 25 and a.size == (480, 400)
    assert a.crops.shape == (75, 96, 96, 3) and a.boxes.shape == (75, 4) and a.landmarks.shape == (75, 5, 2)
    meta = json.loads((a.path / "meta.json").read_text())
    assert meta["detector"] == "retinaface-mobilenet0.25" and meta["settings"]["pads"] == [0, 10, 0, 0]
    # the boxes follow the pan (the face moves left), and the blacked-out frames 30-32 took their neighbours'
    centres = (a.boxes[:, 0] + a.boxes[:, 2]) / 2
    assert centres[0] - centres[-1] > 15
    assert np.all(np.abs(np.diff(centres)) < 4)
    # the full frames are kept losslessly: equal to the decoded source
    source = decode_video(talk_video)
    for _, src, frame in a.read_frames(0, count=5):
        assert np.array_equal(frame, source[src])


@pytest.mark.parametrize("source", ["frames.npy", "frames.mkv"])
def test_frames_loop_forward_then_backward(video_avatar, source):
    avatar = video_avatar if source == "frames.npy" else dataclasses.replace(video_avatar, raw=None)
    assert (avatar.raw is not None) == (source == "frames.npy")
    n = avatar.frames
    got = [src for _, src, _ in avatar.read_frames(0, count=3 * n)]
    expected = [ping_pong(k, n) for k in range(3 * n)]
    assert got == expected
    assert expected[:n] == list(range(n)) and expected[n : 2 * n - 2] == list(range(n - 2, 0, -1))
    assert max(abs(a - b) for a, b in zip(got, got[1:])) == 1  # never jumps
    # starting mid-loop, backwards, gives the same frames as reading from the start
    frames = {src: f for _, src, f in avatar.read_frames(0, count=n)}
    for _, src, frame in avatar.read_frames(n + 10, count=20):
        assert np.array_equal(frame, frames[src])


def test_decoded_frames_kept_when_they_fit_equal_the_lossless_video(video_avatar, talk_video, tmp_path, caplog):
    """frames.npy (what channels read instead of decoding, 5 ms a 512x512 frame each) holds exactly
    the frames frames.mkv decodes to, is read-only, is not written past raw_frames_mb, and a damaged
    one falls back to decoding."""
    decoded = [f for _, _, f in dataclasses.replace(video_avatar, raw=None).read_frames(0, count=75)]
    assert np.array_equal(np.asarray(video_avatar.raw), np.stack(decoded))
    frame = next(iter(video_avatar.read_frames(0, count=1)))[2]
    with pytest.raises(ValueError):
        frame[0, 0] = 0  # a view of the mapped file: no consumer can change the avatar
    from streamer.mouth import face_crop

    for src in (0, 74):  # a crop of another size than the cached ones, for any frame, with no decoder
        assert np.array_equal(face_crop(video_avatar, src, None, 256), face_crop(video_avatar, src, decoded[src], 256))
    assert face_crop(dataclasses.replace(video_avatar, raw=None), 74, None, 256) is None
    small = prepare(talk_video, "small", tmp_path, PrepareSettings(raw_frames_mb=40), progress=False)
    assert small.raw is None and not (small.path / "frames.npy").exists()  # 43 MB of frames > 40 MB
    stamp = os.stat(small.path / "crops.npy").st_mtime_ns
    again = prepare(talk_video, "small", tmp_path, PrepareSettings(raw_frames_mb=50), progress=False)
    assert again.raw is not None and np.array_equal(np.asarray(again.raw), np.asarray(video_avatar.raw))
    assert os.stat(again.path / "crops.npy").st_mtime_ns == stamp  # the frames added, nothing rebuilt
    assert keep_frames(again, 40).raw is None and not (again.path / "frames.npy").exists()
    shutil.copytree(video_avatar.path, tmp_path / "copy")
    with open(tmp_path / "copy" / "frames.npy", "r+b") as f:
        f.truncate(1000)
    with caplog.at_level("WARNING"):
        damaged = Avatar.load(tmp_path, "copy")
    assert damaged.raw is None and "frames.npy is damaged" in caplog.text
    assert np.array_equal(next(iter(damaged.read_frames(5, count=1)))[2], decoded[5])


def test_same_source_is_reused_and_changed_settings_rebuild(video_avatar, talk_video):
    root = video_avatar.path.parent
    stamp = os.stat(video_avatar.path / "crops.npy").st_mtime_ns
    again = prepare(talk_video, "anna", root, progress=False)
    assert os.stat(again.path / "crops.npy").st_mtime_ns == stamp
    other = prepare(talk_video, "anna2", root, PrepareSettings(max_height=200), progress=False)
    assert other.size[1] == 200 and other.frames == 75


def test_image_becomes_a_still_avatar_via_the_cli(tmp_path):
    photo = cv2.flip(cv2.imread(str(ASTRONAUT)), 1)[20:460, 40:480]  # a photo not in the repo
    photo = np.clip(photo.astype(np.int16) + [10, -5, 0], 0, 255).astype(np.uint8)
    path = tmp_path / "me.jpg"
    cv2.imwrite(str(path), photo)
    proc = run_cli("prepare", "--image", path, "--name", "me", "--avatars", tmp_path / "avatars", "-q")
    assert proc.returncode == 0, proc.stderr
    a = Avatar.load(tmp_path / "avatars", "me")
    assert a.frames == 1 and a.meta["kind"] == "image"
    assert [src for _, src, _ in a.read_frames(0, count=4)] == [0, 0, 0, 0]


def test_bad_sources_fail_cleanly_and_leave_nothing(tmp_path):
    root = tmp_path / "avatars"
    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
    garbage = tmp_path / "clip.mp4"
    # (seeded: some random bytes probe as an audio-only stream, which FFmpeg then reports as such)
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((20, 20, 3), np.uint8))
    cases = [(["--image", noise, "--name", "n"], "no face found"),
             (["--video", garbage, "--name", "g"], ("not a readable video", "has no video stream")),
             (["--video", empty, "--name", "e"], "is empty"),
             (["--image", tiny, "--name", "t"], "sizes from 64"),
             (["--image", ASTRONAUT, "--name", "../escape"], "not allowed"),
             (["--video", tmp_path / "missing.mp4", "--name", "m"], "does not exist"),
             (["--video", tmp_path, "--name", "m"], "is a folder, not a file"),
             (["--image", garbage, "--name", "g"], "--image takes a photo")]
    for args, expect in cases:
        proc = run_cli("prepare", *args, "--avatars", root, "-q")
        expect = (expect,) if isinstance(expect, str) else expect
        assert proc.returncode == 2 and any(e in proc.stderr for e in expect), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not root.exists() or list(root.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p != root) == ["clip.mp4", "empty.mp4", "noise.png", "tiny.png"]
    proc = run_cli("prepare", "--image", ASTRONAUT, "--name", "a", "--avatars", noise, "-q")
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, proc.stderr


def test_a_damaged_avatar_is_told_at_load_and_prepared_again(video_avatar, talk_video, tmp_path):
    """frames.mkv cut short: one line when the avatar is loaded (serve, render), not a failure in every
    session that shows it; preparing it again (as the line says, no --force) rebuilds it."""
    copy = tmp_path / "avatars" / "cut"
    shutil.copytree(video_avatar.path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "name": "cut"}))
    (copy / "frames.npy").unlink(missing_ok=True)
    Avatar.load(tmp_path / "avatars", "cut")  # whole: loads
    with open(copy / "frames.mkv", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="'cut' is damaged .*prepare it again"):
        Avatar.load(tmp_path / "avatars", "cut")
    again = prepare(talk_video, "cut", tmp_path / "avatars", progress=False)  # same source and settings
    assert again.frames == video_avatar.frames and Avatar.load(tmp_path / "avatars", "cut").frames == again.frames


def test_blend_is_the_plain_formula_to_the_level():
    """The live path's in-place blend (every speech frame) gives what its plain numpy statement gives, bit
    for bit: colour shifted by the difference of the upper face's means, rounded; src + mask * strength *
    (pred - src), rounded; the source untouched where the mask is 0. Offsets of whole levels included."""
    rng = np.random.default_rng(1)
    for size, box in [(96, (40, 30, 135, 160)), (96, (10, 20, 70, 90)), (256, (20, 10, 140, 150))]:
        frame = rng.integers(20, 236, (200, 200, 3), np.uint8)
        x1, y1, x2, y2 = box
        crop = cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_AREA)
        for k, strength in enumerate((0.25, 1.0)):
            shifted = crop + np.uint8(7)  # a whole-level offset (the means' float32 rounding decides the level)
            pred = rng.integers(0, 256, (size, size, 3), np.uint8) if k else shifted
            top = slice(size // 8, size // 2)
            offset = crop[top].reshape(-1, 3).mean(0) - pred[top].reshape(-1, 3).mean(0)
            matched = np.clip(pred.astype(np.float32) + (offset + 0.5).astype(np.float32), 0, 255).astype(np.uint8)
            if not k:
                assert np.array_equal(matched, crop)  # a whole-level shift is undone exactly
            mask = cv2.resize(lower_face_mask(size), (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
            m = (mask * strength)[..., None]
            src = frame[y1:y2, x1:x2].astype(np.float32)
            big = cv2.resize(matched, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            want = frame.copy()
            want[y1:y2, x1:x2] = np.where(m > 0, np.clip(src + m * (big - src) + 0.5, 0, 255), src).astype(np.uint8)
            assert np.array_equal(blend(frame, box, pred, strength=strength, crop=crop, detail=False), want)


def test_blend_has_no_seam_and_leaves_the_rest_untouched():
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(60, 200, (300, 300, 3), np.uint8), (0, 0), 3)
    box = (100, 80, 196, 210)
    pred = np.full((96, 96, 3), (20, 40, 230), np.uint8)  # worst case: a face of a very different colour
    out = blend(frame, box, pred, match_color=False)
    diff = np.abs(out.astype(np.int16) - frame).sum(axis=2)
    x1, y1, x2, y2 = box
    outside = np.ones(diff.shape, bool)
    outside[y1:y2, x1:x2] = False
    assert diff[outside].max() == 0  # nothing outside the box changes
    # nor on or near the box edge: no rectangle can show
    ring = np.zeros(diff.shape, bool)
    ring[y1 : y1 + 3, x1:x2] = ring[y2 - 3 : y2, x1:x2] = ring[y1:y2, x1 : x1 + 3] = ring[y1:y2, x2 - 3 : x2] = True
    assert diff[ring].max() == 0
    assert diff[y1:y2, x1:x2].max() > 200  # the mouth region did change
    # seam visibility: the largest step between neighbouring pixels of the change, relative to the
    # full colour difference (a hard paste steps by 100% at the box edge)
    change = out.astype(np.float32) - frame
    step = max(np.abs(np.diff(change, axis=0)).max(), np.abs(np.diff(change, axis=1)).max())
    full = np.abs(pred[0, 0].astype(np.float32) - frame[y1:y2, x1:x2].mean(axis=(0, 1))).max()
    assert step / full < 0.2
    mask = lower_face_mask(96)
    assert mask[:40].max() < 0.01 and mask[:48].max() < 0.2  # eyes and forehead untouched, the nose barely
    assert mask[62, 30:66].min() > 0.85  # the mouth, corner to corner, fully replaced


def test_builtin_engine_moves_only_in_speech():
    eng = BuiltinEngine()
    crops = np.repeat(cv2.resize(cv2.imread(str(ASTRONAUT))[57:187, 178:273], (96, 96))[None], 2, axis=0)
    faces = face_input(crops)
    silence = np.full((2, 1, 80, 16), -4.0, np.float32)
    speech = np.zeros((2, 1, 80, 16), np.float32)
    speech[1] = 1.0
    rest = to_images(eng.predict(silence, faces))
    assert np.array_equal(rest, crops)  # silence: the face at rest, exactly
    moved = to_images(eng.predict(speech, faces)).astype(np.int16)
    change = np.abs(moved - crops).sum(axis=3)
    assert change[:, 40:].mean() > change[:, :30].mean() + 5  # the lower face moves, not the eyes
    assert change[1, 55:85].mean() > change[0, 55:85].mean()  # louder opens wider
    assert np.array_equal(to_images(eng.predict(speech, faces)), moved.astype(np.uint8))  # deterministic


def test_builtin_engine_crop_by_crop_equals_its_model_tensor_path():
    """Live and render call `predict_crops` (uint8 crops in, mouths out, no tensors); it is the model
    path's `to_images(predict(face_input(...)))` bit for bit, for every opening, face size and mouth
    place, mouths at the crop's edge included."""
    from streamer.lipsync.builtin import mouth_opening
    from streamer.lipsync.engine import predict_crops

    def plain(eng, face, opening):  # the warp and the opening over the whole crop, as first written
        if opening <= 0.02:
            return face
        s, drop = eng.face_size, opening * 0.07 * eng.face_size
        img = cv2.remap(face, eng._xs, eng._ys - drop * eng._jaw, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        mask = np.zeros((s, s), np.float32)
        axes = (max(1, round(0.12 * s * (0.75 + 0.25 * opening))), max(1, round(drop * 0.75)))
        cv2.ellipse(mask, (round(eng._cx), round(eng._cy + drop * 0.5)), axes, 0, 0, 360, 0.92, thickness=-1)
        mask = cv2.GaussianBlur(mask, (0, 0), 0.008 * s + 0.4)[..., None]
        return img * (1 - mask) + np.array([0.05, 0.04, 0.12], np.float32) * mask

    rng = np.random.default_rng(1)
    for size in (96, 256):
        for mouth in ((0.5, 0.64), (0.2, 0.95), (0.9, 0.1)):
            eng = BuiltinEngine(size, mouth)
            crops = rng.integers(0, 256, (5, size, size, 3), np.uint8)
            for level in (-4.0, -1.6, -1.0, 0.0, 0.8, 4.0):
                windows = np.full((5, 80, 16), level, np.float32) + rng.normal(0, 0.3, (5, 80, 16)).astype(np.float32)
                got = eng.predict_crops(windows, crops)
                assert np.array_equal(got, predict_crops(eng, windows, crops)), (size, mouth, level)
                faces = face_input(crops)[:, 3:].transpose(0, 2, 3, 1)
                openings = mouth_opening(windows[:, None])
                want = [plain(eng, np.ascontiguousarray(f), float(o)) for f, o in zip(faces, openings)]
                assert np.array_equal(got, to_images(np.stack(want).transpose(0, 3, 1, 2))), (size, mouth, level)
    assert np.array_equal(eng.predict_crops(np.full((5, 80, 16), -4.0, np.float32), crops), crops)  # at rest


def test_builtin_mouth_follows_the_avatar_landmarks(video_avatar):
    x, y = video_avatar.mouth_in_crop()
    assert 0.4 < x < 0.6 and 0.55 < y < 0.72  # the portrait's mouth, for boxes padded as the original
    crop = np.ascontiguousarray(video_avatar.crops[0])[None]
    speech = np.zeros((1, 1, 80, 16), np.float32)
    rows = []
    for mouth in ((0.5, 0.5), (0.5, 0.75)):
        moved = to_images(BuiltinEngine(mouth=mouth).predict(speech, face_input(crop)))[0]
        change = np.abs(moved.astype(np.int16) - crop[0]).sum(axis=(1, 2))
        rows.append(int(np.argmax(change)))
    assert rows[0] < rows[1]  # the opening is drawn where the mouth is


def test_blend_keeps_a_close_ups_detail_outside_the_mouth():
    """A 600 px face from a 96 px prediction (a 1080p close-up): the lower face outside the mouth keeps
    >= 90% of the source's fine detail (skin texture), where pasting the upscaled prediction kept far
    less; the mouth the prediction opened is still the prediction's."""
    from streamer.avatar.cache import DEMO_IMAGE
    from streamer.bench import fine_detail

    rng = np.random.default_rng(1)
    face = cv2.resize(cv2.imread(str(DEMO_IMAGE)), (600, 600), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    skin = cv2.GaussianBlur(rng.normal(0, 14, (600, 600)).astype(np.float32), (0, 0), 0.7)[..., None]
    frame = np.zeros((1080, 1080, 3), np.uint8)
    frame[240:840, 240:840] = np.clip(face + skin, 0, 255).astype(np.uint8)
    box = (240, 240, 840, 840)
    crop = cv2.resize(frame[240:840, 240:840], (96, 96), interpolation=cv2.INTER_AREA)
    pred = crop.copy()
    cv2.ellipse(pred, (48, 70), (14, 6), 0, 0, 360, (30, 20, 40), -1)  # the model opened the mouth
    mouth_zone = np.zeros((600, 600), np.uint8)
    cv2.ellipse(mouth_zone, (300, 437), (14 * 25 // 4 + 40, 6 * 25 // 4 + 40), 0, 0, 360, 1, -1)
    lower = cv2.resize(lower_face_mask(96), (600, 600)) > 0.5
    where = lower & (mouth_zone == 0)
    outs = {d: blend(frame, box, pred, crop=crop, detail=d)[240:840, 240:840] for d in (False, True)}
    source = fine_detail(frame[240:840, 240:840], where)
    kept = {d: fine_detail(out, where) / source for d, out in outs.items()}
    assert kept[True] >= 0.9 and kept[False] < 0.6, kept
    out = outs[True]  # the default
    core = np.zeros((600, 600), bool)
    cv2.ellipse(core.view(np.uint8), (300, 437), (60, 20), 0, 0, 360, 1, -1)
    assert out[core].mean() < 0.5 * frame[240:840, 240:840][core].mean()  # the open mouth is shown
