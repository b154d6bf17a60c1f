from types import SimpleNamespace

import numpy as np
import pytest
from aiortc import RTCRtpReceiver
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import RemoteStreamTrack, TimestampMapper
from aiortc.rtp import RtpPacket

from streamer.live.tracks import OpusPackets, voice_samples
from streamer.live.wire import KEEP, LATEST, RESTART, VoiceArrivals, unbuffered


def packet(seq, ts, data=b"\x01"):
    p = RtpPacket(payload_type=111, sequence_number=seq, timestamp=ts)
    p._data = data  # what aiortc's depayloader leaves on the packet
    return p


def test_each_packet_goes_on_at_once_and_its_arrival_is_found_by_the_decoded_frames_pts():
    """Across an RTP timestamp wrap and a reordered pair, as aiortc's receiver would stamp the frames."""
    now = [0.0]
    buf, mapper = VoiceArrivals(clock=lambda: now[0]), TimestampMapper()
    order = [0, 1, 3, 2, 4, 5]  # packet 3 comes before 2
    first = (1 << 32) - 2 * 960
    found = {}
    for k in order:
        now[0] = k * 0.02 + (0.005 if k == 2 else 0)
        _, frame = buf.add(packet(k, (first + k * 960) % (1 << 32)))
        assert frame is not None and frame.data == b"\x01"  # nothing held back
        pts = mapper.map(frame.timestamp)
        found[k] = buf.arrival(pts)
    assert found == {k: k * 0.02 + (0.005 if k == 2 else 0) for k in order}
    assert buf.arrival(123) is None


def test_padding_is_not_decoded_and_what_is_kept_is_bounded():
    buf = VoiceArrivals()
    assert buf.add(packet(0, 0, b"")) == (False, None)
    for k in range(KEEP * 3):
        buf.add(packet(k, k * 960))
    assert len(buf._arrived) == KEEP


def test_what_the_network_repeats_or_brings_too_late_is_not_decoded_but_a_restarted_sender_is():
    buf = VoiceArrivals()
    assert buf.add(packet(1000, 0))[1] is not None
    assert buf.add(packet(1000, 0)) == (False, None)  # a duplicate
    assert buf.add(packet(1000 + LATEST + 1, 960))[1] is not None
    assert buf.add(packet(1000, 0)) == (False, None)  # still a duplicate
    assert buf.add(packet(1001, 960))[1] is not None  # late, still of use
    assert buf.add(packet(999, 0)) == (False, None)  # later than any delay can use
    assert buf.add(packet((1000 + LATEST + 1 - RESTART) % 65536, 5000))[1] is not None  # numbered afresh
    assert buf.add(packet((1000 + LATEST + 2 - RESTART) % 65536, 5960))[1] is not None  # and on from there


def audio_receiver() -> RTCRtpReceiver:
    """An audio receiver as aiortc's peer connection leaves it before packets come: its track made, and
    Opus as payload type 111 (as its start fills the codecs in)."""
    receiver = RTCRtpReceiver("audio", SimpleNamespace(state="new"))
    receiver._track = RemoteStreamTrack("audio")
    receiver._RTCRtpReceiver__codecs[111] = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000,
                                                                 channels=2, payloadType=111)
    return receiver


def test_aiortc_keeps_its_receivers_jitter_buffer_track_queue_and_codecs_where_they_are_used():
    """An aiortc that moved the buffer would leave the voice in its 80 ms buffer, one that moved the
    track's queue or the codecs would decode on its thread again (each with a warning): caught here."""
    receiver = audio_receiver()
    arrivals = unbuffered(receiver)
    assert isinstance(arrivals, VoiceArrivals)
    assert receiver._RTCRtpReceiver__jitter_buffer is arrivals
    assert arrivals.frames is receiver.track._queue
    assert arrivals.codecs is receiver._RTCRtpReceiver__codecs


def test_each_packet_is_decoded_onto_the_track_at_once_and_what_is_missing_is_made_up_in_its_place():
    """Real Opus packets, one reordered and one lost. Each packet goes on the track at once, as mono, the
    same samples as aiortc's decoder gives (one of its two equal channels) while all come in turn. The
    hole a packet shows before it is concealed at once (voice, not silence), in its place; the reordered
    packet, come late, decodes exactly as it would have in turn, for the channel to put in its place."""
    receiver = audio_receiver()
    now = [0.0]
    arrivals = unbuffered(receiver, clock=lambda: now[0])
    t = np.arange(960 * 8) / 48000
    pcm = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    opus = OpusPackets()
    data = [bytes(opus.encode(pcm[k * 960:(k + 1) * 960], k * 960)) for k in range(8)]
    in_turn = OpusDecoder()
    want = [in_turn.decode(JitterFrame(data=d, timestamp=960 * k))[0].to_ndarray().reshape(-1, 2) for k, d in
            enumerate(data)]
    assert all(np.array_equal(w[:, 0], w[:, 1]) for w in want)  # (a mono sender: two equal channels)
    first = (1 << 32) - 3 * 960
    order = [0, 1, 3, 2, 4, 6, 7]  # 3 before 2, 5 lost
    came = {0: [0], 1: [1], 3: [2, 3], 2: [2], 4: [4], 6: [5, 6], 7: [7]}  # frames (by packet) each brings
    got = {}
    for k in order:
        now[0] = 0.02 * k
        assert arrivals.add(packet(1000 + k, (first + 960 * k) % (1 << 32), data[k])) == (False, None)
        assert receiver.track._queue.qsize() == len(came[k])  # on the track now, not after a thread's hop
        for j in came[k]:
            frame = receiver.track._queue.get_nowait()
            assert (frame.pts, frame.sample_rate, frame.layout.name) == (960 * j, 48000, "mono")
            assert frame.format.name == "s16"
            # a made-up frame counts as in when the packet after it began
            assert arrivals.arrival(frame.pts) == pytest.approx(0.02 * k - 0.02 * (j != k))
            got.setdefault(j, []).append(frame.to_ndarray()[0])
    for k in (0, 1, 4, 7):
        assert got[k][0].size == 960
    assert np.array_equal(got[0][0], want[0][:, 0]) and np.array_equal(got[1][0], want[1][:, 0])
    concealed, late = got[2]
    assert np.abs(concealed).max() > 1000  # the tone goes on (fading), not a hole of silence
    assert np.array_equal(late, want[2][:, 0])  # the late packet as if in turn
    assert np.abs(got[5][0]).max() > 1000
    assert (arrivals.voice.late, arrivals.voice.concealed) == (1, 2 * 960)


def _opus_packets(ms: int, count: int, fec: bool = False) -> list[bytes]:
    import av

    enc = av.CodecContext.create("libopus", "w")
    enc.bit_rate, enc.format, enc.layout, enc.sample_rate = 32000, "s16", "mono", 48000
    enc.options = {"application": "voip", "frame_duration": str(ms)}
    if fec:  # (as a browser told of loss)
        enc.options = {**enc.options, "fec": "1", "packet_loss": "20"}
    n = 48 * ms
    t = np.arange(n * count) / 48000
    pcm = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    out = []
    for k in range(count + 2):
        f = av.AudioFrame.from_ndarray(pcm[None, k * n : (k + 1) * n] if k < count else np.zeros((1, n), np.int16),
                                       format="s16", layout="mono")
        f.sample_rate, f.pts = 48000, k * n
        out += [bytes(p) for p in enc.encode(f)]
    return out[:count]


def test_the_voice_decoder_places_everything_once_across_wraps_refusals_long_holes_and_pauses():
    from streamer.live.opus import VoiceDecoder

    data = _opus_packets(20, 12)

    def run(steps):
        dec, out = VoiceDecoder.make(), []
        for seq, pts, d in steps:
            out += [(at, x.size) for at, x in dec.packet(seq % 65536, pts % (1 << 32), d)]
        return dec, out

    # numbers and timestamps wrapping, one packet lost across the wrap
    dec, out = run([(65534, -960 * 2, data[0]), (65535, -960, data[1]), (1, 960, data[3])])
    assert out == [(2**32 - 1920, 960), (2**32 - 960, 960), (0, 960), (960, 960)] and dec.concealed == 960
    # a packet that is not Opus after a lost one: both made up, each place once
    dec, out = run([(0, 0, data[0]), (2, 1920, b"\xff\xff\xff"), (3, 2880, data[3])])
    assert out == [(0, 960), (960, 960), (1920, 960), (2880, 960)] and (dec.concealed, dec.refused) == (1920, 1)
    # a hole longer than MAX_CONCEAL stays silent (read_voice's), and its packets that come late still decode,
    # as if in turn
    in_turn = VoiceDecoder.make()
    want = [x for k in range(3) for _, x in in_turn.packet(k, 960 * k, data[k])]
    dec = VoiceDecoder.make()
    assert [at for at, _ in dec.packet(0, 0, data[0])] == [0]
    assert [at for at, _ in dec.packet(8, 8 * 960, data[8])] == [8 * 960]  # 140 ms missing: not made up
    late = dec.packet(1, 960, data[1]) + dec.packet(2, 1920, data[2])
    assert [at for at, _ in late] == [960, 1920] and all(np.array_equal(x, w) for (_, x), w in zip(late, want[1:]))
    assert dec.packet(4, 4 * 960, data[4]) == []  # not the next of the hole: no decoder state for it
    # a sender's pause (numbers go on, the timestamps jump): nothing made up
    dec, out = run([(0, 0, data[0]), (1, 960, data[1]), (2, 960 * 50, data[2])])
    assert out == [(0, 960), (960, 960), (48000, 960)] and dec.concealed == 0
    # ... with a packet lost at its end that comes after the next: past any delay's use, not decoded
    dec, out = run([(0, 0, data[0]), (2, 960 * 250, data[2]), (1, 960 * 249, data[1])])
    assert out == [(0, 960), (960 * 250, 960)] and dec.concealed == 0


def test_the_voice_decoder_makes_up_a_lost_40_ms_packet_as_one():
    from streamer.live.opus import VoiceDecoder

    data, dec = _opus_packets(40, 6), VoiceDecoder.make()
    out = [(at, x.size) for k in (0, 1, 3) for at, x in dec.packet(k, 1920 * k, data[k])]
    assert out == [(0, 1920), (1920, 1920), (3840, 1920), (5760, 1920)] and dec.concealed == 1920


def test_an_overdue_packet_is_made_up_on_time_and_its_voice_placed_when_it_comes():
    """The receiver says a packet is overdue: its time is made up at once (the frames needing it go on),
    at most MAX_CONCEAL in a row. When it comes, late, it decodes as if in turn, and the decoder goes on
    from there as if nothing had happened; when it never comes, the next packet's FEC copy of it makes
    it up again, better, for its place."""
    from streamer.live.opus import MAX_CONCEAL, VoiceDecoder

    data = _opus_packets(20, 12)
    in_turn = VoiceDecoder.make()
    want = [x for k in range(6) for _, x in in_turn.packet(k, 960 * k, data[k])]

    dec = VoiceDecoder.make()
    assert dec.overdue(960) == []  # nothing heard yet: nothing to go on from
    dec.packet(0, 0, data[0])
    dec.packet(1, 960, data[1])
    made = dec.overdue(960)
    assert [at for at, _ in made] == [1920] and not dec.caught_up
    late = dec.packet(2, 1920, data[2])  # it comes after all
    assert [at for at, _ in late] == [1920] and np.array_equal(late[0][1], want[2]) and dec.caught_up
    after = dec.packet(3, 2880, data[3]) + dec.packet(4, 3840, data[4])
    assert all(np.array_equal(x, w) for (_, x), w in zip(after, want[3:5]))  # as if it had come in turn

    fec = _opus_packets(20, 12, fec=True)
    dec = VoiceDecoder.make()
    dec.packet(0, 0, fec[0])
    dec.packet(1, 960, fec[1])
    assert [at for at, _ in dec.overdue(960)] == [1920]  # packet 2 is lost for good
    assert [at for at, _ in dec.packet(3, 2880, fec[3])] == [1920, 2880]  # 2 again, from 3's FEC copy
    assert (dec.concealed, dec.overdue_made) == (960, 960) and dec.caught_up
    if dec.decoder.has_fec(fec[3]):
        assert dec.recovered == 960
    for k in range(MAX_CONCEAL // 960):
        assert [at for at, _ in dec.overdue(960)] == [3840 + 960 * k]
    assert dec.overdue(960) == []  # a longer wait is a pause


def test_what_was_made_up_is_done_again_only_for_what_is_missing():
    """After time was made up for an overdue packet: the awaited packet, stamped later (a pause, nothing
    lost), is not filled before it with a copy of itself; a packet over MAX_CONCEAL later keeps the hole's
    start for the late ones; only packets that come after their time was made up count as late."""
    from streamer.live.opus import VoiceDecoder

    data = _opus_packets(20, 12, fec=True)
    dec = VoiceDecoder.make()
    dec.packet(0, 0, data[0])
    dec.overdue(960)
    assert [at for at, _ in dec.packet(1, 960 * 4, data[1])] == [3840]  # the next, 60 ms on: nothing made up
    assert (dec.concealed, dec.late) == (0, 0)
    dec = VoiceDecoder.make()
    dec.packet(0, 0, data[0])
    dec.overdue(960)
    assert [at for at, _ in dec.packet(2, 1920, data[2])] == [960, 1920] and dec.late == 0  # 1 lost: not late
    dec = VoiceDecoder.make()
    dec.packet(0, 0, data[0])
    dec.overdue(960)
    dec.overdue(960)
    assert [at for at, _ in dec.packet(9, 960 * 9, data[9])] == [960 * 9]  # 160 ms on: too long to make up
    assert [at for at, _ in dec.packet(1, 960, data[1])] == [960] and dec.late == 1  # 1, late, still in turn


def test_the_wire_makes_up_an_overdue_packet_when_it_is_due():
    import asyncio

    from streamer.live.wire import OVERDUE_S

    data = _opus_packets(20, 6)

    async def main():
        receiver = audio_receiver()
        arrivals = unbuffered(receiver)
        queue = receiver.track._queue
        arrivals.add(packet(0, 0, data[0]))
        t0 = arrivals.arrival(queue.get_nowait().pts)
        made = await asyncio.wait_for(queue.get(), 1)  # packet 1 never comes
        due = arrivals.arrival(made.pts)
        arrivals.add(packet(2, 1920, data[2]))
        return made.pts, due - t0, [queue.get_nowait().pts for _ in range(queue.qsize())]

    pts, after, then = asyncio.run(main())
    assert pts == 960 and 0.02 + OVERDUE_S <= after < 0.5, after  # (not early; a loaded machine may be late)
    assert then[-2:] == [960, 1920]  # 1 made up again from 2 (for its place), then 2


def test_lost_voice_is_concealed_and_comes_back_from_the_next_packets_fec_copy():
    """A browser's voice with in-band FEC, 10% of its packets lost (one in ten, as on a bad Wi-Fi): what
    reaches the track is close to the voice over the lost packets' time too, not 20 ms holes (each a
    click: a step from the voice to 0); the packets after a loss are close as well."""
    import av
    from scipy import signal

    from tests.conftest import speak

    x, rate = speak("One two three, lips and voice together, four five six. Seven eight nine, and ten.")
    voice = np.tile(signal.resample_poly(x, 480, rate // 100), 2)
    pcm = np.round(np.clip(voice, -1, 1) * 32767).astype(np.int16)
    chunks = [pcm[k : k + 960] for k in range(0, pcm.size - 959, 960)]
    enc = av.CodecContext.create("libopus", "w")
    enc.bit_rate, enc.format, enc.layout, enc.sample_rate = 32000, "s16", "mono", 48000
    enc.options = {"application": "voip", "fec": "1", "packet_loss": "10"}  # as a browser told of loss
    data = []
    for k, c in enumerate(chunks):
        f = av.AudioFrame.from_ndarray(c[None], format="s16", layout="mono")
        f.sample_rate, f.pts = 48000, k * 960
        data += [bytes(p) for p in enc.encode(f)]

    def heard(lose):
        receiver = audio_receiver()
        arrivals = unbuffered(receiver)
        out = np.zeros(960 * len(data))
        for k, d in enumerate(data):
            if not lose(k):
                arrivals.add(packet(k, 960 * k, d))
            while not receiver.track._queue.empty():  # (read as the channel reads them)
                f = receiver.track._queue.get_nowait()
                out[f.pts : f.pts + f.samples] = f.to_ndarray()[0]
        return out, arrivals.voice

    whole, _ = heard(lambda k: False)
    lost = [k for k in range(len(data)) if k % 10 == 5 and np.abs(whole[960 * k : 960 * k + 960]).max() > 1000]
    assert len(lost) >= 15, len(lost)  # losses in the speech
    out, voice = heard(lambda k: k % 10 == 5)
    if hasattr(voice.decoder._lib, "opus_packet_has_lbrr"):  # (libopus 1.5 on tells which packets have a copy)
        assert voice.recovered > 0.5 * voice.concealed > 0

    def snr(y, ks):
        idx = np.concatenate([np.arange(960 * k, 960 * k + 960) for k in ks])
        return 10 * np.log10((whole[idx] ** 2).sum() / ((y[idx] - whole[idx]) ** 2).sum())

    holes = out.copy()
    for k in range(5, len(data), 10):
        holes[960 * k : 960 * k + 960] = 0  # what a decoder that leaves a hole gives there
    assert snr(holes, lost) < 0.5 and snr(out, lost) > 5, (snr(holes, lost), snr(out, lost))
    step = np.abs(np.diff(whole)).max()  # the voice's own steepest step
    assert np.abs(np.diff(holes)).max() > 3 * step  # a hole's edge: a click
    assert np.abs(np.diff(out)).max() < 1.5 * step
    after = [k + 1 for k in lost]
    assert snr(out, after) > 10, snr(out, after)


def test_a_packet_the_decoder_refuses_is_lost_and_the_next_still_decodes(caplog):
    receiver = audio_receiver()
    arrivals = unbuffered(receiver)
    pcm = np.zeros(960, np.int16)
    good = bytes(OpusPackets().encode(pcm, 0))
    assert arrivals.add(packet(1, 0, b"\xff" * 3)) == (False, None)  # not Opus: an error, no frame
    assert arrivals.add(packet(2, 960, good)) == (False, None)
    assert [f.pts for f in [receiver.track._queue.get_nowait()]] == [960]
    assert receiver.track._queue.empty()
    assert "voice packet not decoded" in caplog.text


def test_frames_nobody_reads_stay_bounded():
    """A sender that says BYE (aiortc ends the track) and sends on: what it sends is not kept without end."""
    receiver = audio_receiver()
    arrivals = unbuffered(receiver)
    silence = bytes(OpusPackets().encode(np.zeros(960, np.int16), 0))
    for k in range(10 * KEEP):
        arrivals.add(packet(k, 960 * k, silence))
    assert receiver.track._queue.qsize() == KEEP and len(arrivals._arrived) == KEEP


def test_silence_goes_out_as_the_encoders_settled_silence_packet_and_decodes_as_well(monkeypatch):
    """An avatar listening sends digital silence: after SETTLE silent chunks coded, the encoder's own
    3-byte silence packet is reused rather than coding each again. Decoded, the voice is as close to
    its source as when every chunk is coded, the silences are silent, and speech after them is whole."""
    import av
    from scipy import signal

    from streamer.live import tracks
    from tests.conftest import speak

    x, rate = speak("One two three, lips and voice together.")
    speech = signal.resample_poly(x, 480, rate // 100)
    voice = np.concatenate([np.zeros(48000), speech, np.zeros(30000), speech, np.zeros(20000)])
    pcm = np.round(np.clip(voice, -1, 1) * 32767).astype(np.int16)
    chunks = [pcm[k : k + 960] for k in range(0, pcm.size - 959, 960)]

    def sent(settle):
        monkeypatch.setattr(tracks, "SETTLE", settle)
        opus, decoder = OpusPackets(), av.CodecContext.create("libopus", "r")
        packets = [bytes(opus.encode(c, j * 960)) for j, c in enumerate(chunks)]
        heard = np.concatenate([f.to_ndarray().reshape(-1, 2)[:, 0] for p in packets
                                for f in decoder.decode(av.Packet(p))]).astype(np.float64)
        return packets, heard, opus.reused

    coded, heard_coded, none = sent(10**9)
    packets, heard, reused = sent(5)
    silent = [j for j, c in enumerate(chunks) if not c.any()]
    assert none == 0 and reused >= 0.7 * len(silent) > 80
    assert {len(packets[j]) for j in range(10, 50)} == {3}  # in the first second, from the 3rd chunk on
    source, lag = pcm.astype(np.float64), 312  # Opus's pre-skip

    def snr(y):
        n = min(source.size, y.size - lag)
        return 10 * np.log10((source[:n] ** 2).sum() / ((y[lag : lag + n] - source[:n]) ** 2).sum())

    assert abs(snr(heard) - snr(heard_coded)) < 0.5 and snr(heard) > 10
    assert not heard[lag + 10 * 960 : lag + 45 * 960].any()  # the first second's silence is silent
    # reused only once the encoder says silence alone: its first packets after speech still carry the speech's tail
    hasty, heard_hasty, _ = sent(1)
    assert abs(snr(heard_hasty) - snr(heard_coded)) < 0.5
    gap = 48000 + speech.size  # the silence between the two phrases, from its 6th chunk on
    assert not heard_hasty[lag + gap + 5 * 960 : lag + gap + 30000 - 960].any()


def test_decoded_voice_is_read_as_mono_whatever_its_layout():
    """What aiortc's Opus decoder hands over (packed stereo s16, its buffer padded past the samples) and
    planar or 32-bit frames another decoder might give, as mono float voice."""
    import av

    t = np.arange(960) / 48000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 660 * t)
    pcm = np.round(np.stack([left, right], 1).reshape(-1) * 32767).astype(np.int16)
    decoder, opus = OpusDecoder(), OpusPackets()
    for j in range(3):  # (the encoder's first packets hold its warm-up)
        frame = decoder.decode(JitterFrame(data=bytes(opus.encode(pcm[0::2], j * 960)), timestamp=j * 960))[0]
    assert frame.format.name == "s16" and frame.planes[0].buffer_size > 4 * frame.samples  # padded
    want = frame.to_ndarray().reshape(-1, 2).astype(np.float32).mean(1) / 32768
    assert np.allclose(voice_samples(frame), want, atol=1e-6)
    for fmt, data in [("fltp", np.stack([left, right]).astype(np.float32)),
                      ("s16p", np.round(np.stack([left, right]) * 32767).astype(np.int16)),
                      ("s32", np.round(np.stack([left, right], 1).reshape(1, -1) * 2**31).astype(np.int32))]:
        f = av.AudioFrame.from_ndarray(data, format=fmt, layout="stereo")
        assert np.allclose(voice_samples(f), (left + right) / 2, atol=1e-4), fmt
