"""A video frame's mouth, the same live and offline: how strongly it shows (fading into and out of
speech), which avatar frame it goes into, the face crop inference sees, and the blend.

Output is always at Wav2Lip's 25 fps (its mel windows are cut for 25 frames a second); an avatar
recorded at another rate is played at its own speed by picking its frames by time.
"""

from __future__ import annotations

import numpy as np

from streamer.avatar.blend import blend
from streamer.avatar.cache import Avatar, crop, ping_pong

FPS = 25
FADE_FRAMES = 2  # frames over which the mouth fades into and out of speech


def fade_strength(decisions, fade: int = FADE_FRAMES) -> float:
    """Mouth strength of the frame at the centre of `decisions` (speech yes/no for frames i-fade .. i+fade):
    1 in speech, else 1 - d/(fade+1) for the nearest speech frame d away, 0 beyond `fade`."""
    best = 0.0
    for k, speech in enumerate(decisions):
        if speech:
            best = max(best, 1 - abs(k - fade) / (fade + 1))
    return best


def speech_strength(speech: np.ndarray, fade: int = FADE_FRAMES) -> np.ndarray:
    """Per-frame strengths of a whole clip's decisions (what `fade_strength` gives frame by frame)."""
    padded = np.concatenate([np.zeros(fade, bool), np.asarray(speech, bool), np.zeros(fade, bool)])
    return np.array([fade_strength(padded[i : i + 2 * fade + 1], fade) for i in range(len(speech))], np.float32)


def loop_step(step: int, avatar: Avatar) -> int:
    """The avatar's own loop step shown at output frame `step` (the same step for a 25 fps avatar)."""
    return step if avatar.fps == FPS else int(step * avatar.fps / FPS + 1e-6)


def source_frame(step: int, avatar: Avatar) -> int:
    """The avatar frame (index into its frames, boxes and crops) shown at output frame `step`."""
    return ping_pong(loop_step(step, avatar), avatar.frames)


def face_crop(avatar: Avatar, src: int, frame: np.ndarray | None, size: int) -> np.ndarray | None:
    """The face crop inference needs: the avatar's cached one when it has the engine's size, else cut
    from the frame: the decoded one given, or its frames.npy row (any frame, however far ahead of the
    decoder: a long delay needs crops long before their frames), else None (not decoded yet)."""
    if avatar.crops.shape[1] == size:
        return np.asarray(avatar.crops[src])
    if frame is None and avatar.raw is not None:
        frame = avatar.raw[src]
    return None if frame is None else crop(frame, avatar.boxes[src], size)


def with_mouth(frame: np.ndarray, avatar: Avatar, src: int, mouth: np.ndarray, strength: float,
               face: np.ndarray | None) -> np.ndarray:
    """The frame with the predicted mouth blended in at `strength`."""
    return blend(frame, avatar.boxes[src], mouth, strength=strength, crop=face)
