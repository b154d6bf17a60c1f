"""One encode per channel, sent to all its viewers: VP8 frames and Opus packets made once.

aiortc encodes for each sender: a channel watched by its talker and an OBS page encoded every frame
twice, one with ten viewers eleven times (VP8 ~1 ms a 512x512 frame on the team's CPU, the largest
part of what a viewer costs). aiortc sends an `av.Packet` coming out of a track as it is, so a
channel encodes once and its tracks hand the packets out.

A VP8 stream is one chain: every frame refers to the ones before it, back to a keyframe. So each
viewer reads the chain in order from a keyframe on; a newcomer, a viewer too slow to keep up, and a
receiver that lost a picture (PLI/FIR) ask for a keyframe, which every viewer then gets. One
bitrate for all: the lowest any viewer's receiver estimates (REMB)."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, sdp
from aiortc.codecs import vpx
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from streamer.live import vp8
from streamer.live.channel import CHUNK, FPS, VOICE_RATE, Channel
from streamer.live.tracks import VIDEO_CLOCK, I420Frames, OpusPackets, output_frame, pace

log = logging.getLogger(__name__)

KEEP = 25  # encoded frames kept: a viewer this far behind (1 s) starts again from a new keyframe
KEY_GAP_S = 0.2  # keyframes for newcomers and viewers that fell behind: at most one this often
LOSS_KEY_GAP_S = 0.5  # keyframes for receivers that lost a picture: at most one this often
RAISE_S = 5.0  # the bitrate goes down as soon as a viewer needs it, up at most this often (each a keyframe)
# ... and only when the frames (their median) use at least this share of the one they have: a still avatar needs
# ~100 kb/s whatever the receiver allows, and each raise costs a keyframe and ~1 s of frames refining it again
RAISE_USE = 0.5
IDLE_S = 2.0  # a chain whose viewers have all stopped reading this long stops encoding
# aiortc's sender notes a receiver's keyframe request here and uses it only when it encodes itself
_WANTS_KEY = "_RTCRtpSender__force_keyframe"
_ENCODER = "_RTCRtpSender__encoder"


@dataclass(frozen=True, slots=True)
class Encoded:
    seq: int  # place in the channel's chain
    step: int  # the channel's video frame
    data: bytes
    keyframe: bool


class VideoChain:
    """The channel's frames encoded once, in order, as long as some viewer reads them."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.frames: deque[Encoded] = deque(maxlen=KEEP)
        self.viewers: weakref.WeakSet[SharedVideoTrack] = weakref.WeakSet()
        self._seq = 0
        self._key_now = True  # a viewer can't decode until the next keyframe
        self._key_soon = False  # a receiver lost a picture
        self._key_at = -LOSS_KEY_GAP_S
        self._codec: av.CodecContext | None = None
        self._opened_at = 0.0
        self._sizes: deque[int] = deque(maxlen=FPS)  # bytes of the last frames encoded, keyframes not counted
        self._encoding = threading.Lock()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._frame_failed = 0
        self._encode_failed = 0
        self._yuv = I420Frames()

    def join(self, track: SharedVideoTrack) -> None:
        self.viewers.add(track)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"vp8-{self.channel.name}")

    def leave(self, track: SharedVideoTrack) -> None:
        self.viewers.discard(track)
        if not self.viewers and self._task is not None:
            self._task.cancel()

    def want_key(self, now: bool = True) -> None:
        if now:
            self._key_now = True
        else:
            self._key_soon = True

    def next(self, track: SharedVideoTrack) -> Encoded | None:
        """The frame `track` sends next, None until there is one it can send."""
        track.read_at = self.channel.clock()
        if track.cursor is None:  # a newcomer: from the next keyframe on
            track.cursor = self._seq
        if track.synced and self.frames and self.frames[0].seq > track.cursor + 1:
            track.cursor, track.synced = self._seq, False  # what it missed is gone: from a new keyframe on
        for e in self.frames:
            if e.seq > track.cursor and (track.synced or e.keyframe):
                track.cursor, track.synced = e.seq, True
                return e
        if not track.synced:
            self.want_key()
        return None

    async def wait(self) -> None:
        await self._arrived.wait()

    async def _run(self) -> None:
        try:
            await self._encode_frames()
        except Exception:  # noqa: BLE001 - its viewers start it again on their next read
            if not self._encode_failed:
                log.exception("[%s] encoding for the viewers failed", self.channel.session)
            self._encode_failed += 1
        finally:
            if self._task is asyncio.current_task():  # (a viewer may have started a new one since)
                self._task = None
            if not self.viewers:  # (an encode still running keeps its own reference)
                self._codec = None
                self.frames.clear()
            arrived, self._arrived = self._arrived, asyncio.Event()
            arrived.set()  # waiting viewers look again

    async def _encode_frames(self) -> None:
        ch, loop, last = self.channel, asyncio.get_running_loop(), None
        self._key_now = True  # (re)started: what came before may not have reached the chain
        while not ch.closed:
            n = last = await pace(ch, last, 1 / FPS)
            now = ch.clock()
            live = [v for v in self.viewers if v.readyState == "live" and now - v.read_at < IDLE_S]
            if not live:
                self._codec = None  # (no encode runs now: this task awaited its own)
                self.frames.clear()
                break
            # (a frame that fails goes out as the avatar's first: every viewer's video goes on)
            frame, failed = output_frame(ch, n, self._frame_failed > 0, self._yuv)
            self._frame_failed += failed
            gap = now - self._key_at
            key = (self._key_now and gap >= KEY_GAP_S) or (self._key_soon and gap >= LOSS_KEY_GAP_S)
            rates = [r for r in (_bitrate(v.sender) for v in live) if r is not None]
            rate = min(rates) if rates else None
            data = await loop.run_in_executor(None, self._encode, frame, key, rate, now)
            if not data:
                continue  # the encoder dropped this frame (rate control): nothing to send
            keyframe = not data[0] & 1  # VP8 frame tag, bit 0: 0 for a keyframe
            if keyframe:
                self._key_now = self._key_soon = False
                self._key_at = now
                ch.keyframes += 1
            self._seq += 1
            self.frames.append(Encoded(self._seq, n, data, keyframe))
            ch.encoded += 1
            arrived, self._arrived = self._arrived, asyncio.Event()
            arrived.set()

    def _encode(self, frame: av.VideoFrame, key: bool, rate: int | None, now: float) -> bytes:
        with self._encoding:  # a stopped chain's last encode may still be running when a new one starts
            return self._encode_locked(frame, key, rate, now)

    def _encode_locked(self, frame: av.VideoFrame, key: bool, rate: int | None, now: float) -> bytes:
        c = self._codec
        if c is not None and rate is not None:
            down, up = rate < 0.9 * c.bit_rate, rate > 1.1 * c.bit_rate and now - self._opened_at >= RAISE_S
            up = up and 8 * FPS * float(np.median(self._sizes or [0])) >= RAISE_USE * c.bit_rate
        # a keyframe comes from a new encoder: one forced on a running encoder is followed by an inter frame
        # that codes the whole picture again at the quality the encoder had reached (~80 KB, 1-2 s of the
        # bitrate in one burst, for a 512x512 still picture); a new one climbs back over ~1 s
        if key or not vp8.fits(c, frame) or (rate is not None and (down or up)):
            rate = rate or (c.bit_rate if c is not None else vpx.DEFAULT_BITRATE)
            c = self._codec = vp8.open_encoder(frame.width, frame.height, rate)  # starts with a keyframe
            self._opened_at = now
            self._sizes.clear()
        data = b"".join(bytes(p) for p in c.encode(frame))
        if data and data[0] & 1:  # (what a picture costs from nothing is not what the stream needs)
            self._sizes.append(len(data))
        return data


def _bitrate(sender: RTCRtpSender | None) -> int | None:
    """What `sender`'s receiver can take (REMB, which aiortc gives the sender's encoder), None until it says."""
    encoder = getattr(sender, _ENCODER, None)
    return encoder.target_bitrate if getattr(encoder, "reported", False) else None


class SharedVideoTrack(MediaStreamTrack):
    """A viewer's video: the channel's VP8 chain, as packets aiortc sends without encoding again."""

    kind = "video"

    def __init__(self, channel: Channel, sender: RTCRtpSender):
        super().__init__()
        self.chain: VideoChain = _shared(channel, VideoChain)
        self.sender = sender
        self.cursor: int | None = None  # last frame of the chain sent
        self.synced = False  # sent a keyframe and every frame since
        self.read_at = channel.clock()

    async def recv(self) -> av.Packet:
        if self.readyState != "live" or self.chain.channel.closed:
            raise MediaStreamError
        while True:
            self.chain.join(self)  # (again: a chain that failed starts anew)
            if getattr(self.sender, _WANTS_KEY, False):  # its receiver lost a picture
                setattr(self.sender, _WANTS_KEY, False)
                self.chain.want_key(now=False)
            e = self.chain.next(self)
            if e is not None:
                packet = av.Packet(e.data)
                packet.pts, packet.time_base = e.step * (VIDEO_CLOCK // FPS), Fraction(1, VIDEO_CLOCK)
                return packet
            await self.chain.wait()
            if self.readyState != "live" or self.chain.channel.closed:
                raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self.chain.leave(self)


def can_share(pc: RTCPeerConnection, sender: RTCRtpSender) -> bool:
    """Whether `sender`, once `pc`'s answer is set, sends VP8 (the first codec of its media section, as
    aiortc does) and can be fed the channel's chain. Not for H.264 receivers: aiortc encodes for them."""
    mid = next((t.mid for t in pc.getTransceivers() if t.sender is sender), None)
    media = [m for m in sdp.SessionDescription.parse(pc.localDescription.sdp).media if m.rtp.muxId == mid]
    codecs = media[0].rtp.codecs if media else []
    return bool(codecs) and codecs[0].mimeType.lower() == "video/vp8" and hasattr(sender, _WANTS_KEY)


class VoicePackets:
    """The channel's outgoing voice as Opus packets, encoded once for all its viewers. Opus packets
    stand alone (no keyframes): a viewer behind or ahead takes the packets of its own slots. The test
    clients share their voice's packets the same way (`client.VoiceSource`)."""

    KEEP = 50  # packets kept (1 s): a slower viewer's slots

    def __init__(self, channel: Channel, keep: int = KEEP):
        """channel: anything whose `voice_chunk(j)` gives slot j's 20 ms of float voice."""
        self.channel = channel
        self.keep = keep
        self._opus = OpusPackets()
        self._packets: dict[int, bytes | None] = {}  # slot -> packet, slots in the order encoded
        self.last: int | None = None  # the last slot encoded

    def packet(self, j: int) -> av.Packet | None:
        """Slot `j`'s packet (20 ms of voice), None where the encoder has none."""
        if j not in self._packets:
            if self.last is not None and j < self.last:
                return None  # older than anything encoded for the others: skipped, as a late slot is
            # round(clip(x, -1, 1) * 32767), in place: the same values at a third of the numpy calls' cost
            pcm = self.channel.voice_chunk(j) * np.float32(32767)
            pcm = np.rint(np.minimum(np.maximum(pcm, -32767, out=pcm), 32767, out=pcm), out=pcm).astype(np.int16)
            p = self._opus.encode(pcm, j * CHUNK)
            self._packets[j] = bytes(p) if p is not None else None
            self.last = j
            while next(iter(self._packets)) <= j - self.keep:
                del self._packets[next(iter(self._packets))]
        data = self._packets[j]
        if data is None:
            return None
        packet = av.Packet(data)
        packet.pts, packet.time_base = j * CHUNK, Fraction(1, VOICE_RATE)
        return packet


def _shared(channel: Channel, kind: type):
    """The channel's one `kind` (VideoChain, VoicePackets), made by the first viewer that needs it."""
    made = channel.shared.get(kind.__name__)
    if not isinstance(made, kind):
        made = channel.shared[kind.__name__] = kind(channel)
    return made


class VoiceTrack(MediaStreamTrack):
    """The incoming voice, delayed to match the lips, as 20 ms Opus packets on the same clock as the video."""

    kind = "audio"

    def __init__(self, channel: Channel):
        super().__init__()
        self.channel = channel
        self.packets: VoicePackets = _shared(channel, VoicePackets)
        self._last = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        while True:
            j = self._last = await pace(self.channel, self._last, CHUNK / VOICE_RATE)
            packet = self.packets.packet(j)
            if packet is not None:
                return packet
