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


def test_keyframes_are_aiortcs_and_later_frames_are_not_denoised():
    """The first frame (a key frame: the temporal denoiser has nothing to work from yet) comes out the
    same as from aiortc's encoder, bit for bit. The frames after it differ from those of the same
    encoder with aiortc's denoiser turned back on: ours are not denoised."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (128, 160, 3)).astype(np.int16)
    noisy = [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    ours, theirs = encoded(vp8.RenderedVp8Encoder(), noisy), encoded(vpx.Vp8Encoder(), noisy)
    assert ours[0] == theirs[0]
    denoising = vp8.RenderedVp8Encoder()
    denoising.codec = vp8.open_encoder(160, 128, denoising.target_bitrate)
    denoising.codec.options = {**denoising.codec.options, "noise-sensitivity": "4"}  # (before it opens)
    denoised = encoded(denoising, noisy)
    assert denoised[0] == ours[0]
    assert all(a != b for a, b in zip(ours[1:], denoised[1:]))


def test_a_keyframe_asked_for_is_not_followed_by_a_burst(tmp_path):
    """A viewer joining or a receiver that lost a picture asks for a keyframe in the middle of a
    stream. Forced on the running encoder, the frame after it coded the whole picture again (~80 KB
    at 400 kb/s, 1.6 s of the bitrate in one burst of packets); from a new encoder the frames after
    the keyframe stay small, in the channel's chain and in aiortc's own senders alike."""
    from streamer.live import broadcast

    image = demo_picture(tmp_path)
    chain = broadcast.VideoChain(None)  # (its encoder only: no channel needed)
    sender = vp8.RenderedVp8Encoder()
    sender.target_bitrate = 400_000
    for name, encode in (("chain", lambda f, key: chain._encode(f, key, 400_000, 0.0)),
                         ("sender", lambda f, key: b"".join(vpx.vp8_depayload(p) for p in sender.encode(f, key)[0]))):
        sizes = []
        for i in range(100):
            frame = encoder_frame(image)
            frame.pts, frame.time_base = i * 3600, vpx.VIDEO_TIME_BASE
            data = encode(frame, i == 60)
            sizes.append((len(data), not data[0] & 1))
        assert sizes[60][1] and sizes[0][1], name  # keyframes where asked for, and at the start
        assert [k for _, k in sizes].count(True) == 2, name
        assert max(n for n, _ in sizes[61:]) < sizes[60][0], name  # nothing after it as large as it


def test_a_channel_encodes_once_and_every_reader_decodes_its_whole_stream(tmp_path):
    """A channel's VP8 chain read by three viewers: one from the start, one joining late, one that
    stalls 1.5 s (longer than the chain keeps). Each decodes every packet it got, in order, with a
    real VP8 decoder: each starts at a keyframe, the stalled one starts again at a new keyframe with a
    current frame (not a second of stale ones), no reader ever gets a frame it can't decode, and
    the channel encoded each frame once. After the last reader stops, the chain stops."""
    import asyncio

    import av

    from streamer.avatar.cache import demo_avatar
    from streamer.lipsync.builtin import BuiltinEngine
    from streamer.live import broadcast
    from streamer.live.channel import FPS, Channel
    from streamer.live.worker import InferenceWorker

    worker = InferenceWorker(BuiltinEngine())
    ch = Channel("c", demo_avatar(tmp_path), worker)
    ch.viewers = 3

    async def read(track, seconds, stall_at=None):
        got, t0 = [], ch.clock()
        while ch.clock() - t0 < seconds:
            packet = await track.recv()
            got.append((ch.clock(), round(float(packet.pts * packet.time_base) * FPS), bytes(packet)))
            if stall_at is not None and len(got) == stall_at:
                await asyncio.sleep(1.5)  # its sender stuck: the chain moves on without it
        track.stop()
        return got

    async def main():
        first, stalled = broadcast.SharedVideoTrack(ch, None), broadcast.SharedVideoTrack(ch, None)
        jobs = [read(first, 4.0), read(stalled, 4.0, stall_at=20)]
        late = broadcast.SharedVideoTrack(ch, None)

        async def join_late():
            await asyncio.sleep(1.6)  # during the stall: its keyframe is still kept when the stall ends
            return await read(late, 2.0)

        out = await asyncio.gather(*jobs, join_late())
        chain = late.chain  # the channel's one chain, which every track of it reads
        await asyncio.sleep(0.1)
        return out, chain

    try:
        (first, stalled, late), chain = asyncio.run(main())
    finally:
        ch.close()
        worker.close()
    assert chain._task is None and chain._codec is None  # stopped with its last reader

    def decoded(got):
        decoder = av.CodecContext.create("vp8", "r")
        frames = [f for _, _, data in got for f in decoder.decode(av.Packet(data))]
        return len(frames)

    for got in (first, stalled, late):
        assert not got[0][2][0] & 1  # starts with a keyframe
        assert decoded(got) == len(got)  # every packet decodes
        steps = [s for _, s, _ in got]
        assert steps == sorted(set(steps))  # in order, none twice
    assert 95 <= len(first) <= 103 and len(first) >= 0.95 * (first[-1][1] - first[0][1] + 1)  # ~25 fps, whole
    gap = next(k for k in range(1, len(stalled)) if stalled[k][0] - stalled[k - 1][0] > 1.0)
    assert not stalled[gap][2][0] & 1  # after its stall: a keyframe ...
    assert stalled[gap][0] - stalled[gap - 1][0] < 1.8  # ... within a few frames
    now_step = (stalled[gap][0] - ch.start) * FPS
    assert abs(stalled[gap][1] - now_step) <= 8  # of the present, not a second ago
    assert 0.95 * ch.sent <= ch.encoded <= ch.sent  # one encode per frame for the three of them


def demo_picture(tmp_path):
    from streamer.avatar.cache import demo_avatar
    from streamer.live.frames import FrameStore

    return FrameStore(demo_avatar(tmp_path)).first


def test_a_still_picture_is_not_coded_again_every_frame(tmp_path):
    """An avatar in silence sends the same picture 25 times a second. Once it is as sharp as the
    bitrate makes it (the first ~2 s), the encoder codes again only the blocks that differ from it
    visibly: a few hundred bytes a frame at a receiver's 1 Mb/s, not the ~1.4 KB it spent refining the
    same picture every frame with aiortc's settings, and what the viewer sees stays as close to it."""
    import av

    image = demo_picture(tmp_path)
    source = encoder_frame(image).to_ndarray()[: image.shape[0]]  # the luma the encoder gets
    c, decoder = vp8.open_encoder(image.shape[1], image.shape[0], 1_000_000), av.CodecContext.create("vp8", "r")
    sizes, psnr = [], []
    for i in range(100):
        frame = encoder_frame(image)
        frame.pts, frame.time_base = i * 3600, vpx.VIDEO_TIME_BASE
        packets = list(c.encode(frame))
        sizes.append(sum(p.size for p in packets))
        for out in (f for p in packets for f in decoder.decode(p)):
            error = np.mean((out.to_ndarray()[: image.shape[0]].astype(float) - source) ** 2)
            psnr.append(10 * np.log10(255**2 / error))
    assert len(psnr) == 100
    assert np.median(sizes[50:]) < 500
    assert min(psnr[50:]) >= 44  # dB on the luma: no visible loss


def test_the_bitrate_goes_up_only_for_frames_that_need_it(tmp_path):
    """A receiver's estimate rising re-opens the encoder (a keyframe and a second of refining) only
    when the frames use at least half the bitrate they have: never for a still picture, yes for a
    picture that changes everywhere. Going down is never held back."""
    from streamer.live import broadcast
    from streamer.live.channel import FPS

    still = demo_picture(tmp_path)
    rng = np.random.default_rng(0)
    for name, picture in (("still", lambda: still), ("noise", lambda: rng.integers(0, 256, still.shape, np.uint8))):
        chain = broadcast.VideoChain(None)  # (its encoder only: no channel needed)
        opened = []
        for i in range(8 * FPS):
            frame = encoder_frame(picture())
            frame.pts, frame.time_base = i * 3600, vpx.VIDEO_TIME_BASE
            rate = 400_000 if i < FPS else 1_200_000  # the receiver's estimate rises after 1 s
            if name == "still" and i >= 7 * FPS:
                rate = 300_000  # ... and falls
            before = chain._codec
            chain._encode(frame, False, rate, i / FPS)
            if chain._codec is not before:
                opened.append((i, chain._codec.bit_rate))
        if name == "still":
            assert opened == [(0, 400_000), (7 * FPS, 300_000)]
        else:
            assert opened == [(0, 400_000), (broadcast.RAISE_S * FPS, 1_200_000)]


def test_i420_frames_convert_what_changed_and_equal_a_whole_conversion():
    """A still avatar's frame is converted once and a mouth only in its box (rounded out to whole
    chroma samples): the same planes as converting the whole picture, boxes at odd places and at the
    edges included. A video avatar (a new frame every time) and frames without an avatar frame are
    converted whole."""
    from streamer.live.tracks import I420Frames

    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (96, 128, 3), np.uint8)
    yuv = I420Frames()

    def planes(frame):
        return [np.frombuffer(p, np.uint8).copy() for p in frame.planes]

    assert all(np.array_equal(a, b) for a, b in zip(planes(yuv.frame(base, base)), planes(encoder_frame(base))))
    for box in [(31, 17, 77, 60), (0, 0, 5, 3), (120, 90, 128, 96), (-3, -1, 9, 7), (1, 1, 127, 95)]:
        x1, y1, x2, y2 = box
        image = base.copy()
        image[max(0, y1):y2, max(0, x1):x2] = rng.integers(0, 256, image[max(0, y1):y2, max(0, x1):x2].shape)
        got, want = planes(yuv.frame(image, base, box)), planes(encoder_frame(image))
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), box
    assert yuv._base is base  # converted once, reused since
    # what it takes from the avatar frame's conversion: outside the box, the frame is not read at all
    image = base.copy()
    image[40:50, 40:50] = 255
    image[0:4, 0:4] = 0  # (a frame that broke the contract)
    got = yuv.frame(image, base, (40, 40, 50, 50)).to_ndarray()
    assert np.array_equal(got[:4, :4], encoder_frame(base).to_ndarray()[:4, :4])
    assert np.array_equal(got[40:50, 40:50], encoder_frame(image).to_ndarray()[40:50, 40:50])
    # a video avatar: each frame new (or shown twice: 12.5 fps), each converted whole, none kept
    video = I420Frames()
    for _ in range(3):
        frame = rng.integers(0, 256, (96, 128, 3), np.uint8)
        image = frame.copy()
        image[10:20, 10:20] = 0
        for shown in (image, frame):
            got = video.frame(shown, frame, (10, 10, 20, 20))
            assert np.array_equal(got.to_ndarray(), encoder_frame(shown).to_ndarray())
    assert video._base is None
    assert np.array_equal(video.frame(image).to_ndarray(), encoder_frame(image).to_ndarray())
