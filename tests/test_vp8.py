"""The server's VP8 encoder: aiortc's, denoiser off, through aiortc's own sender lookup and decoder."""

import numpy as np
from aiortc import rtcrtpsender
from aiortc.codecs import get_decoder, vpx
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from streamer.live import vp8
from streamer.live.tracks import encoder_frame

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def test_senders_get_the_rendered_frames_encoder_and_its_frames_decode():
    assert vp8.install() and vp8.install()  # idempotent
    encoder = rtcrtpsender.get_encoder(VP8)
    assert type(encoder) is vp8.RenderedVp8Encoder
    assert type(rtcrtpsender.get_encoder(OPUS)) is not vp8.RenderedVp8Encoder
    decoder = get_decoder(VP8)
    image = np.zeros((256, 320, 3), np.uint8)
    image[64:192, 80:240] = (40, 160, 220)
    for i in range(3):
        if i == 2:
            encoder.target_bitrate = 2 * encoder.target_bitrate  # aiortc's bandwidth estimate moved
        frame = encoder_frame(image)
        frame.pts, frame.time_base = i * 3600, vpx.VIDEO_TIME_BASE
        payloads, timestamp = encoder.encode(frame, force_keyframe=i == 0)
        data = b"".join(vpx.vp8_depayload(p) for p in payloads)
        (out,) = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        got = out.to_ndarray(format="bgr24")
        assert got.shape == image.shape
        assert np.abs(got.astype(int) - image).mean() < 3
    assert encoder.codec.bit_rate == encoder.target_bitrate  # re-opened at the new rate, still ours


def encoded(encoder, frames):
    out = []
    for i, image in enumerate(frames):
        frame = encoder_frame(image)
        frame.pts, frame.time_base = i * 3600, vpx.VIDEO_TIME_BASE
        payloads, _ = encoder.encode(frame)
        out.append(b"".join(vpx.vp8_depayload(p) for p in payloads))
    return out


def test_the_denoiser_is_off_and_nothing_else_changes():
    """The first frame (a key frame: the temporal denoiser has nothing to work from yet) comes out the
    same as from aiortc's encoder, bit for bit: the other settings are aiortc's. The frames after it
    differ: aiortc's are denoised first."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (128, 160, 3)).astype(np.int16)
    noisy = [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    ours, theirs = encoded(vp8.RenderedVp8Encoder(), noisy), encoded(vpx.Vp8Encoder(), noisy)
    assert ours[0] == theirs[0]
    assert all(a != b for a, b in zip(ours[1:], theirs[1:]))
