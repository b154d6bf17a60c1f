"""A voice as it comes off the wire: each packet on at once, and when it came.

aiortc's audio receiver holds every packet until four newer ones are in (its jitter buffer's
prefetch: 80 ms at 20 ms packets), and it releases nothing past a lost packet until the sixteenth
after it is in; from then on it runs that far behind for good. On the team's CPU, one talker: the
voice reached the channel 81 ms after it was sent, and with 2% of its packets lost on the way, 281-302
ms, 0 of 178 speech frames lip-synced in time, most of the voice too late for its slot
(BENCHMARKS.md, "The voice off the wire"). A channel has no use for that buffer: it places packets by
their timestamps and fills a hole with silence, and the voice it sends out is held back by the
channel's delay anyway, which is where a reordered packet still finds its place (`read_voice`).

An Opus RTP packet is one whole frame (RFC 7587), so passing each on as it comes loses nothing."""

from __future__ import annotations

import time
from collections import OrderedDict

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame

_BUFFER = "_RTCRtpReceiver__jitter_buffer"
KEEP = 64  # arrival times kept for packets not yet decoded (1.3 s of 20 ms packets)


class VoiceArrivals:
    """Stands in for aiortc's jitter buffer in an audio receiver: hands each packet to the decoder at
    once and notes when it arrived, for the frame decoded from it (`arrival`)."""

    capacity = 16  # (aiortc's, for anything that reads it)

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._origin: int | None = None
        self._arrived: OrderedDict[int, float] = OrderedDict()

    def add(self, packet) -> tuple[bool, JitterFrame | None]:
        """aiortc's call for each packet: (ask for a keyframe?, the frame to decode now)."""
        if not packet._data:  # padding only: nothing to decode
            return False, None
        if self._origin is None:
            self._origin = packet.timestamp
        # keyed as the frame's pts will be: aiortc counts timestamps from the first frame it decodes
        self._arrived[(packet.timestamp - self._origin) % (1 << 32)] = self.clock()
        while len(self._arrived) > KEEP:
            self._arrived.popitem(last=False)
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)

    def arrival(self, pts: int | None) -> float | None:
        """When the packet of the decoded frame stamped `pts` came off the wire (None if unknown)."""
        return None if pts is None else self._arrived.pop(pts % (1 << 32), None)


def unbuffered(receiver: RTCRtpReceiver, clock=time.monotonic) -> VoiceArrivals:
    """Make audio `receiver` pass its packets on as they come (call before any arrives); returns what
    tells when each came."""
    arrivals = VoiceArrivals(clock)
    setattr(receiver, _BUFFER, arrivals)
    return arrivals
