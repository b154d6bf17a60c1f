from types import SimpleNamespace

from aiortc import RTCRtpReceiver
from aiortc.rtcrtpreceiver import TimestampMapper
from aiortc.rtp import RtpPacket

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


def test_aiortc_keeps_its_receivers_jitter_buffer_where_it_is_replaced():
    """An aiortc that moved it would leave the voice in its 80 ms buffer (with a warning): caught here."""
    receiver = RTCRtpReceiver("audio", SimpleNamespace(state="new"))
    assert isinstance(unbuffered(receiver), VoiceArrivals)
    assert isinstance(receiver._RTCRtpReceiver__jitter_buffer, VoiceArrivals)
