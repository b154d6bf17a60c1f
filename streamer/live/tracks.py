"""aiortc tracks of a channel: thin, paced from the channel's one clock, never waiting on inference."""

from __future__ import annotations

import asyncio
import logging
from fractions import Fraction

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from streamer.audio import to_mono_float
from streamer.live.channel import FPS, VOICE_RATE, Channel
from streamer.live.wire import VoiceArrivals

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90000
BEHIND_S = 0.1  # this far behind its slot, a track skips ahead instead of sending stale frames


async def pace(ch: Channel, last: int | None, period: float) -> int:
    """The next slot to send (the one after `last`, or the current one if that is long past), once due."""
    now = ch.clock()
    due = int((now - ch.start) / period)
    n = due if last is None or now - (ch.start + (last + 1) * period) > BEHIND_S else last + 1
    wait = ch.start + n * period - now
    if wait > 0:
        await asyncio.sleep(wait)
    return n


def encoder_frame(image: np.ndarray) -> av.VideoFrame:
    """A BGR image as the I420 frame the encoder takes, converted here by OpenCV: given BGR, aiortc
    has FFmpeg convert each frame through a new scaler whose thread pool is as large as the machine."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:  # I420 needs even sizes: let the encoder's scaler handle odd ones
        return av.VideoFrame.from_ndarray(image, format="bgr24")
    planes = i420_planes(image)
    frame = frame_of(planes)
    if frame is None:  # padded rows: let PyAV place them
        return av.VideoFrame.from_ndarray(np.concatenate([p.reshape(-1) for p in planes]).reshape(-1, w),
                                          format="yuv420p")
    return frame


def i420_planes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A BGR image of even size converted to I420 by OpenCV: its Y, U and V planes."""
    h, w = image.shape[:2]
    yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    q = w * h // 4
    return yuv[: 4 * q].reshape(h, w), yuv[4 * q : 5 * q].reshape(h // 2, w // 2), yuv[5 * q :].reshape(h // 2, w // 2)


def frame_of(planes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> av.VideoFrame | None:
    """A yuv420p frame holding `planes`; None where its rows are padded (not at even sizes in today's
    FFmpeg). Unpadded: three straight copies, 40% of from_ndarray's time."""
    h, w = planes[0].shape
    frame = av.VideoFrame(w, h, "yuv420p")
    if any(p.line_size != a.shape[1] for p, a in zip(frame.planes, planes)):
        return None
    for p, a in zip(frame.planes, planes):
        p.update(a)
    return frame


STILL_AFTER = 3  # an avatar frame shown this many times in a row is kept converted


class I420Frames:
    """A channel's frames as the encoder takes them, converting only what changed. A still avatar's
    frame is converted once; a frame with a mouth blended in, only in the mouth's box (the rest is the
    avatar frame's, already converted): 180 -> 48 us a speech frame and 18 us a silent one on a slow
    2-core CPU, the same pixels. A video avatar's frames differ every time: converted whole."""

    def __init__(self):
        self._base: np.ndarray | None = None  # the avatar frame converted ...
        self._planes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ... to these (Y, U, V)
        self._seen: np.ndarray | None = None  # the avatar frame of the last calls ...
        self._times = 0  # ... this many in a row

    def frame(self, image: np.ndarray, base: np.ndarray | None = None, box: tuple | None = None) -> av.VideoFrame:
        """`image` as an I420 frame: `base` the avatar frame it was made from, equal to it outside `box`
        (None: `image` is `base`). Without `base`, converted whole."""
        h, w = image.shape[:2]
        self._times = self._times + 1 if base is self._seen else 1
        self._seen = base
        if base is None or h % 2 or w % 2 or base.shape != image.shape:
            return encoder_frame(image)
        if base is not self._base:
            # a still avatar shows one frame on and on; a video avatar a new one every frame, or every second
            # or third one below 25 fps: nothing worth keeping
            if self._times < STILL_AFTER:
                return encoder_frame(image)
            self._base, self._planes = base, i420_planes(base)
        x1, y1, x2, y2 = (0, 0, 0, 0) if image is base else box if box is not None else (0, 0, w, h)
        x1, y1 = max(0, x1 & ~1), max(0, y1 & ~1)  # out to even rows and columns: whole chroma samples
        x2, y2 = min(w, x2 + (x2 & 1)), min(h, y2 + (y2 & 1))
        frame = frame_of(self._planes)
        if frame is None:
            return encoder_frame(image)
        if x2 > x1 and y2 > y1:
            for p, k, part in zip(frame.planes, (1, 2, 2), i420_planes(image[y1:y2, x1:x2])):
                view = np.frombuffer(p, np.uint8).reshape(h // k, w // k)
                view[y1 // k : y2 // k, x1 // k : x2 // k] = part
        return frame


def output_frame(ch: Channel, n: int, logged: bool, yuv: I420Frames | None = None) -> tuple[av.VideoFrame, bool]:
    """Channel frame `n` as the encoder takes it, stamped with its time; and whether it failed, in
    which case it is the avatar's first frame and the error is logged unless `logged` (once is enough).
    yuv: the converter of the channel's frames for this encoder (it keeps what it converted)."""
    failed = False
    try:
        image = ch.video_frame(n)
        base, box = ch.made_from(n)
    except Exception:  # noqa: BLE001 - a defect must not end the video (aiortc stops a track that raises)
        if not logged:
            log.exception("[%s] frame %d failed; showing the avatar's first frame", ch.session, n)
        failed = True
        image, base, box = ch.frames.first, None, None
    frame = encoder_frame(image) if yuv is None else yuv.frame(image, base, box)
    frame.pts, frame.time_base = n * (VIDEO_CLOCK // FPS), Fraction(1, VIDEO_CLOCK)
    return frame, failed


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, channel: Channel):
        super().__init__()
        self.channel = channel
        self._last = None
        self._failed = 0
        self._yuv = I420Frames()

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = self._last = await pace(self.channel, self._last, 1 / FPS)
        frame, failed = output_frame(self.channel, n, self._failed > 0, self._yuv)
        self._failed += failed
        return frame


SETTLE = 5  # silent chunks the Opus encoder codes itself before its silence packet is reused
SILENCE_BYTES = 3  # libopus's packet for a silent 20 ms frame: its TOC byte and a 2-byte "silence" frame


class OpusPackets:
    """20 ms chunks of 48 kHz mono int16 in, one Opus packet each out, for a track to hand to aiortc
    (which sends a packet as it is). aiortc's own encoder first pushes every chunk through an FFmpeg
    resampling graph whose thread pool is as large as the machine, though the voice already has
    Opus's rate and frame size: threads woken 50 times a second for nothing (on a 16-core GPU box,
    40% -> 31% of a core per talker without them, BENCHMARKS.md)."""

    def __init__(self):
        self.codec = av.CodecContext.create("libopus", "w")
        # Mono: the voice is, and a stereo encoder codes it twice over (aiortc's: stereo at 96 kb/s). At
        # 72 kb/s a packet is as large as aiortc's and costs 113 against 147-195 us here; below ~70 kb/s
        # libopus switches mode and takes twice as long. RTP's Opus is always "opus/48000/2"; decoders
        # (browsers, aiortc's) give mono packets as stereo.
        self.codec.bit_rate = 72000
        self.codec.format, self.codec.layout = "s16", "mono"
        self.codec.sample_rate, self.codec.time_base = VOICE_RATE, Fraction(1, VOICE_RATE)
        # complexity 6, not libopus's 10: 76 against 122 us a packet on the team's CPU at this bitrate
        # (WebRTC itself uses 9 on desktops, 5 on phones); it matters at low bitrates, not at 72 kb/s
        self.codec.options = {"application": "voip", "compression_level": "6"}
        self.codec.thread_count = 1
        self.quiet = 0  # silent chunks in a row
        self.reused = 0  # silent chunks sent as the settled encoder's silence packet, not encoded
        self._silence: bytes | None = None  # the encoder's own packet for silence, once it has settled

    def encode(self, pcm: np.ndarray, pts: int) -> av.Packet | None:
        """One chunk of CHUNK samples, sent at `pts` (in samples): its packet.

        Digital silence (an avatar listening, a voice not yet in) costs the encoder as much as speech.
        Once it has coded SETTLE silent chunks in a row and made a packet that says only "silence" (3
        bytes; its first ones after speech still carry the speech's tail), that packet stands for every
        further silent chunk, so decoders hear what they would have; the encoder takes up again from
        silence when the voice comes back."""
        silent = not np.count_nonzero(pcm)
        self.quiet = self.quiet + 1 if silent else 0
        if not silent:
            self._silence = None
        if self._silence is not None:
            self.reused += 1
            packet = av.Packet(self._silence)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm)[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = VOICE_RATE, pts, Fraction(1, VOICE_RATE)
            packets = self.codec.encode(frame)
            if not packets:
                return None
            packet = packets[0]
            if self.quiet >= SETTLE and packet.size <= SILENCE_BYTES:
                self._silence = bytes(packet)
        packet.pts, packet.time_base = pts, Fraction(1, VOICE_RATE)
        return packet


def voice_samples(frame: av.AudioFrame) -> np.ndarray:
    """A decoded audio frame as mono float32 in [-1, 1]."""
    channels = len(frame.layout.channels)
    if frame.format.name == "s16":  # packed, as Opus decodes: straight from the buffer, which is padded past the
        # samples (to_ndarray, stacking the planes, took five times as long per packet)
        return to_mono_float(np.frombuffer(frame.planes[0], np.int16, count=frame.samples * channels), channels)
    x = frame.to_ndarray()
    if frame.format.is_planar:  # (channels, samples): interleave
        x = x.T
    x = x.reshape(-1)
    if x.dtype == np.int32:
        x = x.astype(np.float32) * np.float32(2**-31)
    return to_mono_float(x, channels)


MAX_GAP = 2 * VOICE_RATE  # a silence from the sender up to this long is filled; a longer one re-pins the voice


async def read_voice(track: MediaStreamTrack, channel: Channel, wire: VoiceArrivals | None = None) -> None:
    """Feed a received audio track into the channel until it ends. Reading also keeps aiortc's
    receive queue from growing without bound. `wire`: when each packet came off the wire
    (`wire.unbuffered`); without it, a packet counts as in when it is read here.

    Packets are placed by their RTP timestamps, not counted: a hole the decoder did not make up (a
    sender's discontinuous transmission in silence, a loss longer than `opus.MAX_CONCEAL`) becomes
    silence in its place. Counting would move every
    later sample earlier, shrinking the delay by 20 ms per lost packet until voice and lips are late.
    A packet that comes after a later one (reordered on the way) still puts its voice in its place,
    if that has not been sent yet; the mouths there were cut with what stood in for it.
    """
    warned = False
    expected = None
    if wire is not None:
        channel.follow_wire(wire)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            voice = wire.voice if wire is not None else None
            if voice is not None and (voice.concealed or voice.late):
                log.info("[%s] voice ended: %.0f ms of it lost on the way and made up (%.0f ms from FEC copies), "
                         "%d packets placed late", channel.session, voice.concealed / 48, voice.recovered / 48,
                         voice.late)
            if wire is not None and channel.wire is wire:
                channel.follow_wire(None)
            return
        arrival = wire.arrival(frame.pts) if wire is not None else None
        channel.heard()
        if frame.sample_rate != VOICE_RATE:
            if not warned:
                log.warning("[%s] voice at %d Hz ignored: only 48 kHz (Opus) is used", channel.session,
                            frame.sample_rate)
                warned = True
            continue
        mono = voice_samples(frame)
        if frame.pts is not None:
            start = frame.pts
            if expected is not None:
                gap = (frame.pts - expected) % (1 << 32)  # RTP timestamps wrap at 2^32
                behind = (1 << 32) - gap if gap >= 1 << 31 else 0
                if 0 < behind <= MAX_GAP:  # reordered past its turn (or its time made up while it was late)
                    channel.late_voice(behind, mono[:behind])
                    if behind >= mono.size:
                        continue
                    mono, start = mono[behind:], expected  # (longer than what stood in its place: the rest is new)
                elif gap > MAX_GAP:  # the sender paused, or started again elsewhere: filling it would place
                    channel.resume_voice()  # what follows in the past (or far ahead)
                elif gap:  # lost on the way: silence, in by the time this packet began
                    channel.push_voice(np.zeros(gap, np.float32),
                                       None if arrival is None else arrival - mono.size / VOICE_RATE)
            expected = (start + mono.size) % (1 << 32)
        channel.push_voice(mono, arrival)
