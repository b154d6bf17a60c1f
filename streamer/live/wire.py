"""A voice as it comes off the wire: each packet on at once, and when it came.

aiortc's audio receiver holds every packet until four newer ones are in (its jitter buffer's
prefetch: 80 ms at 20 ms packets), and it releases nothing past a lost packet until the sixteenth
after it is in; from then on it runs that far behind for good. On the team's CPU, one talker: the
voice reached the channel 81 ms after it was sent, and with 2% of its packets lost on the way, 281-302
ms, and 0 of 262 speech frames lip-synced in time, most of the voice too late for its slot
(BENCHMARKS.md, "The voice off the wire"). A channel has no use for that buffer: it places packets by
their timestamps (a hole the decoder did not make up is silence), and the voice it sends out is held
back by the channel's delay anyway, which is where a reordered packet still finds its place
(`read_voice`).

An Opus RTP packet is one whole frame (RFC 7587), so passing each on as it comes loses nothing. What
the network repeats is dropped here, and so is what comes too late to be placed: each would go
through the decoder out of turn.

Each packet is also decoded here, on the event loop, and its frame put straight on the track: aiortc
hands every packet to a decoder thread, whose frame comes back through a task made for it and a
wake-up of the loop; that hop cost 53 us of CPU a packet, the 20 ms decode itself 35 (the team's
CPU; BENCHMARKS.md). Opus is decoded by `opus.VoiceDecoder`: a lost packet's time comes out
concealed (or recovered from the next packet's FEC copy), not as a hole, and the packets of the
latest hole that come late, in order, are decoded as if they had come in turn."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from fractions import Fraction

import av
import numpy as np
from aiortc import RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.utils import uint16_add

from streamer.live.opus import RATE, VoiceDecoder, libopus

log = logging.getLogger(__name__)

_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_CODECS = "_RTCRtpReceiver__codecs"  # payload type -> codec, filled in place when the receiver starts
KEEP = 64  # arrival times kept for packets not yet decoded (1.3 s of 20 ms packets)
LATEST = 25  # a packet more than this many behind the newest is dropped: past any delay's use (0.5 s)
RESTART = 100  # ... unless this many or more: the sender's numbers started again (aiortc's own rule)
OVERDUE_S = 0.02  # a voice packet this late is made up for, so the frames that need it are not held up
_TIME_BASE = Fraction(1, 48000)


class VoiceArrivals:
    """Stands in for aiortc's jitter buffer in an audio receiver: notes when each packet arrived, for
    the frame decoded from it (`arrival`), and decodes it at once into `frames` (the track's queue),
    given the receiver's `codecs`; without them it hands the packet to aiortc's decoder thread."""

    def __init__(self, clock=time.monotonic, frames: asyncio.Queue | None = None,
                 codecs: dict[int, RTCRtpCodecParameters] | None = None):
        self.clock = clock
        self.frames, self.codecs = frames, codecs
        self._decoders: dict[str, Decoder] = {}
        self.voice: VoiceDecoder | None = None  # Opus, lost packets concealed (`opus.py`)
        self._overdue: asyncio.TimerHandle | None = None
        self._warned = False
        self._origin: int | None = None
        self._arrived: OrderedDict[int, float] = OrderedDict()
        self._newest: int | None = None  # sequence number
        self._seen: deque[int] = deque(maxlen=2 * LATEST)

    def add(self, packet) -> tuple[bool, JitterFrame | None]:
        """aiortc's call for each packet: (ask for a keyframe?, the frame to decode now)."""
        if not packet._data:  # padding only: nothing to decode
            return False, None
        seq, restart = packet.sequence_number, False
        if seq in self._seen:  # sent twice by the network
            return False, None
        if self._newest is None or uint16_add(seq, -self._newest) < 1 << 15:
            self._newest = seq  # the first, or the newest yet
        else:
            behind = uint16_add(self._newest, -seq)
            restart = behind >= RESTART
            if restart:  # the sender started again from elsewhere
                self._newest = seq
            elif behind > LATEST:
                return False, None
        self._seen.append(seq)
        if self._origin is None:
            self._origin = packet.timestamp
        # keyed as the frame's pts will be: aiortc counts timestamps from the first frame it decodes
        pts = (packet.timestamp - self._origin) % (1 << 32)
        self._arrived[pts] = self.clock()
        while len(self._arrived) > KEEP:
            self._arrived.popitem(last=False)
        if self.frames is None or self.codecs is None:
            return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)
        self._decode(packet, pts, restart)
        return False, None

    def _decode(self, packet, pts: int, restart: bool) -> None:
        codec = self.codecs.get(packet.payload_type)
        if codec is None:  # aiortc drops these before its buffer
            return
        if self.frames.qsize() >= KEEP:  # nobody reads them (the track ended: an RTCP BYE, then more RTP)
            return
        if codec.name.lower() == "opus" and codec.clockRate == RATE and libopus() is not None:
            if self.voice is None:
                self.voice = VoiceDecoder.make()
            self._decode_voice(packet, pts, restart)
            return
        decoder = self._decoders.get(codec.name)
        if decoder is None:
            decoder = self._decoders[codec.name] = get_decoder(codec)
        try:
            frames = decoder.decode(JitterFrame(data=packet._data, timestamp=pts))
        except av.FFmpegError as exc:  # as aiortc's decoder thread: the packet is lost, the decoder kept
            if not self._warned:
                log.warning("voice packet not decoded (%s): treated as lost", exc)
                self._warned = True
            return
        for frame in frames:
            self.frames.put_nowait(frame)  # read at once by the channel's reader (read_voice)

    def _decode_voice(self, packet, pts: int, restart: bool) -> None:
        now, refused = self._arrived[pts], self.voice.refused  # (`add` has just noted it)
        decoded = self.voice.packet(packet.sequence_number, pts, packet._data, restart)
        if self.voice.refused > refused and not self._warned:
            log.warning("voice packet not decoded (not Opus): treated as lost")
            self._warned = True
        for at, samples in decoded:
            if at != pts:  # made up for a lost packet: in by the time this one began
                self._arrived[at] = now - samples.size / RATE
            self._put(at, samples)
        if decoded and decoded[-1][0] == pts and self.voice.caught_up:  # the next is due when this one's time is up
            self._expect(decoded[-1][1].size, decoded[-1][1].size / RATE + OVERDUE_S)

    def _put(self, pts: int, samples: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, pts, _TIME_BASE
        self.frames.put_nowait(frame)

    def _expect(self, samples: int, within_s: float) -> None:
        """The next packet, of `samples`, is to come within `within_s`; if not, its time is made up then."""
        if self._overdue is not None:
            self._overdue.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (driven by hand, as in tests: nothing is overdue)
            return
        self._overdue = loop.call_later(within_s, self._made_up, samples)

    def _made_up(self, samples: int) -> None:
        self._overdue = None
        if self.frames.qsize() >= KEEP:
            return
        made = self.voice.overdue(samples)
        for at, x in made:
            self._arrived[at] = self.clock()
            self._put(at, x)
        if made:
            self._expect(samples, samples / RATE)

    def arrival(self, pts: int | None) -> float | None:
        """When the packet of the decoded frame stamped `pts` came off the wire (None if unknown)."""
        return None if pts is None else self._arrived.pop(pts % (1 << 32), None)


def unbuffered(receiver: RTCRtpReceiver, clock=time.monotonic) -> VoiceArrivals | None:
    """Make audio `receiver` decode its packets as they come onto its track (call before any arrives);
    returns what tells when each came. None, with a warning, if this aiortc keeps its buffer elsewhere:
    the voice then goes through aiortc's buffer, as before. If only its track's queue or its codecs
    moved, packets go on at once through aiortc's decoder thread."""
    if not hasattr(receiver, _BUFFER):
        log.warning("this aiortc's receiver has no %s: the voice waits in its jitter buffer (80 ms or more)",
                    _BUFFER)
        return None
    frames, codecs = getattr(receiver.track, "_queue", None), getattr(receiver, _CODECS, None)
    if not isinstance(frames, asyncio.Queue) or not isinstance(codecs, dict):
        log.warning("this aiortc's receiver keeps its track's queue or its codecs elsewhere: the voice is "
                    "decoded on aiortc's thread")
        frames = codecs = None
    arrivals = VoiceArrivals(clock, frames, codecs)
    setattr(receiver, _BUFFER, arrivals)
    return arrivals
