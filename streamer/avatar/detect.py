"""Face boxes and five landmarks with RetinaFace (MobileNet-0.25), on our own onnxruntime session."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL = Path(__file__).parent / "data" / "retinaface_mobilenet025.onnx"
MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE = (0.1, 0.2)


@dataclass(slots=True)
class Face:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in pixels
    score: float
    landmarks: np.ndarray  # (5, 2): right eye, left eye, nose, mouth right, mouth left (image x, y)


@functools.cache
def _priors(height: int, width: int) -> np.ndarray:
    """(K, 4) anchor centres and sizes, normalised, in the order the network emits them."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        ny, nx = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        cx = (xs.reshape(-1, 1) + 0.5) * stride / width
        cy = (ys.reshape(-1, 1) + 0.5) * stride / height
        for_sizes = [np.hstack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)]) for s in sizes]
        out.append(np.stack(for_sizes, axis=1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = scores.argsort()[::-1]
    keep = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        iou = inter / (area[i] + area[order[1:]] - inter + 1e-9)
        order = order[1:][iou <= threshold]
    return keep


class FaceDetector:
    """detect(image) -> faces, best first. Images are scaled so the long side is at most `max_side`."""

    def __init__(self, max_side: int = 640, threshold: float = 0.8):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
        self.max_side = max_side
        self.threshold = threshold
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) \
            if scale < 1 else image
        sh, sw = small.shape[:2]
        x = (small.astype(np.float32) - MEAN_BGR).transpose(2, 0, 1)[None]
        with self._lock:
            loc, conf, landms = self._sess.run(None, {"input": x})
        priors = _priors(sh, sw)
        scores = conf[0, :, 1]
        idx = np.nonzero(scores > self.threshold)[0]
        if idx.size == 0:
            return []
        p, loc, landms, scores = priors[idx], loc[0, idx], landms[0, idx], scores[idx]
        centre = p[:, :2] + loc[:, :2] * VARIANCE[0] * p[:, 2:]
        size = p[:, 2:] * np.exp(loc[:, 2:] * VARIANCE[1])
        boxes = np.hstack([centre - size / 2, centre + size / 2]) * [sw, sh, sw, sh] / scale
        points = (p[:, None, :2] + landms.reshape(-1, 5, 2) * VARIANCE[0] * p[:, None, 2:]) * [sw, sh] / scale
        return [Face(boxes[i].astype(np.float32), float(scores[i]), points[i].astype(np.float32))
                for i in _nms(boxes, scores, 0.4)]
