"""A talker's voice decoded from Opus, with what the network lost concealed rather than left silent.

aiortc's decoder decodes the packets it is given, in the order given, and a lost packet leaves a
hole: 20 ms of silence in the voice the viewers hear (a click in the middle of a word) and in the
windows the mouths are cut from; the next packet, decoded without its predecessor, is off too.
libopus can do better (RFC 6716): with no packet it continues the voice for the missing time
(packet loss concealment), and a packet sent with in-band FEC also carries a coarse copy of the one
before it, which recovers that one when it was lost. Browsers send that copy once their receiver
reports loss, when the answer says it can use it (`useinbandfec=1`, `advertise_fec`).

The mouths cannot wait for a lost packet's successor: after two or three lost in a row, the frames
that needed them came too late (8 of a clip's speech frames, three lost in every 30). So a packet
overdue by 20 ms (`wire.OVERDUE_S`) has its time made up then (`overdue`); when it, or the packet
after it, comes, that time is done again properly (the late packet itself, or its successor's FEC
copy), for the voice the viewers hear, and decoding goes on from there as if in turn.

Doing again, and a reordered packet that finds its hole concealed already, need the decoder as it
was before the hole: decoded out of turn, a packet would disturb the decoder for those after it. So
the decoder is copied (its state is one flat block, made to be copied) where a hole starts, and the
hole's packets that come late, in order, are decoded on the copy of the last hole, for the channel
to put in their place.

The voice is decoded as mono: what a channel uses (a stereo decoder gave two equal channels for a
mono sender, and a fifth more time). libopus comes with PyAV; without it, aiortc's decoder is used."""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

RATE = 48000
MAX_PACKET = RATE * 120 // 1000  # Opus's longest packet
MAX_CONCEAL = RATE * 120 // 1000  # a longer hole is left silent: the sender paused, or more than a glitch was lost
_STEP = RATE // 400  # libopus conceals in whole 2.5 ms


def _load() -> ctypes.CDLL | None:
    import av

    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    names = sorted(glob.glob(os.path.join(libs, "libopus*.so*")))
    if not names:
        from ctypes.util import find_library

        names = [n for n in [find_library("opus")] if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            lib.opus_decoder_get_size.argtypes = [ctypes.c_int]
            lib.opus_decoder_init.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]
            lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p,
                                        ctypes.c_int, ctypes.c_int]
            lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
            if hasattr(lib, "opus_packet_has_lbrr"):
                lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
            return lib
        except (OSError, AttributeError):
            continue
    return None


_LIB: ctypes.CDLL | None | bool = False


def libopus() -> ctypes.CDLL | None:
    """This process's libopus (the one PyAV ships), None where there is none."""
    global _LIB
    if _LIB is False:
        _LIB = _load()
        if _LIB is None:
            log.warning("no libopus found: lost voice packets stay silent")
    return _LIB


class MonoDecoder:
    """libopus decoding to 48 kHz mono int16; its state in a buffer of its own, so it can be copied."""

    def __init__(self, lib: ctypes.CDLL, state: ctypes.Array | None = None):
        self._lib = lib
        size = lib.opus_decoder_get_size(1)
        self._state = ctypes.create_string_buffer(size)
        if state is None:
            if lib.opus_decoder_init(self._state, RATE, 1) != 0:
                raise RuntimeError("libopus refused a 48 kHz mono decoder")
        else:
            ctypes.memmove(self._state, state, size)
        self._out = np.zeros(MAX_PACKET, np.int16)

    def copy(self) -> MonoDecoder:
        return MonoDecoder(self._lib, self._state)

    def _run(self, data: bytes | None, samples: int, fec: int) -> np.ndarray | None:
        n = self._lib.opus_decode(self._state, data, len(data) if data else 0, self._out.ctypes.data, samples, fec)
        return self._out[:n].copy() if n > 0 else None

    def decode(self, data: bytes) -> np.ndarray | None:
        """A packet's samples; None if it is not Opus (the decoder is left as it was)."""
        return self._run(data, MAX_PACKET, 0)

    def conceal(self, samples: int, after: bytes | None = None) -> np.ndarray | None:
        """`samples` (whole 2.5 ms) that never came; from `after`'s FEC copy where it has one."""
        return self._run(after, samples, 1 if after else 0)

    def samples_in(self, data: bytes) -> int:
        return max(self._lib.opus_packet_get_nb_samples(data, len(data), RATE), 0)

    def has_fec(self, data: bytes) -> bool:
        has = getattr(self._lib, "opus_packet_has_lbrr", None)  # (libopus 1.5 on)
        return has is not None and has(data, len(data)) == 1


@dataclass(slots=True)
class _Hole:
    seq: int  # the first packet missing
    pts: int  # where it goes
    decoder: MonoDecoder  # as it was before the hole


@dataclass
class VoiceDecoder:
    """One sender's voice packets, as they come, to (pts, samples) decoded in their places: a hole
    the sender's numbering shows is concealed when the packet after it comes, and the time of a packet
    that is overdue is made up when its receiver says so (`overdue`), its voice placed when it comes."""

    decoder: MonoDecoder
    concealed: int = 0  # samples made up for packets that did not come
    recovered: int = 0  # ... of them from a later packet's FEC copy
    late: int = 0  # packets decoded after a later one or after their time was made up, in their place
    refused: int = 0  # packets that were not Opus (concealed as lost)
    overdue_made: int = 0  # samples made up for packets overdue (`overdue`), until they or the next came
    _seq: int | None = None  # the next packet in turn
    _pts: int = 0  # where the next samples go
    _ahead: int = 0  # samples made up past the last packet decoded (`overdue`)
    _hole: _Hole | None = None

    @classmethod
    def make(cls) -> VoiceDecoder | None:
        lib = libopus()
        return cls(MonoDecoder(lib)) if lib is not None else None

    def packet(self, seq: int, pts: int, data: bytes, restart: bool = False) -> list[tuple[int, np.ndarray]]:
        """The samples `data` (packet `seq`, its first sample at `pts`) brings, and those made up for what is
        missing before it, in order. `restart`: the sender's numbers started again, nothing is missing."""
        ahead = 0 if self._seq is None or restart else (seq - self._seq) % (1 << 16)
        if ahead >= 1 << 15:  # behind its turn
            return self._late(seq, pts, data)
        hole, out = self._hole, []
        if self._ahead and not restart and hole is not None and (pts - hole.pts) % (1 << 32) <= MAX_CONCEAL:
            # time was made up while this packet (or one before it) was overdue: done again on the decoder as
            # it was, with this packet's FEC copy of the one before, then this packet, and on from there; what
            # comes out before the end of the time made up goes out late, for the channel to put in its place
            self.late += 0 < (self._pts - pts) % (1 << 32) <= self._ahead
            self.decoder, self._pts = hole.decoder, hole.pts
            self._hole = _Hole(hole.seq, hole.pts, hole.decoder.copy())
            gap = (pts - hole.pts) % (1 << 32)
            if gap and seq != hole.seq:  # (the very packet awaited, later stamped: a pause, nothing lost)
                out = self._conceal(gap - gap % _STEP, data)
        else:
            gap = (pts - self._pts) % (1 << 32)
            if self._seq is not None and ahead and 0 < gap <= RATE:
                # its late packets decode on the decoder as it was, into silence or what was made up (a
                # packet later still is past any delay's use, and read_voice would take it for a new start)
                if not self._ahead:  # (else the hole began where `overdue` began making it up)
                    self._hole = _Hole(self._seq, self._pts, self.decoder.copy())
                if gap + self._ahead <= MAX_CONCEAL:  # (counting what `overdue` made up of it)
                    out = self._conceal(gap - gap % _STEP, data)
        self._ahead = 0
        samples = self.decoder.decode(data)
        if samples is None:  # not Opus: the next packet conceals it, from here on
            self.refused += 1
            if out:
                self._seq, self._pts = seq, (out[-1][0] + out[-1][1].size) % (1 << 32)
            return out
        out.append((pts, samples))
        self._seq, self._pts = (seq + 1) % (1 << 16), (pts + samples.size) % (1 << 32)
        return out

    @property
    def caught_up(self) -> bool:
        """No time is made up past the last packet decoded."""
        return not self._ahead

    def overdue(self, samples: int) -> list[tuple[int, np.ndarray]]:
        """The next packet has not come when it should have: `samples` (whole 2.5 ms) made up in its
        place now, so the frames that need them are not held up; at most MAX_CONCEAL in a row (a longer
        wait is a pause). When it or a later one comes, that time is done again as if they had come in
        turn (`packet`)."""
        if self._seq is None or self._ahead + samples > MAX_CONCEAL:
            return []
        if not self._ahead:
            self._hole = _Hole(self._seq, self._pts, self.decoder.copy())
        x = self.decoder.conceal(samples)
        if x is None:
            return []
        out = [(self._pts, x)]
        self._pts, self._ahead = (self._pts + x.size) % (1 << 32), self._ahead + x.size
        self.overdue_made += x.size
        return out

    def _conceal(self, hole: int, data: bytes) -> list[tuple[int, np.ndarray]]:
        """`hole` samples missing before `data`: the last packet's worth from `data`'s FEC copy (libopus
        conceals it where there is none), the rest concealed 20 ms at a time (it fades as it goes)."""
        whole = self.decoder.samples_in(data)
        fec = min(hole, whole)
        # (libopus conceals instead where the copy is not of the missing packet's length)
        recovers = fec == whole and self.decoder.has_fec(data)
        parts, plc = [], hole - fec
        while plc > 0:
            parts.append((min(plc, RATE // 50), None))
            plc -= parts[-1][0]
        if fec:
            parts.append((fec, data))
        out, pts = [], self._pts
        for n, after in parts:
            x = self.decoder.conceal(n, after)
            if x is None:
                break
            out.append((pts, x))
            pts = (pts + x.size) % (1 << 32)
            self.concealed += x.size
            self.recovered += x.size if after is not None and recovers else 0
        return out

    def _late(self, seq: int, pts: int, data: bytes) -> list[tuple[int, np.ndarray]]:
        hole = self._hole
        if hole is None or (hole.seq, hole.pts) != (seq, pts):  # not the next of the last hole: it stays as made up
            return []
        samples = hole.decoder.decode(data)
        if samples is None:
            return []
        hole.seq, hole.pts = (seq + 1) % (1 << 16), (pts + samples.size) % (1 << 32)
        self.late += 1
        return [(pts, samples)]


def advertise_fec() -> None:
    """Answers say `useinbandfec=1` for Opus: a browser then sends its FEC copies once it hears of loss."""
    from aiortc.codecs import CODECS

    for codec in CODECS["audio"]:
        if codec.mimeType.lower() == "audio/opus":
            codec.parameters.setdefault("useinbandfec", 1)
