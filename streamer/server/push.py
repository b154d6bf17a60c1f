"""Programs drive a channel with audio: a WebSocket of PCM with utterance events and barge-in
(`GET /ws/<channel>`), or an uploaded audio file (`POST /speak/<channel>`, `DELETE` interrupts).

WebSocket protocol (JSON text messages, binary audio):
  client: {"type": "start", "sample_rate": 16000|24000|48000}, first
          binary: PCM s16le mono at that rate, any size (at most MAX_MESSAGE bytes a message)
          {"type": "end"}: the current utterance is complete; {"type": "clear"}: interrupt (barge-in)
  server: {"type": "ready", "session", "channel", "delay_ms"}
          {"type": "playback_started", "utterance"}: its first audio reaches the viewers
          {"type": "playback_finished", "utterance", "position", "interrupted"}: position = seconds heard
          {"type": "error", "message"}, then the server closes the socket
Audio may come faster than real time: up to 30 s is queued, then the server stops reading (TCP
backpressure) until the queue plays down. Keep within that to have `clear` act at once: it is read
after the audio sent before it. Closing the socket ends the session; wait for playback_finished first.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from urllib.parse import urlsplit

import av
import numpy as np
from aiohttp import WSMsgType, web

from streamer.audio import to_mono_float
from streamer.live.channel import VOICE_RATE
from streamer.live.pushed import FEED_PIECE, RATES, PushedVoice
from streamer.server.app import Server, error

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20  # bytes of audio in one message (10 s at 48 kHz); more: an error event
HARD_MAX_MESSAGE = 4 << 20  # beyond this the WebSocket layer itself closes with 1009 before we see it
START_TIMEOUT_S = 10
MAX_SPEAK_BYTES = 50 << 20
MAX_SPEAK_S = 600.0
MIN_RATE = 4000  # Hz: below this an upload is no voice (and its resampling would be huge)
AUDIO_FORMATS = "wav,mp3,flac,ogg,mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,aac,aiff,caf,w64"


def foreign_origin(request: web.Request) -> bool:
    """A browser page from another site (WebSockets have no CORS: any page could drive a local server)."""
    origin = request.headers.get("Origin")
    return origin is not None and urlsplit(origin).netloc.lower() != request.host.lower()


def refuse_websocket(ws: web.WebSocketResponse, request: web.Request) -> web.Response | None:
    """The error for a request that is not a WebSocket upgrade, or comes from another site's page."""
    if not ws.can_prepare(request).ok:
        return error(400, "connect with a WebSocket (see /openapi.json for the protocol)")
    if foreign_origin(request):
        return error(403, f"WebSocket from another site ({request.headers['Origin']}) refused")
    return None


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None when it is (or says it is) over `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class Drive:
    """The handlers, on a worker's Server."""

    def __init__(self, server: Server):
        self.server = server

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/ws/{channel}", self.websocket)
        router.add_post("/speak/{channel}", self.speak)
        router.add_delete("/speak/{channel}", self.speak_delete)

    # WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=HARD_MAX_MESSAGE, heartbeat=20)
        refused = refuse_websocket(ws, request)
        if refused:
            return refused
        session, err = await self.server.admit("ws", request.match_info["channel"])
        if err:
            return err
        sid, ch = session.id, session.channel
        session.tasks.add(asyncio.current_task())  # ending the session (DELETE, shutdown) ends this handler
        events: asyncio.Queue = asyncio.Queue()
        sender = feeder = None
        try:
            await ws.prepare(request)
            sender = asyncio.ensure_future(_send_events(ws, events))
            rate = await _start(ws, events)
            if rate is None:
                return ws
            voice = PushedVoice(ch, rate, events.put_nowait)
            feeder = self.server._spawn(voice.run(), f"ws-{sid}")
            session.tasks.add(feeder)
            handler = asyncio.current_task()
            feeder.add_done_callback(lambda t: None if t.cancelled() else handler.cancel())  # it died: end
            events.put_nowait({"type": "ready", "session": sid, "channel": ch.name,
                               "delay_ms": round(1000 * ch.delay_s)})
            log.info("[%s] program voice on channel %s over a WebSocket, %d Hz", sid, ch.name, rate)
            while not await _handle(await ws.receive(), voice, events):
                await voice.room()
        finally:
            if feeder is not None:
                feeder.cancel()
            await self.server.close_session(sid)
            events.put_nowait(None)
            if sender is not None:
                try:
                    await asyncio.wait_for(sender, 2)
                except (asyncio.TimeoutError, ConnectionError):
                    pass
            await ws.close()
        return ws

    # uploaded file

    async def speak(self, request: web.Request) -> web.Response:
        if foreign_origin(request):  # a plain cross-site POST needs no preflight: refuse other sites' pages
            return error(403, f"requests from another site ({request.headers['Origin']}) refused")
        if request.content_length is not None and request.content_length > MAX_SPEAK_BYTES:  # before any session
            return error(413, f"audio files are at most {MAX_SPEAK_BYTES >> 20} MB")
        # the channel's voice is taken before the upload is read: no one holds 50 MB waiting for a 409
        session, err = await self.server.admit("speak", request.match_info["channel"])
        if err:
            return err
        try:
            body = await read_limited(request, MAX_SPEAK_BYTES)
            if body is None:
                await self.server.close_session(session.id)
                return error(413, f"audio files are at most {MAX_SPEAK_BYTES >> 20} MB")
            audio = await asyncio.get_running_loop().run_in_executor(None, decode_audio, body)
        except ValueError as e:
            await self.server.close_session(session.id)
            return error(400, str(e))
        except BaseException:
            await self.server.close_session(session.id)
            raise
        done = session.finished = asyncio.get_running_loop().create_future()

        def on_event(ev: dict) -> None:
            if ev["type"] == "playback_finished" and not done.done():
                done.set_result(ev)

        voice = PushedVoice(session.channel, VOICE_RATE, on_event, max_queue_s=MAX_SPEAK_S + 1)

        def queue_all() -> None:  # up to 600 s of conversions: off the event loop, before `run` starts
            voice.feed(np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16))
            voice.end()

        await asyncio.get_running_loop().run_in_executor(None, queue_all)
        if session.id not in self.server.sessions:  # ended meanwhile (DELETE, shutdown)
            return error(409, "interrupted before it started")
        session.voice = voice
        feeder = self.server._spawn(voice.run(), f"speak-{session.id}")
        feeder.add_done_callback(lambda t: None if t.cancelled() or done.done() else done.set_result(
            {"position": 0.0, "interrupted": True}))  # it died: the session ends
        session.tasks.add(feeder)
        session.tasks.add(self.server._spawn(self._until_done(session.id, done), f"speak-end-{session.id}"))
        log.info("[%s] speaking %.1f s of uploaded audio on channel %s", session.id, audio.size / VOICE_RATE,
                 session.channel.name)
        return web.json_response({"session": session.id, "channel": session.channel.name,
                                  "seconds": round(audio.size / VOICE_RATE, 3)}, status=202)

    async def _until_done(self, sid: str, done: asyncio.Future) -> None:
        await done
        await self.server.close_session(sid)

    async def speak_delete(self, request: web.Request) -> web.Response:
        name = request.match_info["channel"]
        s = next((s for s in self.server.sessions.values() if s.kind == "speak" and s.channel.name == name), None)
        if s is None:
            return error(404, f"nothing is being spoken on channel {name}")
        if s.voice is not None:  # else still being queued: nothing was heard
            s.voice.clear()
        ev = s.finished.result() if s.finished is not None and s.finished.done() else {"position": 0.0,
                                                                                        "interrupted": True}
        await self.server.close_session(s.id)
        return web.json_response({"session": s.id, "position": ev["position"], "interrupted": ev["interrupted"]})


async def _start(ws: web.WebSocketResponse, events: asyncio.Queue) -> int | None:
    """The sample rate from the client's first message, or None after sending an error."""
    try:
        msg = await ws.receive(timeout=START_TIMEOUT_S)
    except asyncio.TimeoutError:
        _fail(events, f"send {{\"type\": \"start\", \"sample_rate\": ...}} within {START_TIMEOUT_S} s")
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
        return None
    cmd = _json(msg.data) if msg.type == WSMsgType.TEXT else None
    rate = cmd.get("sample_rate") if cmd else None
    if not cmd or cmd.get("type") != "start" or type(rate) is not int or rate not in RATES:
        _fail(events, f"the first message must be JSON {{\"type\": \"start\", \"sample_rate\": "
                      f"{'|'.join(map(str, RATES))}}}")
        return None
    return rate


async def _handle(msg, voice: PushedVoice, events: asyncio.Queue) -> bool:
    """One client message; True when the session is over."""
    if msg.type == WSMsgType.BINARY:
        if len(msg.data) > MAX_MESSAGE:
            _fail(events, f"audio messages are at most {MAX_MESSAGE} bytes; send smaller pieces")
            return True
        if len(msg.data) % 2:
            _fail(events, "audio is 16-bit PCM: a message of an odd number of bytes")
            return True
        pcm = np.frombuffer(msg.data, "<i2")
        for i in range(0, pcm.size, FEED_PIECE):
            voice.feed(pcm[i : i + FEED_PIECE])
            if i + FEED_PIECE < pcm.size:
                await asyncio.sleep(0)  # every channel's frames and packets go out between pieces
        return False
    if msg.type == WSMsgType.TEXT:
        cmd = _json(msg.data)
        kind = cmd.get("type") if cmd else None
        if kind == "end":
            voice.end()
        elif kind == "clear":
            voice.clear()
        elif kind == "start":
            _fail(events, "already started")
            return True
        else:
            _fail(events, "messages are JSON {\"type\": \"end\"|\"clear\"} or binary PCM")
            return True
        return False
    if msg.type == WSMsgType.ERROR:
        log.info("WebSocket error: %s", msg.data)
    return True  # closed, closing or broken


def _json(text: str) -> dict | None:
    try:
        cmd = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return cmd if isinstance(cmd, dict) else None


def _fail(events: asyncio.Queue, message: str) -> None:
    """Tell the client what is wrong; the socket is closed after it (see _send_events)."""
    events.put_nowait({"type": "error", "message": message})


async def _send_events(ws: web.WebSocketResponse, events: asyncio.Queue) -> None:
    """The one writer of the socket: events in order, until None."""
    while (ev := await events.get()) is not None:
        if ws.closed:
            continue
        try:
            await ws.send_json(ev)
        except ConnectionError:
            pass
        if ev["type"] == "error":
            await ws.close(code=1008, message=close_reason(ev["message"]))


def close_reason(text: str) -> bytes:
    """`text` as a WebSocket close reason: at most 123 bytes, never half a character."""
    return text.encode()[:123].decode(errors="ignore").encode()


def decode_audio(data: bytes) -> np.ndarray:
    """Any audio file PyAV reads -> 48 kHz mono float32. ValueError with a clear line otherwise."""
    try:
        # audio containers only: FFmpeg's concat or playlist demuxers would read files named inside the upload
        with av.open(io.BytesIO(data), options={"format_whitelist": AUDIO_FORMATS},
                     metadata_errors="replace") as f:  # a damaged tag is no reason to fail
            if not f.streams.audio:
                raise ValueError("the file has no audio track")
            stream = f.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=VOICE_RATE)
            parts, seconds = [], 0.0
            for frame in f.decode(stream):
                # judged before resampling: 8 kB declaring 1 Hz would be 2 hours, gigabytes, at 48 kHz
                if frame.sample_rate < MIN_RATE:
                    raise ValueError(f"a sample rate of {frame.sample_rate} Hz is not a voice's (at least {MIN_RATE})")
                seconds += frame.samples / frame.sample_rate
                if seconds > MAX_SPEAK_S:
                    raise ValueError(f"audio files are at most {MAX_SPEAK_S:.0f} s long")
                for out in resampler.resample(frame):
                    parts.append(to_mono_float(out.to_ndarray().reshape(-1)))
            for out in resampler.resample(None):
                parts.append(to_mono_float(out.to_ndarray().reshape(-1)))
    except av.FFmpegError as e:
        raise ValueError(f"cannot read this audio file: {e.strerror or type(e).__name__}") from None
    if not parts or sum(p.size for p in parts) == 0:
        raise ValueError("the file holds no audio samples")
    return np.concatenate(parts)
