"""The prepared avatar on disk, and reading it back.

avatars/<name>/
  meta.json       fps, size, frame count, source hash, detector, pads, face size, format version
  frames.mkv      every frame, lossless (H.264 RGB, qp 0): compact on disk, decoded ahead at run time
  boxes.npy       (N, 4) int32 face boxes x1, y1, x2, y2, padded and smoothed over time
  landmarks.npy   (N, 5, 2) float32 eyes, nose, mouth corners
  crops.npy       (N, S, S, 3) uint8 BGR face crops at the model's size
  frames.npy      (N, H, W, 3) uint8 BGR every frame decoded, when that fits `raw_frames_mb`: read in
                  place of frames.mkv (no decoding per channel; processes share it through the page cache)
  musetalk-latents-<key>.npz   MuseTalk only: every crop's VAE latents (written by that engine)

The live path holds boxes, landmarks and crops (41 MB for 60 s at 96 px) and reads full frames a
few at a time (memory-mapped from frames.npy, else decoded), so a long 1080p avatar needs no
gigabytes of RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from streamer.errors import UserError, need_file

log = logging.getLogger(__name__)

FORMAT = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # use fullmatch: `$` would let a final newline in
DEMO_NAME = "astronaut"
DEMO_IMAGE = Path(__file__).parent / "data" / "astronaut.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
GOP = 12  # keyframe interval of frames.mkv: reading backwards decodes one group at a time
MIN_SIDE, MAX_SIDE = 64, 7680
MAX_FRAMES = 25 * 60 * 30  # 30 minutes at 25 fps


def avatar_dir(root: str | Path, name: str) -> Path:
    """The avatar's folder; names are plain words, so no name can point outside `root`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UserError(f"avatar name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_'")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"avatars folder {root} is a file, not a folder")
    return root / name


def ping_pong(k: int, n: int) -> int:
    """Source frame shown at loop step k: 0..n-1 then n-2..1, again and again, so it never jumps."""
    if n <= 1:
        return 0
    period = 2 * n - 2
    k %= period
    return k if k < n else period - k


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Avatar:
    path: Path
    meta: dict
    boxes: np.ndarray
    landmarks: np.ndarray
    crops: np.ndarray
    raw: np.ndarray | None = None  # frames.npy, memory-mapped, when prepared with it

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def frames(self) -> int:
        return self.meta["frames"]

    @property
    def fps(self) -> float:
        return self.meta["fps"]

    @property
    def size(self) -> tuple[int, int]:
        return self.meta["width"], self.meta["height"]

    def mouth_in_crop(self) -> tuple[float, float]:
        """Where the mouth sits in the face crops, as fractions of the crop (median over frames)."""
        centre = self.landmarks[:, 3:5].mean(axis=1)  # between the mouth corners
        size = np.maximum(self.boxes[:, 2:] - self.boxes[:, :2], 1)
        rel = (centre - self.boxes[:, :2]) / size
        x, y = np.median(rel, axis=0)
        return float(np.clip(x, 0.2, 0.8)), float(np.clip(y, 0.3, 0.9))

    @classmethod
    def load(cls, root: str | Path, name: str) -> Avatar:
        path = avatar_dir(root, name)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise UserError(f"avatar {name!r} is not prepared in {root}; run: streamer prepare --video FILE "
                            f"--name {name}") from None
        except json.JSONDecodeError:
            raise UserError(f"avatar {name!r} has a damaged meta.json; prepare it again") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"avatar {name!r} was prepared by another version; prepare it again")
        try:
            avatar = cls(path, meta, np.load(path / "boxes.npy"), np.load(path / "landmarks.npy"),
                         np.load(path / "crops.npy", mmap_mode="r"))
        except (OSError, ValueError) as e:
            raise damaged(name, type(e).__name__) from None
        if (path / "frames.npy").exists():
            try:
                raw = np.load(path / "frames.npy", mmap_mode="r")
            except (OSError, ValueError):
                raw = None
            want = (avatar.frames, avatar.size[1], avatar.size[0], 3)
            if isinstance(raw, np.ndarray) and raw.shape == want and raw.dtype == np.uint8:  # (not an .npz)
                avatar.raw = raw
                _read_ahead(path / "frames.npy")
            else:  # frames.mkv still holds every frame
                log.warning("avatar %s: frames.npy is damaged; decoding frames.mkv instead", name)
        if avatar.raw is None:
            _check_video(path / "frames.mkv", name)
        return avatar

    def read_frames(self, start: int = 0, count: int | None = None, ahead: int = 2 * GOP):
        """Full BGR frames in loop order from loop step `start`: yields (step, source index, frame).

        A thread decodes up to `ahead` frames in advance; stop by closing the generator.
        """
        return FrameReader(self, start, ahead).iterate(count)


def damaged(name: str, why: str) -> UserError:
    """The one line for an avatar whose files cannot be read (`prepare` of the same source rebuilds it)."""
    return UserError(f"avatar {name!r} is damaged ({why}); prepare it again")


def _check_video(path: Path, name: str) -> None:
    """A UserError unless `path`'s first frame decodes: a damaged avatar is told at load, not by every
    session that would show it."""
    import av

    try:
        with av.open(str(path)) as container:
            next(container.decode(container.streams.video[0]))
    except (av.FFmpegError, OSError, IndexError, StopIteration) as e:
        why = "no frame decodes" if isinstance(e, StopIteration) else getattr(e, "strerror", None) or type(e).__name__
        raise damaged(name, f"frames.mkv: {why}") from None


def _read_ahead(path: Path) -> None:
    """Ask the kernel to read the file into the page cache in the background: frames and crops cut
    from it later (some on an event loop) then do not wait for the disk."""
    if hasattr(os, "posix_fadvise"):
        try:
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint


class FrameReader:
    """Decodes frames.mkv in ping-pong order: forward groups, then backward group by group."""

    def __init__(self, avatar: Avatar, start: int, ahead: int):
        self.avatar = avatar
        self.start = start
        self._q: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()

    def _groups(self, start: int):
        """(step, first source index, last source index, forward?) per group, endlessly from `start`."""
        n = self.avatar.frames
        step = start
        while True:
            src = ping_pong(step, n)
            forward = n <= 1 or (step % (2 * n - 2)) < n - 1
            if forward:
                last = min(n - 1, (src // GOP + 1) * GOP - 1)
                yield step, src, last, True
                step += last - src + 1
            else:
                first = max(0, (src // GOP) * GOP)
                first = max(first, 1) if src > 0 else 0
                yield step, src, first, False
                step += src - first + 1

    def _decode(self, container, stream, lo: int, hi: int) -> dict[int, np.ndarray]:
        fps = self.avatar.fps
        target = int(lo / fps / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        out = {}
        for frame in container.decode(stream):
            idx = round(float(frame.pts * stream.time_base) * fps)
            if idx > hi:
                break
            if idx >= lo:
                out[idx] = frame.to_ndarray(format="bgr24")
            if idx == hi:
                break
        return out

    def _run(self, count: int | None) -> None:
        if self.avatar.raw is not None:
            self._run_raw(count)
            return
        import av

        try:
            with av.open(str(self.avatar.path / "frames.mkv")) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                produced = 0
                still = None
                for step, a, b, forward in self._groups(self.start):
                    lo, hi = (a, b) if forward else (b, a)
                    if self.avatar.frames == 1:  # a still avatar: decode its one frame once
                        still = still or self._decode(container, stream, 0, 0)
                        frames = still
                    else:
                        frames = self._decode(container, stream, lo, hi)
                    order = range(a, b + 1) if forward else range(a, b - 1, -1)
                    for i, src in enumerate(order):
                        if count is not None and produced >= count:
                            self._put(None)
                            return
                        frame = frames.get(src)
                        if frame is None:  # a damaged file: repeat the last good frame rather than stall
                            frame = frames[min(frames, key=lambda j: abs(j - src))] if frames else None
                        if frame is None:
                            raise damaged(self.avatar.name, f"frame {src} cannot be decoded")
                        if not self._put((step + i, src, frame)):
                            return
                        produced += 1
        except (av.FFmpegError, OSError) as e:  # a damaged or unreadable frames.mkv
            self._put(damaged(self.avatar.name, f"frames.mkv: {e.strerror or type(e).__name__}"))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)

    def _run_raw(self, count: int | None) -> None:
        """frames.npy: nothing to decode. Each frame is copied here, on the reader's thread, so a page
        not yet in memory is read from disk here and not by whoever shows the frame (an event loop)."""
        step = self.start
        try:
            while count is None or step - self.start < count:
                src = ping_pong(step, self.avatar.frames)
                frame = np.array(self.avatar.raw[src])
                frame.flags.writeable = False  # as the mapped file: no consumer may change an avatar frame
                if not self._put((step, src, frame)):
                    return
                step += 1
            self._put(None)
        except OSError as e:  # an I/O error reading it: handed to the consumer, which raises it
            self._put(damaged(self.avatar.name, f"frames.npy: {e.strerror or type(e).__name__}"))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def iterate(self, count: int | None):
        thread = threading.Thread(target=self._run, args=(count,), name=f"frames-{self.avatar.name}", daemon=True)
        thread.start()
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._stop.set()
            thread.join(timeout=5)


# preparing


@dataclass
class PrepareSettings:
    face_size: int = 96
    pads: tuple[int, int, int, int] = (0, 10, 0, 0)  # top, bottom, left, right, as the original
    smooth: int = 5  # frames in the box smoothing window
    max_height: int = 1080  # taller sources are scaled down
    raw_frames_mb: int = 2048  # frames.npy is kept when every frame decoded fits this (not in as_meta:
    # changing it adds or removes that file, nothing is rebuilt)

    def as_meta(self) -> dict:
        return {"face_size": self.face_size, "pads": list(self.pads), "smooth": self.smooth,
                "max_height": self.max_height}


def _open_video(path: Path):
    import av

    try:
        container = av.open(str(path), metadata_errors="replace")  # a damaged tag is no reason to fail
    except (av.FFmpegError, OSError) as e:
        raise UserError(f"{path} is not a readable video or image ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{path} has no video stream")
    if container.streams.video[0].codec_context is None:  # a damaged header may leave no codec
        container.close()
        raise UserError(f"{path} is not a readable video (no codec for its video stream)")
    return container


def _source_frames(path: Path, max_height: int):
    """(fps, frame count or None, iterator of BGR frames) of a video or an image."""
    import cv2

    def fit(img):
        h, w = img.shape[:2]
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
            raise UserError(f"{path} is {w}x{h}; sizes from {MIN_SIDE} to {MAX_SIDE} pixels are supported")
        if h > max_height:
            img = cv2.resize(img, (round(w * max_height / h), max_height), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        return img[: h - h % 2, : w - w % 2]  # even sizes, as H.264 in yuv420 needs

    if path.suffix.lower() in IMAGE_SUFFIXES:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"{path} is not a readable image")
        return 25.0, 1, iter([fit(img)])

    container = _open_video(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    if not 1 <= fps <= 120:
        fps = 25.0
    total = stream.frames or None

    def gen():
        import av

        n = 0
        try:
            for frame in container.decode(stream):
                n += 1
                if n > MAX_FRAMES:
                    raise UserError(f"{path} is longer than {MAX_FRAMES} frames; trim it")
                yield fit(frame.to_ndarray(format="bgr24"))
        except av.FFmpegError as e:
            if n == 0:
                raise UserError(f"{path} cannot be decoded ({type(e).__name__})") from None
            log.warning("%s: decoding stopped after %d frames (%s)", path.name, n, e)
        finally:
            container.close()

    return fps, total, gen()


def _fill_and_smooth(found: list, window: int, pads, size) -> tuple[np.ndarray, np.ndarray]:
    """Boxes for every frame: gaps take their neighbours' boxes (interpolated), then a centred mean."""
    n = len(found)
    have = [i for i, f in enumerate(found) if f is not None]
    boxes = np.zeros((n, 4), np.float64)
    marks = np.zeros((n, 5, 2), np.float64)
    for i in range(n):
        if found[i] is not None:
            boxes[i], marks[i] = found[i].box, found[i].landmarks
    for i in range(n):
        if found[i] is None:
            right = next((j for j in have if j > i), None)
            left = next((j for j in reversed(have) if j < i), None)
            if left is None or right is None:
                j = right if left is None else left
                boxes[i], marks[i] = boxes[j], marks[j]
            else:
                t = (i - left) / (right - left)
                boxes[i] = (1 - t) * boxes[left] + t * boxes[right]
                marks[i] = (1 - t) * marks[left] + t * marks[right]
    half = window // 2
    smooth = np.stack([boxes[max(0, i - half) : i + half + 1].mean(axis=0) for i in range(n)])
    top, bottom, left_pad, right_pad = pads
    w, h = size
    smooth += [-left_pad, -top, right_pad, bottom]
    smooth = np.round(smooth).astype(np.int32)
    smooth[:, [0, 2]] = np.clip(smooth[:, [0, 2]], 0, w)
    smooth[:, [1, 3]] = np.clip(smooth[:, [1, 3]], 0, h)
    return smooth, marks.astype(np.float32)


def crop(frame: np.ndarray, box, size: int) -> np.ndarray:
    import cv2

    x1, y1, x2, y2 = (int(v) for v in box)
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)


def prepare(source: str | Path, name: str, root: str | Path, settings: PrepareSettings | None = None,
            force: bool = False, progress: bool = True) -> Avatar:
    """Build (or reuse) the avatar `name` from a video or image. The folder appears complete or not at all."""
    import av
    from tqdm import tqdm

    from streamer.avatar.detect import FaceDetector

    settings = settings or PrepareSettings()
    source = Path(source)
    root = Path(root)
    target = avatar_dir(root, name)
    need_file(source, "source")
    if source.stat().st_size == 0:
        raise UserError(f"source {source} is empty")
    digest = sha256(source)
    if target.exists() and not force:
        try:
            meta = json.loads((target / "meta.json").read_text())
            if meta.get("format") == FORMAT and meta.get("source_sha256") == digest \
                    and meta.get("settings") == settings.as_meta():
                avatar = Avatar.load(root, name)
                log.info("avatar %s is up to date, reusing %s", name, target)
                return keep_frames(avatar, settings.raw_frames_mb, progress)
        except (OSError, json.JSONDecodeError):
            pass
        except UserError as e:  # damaged: what "prepare it again" asks for (the demo avatar has no --force)
            log.warning("%s: rebuilding", e)
        log.info("avatar %s: source or settings changed, rebuilding", name)

    tmp = root / f".{name}.building-{os.getpid()}"
    try:
        if not root.is_dir():
            log.info("making the avatars folder %s", root)
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write to the avatars folder {root} ({e.strerror or e})") from None
    try:
        fps, total, frames = _source_frames(source, settings.max_height)
        detector = FaceDetector()
        found = []
        width = height = None
        out = av.open(str(tmp / "frames.mkv"), "w", format="matroska")
        started = time.perf_counter()
        with tqdm(total=total, desc=f"prepare {name}: detect faces", unit="frame", disable=not progress) as bar:
            for frame in frames:
                if width is None:
                    height, width = frame.shape[:2]
                    rate = Fraction(fps).limit_denominator(1001)
                    vs = out.add_stream("libx264rgb", rate=rate)
                    vs.width, vs.height, vs.pix_fmt = width, height, "bgr24"
                    vs.options = {"qp": "0", "preset": "ultrafast", "g": str(GOP), "bf": "0"}
                elif frame.shape[:2] != (height, width):
                    raise UserError(f"{source}: frame size changes mid-video; re-encode it at one size")
                faces = detector.detect(frame)
                found.append(faces[0] if faces else None)
                vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
                vf.pts = len(found) - 1
                vf.time_base = 1 / rate
                for packet in vs.encode(vf):
                    out.mux(packet)
                bar.update()
            if width is None:
                raise UserError(f"{source} holds no frames")
            for packet in vs.encode():
                out.mux(packet)
        out.close()
        if all(f is None for f in found):
            raise UserError(f"no face found in {source}; use a video or photo with one clearly visible face")
        missing = sum(f is None for f in found)
        if missing:
            log.warning("avatar %s: no face in %d of %d frames; they take their neighbours' boxes",
                        name, missing, len(found))
        boxes, marks = _fill_and_smooth(found, settings.smooth, settings.pads, (width, height))
        if np.any(boxes[:, 2] - boxes[:, 0] < 8) or np.any(boxes[:, 3] - boxes[:, 1] < 8):
            raise UserError(f"the face in {source} is too small to animate")

        meta = {"format": FORMAT, "name": name, "kind": "image" if len(found) == 1 and total == 1 else "video",
                "source": source.name, "source_sha256": digest, "fps": fps, "width": width, "height": height,
                "frames": len(found), "detector": "retinaface-mobilenet0.25", "settings": settings.as_meta(),
                "seconds_to_prepare": round(time.perf_counter() - started, 2)}
        partial = Avatar(tmp, meta, boxes, marks, np.zeros((0,)))
        crops = np.zeros((len(found), settings.face_size, settings.face_size, 3), np.uint8)
        with tqdm(total=len(found), desc=f"prepare {name}: face crops", unit="frame", disable=not progress) as bar:
            for _, src, frame in partial.read_frames(0, count=len(found)):
                crops[src] = crop(frame, boxes[src], settings.face_size)
                bar.update()
        np.save(tmp / "boxes.npy", boxes)
        np.save(tmp / "landmarks.npy", marks)
        np.save(tmp / "crops.npy", crops)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if target.exists():
            old = root / f".{name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return keep_frames(Avatar.load(root, name), settings.raw_frames_mb, progress)


def keep_frames(avatar: Avatar, limit_mb: int, progress: bool = False) -> Avatar:
    """The avatar with frames.npy exactly when every frame decoded fits `limit_mb` (a still avatar:
    never; it is decoded once anyway): written from frames.mkv, so they are the frames a reader of
    that gets, or removed. A folder that cannot be written to is used as it is."""
    from tqdm import tqdm

    path = avatar.path / "frames.npy"
    w, h = avatar.size
    size = avatar.frames * w * h * 3
    if avatar.frames < 2 or size > limit_mb * 1e6:
        path.unlink(missing_ok=True)
        avatar.raw = None
        return avatar
    if avatar.raw is not None:
        return avatar
    log.info("avatar %s: keeping its %d frames decoded (%.0f MB, once)", avatar.name, avatar.frames, size / 1e6)
    tmp = path.with_name(f".frames.npy.{os.getpid()}.tmp")
    try:
        raw = np.lib.format.open_memmap(tmp, "w+", np.uint8, (avatar.frames, h, w, 3))
        with tqdm(total=avatar.frames, desc=f"avatar {avatar.name}: decoded frames", unit="frame",
                  disable=not progress) as bar:
            for _, src, frame in avatar.read_frames(0, count=avatar.frames):
                raw[src] = frame
                bar.update()
        raw.flush()
        del raw
        os.replace(tmp, path)
    except OSError as e:
        log.warning("avatar %s: cannot keep its decoded frames (%s); they are decoded while serving",
                    avatar.name, e.strerror or e)
        return avatar
    finally:
        tmp.unlink(missing_ok=True)
    return Avatar.load(avatar.path.parent, avatar.path.name)


def demo_avatar(root: str | Path, progress: bool = False) -> Avatar:
    """The bundled astronaut portrait, prepared on first use."""
    return prepare(DEMO_IMAGE, DEMO_NAME, root, progress=progress)
