from aiortc.rtcrtpreceiver import TimestampMapper
from aiortc.rtp import RtpPacket

from streamer.live.wire import KEEP, VoiceArrivals


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
