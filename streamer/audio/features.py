"""An engine's audio features per video frame, offline and streaming, behind one small interface.

Every engine says what it hears through its `features` object:
  shape        one frame's window, e.g. (80, 16) for Wav2Lip's mel
  lookahead_s  audio needed past a frame's start before its window is complete (live delay floor)
  compute_s    time from that audio's arrival to the window (measured; the auto delay adds it)
  offline(audio16, frames) -> (frames, *shape) float32
  for_clip(audio16, frames)  `offline`'s windows, indexable by frame lists (render asks in rising
               order); may make them as asked rather than hold them all
  stream()     an object with push(audio16) -> [(i, window)] and flush(), equal to `offline` for any
               chunking of the same audio; where a push returns every window its audio completes, the
               stream may say when: `samples_for(i)`, the samples pushed when window i comes out (a live
               channel then pushes once per frame, not per packet)
"""

from __future__ import annotations

import numpy as np

from streamer.audio.mel import LOOKAHEAD_S, MelStream, mel_windows, melspectrogram


class MelFeatures:
    """Wav2Lip's 80x16 mel windows (also what the builtin engine reads its mouth opening from)."""

    shape = (80, 16)
    lookahead_s = LOOKAHEAD_S
    compute_s = 0.0  # a mel window is microseconds of work, done as the packet arrives

    def __init__(self, fps: float = 25):
        self.fps = fps

    def offline(self, audio16: np.ndarray, frames: int) -> np.ndarray:
        windows = mel_windows(melspectrogram(audio16), self.fps)
        if not len(windows):
            return np.full((frames, *self.shape), -4, np.float32)  # silence
        if len(windows) < frames:  # the original rule stops ~0.1 s short of the audio's end
            windows = np.concatenate([windows, np.repeat(windows[-1:], frames - len(windows), axis=0)])
        return windows[:frames]

    for_clip = offline  # 5 KB a frame: held whole

    def stream(self) -> MelStream:
        return MelStream(self.fps)
