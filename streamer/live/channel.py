"""A live channel: one voice in, one avatar stream out to any number of viewers, on one clock.

Video frame n leaves at `start + n / 25`, audio chunk j (20 ms) at `start + j / 50`. When the first
voice packet arrives (time a0), the voice is pinned to the output: input video frame i (audio from
i / 25 s on) becomes output frame i + n0, input sample s becomes output sample s + 1920 n0, with
n0 = ceil((a0 + delay - start) * 25). The mapping never changes: a prediction not ready by its
frame's deadline is replaced by the idle frame, late voice by silence. So lips and voice cannot
drift apart and the delay cannot grow, however slow inference is.

A voice starts with a little silence (`voice_lead`) so that every frame's audio window is complete
exactly at the end of a packet, not up to a packet later: the least delay is then the lookahead itself.

The first packet may itself have come late (a busy loop), and the sender's sound card is never exactly
48 kHz (±100 ppm is common: 60 ms in 10 minutes), so the pin is settled by the packets that follow:
once before the first mouth is cut, and again in silence, the channel's clock moves (voice and video
together, so sync is kept) to where the voice arrives. More than RESYNC_S off, the voice moves by whole
frames first, where repeating or skipping 40 ms of silent input is neither seen nor heard.

An auto delay moves the same way, voice and video together, to what the mouths were measured to need
(`_retune`): down by the clock alone, even while the talker speaks (what goes out goes out sooner); up in
silence, or by small steps of the clock when mouths come late while the talker speaks.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import threading
import time
from collections import deque

import numpy as np

from streamer.audio import StreamResampler, VoiceActivity
from streamer.audio.mel import LOOKAHEAD_S
from streamer.avatar.cache import Avatar
from streamer.live.frames import FrameStore
from streamer.live.worker import InferenceWorker, Request
from streamer.mouth import FPS, face_crop, fade_strength, loop_step, source_frame, with_mouth

log = logging.getLogger(__name__)

VOICE_RATE = 48000
SAMPLES_PER_FRAME = VOICE_RATE // FPS  # 1920
CHUNK = 960  # 20 ms of outgoing voice
PACKET_S = 0.02  # the voice's packets as WebRTC senders make them (browsers, aiortc, OBS)
RESYNC_S = 0.03
SETTLE_S = 0.002  # an offset of the voice from its pinned timeline under this is left (the loop's own jitter)
SETTLE_FIRST_S = 0.2  # voice after which a new voice's timeline is settled once (or when frame 0 can be cut)
SHOWN_WITHIN_S = 0.1  # a track may send a frame this long after its slot (tracks.BEHIND_S)
FADE_OUT = 240  # samples (5 ms) over which an interrupted voice fades out
KEEP_VOICE_S = 1.0  # outgoing voice kept this long after its time to be sent, for slow viewers
# The auto delay's first margin, until the mouths say what they need: network jitter (a lost packet holds a
# window back 20 ms or more) and event-loop lag. They say so within 1-2 s of speech (BENCHMARKS.md: 42.5 ms
# before; 25 ms cost a mouth in the tests with lost and reordered packets, 30 did not)
AUTO_MARGIN_S = 0.03
AUTO_MAX_S = 0.5  # beyond this a conversation suffers more from the delay than from held mouths
AUTO_LATE_SHARE = 0.02  # auto delay: more missed mouths than this among the last speech frames: grow it
AUTO_WINDOW = 25  # speech frames judged before the auto delay moves (again), and the fewest needs it goes by
# Auto delay, measured: once this many speech frames have been cut, the delay is what the 99th percentile
# of the last NEEDS_KEPT needed (from the start of a frame's voice to its mouth's arrival: lookahead,
# network jitter, the event loop, inference) and a guard for what a few seconds of them did not show.
AUTO_MEASURED = 50
AUTO_GUARD_S = 0.01
SPEECH_STEP_S = 0.02  # the auto delay grows at most this much a time while the talker speaks
AUTO_STEP_S = 0.004  # the auto delay moves no less than this (each move sends voice and video sooner or later)
NEEDS_KEPT = 10 * FPS  # speech frames whose needs the auto delay goes by (the last 10 s of speech)
HOLD_FRAMES = 2  # a speech frame whose mouth is late shows the last mouth up to this many frames old


RESAMPLER_HOLD_S = StreamResampler(VOICE_RATE).hold / VOICE_RATE  # what the 48 -> 16 kHz filter waits for: 0.625 ms


def _packets_divide_frames(packet_s: float) -> bool:
    return abs(1 / FPS / packet_s - round(1 / FPS / packet_s)) < 1e-9


def voice_lead(lookahead_s: float, packet_s: float = PACKET_S) -> int:
    """Samples of silence a voice starts with so that, frames starting on packet boundaries, each
    frame's audio (`lookahead_s` past its start, and the resampler's hold) is complete exactly at the
    end of a packet: 630 for Wav2Lip (213.125 ms = 10 packets and 13.125 ms), 30 for MuseTalk. 0 when
    packets do not divide a frame. The lead for 20 ms packets suits 10 and 40 ms ones as well."""
    if not _packets_divide_frames(packet_s):
        return 0
    return round((lookahead_s + RESAMPLER_HOLD_S) * VOICE_RATE) % round(packet_s * VOICE_RATE)


def packet_floor(lookahead_s: float, packet_s: float = PACKET_S) -> float:
    """The least delay at which every frame's audio has arrived and passed the resampler: `lookahead_s`
    past the frame's start, and the resampler's hold. The voice's timeline is pinned to a packet's
    start, led by `voice_lead`, so when packets divide a frame (20 ms in 40) each frame's audio is in
    with the packet that ends just then (Wav2Lip: 213.1 ms, not the 220 of whole packets from the
    frame's start); otherwise up to a whole packet more. It only says the audio is in: inference
    needs time on top (the auto delay adds it)."""
    need = lookahead_s + RESAMPLER_HOLD_S
    if _packets_divide_frames(packet_s):
        return need
    return need + packet_s


MIN_DELAY_S = packet_floor(LOOKAHEAD_S)  # Wav2Lip's, with 20 ms packets: 213.125 ms


def cut_lookahead(vad: VoiceActivity, fade: int, lookahead_s: float = LOOKAHEAD_S) -> float:
    """How long after its start a frame can be cut: its audio window (the engine's `lookahead_s`), and
    the speech decisions `fade` frames ahead (the fade into speech starts before it), each decided
    `preroll` after its frame."""
    return max(lookahead_s, (fade + 1) / FPS + (vad.preroll + vad.frame) / 16000)


def auto_delay(worker: InferenceWorker, min_delay: float = MIN_DELAY_S) -> float:
    """The least delay that leaves inference its room: the floor (`packet_floor`), then twice the time
    of the smallest batch at which the worker keeps up with 25 fps (a frame may wait for the call in
    flight, then its own), and a margin; at most AUTO_MAX_S. An engine slower than real time at
    every batch size gets its fastest batch and does what it can."""
    cost = worker.cost.estimate
    keeps_up = [n for n in worker.sizes if cost(n) <= n / FPS]
    n = keeps_up[0] if keeps_up else max(worker.sizes, key=lambda n: n / max(cost(n), 1e-9))
    return min(max(AUTO_MAX_S, min_delay), min_delay + 2 * cost(n) + AUTO_MARGIN_S)


def _end_features(voice: VoiceIn | None) -> None:
    """A voice that is gone: its audio front end's queued work is dropped (MuseTalk's whisper blocks)."""
    close = getattr(voice.features, "close", None) if voice else None
    if close:
        close()


class VoiceIn:
    """What one voice source (a talk page or a WHIP publisher) brings to a channel: its packets, the
    features cut from them, and where they are pinned on the channel's clock."""

    def __init__(self, vad: VoiceActivity, features):
        self.resampler = StreamResampler(VOICE_RATE)
        self.features = features.stream()  # the engine's audio windows
        self.vad = vad
        # packets not yet through the front end: it runs once a frame's audio is complete, not per packet
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.per_frame = hasattr(self.features, "samples_for")  # (MuseTalk's whisper windows come back later)
        self.level = 0.0  # mouth strength of the last frame cut
        self.windows: dict[int, np.ndarray] = {}
        self.speech: dict[int, bool] = {}  # decisions from frame next_i - fade on
        self.next_i = 0
        self.n0: int | None = None  # output frame of input frame 0
        self.buffer = np.zeros(0, np.float32)  # received voice from absolute sample buffer0 on
        self.buffer0 = 0
        self.received = 0
        self.interrupted_to = 0  # voice received before this sample was silenced by an interrupt
        self.arrivals: deque[tuple[int, float]] = deque(maxlen=500)  # (first sample, arrival time)
        self.lateness: deque[float] = deque(maxlen=100)  # per packet, vs the pinned timeline (2 s)
        self.settled = False  # the first settling of the timeline is done


class Channel:
    """One avatar stream: at most one voice drives it, any number of viewers watch it. Its outputs
    are computed once per frame and shared by every viewer."""

    def __init__(self, name: str, avatar: Avatar, worker: InferenceWorker, delay_s: float | None = 0.3,
                 vad_factory=None, fade: int = 2, clock=time.monotonic):
        """delay_s None: `auto_delay`, set anew when each voice starts."""
        self._vad_factory = vad_factory or (lambda: VoiceActivity(fps=FPS))
        self.features = worker.engine.features
        lookahead = cut_lookahead(self._vad_factory(), fade, self.features.lookahead_s)
        self.min_delay_s = packet_floor(lookahead)
        self.lead = voice_lead(lookahead)  # samples of silence each voice starts with
        if delay_s is not None and delay_s < self.min_delay_s - 1e-6:
            log.warning("delay %.1f ms is below the floor (the engine's lookahead and voice activity settings): "
                        "%.1f ms used", 1000 * delay_s, 1000 * self.min_delay_s)
            delay_s = self.min_delay_s
        self.name = name
        self.avatar = avatar
        self.worker = worker
        self.auto = delay_s is None
        self.front_s = 0.0
        self.delay_s = self._auto_delay() if self.auto else delay_s
        self.clock = clock
        self.fade = fade
        self.start = clock()
        self.closed = False
        self.frames = FrameStore(avatar)
        self.voice: VoiceIn | None = None
        self.publisher: str | None = None  # session id of the voice source
        self.heard_at: float | None = None  # clock time of its last packet from the network
        self.viewers = 0
        self._faces: dict[int, np.ndarray] = {}  # step -> mouth from the worker, not yet shown
        self._last_face: tuple[int, np.ndarray] | None = None  # (step, mouth) last shown
        self._lock = threading.Lock()
        self._held: np.ndarray | None = None
        # step -> (frame sent, the avatar frame it was made from, the box of the mouth blended in)
        self._video_memo: dict[int, tuple[np.ndarray, np.ndarray | None, tuple | None]] = {}
        self._voice_memo: dict[int, np.ndarray] = {}
        # speech step -> (strength, crop, taken by the worker, seconds to its deadline when taken)
        self._expected: dict[int, tuple[float, np.ndarray | None, bool, float]] = {}
        self._shown = 0  # steps below this have been sent
        # what users see: counters and recent delays
        self.sent = 0
        self.encoded = 0  # VP8 frames encoded once for all viewers that share them (live/broadcast.py)
        self.keyframes = 0
        self.shared: dict[str, object] = {}  # encoders its viewers share (live/broadcast.py)
        self.lipsync_frames = 0
        self.late = 0  # speech frames whose own mouth was not ready in time
        self.held = 0  # of those, frames shown with the last mouth instead of the idle one
        self.speaking = False
        self.resyncs = 0  # voice moved by whole frames on the timeline (a sender clock's drift)
        self.settles = 0  # channel clock moved, by under a frame, to where the voice arrives
        self.interrupts = 0
        self.wire = None  # the voice's arrivals off the wire (live/wire.py): its decoder counts what was lost
        self._lost = (0, 0, 0)  # voices gone before: samples made up, of them from FEC copies, packets late
        self._sent_at: deque[float] = deque(maxlen=51)  # when the last frames were made (fps over ~2 s)
        self.delays: deque[float] = deque(maxlen=750)  # voice in -> its frame out, seconds (30 s)
        self.off: deque[float] = deque(maxlen=750)  # ... less the delay set then (the auto delay moves)
        self.first_delay_s = self.delay_s  # the delay the voice started with
        self._recent: deque[tuple[int, bool]] = deque(maxlen=2 * AUTO_WINDOW)  # speech frames: mouth in time?
        # speech frame the worker took -> (seconds from the start of its voice to its mouth's arrival, or until
        # it comes to its cut; whether it came): the same whatever the delay, which moves both ends alike
        self._need: dict[int, tuple[float, bool]] = {}
        self._tuned_at: int | None = None  # speech frames shown when the auto delay was last judged
        self._moving = False  # the auto delay wants to move, and waits for its moment
        self._grown_to = 0.0  # auto delay grown because mouths were dropped: measured needs stay above it
        self.on_delay = None  # called with each frame's voice-in -> lips-out delay (metrics)

    @property
    def session(self) -> str:
        return self.publisher or self.name

    # voice in (event loop; light work only)

    def heard(self) -> None:
        """A packet of the voice came off the wire (whatever it holds): the sender is alive."""
        self.heard_at = self.clock()

    def silent_for(self) -> float:
        """Seconds since the voice's last packet; 0 while none has come yet (still connecting)."""
        return 0.0 if self.heard_at is None else self.clock() - self.heard_at

    def attach_voice(self, session: str) -> None:
        """A new voice source takes the channel: its timeline starts afresh at its first packet."""
        with self._lock:
            self.heard_at = None
            self.publisher = session
            self._set_voice(VoiceIn(self._vad_factory(), self.features))
            self.speaking = False
            if self.auto:
                self.delay_s = self._auto_delay()
                self._recent.clear()
                self._need.clear()
                self._grown_to = 0.0
            self.first_delay_s = self.delay_s

    def _auto_delay(self) -> float:
        self.front_s = self.features.compute_s  # what it counted for the audio front end (logged)
        return auto_delay(self.worker, self.min_delay_s + self.front_s)

    def resume_voice(self) -> None:
        """The voice comes back after its sender paused longer than a gap we fill (its timestamps jumped):
        pin it to the clock afresh, as a new voice, rather than place it seconds in the past."""
        with self._lock:
            if self.voice is not None:
                self._set_voice(VoiceIn(self._vad_factory(), self.features))
                self.speaking = False
                self._need.clear()  # (measured against the old pin)
                self._recent.clear()
        log.info("[%s] voice resumed after a pause on channel %s: timeline pinned again", self.session, self.name)

    def detach_voice(self, session: str) -> None:
        with self._lock:
            if self.publisher == session:
                self.publisher = None
                self._set_voice(None)
                self.speaking = False

    def _set_voice(self, voice: VoiceIn | None) -> None:
        old, self.voice = self.voice, voice
        _end_features(old)

    @property
    def n0(self) -> int | None:
        v = self.voice
        return v.n0 if v else None

    def push_voice(self, mono48: np.ndarray, arrival: float | None = None) -> None:
        """One received packet of 48 kHz mono float voice, in order."""
        v = self.voice
        if self.closed or v is None or mono48.size == 0:
            return
        arrival = self.clock() if arrival is None else arrival
        if v.n0 is None:
            mono48 = np.concatenate([np.zeros(self.lead, np.float32), mono48])  # (as if heard just before)
            first = arrival - mono48.size / VOICE_RATE  # when its first sample was spoken, as we see it
            v.n0 = max(0, math.ceil((first + self.delay_s - self.start) * FPS))
            # Re-phase the clock once, by under a frame, so the delay is exactly delay_s, not up to a
            # frame more; the tracks just send their next frame a little sooner.
            self.start = max(self.start - 1 / FPS, first + self.delay_s - v.n0 / FPS)
            log.info("[%s] voice started on channel %s: output frame %d, delay %.0f ms (%s)", self.session,
                     self.name, v.n0, 1000 * (self.start + v.n0 / FPS - first),
                     f"auto: floor {1000 * self.min_delay_s:.0f}, audio front end {1000 * self.front_s:.0f}"
                     if self.auto else "fixed")
        v.arrivals.append((v.received, arrival))
        v.received += mono48.size
        # how late this packet is for its slot (network jitter only ever adds, so the minimum over
        # the window is the clock offset)
        v.lateness.append(arrival + self.delay_s - (self.start + (v.received + v.n0 * SAMPLES_PER_FRAME) / VOICE_RATE))
        with self._lock:
            v.buffer = np.concatenate([v.buffer, mono48.astype(np.float32)])
            # voice no viewer can still ask for goes, whether or not anyone watches (a WHIP publisher
            # with no viewer would otherwise grow this by 11.5 MB a minute)
            sent = int((arrival - self.start - KEEP_VOICE_S) * VOICE_RATE) - v.n0 * SAMPLES_PER_FRAME
            if sent > v.buffer0:
                cut = min(sent - v.buffer0, v.buffer.size)
                v.buffer, v.buffer0 = v.buffer[cut:], v.buffer0 + cut
        v.pending.append(mono48)
        v.pending_size += mono48.size
        # The front end (resampling, features, voice activity) costs per call more than per sample: it runs
        # when the next frame can be cut, or a frame's worth has come, so once per frame with 20 ms packets
        # (the lead puts every window's end on a packet's end). Features made off the loop (MuseTalk's
        # whisper) come back on a later push: those go through with every packet.
        if not v.per_frame or v.pending_size >= SAMPLES_PER_FRAME or v.received >= self._cuttable(v):
            self._analyse(v)
        self._resync(v)
        self._retune(v)
        self._cut(v)

    def _cuttable(self, v: VoiceIn) -> int:
        """Voice received (lead included) when frame `next_i` can be cut: its window and the speech
        decision `fade` frames ahead, through the resampler."""
        i = v.next_i
        return v.resampler.inputs_for(max(v.features.samples_for(i), v.vad.samples_for(i + self.fade)))

    def _analyse(self, v: VoiceIn) -> None:
        """The packets waiting for the front end through it: windows and speech decisions."""
        if not v.pending:
            return
        mono48 = v.pending[0] if len(v.pending) == 1 else np.concatenate(v.pending)
        v.pending.clear()
        v.pending_size = 0
        audio16 = v.resampler.push(mono48)
        for i, w in v.features.push(audio16):
            v.windows[i] = w
        for i, speech in v.vad.push(audio16):
            v.speech[i] = speech

    def _cut(self, v: VoiceIn) -> None:
        # a frame is cut once its audio window and the speech decisions `fade` frames ahead are in (the
        # fade into speech starts before it, as offline)
        fade = self.fade
        while v.next_i in v.windows and v.next_i + fade in v.speech:
            i = v.next_i
            window = v.windows.pop(i)
            v.next_i += 1
            self.speaking = v.speech[i]
            strength = v.level = fade_strength([v.speech.get(i + d, False) for d in range(-fade, fade + 1)], fade)
            v.speech.pop(i - fade, None)
            if strength <= 0 or self.viewers == 0:  # nobody watching: no inference
                continue
            step = i + v.n0
            face = self._crop(step)
            spare = self.start + step / FPS - self.clock()
            noted = self.auto and face is not None
            if noted:
                with self._lock:  # (before the worker can bring its mouth)
                    self._need[step] = (self.delay_s - spare, False)
                    if len(self._need) > NEEDS_KEPT:
                        del self._need[next(iter(self._need))]
            taken = face is not None and self.worker.submit(Request(self, step, window, face, self.start + step / FPS))
            if noted and not taken:
                with self._lock:
                    self._need.pop(step, None)
            self._expected[step] = (strength, face, taken, spare)

    def late_voice(self, behind: int, mono48: np.ndarray) -> None:
        """A packet that came after later ones, starting `behind` samples before the end of the voice
        received: silence stands in its place, and its voice replaces that where not yet sent (the
        mouths there were cut with the silence)."""
        v = self.voice
        if self.closed or v is None or v.n0 is None:
            return
        start = v.received - behind
        if start < v.interrupted_to:  # an interrupt silenced what had come: so it stays
            return
        with self._lock:
            lo, hi = max(start, v.buffer0), min(start + mono48.size, v.buffer0 + v.buffer.size)
            if hi > lo:
                v.buffer[lo - v.buffer0 : hi - v.buffer0] = mono48[lo - start : hi - start]

    def output_sample(self) -> int | None:
        """The voice sample (counted from the voice's first, its lead not counted) going out to the viewers now."""
        v = self.voice
        if v is None or v.n0 is None:
            return None
        return int((self.clock() - self.start) * VOICE_RATE) - v.n0 * SAMPLES_PER_FRAME - self.lead

    def interrupt(self) -> None:
        """Barge-in: what the voice brought and the viewers have not yet seen or heard is dropped now,
        not played out: queued voice (after a 5 ms fade, no click), mouths expected, in flight or
        done, and the speech the front end has heard (its hangover). The mouth rests from the next frame."""
        v = self.voice
        if v is None or v.n0 is None:
            return
        self._analyse(v)  # what was heard before the interrupt counts as heard, then is forgotten
        self._cut(v)
        now = self.clock() - self.start
        with self._lock:
            cut = (int(now * VOICE_RATE / CHUNK) + 1) * CHUNK - v.n0 * SAMPLES_PER_FRAME  # next chunk's first sample
            lo = max(cut, v.buffer0) - v.buffer0
            if lo < v.buffer.size:
                v.buffer = v.buffer.copy()
                fade = v.buffer[lo : lo + FADE_OUT]
                fade *= np.linspace(1, 0, FADE_OUT, dtype=np.float32)[: fade.size]
                v.buffer[lo + FADE_OUT :] = 0
            v.interrupted_to = v.received
            for j in [j for j in self._voice_memo if j * CHUNK - v.n0 * SAMPLES_PER_FRAME >= cut]:
                del self._voice_memo[j]
            step = int(now * FPS) + 1
            for k in [k for k in self._expected if k >= step]:
                del self._expected[k]
            for k in [k for k in self._faces if k >= step]:
                del self._faces[k]
            self._last_face = None
        for i in v.speech:
            v.speech[i] = False
        v.vad.forget()
        v.level = 0.0
        self.speaking = False
        self.interrupts += 1
        log.info("[%s] interrupted on channel %s: voice and mouth rest from frame %d", self.session, self.name, step)

    def _resync(self, v: VoiceIn) -> None:
        """Keep the voice on its pinned timeline by the least lateness of its packets (network jitter
        only ever adds, so that is the offset): the first packet, which pinned it, may itself have come
        late (a busy loop, a sender starting up), and the sender's clock drifts. Judged once on the first
        SETTLE_FIRST_S of voice (or before the first frame is cut), then on each 2 s of packets, in
        silence. The channel's clock moves by the offset (voice and video together, so sync holds) and
        the delay is the target again; an offset over RESYNC_S moves the voice by whole frames first."""
        # (first: before frame 0 is cut, which `_cut` does after this, whatever the engine and packets)
        first = not v.settled and (v.received >= SETTLE_FIRST_S * VOICE_RATE
                                   or (v.next_i == 0 and 0 in v.windows and self.fade in v.speech))
        if not (first or len(v.lateness) == v.lateness.maxlen) or not self._still(v):
            return
        v.settled = True
        late = min(v.lateness)
        if abs(late) <= SETTLE_S:
            return
        v.lateness.clear()
        frames, rest = self._shift(v, late)
        self._moving = True  # (the auto delay judged again)
        if frames:
            self.resyncs += 1
            log.info("[%s] voice %+.0f ms off its timeline (a sender's clock drifting, or its first packet late): "
                     "moved it %+d frame(s) in silence", self.session, 1000 * late, frames)
        if abs(rest) > 1e-6:
            self.settles += 1
            log.debug("[%s] voice %+.1f ms off its pinned timeline: channel clock moved by that", self.session,
                      1000 * rest)

    def _still(self, v: VoiceIn) -> bool:
        """Whether the timeline may move now: in silence, with no mouth still to show (those long past
        their slot go when a viewer asks again)."""
        if self.speaking or v.level > 0:
            return False
        return not (self._expected and max(self._expected) >= (self.clock() - self.start - SHOWN_WITHIN_S) * FPS)

    def _shift(self, v: VoiceIn, by: float, delay: bool = False, frames_first: bool = True) -> tuple[int, float]:
        """Voice and video out `by` seconds later (earlier if negative), together: over RESYNC_S by whole
        frames of the voice first (40 ms of silent input repeated or skipped; not if `frames_first` is
        False: while the talker speaks), the rest by the channel's clock (the tracks send their next frame
        a little later or sooner). `delay`: the delay grows by that (else the voice was found to start
        `by` later than pinned: its frames needed that much less). The frames and the rest moved."""
        frames = round(by * FPS) if frames_first and abs(by) > RESYNC_S else 0
        rest = by - frames / FPS
        with self._lock:  # (with the needs, as `accept` sees them)
            v.n0 += frames
            self.start += rest
            if delay:
                self.delay_s += by
            else:
                for k, (need, came) in self._need.items():
                    self._need[k] = (need - by, came)
        return frames, rest

    def _retune(self, v: VoiceIn) -> None:
        """Auto delay. It starts from what inference was measured to need, and a margin for the network
        and the event loop. Then it is what the speech frames needed (`_need`; their 99th percentile),
        and AUTO_GUARD_S (on a quiet machine and network 10-20 ms above the floor): down once
        AUTO_MEASURED frames have been cut, up to cover jitter that came. When more than AUTO_LATE_SHARE
        of the recent speech frames the worker took missed their mouth and the needs do not say by how
        much (the worker dropped them: it could not make them in time), it grows by a frame, and the
        needs do not take it back; missed frames whose mouths came in time (a track that skipped them,
        its loop stalled) move nothing, no delay would help them. At most AUTO_MAX_S (unless the floor
        and the audio front end's time alone are more), never under those.

        Down, the channel's clock moves (voice and video go out sooner, the same samples and frames in
        the same order: a receiver's jitter buffer plays the little surplus out), when no mouth is in
        flight, at most as far as keeps the tracks within SHOWN_WITHIN_S / 2 of their slots. Up, in
        silence, as a drift correction does; while the talker speaks only when more than AUTO_LATE_SHARE
        missed and were measured late, with no mouth in flight, by the clock, SPEECH_STEP_S at most a
        time (a receiver's jitter buffer, grown with the jitter that made them late, mostly covers the
        gap; a larger one it would fill by stretching speech)."""
        if not self.auto or not v.settled or len(self._recent) < AUTO_WINDOW:
            return
        judged = self.lipsync_frames + self.late
        if judged != self._tuned_at:  # judged once per speech frame shown, then on each packet until it moves
            self._tuned_at, self._moving = judged, True
        if not self._moving:
            return
        want = self._want()
        if want is None:
            self._moving = False
            return
        delay, kind, why = want
        if delay > self.delay_s:
            if not self._still(v):
                if kind != "late" or self._in_flight():
                    return  # (a mouth in flight has its deadline from the slot it had)
                # measured late while speaking: a step by the clock now (a gap a receiver's jitter buffer,
                # grown with the jitter, mostly covers), the rest in the next pause or step
                delay = min(delay, self.delay_s + SPEECH_STEP_S)
                self._shift(v, delay - self.delay_s, delay=True, frames_first=False)
            else:
                self._shift(v, delay - self.delay_s, delay=True)
            if kind == "dropped":
                self._grown_to = delay
        else:
            if self._in_flight():
                return  # a mouth in flight: its slot stays where its deadline was set
            now = self.clock() - self.start  # how far behind their slots the tracks are
            voice = now - (max(self._voice_memo) + 1) * CHUNK / VOICE_RATE if self._voice_memo else 0.0
            behind = max(0.0, now - self._shown / FPS, voice if voice < 1.0 else 0.0)  # (none sending the voice)
            delay = max(delay, self.delay_s - (SHOWN_WITHIN_S / 2 - behind))
            if self.delay_s - delay < AUTO_STEP_S:
                return
            self._shift(v, delay - self.delay_s, delay=True, frames_first=False)
        self._recent.clear()
        self._moving = False
        log.info("[%s] %s: auto delay now %.0f ms", self.session, why, 1000 * self.delay_s)

    def _in_flight(self) -> bool:
        """Whether a mouth the worker took is still to come for a frame not yet shown."""
        with self._lock:
            return any(e[2] and k not in self._faces for k, e in self._expected.items())

    def _want(self) -> tuple[float, str, str] | None:
        """The auto delay the recent speech frames ask for, the kind of reason ("late": mouths measured
        late, "dropped": mouths never came, "needed": what the mouths needed) and why, for the log; None:
        as it is."""
        missed = [k for k, ok in self._recent if not ok]
        with self._lock:
            need_of = dict(self._need)
        needs = [need for need, _ in need_of.values()]
        # the 99th percentile (the upper one: of 25-250 frames, the 1st to 3rd most)
        need = heapq.nlargest(len(needs) // 100 + 1, needs)[-1] if len(needs) >= AUTO_WINDOW else None
        if len(missed) > AUTO_LATE_SHARE * len(self._recent):
            if need is not None and need + AUTO_GUARD_S > self.delay_s:  # they came, late: by this much
                delay, kind, why = need + AUTO_GUARD_S, "late", f"mouths came late (needed {1000 * need:.0f} ms)"
            elif sum(1 for k in missed if k < self._shown - HOLD_FRAMES and k in need_of and not need_of[k][1]
                     and need_of[k][0] + AUTO_GUARD_S <= self.delay_s) > AUTO_LATE_SHARE * len(self._recent):
                # missed frames whose voice was in in time and whose mouth never came: not measured, a frame more
                delay, kind, why = self.delay_s + 1 / FPS, "dropped", "mouths dropped by the worker"
            else:  # the mouths came in time: a track skipped their frames (a stalled loop), which no delay helps
                return None
        else:
            if need is None or (len(needs) < AUTO_MEASURED and not missed):
                return None
            delay, kind, why = max(need + AUTO_GUARD_S, self._grown_to), "needed", f"mouths needed {1000 * need:.0f} ms"
            if missed and delay < self.delay_s:  # a mouth not measured may have needed more
                return None
        delay = min(max(delay, self.min_delay_s + self.front_s), max(AUTO_MAX_S, self.min_delay_s + self.front_s))
        return (delay, kind, why) if abs(delay - self.delay_s) >= AUTO_STEP_S else None

    def _crop(self, step: int) -> np.ndarray | None:
        """The face crop inference needs for output frame `step` (None if the decoder is behind)."""
        src = source_frame(step, self.avatar)
        cached = self.avatar.crops.shape[1] == self.worker.engine.face_size
        return face_crop(self.avatar, src, None if cached else self.frames.get(loop_step(step, self.avatar)),
                         self.worker.engine.face_size)

    # worker thread

    def accept(self, step: int, face: np.ndarray) -> None:
        """A mouth from the inference worker."""
        with self._lock:
            if not self.closed:
                self._faces[step] = face
                if step in self._need:
                    self._need[step] = (self.delay_s - (self.start + step / FPS - self.clock()), True)
                if step < self._shown:
                    log.debug("[%s] mouth %d came %.0f ms after its frame's slot", self.session, step,
                              1000 * (self.clock() - self.start - step / FPS))

    # tracks (event loop)

    def video_frame(self, step: int) -> np.ndarray:
        """Output frame `step`, computed once; every viewer asking for the same step gets the same frame.
        A speech frame gets its lip-synced mouth if it came in time; if not, the last mouth when it is
        at most HOLD_FRAMES old (a slower machine then shows a steady lower mouth rate instead of a
        mouth flashing shut), else the idle one. Never waits."""
        memo = self._video_memo.get(step)
        if memo is not None:
            return memo[0]
        with self._lock:
            face = self._faces.pop(step, None)
            for k in [k for k in self._faces if k < step]:
                del self._faces[k]
            self._shown = max(self._shown, step + 1)  # (a mouth for it that comes now is late)
        for k in [k for k in self._expected if k < step]:  # skipped by the track: never shown
            if self._expected.pop(k)[2]:
                self._recent.append((k, False))
            self.late += 1
            log.debug("[%s] frame %d late: skipped, the video was behind (sent frame %d instead)", self.session, k,
                      step)
        want = self._expected.pop(step, None)
        if want is None:  # a mouth no frame waits for: in flight when the voice was interrupted
            face = None
        loop = loop_step(step, self.avatar)
        frame = self.frames.get(loop)
        if frame is None:  # the decoder is behind: a mouth has no frame to go into
            face = None
        if want is not None:
            if want[2]:  # what the auto delay judges by: mouths the worker took and did not bring in time
                self._recent.append((step, face is not None))
            if face is not None:
                self.lipsync_frames += 1
                self._last_face = (step, face)
            else:
                self.late += 1
                log.debug("[%s] frame %d late: sent %.0f ms after its slot, its mouth %s %.0f ms before it%s",
                          self.session, step, 1000 * (self.clock() - self.start - step / FPS),
                          "asked for" if want[2] else "not taken by the worker", 1000 * want[3],
                          "" if frame is not None else ", no avatar frame decoded")
                if frame is not None and self._last_face is not None and step - self._last_face[0] <= HOLD_FRAMES:
                    face = self._last_face[1]
                    self.held += 1
        made = (None, None)
        if frame is None:  # the decoder is behind: hold the last frame rather than wait
            out = self._held if self._held is not None else self.frames.first
        elif face is not None:
            strength, crop_img, _, _ = want
            src = source_frame(step, self.avatar)
            out = with_mouth(frame, self.avatar, src, face, strength, crop_img)
            made = (frame, tuple(int(v) for v in self.avatar.boxes[src]))
        else:
            out, made = frame, (frame, None)
        self.frames.release(loop_step(step - 2, self.avatar))  # a slower viewer may still ask for the last steps
        self._held = out
        self.sent += 1
        self._sent_at.append(self.clock())
        self._measure(step)
        self._video_memo[step] = (out, *made)
        for k in [k for k in self._video_memo if k < step - 4]:
            del self._video_memo[k]
        return out

    def made_from(self, step: int) -> tuple[np.ndarray | None, tuple | None]:
        """What `video_frame(step)` was made of: the avatar frame, and the box a mouth was blended into
        (outside it the two are the same; None: the frame itself). (None, None) when not known."""
        memo = self._video_memo.get(step)
        return (None, None) if memo is None else memo[1:]

    def _measure(self, step: int) -> None:
        """Voice in -> lips out: when the voice for this frame arrived, and now, when its frame leaves."""
        v = self.voice
        if v is None or v.n0 is None or step < v.n0:
            return
        sample = (step - v.n0) * SAMPLES_PER_FRAME
        k = bisect.bisect_right(v.arrivals, sample, key=lambda a: a[0]) - 1
        if k < 0 or sample >= v.received:
            return
        _, arrival = v.arrivals[k]
        # the packet arrived when its last sample was in; this sample was spoken a little earlier
        packet_end = v.arrivals[k + 1][0] if k + 1 < len(v.arrivals) else v.received
        delay = self.clock() - (arrival - (packet_end - sample) / VOICE_RATE)
        self.delays.append(delay)
        self.off.append(delay - self.delay_s)
        if self.on_delay:
            self.on_delay(delay)

    def voice_chunk(self, j: int) -> np.ndarray:
        """Output voice samples [j*960, (j+1)*960): the input delayed to match the lips; silence if
        none. Computed once per chunk, shared by every viewer."""
        memo = self._voice_memo.get(j)
        if memo is not None:
            return memo
        out = np.zeros(CHUNK, np.float32)
        v = self.voice
        if v is not None and v.n0 is not None:
            s = j * CHUNK - v.n0 * SAMPLES_PER_FRAME
            with self._lock:
                lo, hi = max(s, v.buffer0), min(s + CHUNK, v.buffer0 + v.buffer.size)
                if hi > lo:
                    out[lo - s : hi - s] = v.buffer[lo - v.buffer0 : hi - v.buffer0]
                keep = max(v.buffer0, s + CHUNK)  # what is sent is done with
                if keep > v.buffer0:
                    v.buffer = v.buffer[keep - v.buffer0 :]
                    v.buffer0 = keep
        self._voice_memo[j] = out
        for k in [k for k in self._voice_memo if k < j - 8]:
            del self._voice_memo[k]
        return out

    def fps(self) -> float:
        """Frames a second over the last two seconds (0 when none came in the last second)."""
        t = self._sent_at
        if len(t) < 2 or self.clock() - t[-1] > 1.0:
            return 0.0
        return round((len(t) - 1) / max(1e-9, t[-1] - t[0]), 2)

    def viewer_left(self) -> None:
        """One viewer fewer. With none left, the mouths expected go: no frame will show them, and a viewer
        who comes later must not find them counted late (nor the auto delay widened by them)."""
        self.viewers -= 1
        if self.viewers <= 0:
            self._expected.clear()

    def follow_wire(self, wire) -> None:
        """The arrivals (`wire.VoiceArrivals`) of the voice now driving the channel; None when it ends.
        What their decoders made up for lost packets is counted over the channel's life."""
        if wire is not self.wire:
            self._lost, self.wire = self.voice_losses(), wire

    def voice_losses(self, current: bool = False) -> tuple[int, int, int]:
        """Voice lost on the way in, over the channel's life (current: the voice driving it now):
        samples made up (concealed, or rebuilt from the next packet's FEC copy; not gaps too long to
        make up, left silent), of those rebuilt from FEC copies, and packets placed late (after a
        later one, or after their time was made up: a busy server's event loop makes those too)."""
        made, fec, late = (0, 0, 0) if current else self._lost
        decoder = getattr(self.wire, "voice", None)
        if decoder is not None:
            made, fec, late = made + decoder.concealed, fec + decoder.recovered, late + decoder.late
        return made, fec, late

    def stats(self) -> dict:
        d = np.array(self.delays) * 1000 if self.delays else np.zeros(0)
        made, fec, late = self.voice_losses(current=True)
        return {"channel": self.name, "frames_sent": self.sent, "viewers": self.viewers,
                "fps": self.fps(),
                "lipsync_frames": self.lipsync_frames, "late_frames": self.late, "held_frames": self.held,
                "voice_lost_ms": round(1000 * made / VOICE_RATE), "voice_fec_ms": round(1000 * fec / VOICE_RATE),
                "voice_late_packets": late,
                "speaking": self.speaking,
                "delay_ms_p50": round(float(np.percentile(d, 50)), 1) if d.size else None,
                "delay_ms_p95": round(float(np.percentile(d, 95)), 1) if d.size else None,
                # how far the delays measured were from the delay set when each was (p95): the timeline's health
                "delay_off_ms_p95": round(float(np.percentile(np.abs(self.off), 95)) * 1000, 1) if self.off else None,
                "target_delay_ms": round(self.delay_s * 1000),
                "first_target_delay_ms": round(self.first_delay_s * 1000)}

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._faces.clear()
            _end_features(self.voice)  # the voice stays, for its figures
        self.frames.close()
        self.shared.clear()
