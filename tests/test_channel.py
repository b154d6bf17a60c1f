"""The channel's pipeline on a driven clock: no network, no codec, exact answers."""

import asyncio

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from scipy import signal

from streamer.audio.features import MelFeatures
from streamer.audio.mel import LOOKAHEAD_S
from streamer.audio.resample import StreamResampler
from streamer.avatar.cache import demo_avatar
from streamer.lipsync.builtin import BuiltinEngine
from streamer.live.channel import (
    CHUNK,
    FPS,
    MIN_DELAY_S,
    SAMPLES_PER_FRAME,
    VOICE_RATE,
    Channel,
    packet_floor,
    voice_lead,
)
from streamer.live.tracks import BEHIND_S, read_voice
from streamer.live.worker import InferenceWorker
from tests.conftest import speak


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    return demo_avatar(tmp_path_factory.mktemp("avatars"))


def simulated_channel(avatar, viewers: int = 1, voice: bool = True, engine=None, delay_s: float = 0.3):
    """(clock cell, worker, channel) on a simulated clock (set now[0]; drain the worker yourself)."""
    now = [100.0]
    worker = InferenceWorker(engine or BuiltinEngine(), clock=lambda: now[0])
    ch = Channel("c", avatar, worker, delay_s=delay_s, clock=lambda: now[0])
    ch.viewers = viewers
    if voice:
        ch.attach_voice("s")
    return now, worker, ch


def test_channel_timeline_is_exact(avatar):
    x, rate = speak("One two three, lips and voice together.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    lead = 48000  # 1 s of silence first
    voice = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(2 * 48000, np.float32)])
    from streamer.live.tracks import I420Frames, encoder_frame

    now, worker, ch = simulated_channel(avatar)
    idle = next(iter(avatar.read_frames(0, count=1)))[2]
    frames, chunks = {}, {}
    n = j = 0
    yuv = I420Frames()
    for k in range(0, voice.size, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000  # each packet arrives as its last sample is spoken
        ch.push_voice(voice[k : k + CHUNK])
        assert worker.drain()
        while ch.start + n / FPS <= now[0]:  # the video track's schedule
            frames[n] = ch.video_frame(n)
            # what the encoder gets, converting only what changed: as if the whole frame were converted
            got = yuv.frame(frames[n], *ch.made_from(n))
            assert np.array_equal(got.to_ndarray(), encoder_frame(frames[n]).to_ndarray()), n
            n += 1
        while ch.start + j * CHUNK / 48000 <= now[0]:  # the voice track's schedule
            chunks[j] = ch.voice_chunk(j)
            j += 1
    worker.close()
    ch.close()

    # the delay is exactly the target, measured for every frame once voice flowed
    d = np.array(ch.delays)
    assert len(d) > 100 and np.abs(d - 0.3).max() < 0.021  # within one 20 ms packet
    assert ch.late == 0 and ch.lipsync_frames > 30
    assert np.array_equal(yuv._base, idle)  # the still avatar's frame, converted once

    # the voice comes out delayed by exactly n0 frames and the lead
    out = np.concatenate([chunks[i] for i in range(j)])
    shift = ch.n0 * SAMPLES_PER_FRAME + ch.lead
    m = min(out.size - shift, voice.size)
    assert np.abs(out[shift : shift + m] - voice[:m]).max() < 1e-6

    # silent frames are the idle avatar, bit for bit; speech frames change only the lower face
    changed = {k for k, f in frames.items() if not np.array_equal(f, idle)}
    assert changed
    x1, y1, x2, y2 = avatar.boxes[0]
    for k in changed:
        diff = np.abs(frames[k].astype(int) - idle).sum(axis=2)
        ys, xs = np.nonzero(diff)
        assert ys.min() >= y1 + (y2 - y1) * 0.4 and xs.min() >= x1 and xs.max() < x2 and ys.max() < y2

    # lips start with the voice: the first moving frame is within the pre-roll (3 frames) before
    # the first voiced output frame, and never after it
    first_voice_frame = ch.n0 + (lead + int(np.argmax(np.abs(speech) > 0.02))) // SAMPLES_PER_FRAME
    first_moving = min(changed)
    assert first_voice_frame - 4 <= first_moving <= first_voice_frame
    # and they rest again after the voice ends (hangover 240 ms + 2 fade frames)
    last_voice_frame = ch.n0 + (lead + speech.size - int(np.argmax(np.abs(speech[::-1]) > 0.02))) // SAMPLES_PER_FRAME
    assert max(changed) <= last_voice_frame + 6 + 2 + 1


def phrases_with_pauses(pause_s: float, repeats: int) -> np.ndarray:
    """48 kHz voice: a pause, then `repeats` times a short phrase and a pause."""
    x, rate = speak("Here is one phrase, then a pause.")
    phrase = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    pause = np.zeros(int(pause_s * 48000), np.float32)
    return np.concatenate([pause] + [np.concatenate([phrase, pause])] * repeats)


@pytest.mark.parametrize("skew", [0.005, -0.005])
def test_sender_clock_drift_is_absorbed_in_silence(avatar, skew):
    """A sender whose clock runs 0.5% fast or slow (50 times a bad sound card, so the drift shows in
    seconds): the delay must stay at its target instead of moving 100 ms in 20 s."""
    voice = phrases_with_pauses(1.5, 5)
    now, worker, ch = simulated_channel(avatar)
    n = 0
    for k in range(0, voice.size, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000 / (1 + skew)  # the sender's 48 kHz is (1 + skew) x 48 kHz
        ch.push_voice(voice[k : k + CHUNK])
        assert worker.drain()
        while ch.start + n / FPS <= now[0]:
            ch.video_frame(n)
            n += 1
    worker.close()
    ch.close()
    d = np.array(ch.delays)
    assert np.abs(d - 0.3).max() < 0.06, (d.min(), d.max())
    assert ch.resyncs + ch.settles >= 2, (ch.resyncs, ch.settles)
    assert ch.late == 0


def test_auto_delay_widens_in_silence_when_mouths_come_late(avatar):
    """Auto delay starts from the measured inference time; when mouths still come late (here: a worker
    that never answers), the delay grows a frame at a time in the pauses, voice and video together,
    up to its cap, and the voice-in to lips-out delay measured per frame follows it."""
    from streamer.live.channel import AUTO_MAX_S

    voice = phrases_with_pauses(1.0, 4)
    now = [100.0]
    worker = InferenceWorker(BuiltinEngine(), clock=lambda: now[0])
    worker.close()  # nothing is ever inferred: every speech frame is late
    ch = Channel("c", avatar, worker, delay_s=None, clock=lambda: now[0])
    first = ch.delay_s
    ch.viewers = 1
    ch.attach_voice("s")
    n = 0
    for k in range(0, voice.size, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000
        ch.push_voice(voice[k : k + CHUNK])
        while ch.start + n / FPS <= now[0]:
            ch.video_frame(n)
            n += 1
    ch.close()
    assert first < 0.27  # the builtin engine needs almost nothing beyond the lookahead and margin
    assert first + 2 / FPS - 1e-9 <= ch.delay_s <= AUTO_MAX_S
    assert abs(ch.delays[-1] - ch.delay_s) < 0.021  # the timeline moved with it
    assert ch.lipsync_frames == 0 and ch.late > 100


def run_auto(avatar, voice: np.ndarray, hold=lambda k: 0.0):
    """`voice` in 20 ms packets into an auto-delay channel on a driven clock, packet k held `hold(k)` s on
    the way (none overtakes another), every frame shown and every voice chunk sent at its slot, or
    skipped as a track does when over BEHIND_S behind: (channel, voice chunks sent in order, (time,
    delay) at each change of the auto delay)."""
    now, worker, ch = simulated_channel(avatar, delay_s=None)
    sent, changes, n, j, last = [], [(0.0, ch.delay_s)], 0, 0, 0.0
    for k in range(0, voice.size // CHUNK):
        last = max(last, 100.0 + (k + 1) * CHUNK / 48000 + hold(k))
        now[0] = last
        while ch.start + n / FPS <= now[0]:
            if now[0] - (ch.start + n / FPS) > BEHIND_S:
                n = int((now[0] - ch.start) * FPS)
            ch.video_frame(n)
            n += 1
        while ch.start + j * CHUNK / 48000 <= now[0]:
            if now[0] - (ch.start + j * CHUNK / 48000) > BEHIND_S:
                j = int((now[0] - ch.start) * 48000 / CHUNK)
            sent.append(ch.voice_chunk(j))
            j += 1
        ch.push_voice(voice[k * CHUNK : (k + 1) * CHUNK])
        assert worker.drain()
        if ch.delay_s != changes[-1][1]:
            changes.append((now[0] - 100.0, ch.delay_s))
    worker.close()
    ch.close()
    return ch, np.concatenate(sent), changes


def test_auto_delay_comes_down_to_what_the_mouths_need_while_speaking(avatar):
    """Auto delay starts with a margin for jitter the network and the event loop may bring (256 ms with
    the builtin engine); once 2 s of mouths have come back with time to spare, it comes down to what
    they needed and a 10 ms guard, while the talker speaks: the same voice samples go out, in order,
    none skipped or repeated, sooner; the same mouths, none late; the lips still on their voice."""
    x, rate = speak("One two three, lips and voice together. And four five six, on it goes, without a pause.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(24000, np.float32), speech, np.zeros(48000, np.float32)])
    ch, sent, changes = run_auto(avatar, voice)
    first, settled = changes[0][1], ch.delay_s
    assert len(changes) == 2 and changes[1][0] < 0.5 + speech.size / 48000 - 1, changes  # moved while speaking
    assert first - settled > 0.01 and settled == pytest.approx(MIN_DELAY_S + 0.01, abs=0.002), (first, settled)
    assert ch.late == 0 and ch.lipsync_frames > 80
    lead = voice_lead(LOOKAHEAD_S)
    out = sent[ch.n0 * SAMPLES_PER_FRAME + lead :]
    m = min(out.size, voice.size)
    assert m > voice.size - 48000 // 2 and np.array_equal(out[:m], voice[:m])
    assert abs(np.median(list(ch.delays)[-40:]) - settled) < 0.021  # measured voice in -> lips out follows


def test_auto_delay_comes_down_far_in_steps_the_tracks_keep_up_with(avatar, monkeypatch):
    """A first margin of 100 ms (313 ms): the auto delay comes down 90 ms, 50 ms at most a time, so the
    tracks, sending what is due sooner, stay within their 100 ms of their slots and skip nothing: all of
    the voice goes out, in order, every mouth in time."""
    from streamer.live import channel

    monkeypatch.setattr(channel, "AUTO_MARGIN_S", 0.1)
    voice = phrases_with_pauses(0.5, 3)
    ch, sent, changes = run_auto(avatar, voice)
    steps = np.diff([d for _, d in changes])
    assert len(steps) >= 2 and steps.max() < 0 and steps.min() >= -0.05 - 1e-9, changes
    assert ch.delay_s == pytest.approx(MIN_DELAY_S + 0.01, abs=0.002) and ch.late == 0, (changes, ch.late)
    out = sent[ch.n0 * SAMPLES_PER_FRAME + voice_lead(LOOKAHEAD_S) :]
    m = min(out.size, voice.size)
    assert m > voice.size - 48000 // 2 and np.array_equal(out[:m], voice[:m])


def test_auto_delay_grows_to_cover_the_jitter_that_came(avatar):
    """A network that holds every fifth voice packet 60 ms (those behind it wait too): mouths of the
    first phrase come late, by as much as the holds. The auto delay grows to what they needed and the
    guard: while the talker speaks, 20 ms a step (a gap a receiver's jitter buffer covers), the rest in
    the pause; the next phrases' mouths are in time."""
    voice = phrases_with_pauses(1.0, 3)
    ch, sent, changes = run_auto(avatar, voice, hold=lambda k: 0.06 if k % 5 == 0 else 0.0)
    assert ch.delay_s == pytest.approx(MIN_DELAY_S + 0.06 + 0.01, abs=0.006), ch.delay_s
    phrase_s = (voice.size / 48000 - 1.0) / 3
    steps = np.diff([d for _, d in changes])
    assert changes[1][0] < 1.0 + phrase_s and steps.min() > 0 and steps[:-1].max() <= 0.02 + 1e-9, changes
    assert changes[-1][0] < 1.0 + 2 * phrase_s, changes  # grown by the end of the first pause
    assert 0 < ch.late < phrase_s * FPS, ch.late  # late in the first phrase only


def test_a_slower_path_is_settled_not_also_added_to_the_auto_delay(avatar):
    """The voice's path gets 20 ms slower in the first phrase: its later mouths need 20 ms more, within the
    delay. In the pause the timeline settles on where the voice now arrives (20 ms later), so those
    frames needed 20 ms less than they seemed: the auto delay comes down to the floor and the guard, not
    20 ms above."""
    voice = phrases_with_pauses(1.0, 3)
    ch, sent, changes = run_auto(avatar, voice, hold=lambda k: 0.02 if k * CHUNK / 48000 >= 1.8 else 0.0)
    assert ch.resyncs + ch.settles >= 1 and ch.late == 0
    assert ch.delay_s == pytest.approx(MIN_DELAY_S + 0.01, abs=0.003), changes


def test_mouths_expected_when_the_last_viewer_left_are_not_counted_late_when_one_comes_back(avatar):
    """The last viewer leaves mid-speech (an OBS source hidden) and one comes back a second later: the
    mouths that were expected when it left were never to be shown, and must not count as late frames
    (nor widen the auto delay); the speech after it came back is lip-synced as before."""
    x, rate = speak("One two three, lips and voice together. And four five six, on it goes.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(24000, np.float32), speech, np.zeros(48000, np.float32)])
    now, worker, ch = simulated_channel(avatar)
    n, gone = 0, (1.2, 2.2)  # seconds into the voice with no viewer
    for k in range(0, voice.size, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000
        t = (k + CHUNK) / 48000
        if ch.viewers and gone[0] <= t < gone[1]:
            ch.viewer_left()
        elif not ch.viewers and t >= gone[1]:
            ch.viewers += 1
            n = int((now[0] - ch.start) * FPS)  # a track starts at the frame due now
        ch.push_voice(voice[k : k + CHUNK])
        assert worker.drain()
        while ch.viewers and ch.start + n / FPS <= now[0]:
            ch.video_frame(n)
            n += 1
    worker.close()
    ch.close()
    assert ch.late == 0 and ch.lipsync_frames > 30, (ch.late, ch.lipsync_frames)


def test_voice_with_no_viewer_stays_bounded(avatar):
    """A WHIP publisher with no viewer: the outgoing voice nobody asks for is let go (it grew 11.5 MB a
    minute before), and a viewer arriving later still gets the voice from then on."""
    now = [100.0]
    worker = InferenceWorker(BuiltinEngine(), clock=lambda: now[0])
    ch = Channel("c", avatar, worker, delay_s=0.3, clock=lambda: now[0])
    ch.attach_voice("s")
    rng = np.random.default_rng(0)
    voice = (0.1 * rng.standard_normal(60 * 48000)).astype(np.float32)  # a minute, nobody watching
    for k in range(0, voice.size, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000
        ch.push_voice(voice[k : k + CHUNK])
    assert ch.voice.buffer.size < 2 * 48000, ch.voice.buffer.size
    j = int((now[0] - ch.start) * 48000 / CHUNK)  # a viewer now gets the voice delayed as ever
    s = j * CHUNK - ch.n0 * SAMPLES_PER_FRAME - ch.lead
    assert np.array_equal(ch.voice_chunk(j), voice[s : s + CHUNK])
    worker.close()
    ch.close()


def test_interrupt_drops_voice_and_mouths_not_yet_out_even_those_in_flight(avatar):
    x, rate = speak("One two three, lips and voice together, and on and on.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(48000, np.float32), speech, np.zeros(48000, np.float32), speech,
                            np.zeros(48000, np.float32)])
    now, worker, ch = simulated_channel(avatar)
    idle = next(iter(avatar.read_frames(0, count=1)))[2]
    frames, chunks = {}, {}
    n = j = 0
    cut_at = 48000 + speech.size // 2  # mid-speech: what was pushed before is dropped, then comes silence
    voice[cut_at : 48000 + speech.size] = 0
    cut_time = None
    for k in range(0, voice.size, CHUNK):
        now[0] = 100.0 + (k + CHUNK) / 48000
        ch.push_voice(voice[k : k + CHUNK])
        if k + CHUNK >= cut_at and cut_time is None:
            cut_time = now[0]
            ch.interrupt()
            assert worker.drain()  # mouths that were in flight arrive after the interrupt
        elif k % (4 * CHUNK) == 0:
            assert worker.drain()
        while ch.start + n / FPS <= now[0]:
            frames[n] = ch.video_frame(n)
            n += 1
        while ch.start + j * CHUNK / 48000 <= now[0]:
            chunks[j] = ch.voice_chunk(j)
            j += 1
    worker.close()
    ch.close()
    moving = [k for k, f in frames.items() if not np.array_equal(f, idle)]
    first_after = int((cut_time - ch.start) * FPS) + 1
    assert [k for k in moving if k < first_after]  # it was speaking before
    second = ch.n0 + (48000 + speech.size + 48000) // SAMPLES_PER_FRAME  # the next utterance's first frame
    assert not [k for k in moving if first_after <= k < second - 4]  # rests at once, until the next one
    assert [k for k in moving if k >= second]  # which lip-syncs as usual
    j_cut = int((cut_time - ch.start) * 48000 / CHUNK) + 1
    out = np.concatenate([chunks[i] for i in range(j_cut, (second * SAMPLES_PER_FRAME) // CHUNK - 1)])
    assert np.abs(out[240:]).max() == 0 and np.abs(out[:240]).max() < 0.5  # silent after a 5 ms fade
    assert np.abs(np.concatenate([chunks[i] for i in range(j_cut)])).max() > 0.1
    assert ch.interrupts == 1


def test_fps_stat_is_the_recent_rate_not_the_average_since_the_channel_opened(avatar):
    now, worker, ch = simulated_channel(avatar, viewers=0, voice=False)
    now[0] = 200.0  # open, unwatched, for 100 s
    for n in range(int(100 * FPS), int(103 * FPS)):
        now[0] = ch.start + n / FPS
        ch.video_frame(n)
    assert abs(ch.stats()["fps"] - FPS) < 0.1, ch.stats()
    now[0] += 2
    assert ch.stats()["fps"] == 0.0  # nothing sent lately
    worker.close()
    ch.close()


def test_a_frame_that_fails_goes_out_as_the_avatars_first_frame_and_is_logged_once(avatar, caplog):
    """Whoever encodes a channel's frames (a viewer's track, the shared chain) sends on through a defect."""
    from streamer.live.tracks import VIDEO_CLOCK, output_frame

    _, worker, ch = simulated_channel(avatar, voice=False)
    good, failed = output_frame(ch, 3, False)
    assert not failed and good.pts == 3 * VIDEO_CLOCK // FPS
    ch.video_frame = lambda n: 1 / 0
    with caplog.at_level("ERROR"):
        frames = [output_frame(ch, n, n > 4) for n in (4, 5, 6)]
    assert all(failed for _, failed in frames) and [f.pts for f, _ in frames] == [4 * 3600, 5 * 3600, 6 * 3600]
    assert sum("frame 4 failed" in r.getMessage() for r in caplog.records) == 1 and len(caplog.records) == 1
    first = ch.frames.first
    assert np.abs(frames[0][0].to_ndarray(format="bgr24").astype(int) - first).mean() < 3  # (I420 round trip)
    worker.close()
    ch.close()


@pytest.mark.parametrize("packet_ms", [10, 20, 40, 60])
def test_every_frames_audio_is_in_by_the_delay_floor(packet_ms):
    """Voice in packets from its first sample, led by the channel's silence (`voice_lead`), through the
    channel's resampler and Wav2Lip's windows: each frame's window is out by the packet that ends
    `packet_floor` after the frame's start. With 10, 20 or 40 ms packets that is the lookahead and the
    resampler's hold (213.125 ms), not whole packets from the frame's start (220) nor a packet more
    (232.5), and the latest frames need all of it."""
    resampler, stream = StreamResampler(VOICE_RATE), MelFeatures().stream()
    lead = voice_lead(LOOKAHEAD_S)  # the channel's, made for 20 ms packets
    voice = np.random.default_rng(0).standard_normal(4 * VOICE_RATE).astype(np.float32) * 0.1
    size = VOICE_RATE * packet_ms // 1000
    waits = {}
    stream.push(resampler.push(np.zeros(lead, np.float32)))  # (no window is out with the lead alone)
    for k in range(0, voice.size, size):
        for i, _ in stream.push(resampler.push(voice[k : k + size])):
            waits[i] = (lead + k + size) / VOICE_RATE - i / FPS  # timeline: the lead's start is frame 0's
    assert len(waits) > 90
    floor = packet_floor(LOOKAHEAD_S, packet_ms / 1000)
    assert max(waits.values()) <= floor + 1e-9
    if packet_ms <= 40:
        assert lead == 630 and floor == pytest.approx(0.213125) == MIN_DELAY_S
        assert max(waits.values()) == pytest.approx(floor)


def test_without_the_lead_a_frames_audio_waits_for_whole_packets():
    """What the lead is for: from the voice's first sample alone, 20 ms packets bring each window 220 ms
    after its frame's start, 6.9 ms past the floor."""
    resampler, stream = StreamResampler(VOICE_RATE), MelFeatures().stream()
    voice = np.random.default_rng(0).standard_normal(2 * VOICE_RATE).astype(np.float32) * 0.1
    waits = [(k + CHUNK) / VOICE_RATE - i / FPS for k in range(0, voice.size, CHUNK)
             for i, _ in stream.push(resampler.push(voice[k : k + CHUNK]))]
    assert max(waits) == pytest.approx(0.22)


@pytest.mark.parametrize("phase, packet", [(0.0, CHUNK), (0.0137, CHUNK), (0.031, CHUNK), (0.0137, CHUNK // 2),
                                           (0.0137, 2 * CHUNK)])
def test_at_the_floor_every_speech_frame_is_cut_by_its_slot_and_some_just_by_it(avatar, phase, packet):
    """The channel pins the voice to its first packet and re-phases its clock, so with the delay at the
    floor (213.125 ms) each speech frame's window is cut no later than its slot, whatever the clock's phase
    against the packets, with 10, 20 or 40 ms packets; the tightest has no time to spare (the floor is
    exact, not padded)."""
    x, rate = speak("One two three, lips and voice together.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(24000, np.float32), speech, np.zeros(48000, np.float32)])
    now, worker, ch = simulated_channel(avatar, delay_s=MIN_DELAY_S)
    slack = {}
    for k in range(0, voice.size, packet):
        now[0] = 100.0 + phase + (k + packet) / 48000  # each packet arrives as its last sample is spoken
        ch.push_voice(voice[k : k + packet])
        slack.update({step: want[3] for step, want in ch._expected.items() if step not in slack})
        assert worker.drain()
    worker.close()
    ch.close()
    assert ch.delay_s == pytest.approx(MIN_DELAY_S) and len(slack) > 30
    assert -1e-9 <= min(slack.values()) < 0.001


def arrival_slack(avatar, voice: np.ndarray, off_s: float, first: int = 2, packet: int = CHUNK):
    """A voice at the floor whose first `first` packets came `off_s` later than the rest (earlier if
    negative): (channel, {speech step: seconds from its cut to its slot})."""
    now, worker, ch = simulated_channel(avatar, delay_s=MIN_DELAY_S)
    slack, n = {}, 0
    for p, k in enumerate(range(0, voice.size, packet)):
        now[0] = 100.0 + (k + packet) / 48000 + (off_s if p < first else 0.0)
        ch.push_voice(voice[k : k + packet])
        slack.update({step: want[3] for step, want in ch._expected.items() if step not in slack})
        assert worker.drain()
        while ch.start + n / FPS <= now[0]:  # the video track's schedule
            ch.video_frame(n)
            n += 1
    worker.close()
    ch.close()
    return ch, slack


@pytest.mark.parametrize("late, pause, packet", [(0.008, 0.5, CHUNK), (0.008, 0.0, CHUNK), (0.008, 0.0, 2 * CHUNK),
                                                 (0.035, 0.0, CHUNK), (0.085, 0.5, CHUNK)])
def test_a_voice_whose_first_packets_came_late_is_settled_before_its_first_mouth(avatar, late, pause, packet):
    """The voice is pinned by its first packet's arrival. When the first two packets came late (a busy
    loop, a sender starting up: 4-25 ms seen with 4 talkers on one loop), every later frame went out
    that much after the target delay. The timeline settles on the packets that follow, before the first
    frame is cut, even when the speech starts at once, with 20 or 40 ms packets; over 30 ms off, by
    whole frames and the rest: at the floor, the tightest speech frame is cut with no time to spare
    (8 ms to spare before), and none late."""
    x, rate = speak("One two three, lips and voice together.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(int(pause * 48000), np.float32), speech, np.zeros(48000, np.float32)])
    ch, slack = arrival_slack(avatar, voice, late, packet=packet)
    assert len(slack) > 30 and -1e-9 <= min(slack.values()) < 0.001, min(slack.values())
    assert ch.resyncs == (late > 0.03) and ch.settles == 1


def test_a_voice_that_came_in_later_than_its_first_packet_is_settled_in_the_next_pause(avatar):
    """The other way: the first packets came 10 ms sooner than the rest (the loop got busier after them,
    or the first packet was lucky with the network). Network jitter only ever adds, so the first
    packets cannot tell that from jitter; 2 s of packets can, in the next pause: at the floor the first
    phrase's mouths are 10 ms late until then, the second phrase's are not."""
    x, rate = speak("One two three, lips and voice together.")
    phrase = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    pause = np.zeros(int(2.5 * 48000), np.float32)
    voice = np.concatenate([pause[:24000], phrase, pause, phrase, pause[:48000]])
    ch, slack = arrival_slack(avatar, voice, -0.01)
    second = (24000 + phrase.size + pause.size) // SAMPLES_PER_FRAME + ch.n0
    first_phrase = [s for step, s in slack.items() if step < second]
    second_phrase = [s for step, s in slack.items() if step >= second]
    assert len(second_phrase) > 30 and -1e-9 <= min(second_phrase) < 0.001, min(second_phrase)
    assert min(first_phrase) == pytest.approx(-0.01, abs=1e-6)
    assert ch.settles == 1 and ch.resyncs == 0


@pytest.mark.parametrize("packet, preroll_ms, fade", [(CHUNK // 2, 40, 2), (CHUNK, 40, 2), (2 * CHUNK, 40, 2),
                                                      (CHUNK, 100, 2), (CHUNK // 2, 300, 0)])
def test_the_front_end_once_a_frame_cuts_every_frame_on_the_packet_it_did_per_packet(avatar, packet, preroll_ms,
                                                                                      fade):
    """Running the front end only when the next frame can be cut (or a frame's worth waits) loses no time:
    each frame is cut on the very packet that completed its window and speech decisions before."""
    from streamer.audio import VoiceActivity

    x, rate = speak("One two three.")
    speech = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(12000, np.float32), speech, np.zeros(24000, np.float32)])

    def cut_on(per_frame):
        now = [100.0]
        worker = InferenceWorker(BuiltinEngine(), clock=lambda: now[0])
        ch = Channel("c", avatar, worker, delay_s=0.4, fade=fade, clock=lambda: now[0],
                     vad_factory=lambda: VoiceActivity(fps=FPS, preroll_ms=preroll_ms))
        ch.viewers = 1
        ch.attach_voice("s")
        ch.voice.per_frame = per_frame
        cut, runs = {}, 0
        for k in range(0, voice.size, packet):
            now[0] = 100.0 + (k + packet) / 48000
            before = ch.voice.next_i
            ch.push_voice(voice[k : k + packet])
            cut.update({i: k for i in range(before, ch.voice.next_i)})
            runs += ch.voice.pending_size == 0
            worker.drain()
        worker.close()
        ch.close()
        return cut, runs

    (per_packet, every), (per_frame, fewer) = cut_on(False), cut_on(True)
    assert per_frame == per_packet and len(per_frame) > 40
    share = {CHUNK // 2: 0.35, CHUNK: 0.55}  # of the packets, the front end runs on about 1 in 4 and 1 in 2
    if packet in share:
        assert fewer <= share[packet] * every
    else:  # a frame or more a packet: on every one (a short last packet aside)
        assert fewer >= every - 1


class _Packets(MediaStreamTrack):
    """Decoded voice packets as aiortc's receiver hands them over (48 kHz stereo s16, stamped), then the end."""

    kind = "audio"

    def __init__(self, packets: list[tuple[int, np.ndarray]]):
        super().__init__()
        self.packets = list(packets)

    async def recv(self):
        if not self.packets:
            raise MediaStreamError
        pts, mono = self.packets.pop(0)
        pcm = np.repeat(np.round(mono * 32767).astype(np.int16), 2)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = VOICE_RATE, pts
        return frame


def test_a_packet_that_comes_after_the_next_puts_its_voice_in_its_place(avatar):
    now, worker, ch = simulated_channel(avatar)
    rng = np.random.default_rng(1)
    voice = np.clip(0.1 * rng.standard_normal(20 * CHUNK), -1, 1)
    packets = [(k * CHUNK, voice[k * CHUNK : (k + 1) * CHUNK]) for k in range(20)]
    packets[5], packets[6] = packets[6], packets[5]  # 5 comes after 6
    packets[12], packets[14] = packets[14], packets[12]  # 12 after 14 (and 13)
    asyncio.run(read_voice(_Packets(packets), ch))
    assert ch.voice.received == ch.lead + voice.size and ch.lead == 630
    assert np.abs(ch.voice.buffer[ch.lead :] - voice).max() < 1e-3  # each in its place; silence stood in meanwhile
    worker.close()
    ch.close()


def test_a_late_packet_longer_than_what_stood_in_its_place_puts_the_rest_on_as_new_voice(avatar):
    """20 ms made up for a packet that was late, and the packet comes: 40 ms. Its first 20 ms replace
    what was made up, the rest goes on as the voice after it (dropped, it left a hole: a click)."""
    now, worker, ch = simulated_channel(avatar)
    rng = np.random.default_rng(2)
    voice = np.clip(0.1 * rng.standard_normal(20 * CHUNK), -1, 1)
    packets = [(k * CHUNK, voice[k * CHUNK : (k + 1) * CHUNK]) for k in range(10)]
    packets += [(10 * CHUNK, np.zeros(CHUNK)), (10 * CHUNK, voice[10 * CHUNK : 12 * CHUNK])]  # made up, then it
    packets += [(k * CHUNK, voice[k * CHUNK : (k + 1) * CHUNK]) for k in range(12, 20)]
    asyncio.run(read_voice(_Packets(packets), ch))
    assert ch.voice.received == ch.lead + voice.size
    assert np.abs(ch.voice.buffer[ch.lead :] - voice).max() < 1e-3
    worker.close()
    ch.close()


def test_a_sender_whose_timestamps_jump_back_is_pinned_afresh_not_ignored(avatar):
    """A sender that starts again (new stream, timestamps behind the old ones): its voice is a new voice on
    the channel's clock. Taken for packets behind their turn, all of it used to be dropped."""
    now, worker, ch = simulated_channel(avatar)
    voice = np.full(CHUNK, 0.25)
    first = [(k * CHUNK, voice) for k in range(50)]
    again = [((k - 600) * CHUNK % (1 << 32), voice) for k in range(30)]  # 12 s back
    asyncio.run(read_voice(_Packets(first), ch))
    old = ch.voice
    asyncio.run(read_voice(_Packets(first + again), ch))
    assert ch.voice is not old and ch.voice.received == ch.lead + 30 * CHUNK
    worker.close()
    ch.close()
