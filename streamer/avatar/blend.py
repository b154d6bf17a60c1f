"""Putting a predicted face back into its frame without seams.

The original pastes the whole resized prediction as a hard rectangle. Here only the lower face
changes, through a mask that is 1 around the mouth and jaw and falls smoothly to exactly 0 well
inside the box, so no box edge can show; pixels where the mask is 0 are the source's, bit for bit.
The prediction's colour is matched to the source on the upper face, which the model only copies.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np


@functools.cache
def lower_face_mask(size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1], in crop coordinates: the mouth, chin and cheeks."""
    mask = np.zeros((size, size), np.float32)
    # below the nose (~0.55 of the crop) to the chin; wide enough for the mouth corners (0.25-0.7)
    centre = (round(size * 0.5), round(size * 0.73))
    axes = (round(size * 0.34), round(size * 0.18))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, thickness=-1)
    sigma = size * 0.05
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    margin = max(2, round(size * 0.04))
    inner = np.zeros_like(mask)
    inner[margin:-margin, margin:-margin] = 1
    return mask * inner  # exactly 0 near the crop border


def color_match(pred: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """Shift the prediction's colour so its upper face agrees with the source crop's."""
    top = slice(crop.shape[0] // 8, crop.shape[0] // 2)
    # cv2.mean: the exact means (a numpy mean over the pixels' axis took ~8x as long, per live frame)
    source, predicted = cv2.mean(crop[top]), cv2.mean(pred[top])
    shifted = pred.astype(np.float32)
    # rounded to the nearest level (truncating, as this did until 2026-11, took half a level off on average)
    shifted += np.array([source[c] - predicted[c] + 0.5 for c in range(3)], np.float32)
    return np.minimum(np.maximum(shifted, 0, out=shifted), 255, out=shifted).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _mask_in_box(size: int, w: int, h: int) -> tuple[np.ndarray, slice, slice] | None:
    """`lower_face_mask` resized to a w x h box: the rows and columns it reaches, and its values there
    (None: it reaches none). A still avatar's box keeps its size; a video's may change every frame."""
    mask = cv2.resize(lower_face_mask(size), (w, h), interpolation=cv2.INTER_LINEAR)
    rows, cols = np.flatnonzero(mask.max(axis=1) > 0), np.flatnonzero(mask.max(axis=0) > 0)
    if rows.size == 0:
        return None
    sy, sx = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    reach = mask[sy, sx].copy()
    reach.flags.writeable = False  # shared by every frame of that box size
    return reach, sy, sx


DETAIL_FROM = 1.25  # box this much larger than the prediction: it lacks detail the source has
# How much the prediction changed the face, in levels at its own resolution: below the first, it only
# re-rendered it (a model's reconstruction differs by 5-10 levels where nothing moved) and the
# source's detail is kept whole; from the second on (an opening mouth), the prediction's pixels win.
DETAIL_KEPT, DETAIL_GONE = 12.0, 40.0


def blend(frame: np.ndarray, box, pred: np.ndarray, strength: float = 1.0, match_color: bool = True,
          crop: np.ndarray | None = None, detail: bool = True) -> np.ndarray:
    """A copy of `frame` with the predicted face `pred` (S, S, 3 uint8) blended into `box`.

    strength in [0, 1] scales the mask: 0 gives the source frame, used to fade in and out of speech.
    detail: where the box is larger than the prediction, keep the source's fine detail wherever the
    prediction left the face as it was. A model's 96 or 256 px face blown up to a close-up is soft:
    skin, stubble and lip texture go all over the lower face, though the model only meant to move the
    mouth. What the source holds beyond the prediction's resolution is added back, weighted down where
    the prediction changed the face at its own resolution (an opening mouth has no source detail).
    """
    out = frame.copy()
    if strength <= 0:
        return out
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if w < 4 or h < 4:
        return out
    if match_color and crop is not None:
        pred = color_match(pred, crop)
    size = pred.shape[0]
    region = out[y1:y2, x1:x2]
    reach = _mask_in_box(size, w, h)
    if reach is None:
        return out
    mask, sy, sx = reach  # only where the mask reaches: `mask` is that part
    part = region[sy, sx]
    src = part.astype(np.float32)
    big = cv2.resize(pred, (w, h), interpolation=cv2.INTER_LINEAR)[sy, sx].astype(np.float32)
    if detail and w >= DETAIL_FROM * size:
        small = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)  # the source as the model sees it
        low = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)[sy, sx].astype(np.float32)
        change = cv2.GaussianBlur(np.abs(pred.astype(np.float32) - small).mean(axis=2), (0, 0), 1.0)
        keep = np.clip((DETAIL_GONE - change) * (1 / (DETAIL_GONE - DETAIL_KEPT)), 0, 1)
        keep = cv2.resize(keep, (w, h), interpolation=cv2.INTER_LINEAR)
        big += (src - low) * keep[sy, sx, None]
    # src + m (big - src), rounded, in place; where m is 0 that is src exactly, so the source's pixels stay
    big -= src
    big *= (mask * np.float32(strength))[..., None]
    big += src
    big += np.float32(0.5)
    part[...] = np.minimum(np.maximum(big, 0, out=big), 255, out=big).astype(np.uint8)
    return out
