"""A WebRTC client peer: sends a voice to a streamer server, receives the avatar. Used by the tests and
`streamer bench live`; real aiortc, real codecs, the machine's host address (aioice never uses loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from fractions import Fraction

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import is_rtcp

from streamer.live.broadcast import VoicePackets
from streamer.live.wire import VoiceArrivals, unbuffered


class _Voice:
    """A client's voice as `VoicePackets` reads a channel's: slot j's 20 ms, silence after its end."""

    def __init__(self, voice: np.ndarray):
        self.voice = voice

    def voice_chunk(self, j: int) -> np.ndarray:
        chunk = self.voice[j * 960 : (j + 1) * 960]
        return chunk if chunk.size == 960 else np.pad(chunk, (0, 960 - chunk.size))


KEEP_SENT = 3000  # packets of a voice kept (60 s) for its other clients: those of one run start within seconds
_VOICES: dict[tuple, VoicePackets] = {}  # (voice's digest, pause) -> its packets: a process's clients share them


class VoiceSource(MediaStreamTrack):
    """48 kHz mono float voice as 20 ms Opus packets, paced in real time from `t0`; silence after the end.
    The clients of a process that send one voice share its packets: from a fresh encoder and in the
    same order each packet is the same, so each client sends what its own encoder would have made,
    for a sixth of a client's CPU (the team's CPU, 8 talkers; BENCHMARKS.md)."""

    kind = "audio"

    def __init__(self, voice: np.ndarray, pause: tuple[float, float] | None = None):
        super().__init__()
        voice = np.asarray(voice, np.float32)
        key = (hashlib.sha1(voice.tobytes()).hexdigest(), voice.size, pause)
        self.encoded = _VOICES.get(key)
        if self.encoded is None:
            if len(_VOICES) > 8:
                _VOICES.clear()  # voices of clients long gone
            self.encoded = _VOICES[key] = VoicePackets(_Voice(voice), keep=KEEP_SENT)
        self.j = 0
        self.t0: float | None = None  # (time.monotonic) when the first packet went
        self.pause = pause  # (from s, for s): nothing sent meanwhile, as a sender that stops; time runs on

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        if self.pause and self.pause[0] <= self.j * 0.02 < sum(self.pause):
            self.j = round(sum(self.pause) / 0.02)  # the next packet comes after the pause, timestamps jumped
        wait = self.t0 + self.j * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        j = self.j
        self.j += 1
        if self.encoded.last is not None and j <= self.encoded.last - KEEP_SENT:  # far behind the others: an
            self.encoded = VoicePackets(self.encoded.channel, keep=KEEP_SENT)  # encoder of its own from here
        packet = self.encoded.packet(j)
        return packet if packet is not None else await self.recv()


class _CountingDecoder:
    """A video "decoder" for load generation: one blank 16x16 frame per complete encoded frame the
    jitter buffer hands over, no pixels decoded, so a box running many clients keeps its cores for
    the server it measures. Arrival times stay real; picture content is not looked at."""

    def decode(self, encoded_frame) -> list:
        frame = av.VideoFrame(16, 16, "yuv420p")
        frame.pts, frame.time_base = encoded_frame.timestamp, Fraction(1, 90000)
        return [frame]


def count_video_only() -> None:
    """From now on, this process's peers count received video frames without decoding them
    (`streamer bench live --no-decode`); audio is still decoded."""
    import aiortc.rtcrtpreceiver as receiver
    from aiortc.codecs import get_decoder

    receiver.get_decoder = lambda codec: (_CountingDecoder() if codec.mimeType.lower().startswith("video/")
                                          else get_decoder(codec))


class Received:
    def __init__(self, keep: bool = True):
        """keep False: only arrival times (long runs would hold gigabytes of frames)."""
        self.keep = keep
        self.video: list[tuple[float, np.ndarray | None]] = []  # (arrival, BGR frame)
        self.audio: list[tuple[float, np.ndarray | None]] = []  # (arrival, mono float 48 kHz)
        self.voice_t0: float | None = None  # when the voice sent began (`talk`)
        self.lost_on_the_way = 0  # voice packets `talk` lost on purpose (`lose_every`)


async def _collect(track, sink, kind, wire: VoiceArrivals | None = None):
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        now = wire.arrival(frame.pts) if wire is not None else None
        now = time.monotonic() if now is None else now
        if not sink.keep:
            (sink.video if kind == "video" else sink.audio).append((now, None))
        elif kind == "video":
            sink.video.append((now, frame.to_ndarray(format="bgr24")))
        else:
            pcm = frame.to_ndarray().reshape(-1).astype(np.float32) / 32768
            channels = len(frame.layout.channels)
            sink.audio.append((now, pcm.reshape(-1, channels).mean(axis=1)))


def _receive(pc: RTCPeerConnection, keep: bool = True) -> tuple[Received, list[asyncio.Task]]:
    """Collect every track `pc` receives; returns what arrives and the collecting tasks. Audio is
    taken off the wire as the server takes it (`wire.unbuffered`), so its arrival times are the
    packets'; video waits in aiortc's jitter buffer until the next frame starts (40 ms at 25 fps)."""
    got, tasks = Received(keep), []

    @pc.on("track")
    def on_track(track):
        wire = None
        if track.kind == "audio":
            wire = unbuffered(next(r for r in pc.getReceivers() if r.track is track))
        tasks.append(asyncio.ensure_future(_collect(track, got, track.kind, wire)))

    return got, tasks


async def _stop(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def talk(url: str, voice: np.ndarray, seconds: float, offer_extra: dict | None = None,
               token: str | None = None, lose_every: int = 0, swap_every: int = 0,
               pause: tuple[float, float] | None = None, keep: bool = True,
               lose_run: int = 1, jitter_s: float = 0.0) -> tuple[Received, dict]:
    """Connect to `url`/offer, send `voice`, receive for `seconds`; returns what arrived and the session's stats.
    `lose_every=k`: every k-th voice packet is lost on the way, and with `lose_run=r` the r-1 after it too;
    `swap_every=k`: every k-th comes after the next; `jitter_s`: each is held on the way for a random time,
    exponential with this mean (a packet held long is overtaken). `pause`: (from s, for s) the sender
    sends nothing, its timestamps run on."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    got, tasks = _receive(pc, keep)
    source = VoiceSource(voice, pause)
    voice_out = pc.addTransceiver(source, direction="sendrecv").sender
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                    **(offer_extra or {})}) as res:
            body = await res.json()
            assert res.status == 200, body
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
        if lose_every or swap_every or jitter_s:
            _on_the_way(voice_out, got, lose_every, swap_every, lose_run, jitter_s)
        await asyncio.sleep(seconds)
        lost = got.lost_on_the_way
        async with http.get(f"{url}/session/{body['session']}") as res:
            stats = await res.json()
        # (what the stats can count: lost before they were asked for, and by the time they came)
        stats["session"], stats["lost_on_the_way"] = body["session"], (lost, got.lost_on_the_way)
        async with http.delete(f"{url}/session/{body['session']}"):  # as the page does: the channel is free at once
            pass
    await pc.close()
    await _stop(tasks)
    got.voice_t0 = source.t0
    return got, stats


def round_trip_s(got: Received, sent: np.ndarray) -> float:
    """Seconds from when the first sound of the voice `talk` sent was spoken (as a microphone's packet
    carries it: sent once its last sample is in) to when its packet came back (both Opus encodes'
    lookahead, the talker's and the server's, still in)."""
    went = got.voice_t0 + np.argmax(np.abs(sent) > 0.05) / 48000 - 0.02
    k = next(k for k, (_, a) in enumerate(got.audio) if np.abs(a).max() > 0.05)
    return got.audio[k][0] + np.argmax(np.abs(got.audio[k][1]) > 0.05) / 48000 - went


def _on_the_way(sender, got: Received, lose_every: int = 0, swap_every: int = 0, lose_run: int = 1,
                jitter_s: float = 0.0) -> None:
    """What the network does to the RTP packets `sender` sends: every `lose_every`-th is lost (its
    sequence number used, never delivered, as a receiver sees a real loss; counted in `got`), with the
    `lose_run` - 1 after it; every `swap_every`-th comes after the one sent next; each is held for an
    exponential random time of mean `jitter_s`."""
    assert swap_every != 1, "every packet after the next: none would ever be sent"
    transport, count, held = sender.transport, 0, None
    send = transport._send_rtp  # aiortc's way out for RTP and RTCP alike, before encryption
    rng, held_on_the_way = np.random.default_rng(0), set()

    async def network(data: bytes) -> None:
        nonlocal count, held
        if is_rtcp(data) or int.from_bytes(data[8:12], "big") != sender._ssrc:
            await send(data)
            return
        count += 1
        if lose_every and count >= lose_every and (count - lose_every) % lose_every < lose_run:
            got.lost_on_the_way += 1
            return
        if swap_every and count % swap_every == 0:
            held = data
            return
        if jitter_s:
            task = asyncio.get_running_loop().create_task(_later(send, data, rng.exponential(jitter_s)))
            held_on_the_way.add(task)  # (a task is kept until done)
            task.add_done_callback(held_on_the_way.discard)
            return
        await send(data)
        if held is not None:
            held, data = None, held
            await send(data)

    transport._send_rtp = network


async def _later(send, data: bytes, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await send(data)


async def _whip_whep(pc: RTCPeerConnection, base: str, path: str, seconds: float, token: str | None) -> str:
    """Offer `pc`'s description to a WHIP/WHEP endpoint, stay `seconds`, DELETE; returns the answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(base + path, data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as res:
            answer, location = await res.text(), res.headers.get("Location")
            assert res.status == 201 and location, (res.status, answer)
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.sleep(seconds)
        async with http.delete(base + location) as res:
            assert res.status == 200, res.status
    await pc.close()
    return answer


def _lossy(receiver, share: float, seed: int = 0) -> None:
    """Drop `share` of the RTP packets `receiver` gets (retransmissions too) as they arrive, as a lossy
    network would: what the receiver's NACKs and PLIs must make up for."""
    import random

    rng = random.Random(seed)
    handle = receiver._handle_rtp_packet  # aiortc's entry point for each packet the transport routes here

    async def lossy(packet, arrival_time_ms):
        if rng.random() >= share:
            await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = lossy


async def watch(base: str, channel: str, seconds: float, token: str | None = None,
                keep: bool = True, lose: float = 0.0, codec: str | None = None) -> tuple[Received, str]:
    """A WHEP viewer: watch `channel` for `seconds`, then DELETE the session. Returns (received, answer SDP).
    `lose`: share of the video packets lost on the way to this viewer. `codec`: the only video codec
    it takes (a MIME type such as "video/H264"; default: aiortc's, VP8 first)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    got, tasks = _receive(pc, keep)
    video = pc.addTransceiver("video", direction="recvonly")
    if codec:
        video.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs
                                   if c.mimeType.lower() in (codec.lower(), "video/rtx")])
    if lose:
        _lossy(video.receiver, lose)
    pc.addTransceiver("audio", direction="recvonly")
    answer = await _whip_whep(pc, base, f"/whep/{channel}", seconds, token)
    await _stop(tasks)
    return got, answer


async def publish(base: str, channel: str, voice: np.ndarray, seconds: float, token: str | None = None) -> str:
    """A WHIP publisher: send `voice` to `channel` for `seconds`, then DELETE. Returns the answer SDP."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(VoiceSource(voice), direction="sendonly")
    return await _whip_whep(pc, base, f"/whip/{channel}", seconds, token)
