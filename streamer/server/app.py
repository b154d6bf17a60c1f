"""`streamer serve`: web/ pages, POST /offer (WebRTC talk sessions), session stats, /healthz."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

from streamer.audio import VoiceActivity
from streamer.config import Config
from streamer.live.channel import FPS, Channel
from streamer.live.tracks import AvatarVideoTrack, VoiceTrack, read_voice
from streamer.live.worker import InferenceWorker

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
MAX_BODY = 256 * 1024  # an SDP offer is a few kB
CONNECT_TIMEOUT_S = 30


@dataclass
class Session:
    id: str
    pc: RTCPeerConnection
    channel: Channel
    tasks: set[asyncio.Task] = field(default_factory=set)
    created: float = field(default_factory=time.monotonic)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Server:
    def __init__(self, cfg: Config, engine, avatar, web_dir: Path = WEB_DIR):
        self.cfg = cfg
        self.engine = engine
        self.avatar = avatar
        self.web_dir = web_dir
        self.worker = InferenceWorker(engine, max_batch=cfg.live.max_batch)
        self.sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/session/{id}", self.session_stats)
        app.router.add_delete("/session/{id}", self.session_delete)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/", self.index)
        app.router.add_static("/", self.web_dir, follow_symlinks=False)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        self._spawn(self._report(), "stats-report")

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception():
            log.error("task %s failed: %r", task.get_name(), task.exception())

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.web_dir / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "sessions": len(self.sessions), "engine": self.engine.name,
                                  "avatar": self.avatar.name})

    def _ice(self) -> RTCConfiguration:
        stun = self.cfg.server.stun
        return RTCConfiguration(iceServers=[RTCIceServer(urls=[stun])] if stun else [])

    async def offer(self, request: web.Request) -> web.Response:
        if len(self.sessions) >= self.cfg.server.max_sessions:
            return error(503, f"server is full ({self.cfg.server.max_sessions} sessions); try again later")
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"offer larger than {MAX_BODY} bytes")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}")
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            return error(400, "body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}")
        sdp = body["sdp"]
        if "m=audio" not in sdp:
            return error(400, "the offer has no audio: the avatar needs a voice to lip-sync to")
        sid = secrets.token_urlsafe(6)
        pc = RTCPeerConnection(self._ice())
        a = self.cfg.audio
        vad = VoiceActivity(a.vad_aggressiveness, a.vad_frame_ms, a.vad_preroll_ms, a.vad_hangover_ms, fps=FPS,
                            min_snr_db=a.vad_min_snr_db)
        channel = Channel(sid, self.avatar, self.worker, delay_s=self.cfg.live.delay_ms / 1000, vad=vad,
                          fade=self.cfg.live.fade_frames, session=sid)
        session = Session(sid, pc, channel)
        self.sessions[sid] = session

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                task = self._spawn(read_voice(track, channel), f"voice-{sid}")
                session.tasks.add(task)

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("[%s] connection %s", sid, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close_session(sid)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(VoiceTrack(channel))
            video = AvatarVideoTrack(channel)
            pc.addTrack(video)
            for t in pc.getTransceivers():
                if t.kind == "audio":
                    opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.name == "opus"]
                    t.setCodecPreferences(opus)
            if not any(t.kind == "video" and t.sender.track is video for t in pc.getTransceivers()):
                raise ValueError("the offer does not receive video")
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as e:  # noqa: BLE001 - a bad offer fails this session only
            await self.close_session(sid)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return error(400, f"cannot use this offer: {first}")
        session.tasks.add(self._spawn(self._watch(sid), f"watch-{sid}"))
        log.info("[%s] session started (%d live)", sid, len(self.sessions))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": sid})

    async def _watch(self, sid: str) -> None:
        """Close a session whose peer never connects."""
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        s = self.sessions.get(sid)
        if s and s.pc.connectionState != "connected":
            log.info("[%s] never connected; closing", sid)
            await self.close_session(sid)

    async def session_stats(self, request: web.Request) -> web.Response:
        s = self.sessions.get(request.match_info["id"])
        if s is None:
            return error(404, "no such session")
        return web.json_response({**s.channel.stats(), "engine": self.engine.name, "avatar": self.avatar.name})

    async def session_delete(self, request: web.Request) -> web.Response:
        if request.match_info["id"] not in self.sessions:
            return error(404, "no such session")
        await self.close_session(request.match_info["id"])
        return web.Response(status=204)

    async def close_session(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        current = asyncio.current_task()
        for task in s.tasks:
            if task is not current:
                task.cancel()
        s.channel.close()
        await s.pc.close()
        st = s.channel.stats()
        log.info("[%s] session ended: %d frames, %d lip-synced, %d late, delay p95 %s ms", sid, st["frames_sent"],
                 st["lipsync_frames"], st["late_frames"], st["delay_ms_p95"])

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(10)
            for sid, s in list(self.sessions.items()):
                st = s.channel.stats()
                log.info("[%s] %.1f fps, %d lip-synced, %d late, delay p50 %s p95 %s ms, %s", sid, st["fps"],
                         st["lipsync_frames"], st["late_frames"], st["delay_ms_p50"], st["delay_ms_p95"],
                         "speaking" if st["speaking"] else "idle")

    async def _on_shutdown(self, app) -> None:
        for sid in list(self.sessions):
            await self.close_session(sid)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.close)
