"""VP8 for rendered frames: aiortc's encoder with its settings, tuned for pictures that do not change.

aiortc tunes libvpx for cameras. An avatar's frames are rendered, clean, and mostly unchanged between
frames (a still portrait: all but the mouth, and all of it in silence). Three settings differ, each
measured on the team's CPU with 512x512 demo frames (BENCHMARKS.md):
- `noise-sensitivity 0`: aiortc's 4 runs a temporal denoiser over every frame, a fifth of the
  encoder's time, and there is no noise to remove;
- `static-thresh 400`: a macroblock is not coded again when its prediction's luma is within a squared
  error of 400 of the source (46 dB for that block; at low bitrates the quantiser's own bound is
  larger) and its chroma within 200. aiortc's 1 skips next to nothing: CBR then spends the bitrate refining
  the same still picture every frame. A channel's frames at 900 kb/s: 1,807 -> 467 bytes and 0.86 ->
  0.27 ms a frame, 0.2 dB apart;
- `cpu-used -8` (aiortc: -6): 10% less time on frames that change everywhere (a video avatar), same
  quality.
Every keyframe is a new encoder's first (broadcast.py says why), and that comes out as aiortc's, bit
for bit. aiortc has no setting for these, so the senders of this process get an encoder that opens
libvpx itself. `install()` is idempotent; if aiortc's encoder no longer has the shape this relies on,
it leaves aiortc's own in place."""

from __future__ import annotations

import logging
import multiprocessing

import av
from aiortc import rtcrtpsender
from aiortc.codecs import vpx

log = logging.getLogger(__name__)


class RenderedVp8Encoder(vpx.Vp8Encoder):
    """aiortc's Vp8Encoder; the libvpx context is opened here (`open_encoder`) before aiortc's `encode`
    would open its own (it keeps a context whose size and bitrate still match)."""

    reported = False  # its receiver has said what it can take (REMB); aiortc starts from a guess

    @property
    def target_bitrate(self) -> int:
        return vpx.Vp8Encoder.target_bitrate.fget(self)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        vpx.Vp8Encoder.target_bitrate.fset(self, bitrate)
        self.reported = True

    def encode(self, frame: av.VideoFrame, force_keyframe: bool = False):
        rate = self.target_bitrate
        c = self.codec
        if force_keyframe or not fits(c, frame) or abs(rate - c.bit_rate) / c.bit_rate > 0.1:
            self.codec = open_encoder(frame.width, frame.height, rate)  # a keyframe (why new: broadcast.py)
        return super().encode(frame, False)


def fits(c: av.CodecContext | None, frame: av.VideoFrame) -> bool:
    """Whether encoder `c` is open and of `frame`'s size."""
    return c is not None and c.width == frame.width and c.height == frame.height


def open_encoder(width: int, height: int, rate: int) -> av.CodecContext:
    c = av.CodecContext.create("libvpx", "w")
    c.width, c.height, c.bit_rate, c.pix_fmt = width, height, rate, "yuv420p"
    c.gop_size, c.qmin, c.qmax = 3000, 2, 56
    c.options = {
        "bufsize": str(rate), "deadline": "realtime", "lag-in-frames": "0",
        "minrate": str(rate), "maxrate": str(rate),  # CBR, as aiortc's
        "noise-sensitivity": "0", "static-thresh": "400", "cpu-used": "-8",  # the differences (above)
        "overshoot-pct": "15", "partitions": "0", "undershoot-pct": "100",
    }
    c.thread_count = vpx.number_of_threads(width * height, multiprocessing.cpu_count())
    return c


def _get_encoder(codec):
    encoder = _aiortc_get_encoder(codec)
    return RenderedVp8Encoder() if type(encoder) is vpx.Vp8Encoder else encoder


_aiortc_get_encoder = rtcrtpsender.get_encoder


def install() -> bool:
    """Have this process's WebRTC senders encode VP8 with `RenderedVp8Encoder`. False where aiortc's
    encoder is not as expected (then aiortc's own is used, denoiser and all)."""
    if rtcrtpsender.get_encoder is _get_encoder:
        return True
    probe = vpx.Vp8Encoder()
    if not (hasattr(probe, "codec") and hasattr(probe, "target_bitrate") and hasattr(vpx, "number_of_threads")):
        log.warning("aiortc's VP8 encoder has changed: its denoiser stays on")
        return False
    rtcrtpsender.get_encoder = _get_encoder
    return True
