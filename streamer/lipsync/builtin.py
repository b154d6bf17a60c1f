"""The builtin engine: a weights-free mouth animation, so a fresh install demos end to end.

It is not neural lip-sync: the mouth opens with the speech-band energy of the mel window at the
frame's time (jaw dropped by a smooth warp, a dark mouth opening drawn between the lips). Same
interface as Wav2LipInfer; deterministic; well under 5 ms a frame on a CPU.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from streamer.audio.features import MelFeatures
from streamer.audio.mel import FMAX, FMIN, N_MELS, _hz_to_mel
from streamer.lipsync.engine import check_inputs, predict_crops, to_images

MOUTH = (0.5, 0.64)  # mouth centre in crop coordinates (x, y) when the avatar's landmarks are not given


@functools.cache
def _speech_bands() -> slice:
    """Mel bins of 300-3000 Hz, where voiced speech carries its energy."""
    edges = np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2)[1:-1]
    lo, hi = np.searchsorted(edges, _hz_to_mel(300.0)), np.searchsorted(edges, _hz_to_mel(3000.0))
    return slice(int(lo), int(hi))


def mouth_opening(mel: np.ndarray) -> np.ndarray:
    """(B, 1, 80, 16) windows -> (B,) opening in [0, 1] from the first 50 ms of each window."""
    level = mel[:, 0, _speech_bands(), :4].mean(axis=(1, 2))  # normalised dB, -4 (silence) .. 4
    return np.clip((level + 1.6) / 2.4, 0.0, 1.0)


class BuiltinEngine:
    backend = "builtin"
    device = "cpu"
    dtype = "fp32"
    features = MelFeatures()

    def __init__(self, face_size: int = 96, mouth: tuple[float, float] = MOUTH):
        self.face_size = face_size
        self.mouth = mouth
        s = face_size
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
        self._xs, self._ys = xs, ys
        cx, cy = mouth[0] * s, mouth[1] * s
        # Jaw region: below the upper lip, within the lower face, falling off smoothly sideways.
        side = np.exp(-(((xs - cx) / (0.26 * s)) ** 2))
        below = np.clip((ys - (cy - 0.03 * s)) / (0.05 * s), 0, 1)
        fade = np.clip((0.97 * s - ys) / (0.2 * s), 0, 1)
        self._jaw = (side * below * fade).astype(np.float32)
        moved = np.flatnonzero(self._jaw.any(axis=1))
        # the rows the warp moves; it keeps the others (none: a mouth at the crop's bottom edge)
        self._rows = slice(int(moved[0]), int(moved[-1]) + 1) if moved.size else slice(0, 0)
        self._cx, self._cy = cx, cy
        self._blur = 0.008 * s + 0.4
        # OpenCV's kernel for a float image: round(8 sigma + 1), odd; beyond its radius the blur of zeros is 0
        self._reach = (int(round(8 * self._blur + 1)) | 1) // 2 + 1

    @property
    def name(self) -> str:
        return f"builtin (not neural; {self.face_size}px)"

    def predict(self, mel: np.ndarray, faces: np.ndarray) -> np.ndarray:
        s = self.face_size
        check_inputs(mel, faces, s)
        out = np.empty((mel.shape[0], 3, s, s), np.float32)
        for b, opening in enumerate(mouth_opening(mel)):
            ref = np.ascontiguousarray(faces[b, 3:].transpose(1, 2, 0))
            out[b] = self._animate(ref, float(opening)).transpose(2, 0, 1)
        return out

    def predict_crops(self, windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """As `predict` of `face_input(crops)`, to images, crop by crop: its float tensors and transposes
        were most of a frame's time."""
        s = self.face_size
        if windows.ndim != 3 or windows.shape[1:] != (80, 16) or crops.shape != (len(windows), s, s, 3):
            return predict_crops(self, windows, crops)  # (its checks say what is wrong)
        out = np.empty_like(crops)
        for b, opening in enumerate(mouth_opening(windows[:, None])):
            if opening <= 0.02:  # unmoved: the crop itself (its round trip through float is exact)
                out[b] = crops[b]
                continue
            face = self._animate(crops[b].astype(np.float32) * (1 / 255), float(opening))
            out[b] = to_images(face.transpose(2, 0, 1)[None])[0]
        return out

    def warmup(self, batch_sizes=(1,)) -> float:
        return 0.0

    def _animate(self, face: np.ndarray, opening: float) -> np.ndarray:
        if opening <= 0.02:
            return face
        s = self.face_size
        drop = opening * 0.07 * s  # jaw drop in pixels
        rows = self._rows
        img = face.copy()
        if rows.stop > rows.start:
            img[rows] = cv2.remap(face, self._xs[rows], self._ys[rows] - drop * self._jaw[rows], cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
        # the opening between the lips: a dark ellipse, feathered, growing with the drop; drawn, blurred
        # and mixed in only where it reaches (beyond that its mask is 0 and the image stays as it is)
        axes = (max(1, round(0.12 * s * (0.75 + 0.25 * opening))), max(1, round(drop * 0.75)))
        centre = (round(self._cx), round(self._cy + drop * 0.5))
        r = self._reach
        x1, y1 = max(0, centre[0] - axes[0] - r), max(0, centre[1] - axes[1] - r)
        x2, y2 = min(s, centre[0] + axes[0] + r + 1), min(s, centre[1] + axes[1] + r + 1)
        if x2 <= x1 or y2 <= y1:
            return img
        mask = np.zeros((y2 - y1, x2 - x1), np.float32)
        cv2.ellipse(mask, (centre[0] - x1, centre[1] - y1), axes, 0, 0, 360, 0.92, thickness=-1)
        mask = cv2.GaussianBlur(mask, (0, 0), self._blur)[..., None]
        cavity = np.array([0.05, 0.04, 0.12], np.float32)  # BGR, dark red
        part = img[y1:y2, x1:x2]
        part[...] = part * (1 - mask) + cavity * mask
        return img
