"""`streamer serve`: the pages in web/, WebRTC signalling and observability.

Endpoints
  POST /offer                 talk session from web/index.html: JSON {sdp, type, channel?} -> {sdp, type, session}
  POST /whip/<channel>        WHIP ingest (RFC 9725): a publisher's voice drives the channel
  POST /whep/<channel>        WHEP viewer: receives the channel's avatar video and delayed voice
  DELETE <Location>           ends a WHIP/WHEP session; PATCH (trickle ICE) answers 405
  GET|DELETE /session/<id>    a talk session's live stats / end it
  GET /ws/<channel>           a program's voice over a WebSocket, with events and barge-in (server/push.py)
  POST|DELETE /speak/<channel> speak an uploaded audio file / interrupt it
  GET /metrics, /healthz      Prometheus text; liveness
  GET /openapi.json           all of the above as an OpenAPI 3.1 document
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

from streamer.avatar.cache import NAME_RE
from streamer.config import Config
from streamer.live import vp8
from streamer.live.broadcast import SharedVideoTrack, VoiceTrack, can_share
from streamer.live.channel import FPS, Channel
from streamer.live.opus import advertise_fec
from streamer.live.tracks import AvatarVideoTrack, read_voice
from streamer.live.wire import unbuffered
from streamer.live.worker import InferenceWorker
from streamer.pauses import settle
from streamer.server.metrics import Metrics
from streamer.server.openapi import document

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[1] / "web"  # package data: found in an installed wheel too
MAX_BODY = 256 * 1024  # an SDP offer is a few kB
CONNECT_TIMEOUT_S = 10  # a peer not connected by then is dropped: half-open offers must not hold slots long
TAKEOVER_S = 3.0  # a talk page or WHIP voice silent on the wire this long gives its channel to a newcomer
ACCEPTS_POST = {"whip": "application/sdp", "whep": "application/sdp", "offer": "application/json",
                "speak": "audio/*, application/octet-stream"}
PAGES = "pages"  # the route of web/'s files, under every path no endpoint has
NOT_FOUND = "no such page or endpoint (see /openapi.json)"
CORS = {"Access-Control-Allow-Methods": "GET, POST, DELETE, PATCH, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Expose-Headers": "Location"}


@dataclass
class Session:
    id: str
    # "talk" (web page: voice in, avatar back), "whip" (voice in), "whep" (avatar out),
    # "ws" (a program's audio over a WebSocket), "speak" (an uploaded file)
    kind: str
    pc: RTCPeerConnection | None
    channel: Channel
    tasks: set[asyncio.Task] = field(default_factory=set)
    voice: object = None  # a program's PushedVoice ("ws", "speak")
    finished: asyncio.Future | None = None  # "speak": its playback_finished event

    @property
    def publishes(self) -> bool:
        return self.kind in ("talk", "whip", "ws", "speak")

    @property
    def views(self) -> bool:
        return self.kind in ("talk", "whep")


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def page_file(web_dir: Path, name: str) -> Path | None:
    """The file `name` of web/, nothing outside it (no '..', no symbolic link out), or None."""
    root = web_dir.resolve()
    try:
        path = (root / name).resolve()
    except (ValueError, OSError):  # a NUL byte, a name too long
        return None
    return path if path.is_relative_to(root) and path.is_file() else None


async def page(web_dir: Path, request: web.Request) -> web.StreamResponse:
    """A file of web/, a JSON 404 otherwise (a few stats of a small local folder: not worth a thread)."""
    path = page_file(web_dir, request.match_info["page"])
    return error(404, NOT_FOUND) if path is None else web.FileResponse(path)


def preflight(request: web.Request) -> web.Response:
    """The 204 for OPTIONS (a CORS preflight: the middleware adds CORS), saying what a POST there takes."""
    accepts = ACCEPTS_POST.get(request.path.split("/")[1])
    return web.Response(status=204, headers={"Accept-Post": accepts} if accepts else None)


async def refused(request: web.Request) -> web.Response:
    """A method routed only to be refused, so that /openapi.json lists it (PATCH: trickle ICE is not
    supported); `wrong_method` answers it, as any method a path does not answer."""
    return web.Response(status=405)


async def served_methods(request: web.Request) -> set[str]:
    """The methods the endpoint at the request's path answers; none where no endpoint is (the pages'
    catch-all matches every path, and routes to `refused` answer nothing)."""
    methods: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name != PAGES and (await resource.resolve(request))[1]:  # its path matches
            methods.update(route.method for route in resource if route.handler is not refused)
    return methods


async def wrong_method(request: web.Request, web_dir: Path) -> web.Response | None:
    """The JSON 405 for a method the request's path does not answer, Allow naming only those it does
    (the pages' catch-all would answer `GET /offer` with a 404, and add its GET to the router's 405 for
    `DELETE /offer`); a 404 where nothing answers; None: the route matched answers."""
    route = request.match_info.route
    pages = route.resource is not None and route.resource.name == PAGES
    if route.resource is not None and not pages and route.handler is not refused:
        return None  # an endpoint's own method
    methods = await served_methods(request)
    if not methods and route.resource is None and page_file(web_dir, request.path[1:]):
        methods = {"GET", "HEAD"}  # a file of web/, asked with another method
    if not methods:
        return None if pages else error(404, NOT_FOUND)
    allow = ", ".join(sorted(methods))
    return error(405, f"{request.method} is not answered here; use {allow}", {"Allow": allow})


def shown_host(host: str) -> str:
    """The address to tell the user to open (0.0.0.0 is where we listen, not a place to go)."""
    return "localhost" if host in ("127.0.0.1", "::1", "0.0.0.0", "::", "") else host


def open_line(host: str, port: int, token: str | None) -> str:
    """What `streamer serve` prints once it listens: the page to open (the token's place, not its value:
    logs keep what is printed)."""
    page = "?token=<server.token>" if token else ""
    return f"streamer: open http://{shown_host(host)}:{port}/{page} and press Start (Ctrl-C stops)"


def warn_if_open(host: str, token: str | None) -> None:
    if host not in ("127.0.0.1", "::1", "localhost") and not token:
        log.warning("listening on %s without a token: anyone who can reach this machine can talk, watch and "
                    "read /metrics; set server.token (--config) to require one", host or "every address")


def quiet_webrtc_logs() -> None:
    """aioice logs each ICE candidate pair's every state at INFO (~6 lines a session): it and aiortc say
    only warnings unless the server runs --verbose (the root logger at DEBUG) or they were set already."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    for name in ("aioice", "aiortc"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def allow_origin(response: web.StreamResponse, request: web.Request, origins: str | None) -> web.StreamResponse:
    """CORS headers for a page from another site only when `server.cors_origins` names it (or is *):
    pages this server serves need none, and no other site's page may drive or watch a local server."""
    origin = request.headers.get("Origin")
    allowed = [o.strip() for o in (origins or "").split(",") if o.strip()]
    if origin and not response.prepared and ("*" in allowed or origin in allowed):
        response.headers.update({**CORS, "Access-Control-Allow-Origin": origin, "Vary": "Origin"})
    return response


async def guarded(request: web.Request, handler, origins: str | None = None,
                  web_dir: Path = WEB_DIR) -> web.StreamResponse:
    """Run `handler` (or answer the Response given instead): every error is a JSON body, the router's
    404 and 405 too, and a defect is a 500 with one line, never a traceback to the client."""
    return allow_origin(await _guarded(request, handler, web_dir), request, origins)


async def _guarded(request: web.Request, handler, web_dir: Path) -> web.StreamResponse:
    if isinstance(handler, web.StreamResponse):
        return handler
    if (wrong := await wrong_method(request, web_dir)) is not None:
        return wrong
    try:
        response = await handler(request)
        if response.status >= 400 and not response.prepared and response.content_type != "application/json":
            allow = {"Allow": response.headers["Allow"]} if "Allow" in response.headers else None
            text = NOT_FOUND if response.status == 404 else response.reason
            return error(response.status, text, allow)  # the static handler's bare 404, a plain 405
        return response
    except web.HTTPException as e:
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        text = NOT_FOUND if e.status == 404 else e.reason
        return error(e.status, text, allow)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # noqa: BLE001 - logged here, answered plainly
        log.exception("%s %s failed", request.method, request.path)
        return error(500, "internal error (logged by the server)")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def foreign_host(listen: str, request: web.Request) -> bool:
    """A server listening on loopback answers only requests addressed to loopback: a page whose own
    name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own Host, and is refused."""
    if listen not in LOOPBACK:
        return False
    host = (request.host or "").lower()
    name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name not in LOOPBACK


def refuse(token: str | None, request: web.Request, listen: str | None = None) -> web.Response | None:
    """With a token set, every signalling endpoint and /metrics need `Authorization: Bearer <token>`;
    on loopback, the Host must be loopback too: the error to answer, or None."""
    if listen is not None and foreign_host(listen, request):
        return error(421, "this server answers requests for localhost only (see server.host)")
    open_paths = request.path in ("/healthz", "/openapi.json") or request.method == "OPTIONS" or (
        request.method == "GET" and not request.path.startswith(("/session/", "/metrics", "/internal/", "/ws/")))
    if token and not open_paths:
        given = request.headers.get("Authorization", "")  # may hold any bytes (surrogate-escaped)
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()):
            return error(401, "a valid 'Authorization: Bearer <token>' header is required",
                         {"WWW-Authenticate": "Bearer"})
    return None


class OfferError(ValueError):
    """An offer the server cannot use, said in words for the client."""


def offer_problem(e: Exception) -> str:
    """What to tell a client about an offer that failed: our own words, or aiortc's when they are words
    (a bare AssertionError or 'None is not in list' would only puzzle)."""
    first = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, OfferError) or (type(e) is ValueError and first and "not in list" not in first):
        return first
    return "malformed or unsupported SDP"


class Server:
    def __init__(self, cfg: Config, engine, avatar, web_dir: Path = WEB_DIR, worker=None):
        """worker: what runs inference (default: an InferenceWorker on `engine` in this process; a media
        worker of a multi-process server passes the RemoteWorker of the server's inference service)."""
        self.cfg = cfg
        self.engine = engine
        self.avatar = avatar
        self.web_dir = web_dir
        vp8.install()  # avatar frames are clean: no denoiser
        advertise_fec()  # a lost voice packet comes back from the next one's copy
        quiet_webrtc_logs()  # (a Server is made after `streamer serve` has set its logging up)
        self.worker = worker or InferenceWorker(engine, max_batch=cfg.live.max_batch)
        self.channels: dict[str, Channel] = {}
        self.delay_s = None if cfg.live.delay_ms == "auto" else cfg.live.delay_ms / 1000  # None: auto
        self.sessions: dict[str, Session] = {}
        self.metrics = Metrics(self)
        self._tasks: set[asyncio.Task] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        r = app.router
        r.add_post("/offer", self.offer)
        r.add_get("/session/{id}", self.session_stats)
        r.add_delete("/session/{id}", self.session_delete)
        for kind in ("whip", "whep"):
            r.add_post(f"/{kind}/{{channel}}", self.whip if kind == "whip" else self.whep)
            r.add_delete(f"/{kind}/{{channel}}/{{id}}", self.resource_delete)
            # trickle ICE is not supported (our answers carry every candidate): PATCH answers 405
            r.add_route("PATCH", f"/{kind}/{{channel}}", refused)
            r.add_route("PATCH", f"/{kind}/{{channel}}/{{id}}", refused)
            r.add_route("OPTIONS", f"/{kind}/{{channel}}", self.options)
            r.add_route("OPTIONS", f"/{kind}/{{channel}}/{{id}}", self.options)
        from streamer.server.push import Drive  # push builds on this module

        Drive(self).add_routes(r)
        for path in ("/offer", "/session/{id}", "/speak/{channel}"):
            r.add_route("OPTIONS", path, self.options)  # CORS preflight, for the origins configured
        r.add_get("/metrics", self.metrics.handle)
        r.add_get("/internal/load", self.load)
        r.add_get("/healthz", self.healthz)
        r.add_get("/openapi.json", openapi)
        r.add_get("/", self.index)
        r.add_get("/{page:.+}", self.page, name=PAGES)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    # plumbing

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        return await guarded(request, refuse(self.cfg.server.token, request, self.cfg.server.host) or handler,
                             self.cfg.server.cors_origins, self.web_dir)

    async def _on_startup(self, app) -> None:
        settle()  # what this process loaded is kept out of the garbage collector's pauses
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

    def _ice(self) -> RTCConfiguration:
        stun = self.cfg.server.stun
        return RTCConfiguration(iceServers=[RTCIceServer(urls=[stun])] if stun else [])

    async def channel(self, name: str) -> Channel:
        """The channel `name`, opened if needed (off the event loop: it decodes the avatar's first frame)."""
        ch = self.channels.get(name)
        if ch is not None:
            return ch
        ch = await asyncio.get_running_loop().run_in_executor(
            None, lambda: Channel(name, self.avatar, self.worker, delay_s=self.delay_s,
                                  vad_factory=lambda: self.cfg.audio.voice_activity(FPS),
                                  fade=self.cfg.live.fade_frames))
        if name in self.channels:  # opened meanwhile by another request
            ch.close()
            return self.channels[name]
        ch.on_delay = self.metrics.delay.observe
        self.channels[name] = ch
        log.info("channel %s opened", name)
        return ch

    def _release(self, ch: Channel) -> None:
        if ch.publisher is None and ch.viewers == 0 and self.channels.get(ch.name) is ch:
            del self.channels[ch.name]
            ch.close()
            log.info("channel %s closed", ch.name)

    def count(self, kind_test) -> int:
        return sum(1 for s in self.sessions.values() if kind_test(s))

    # sessions

    def _full(self, publishes: bool) -> web.Response | None:
        """The 503 when the voices (or the viewers) are at their limit."""
        server = self.cfg.server
        if publishes and self.count(lambda s: s.publishes) >= server.max_sessions:
            return error(503, f"server is full ({server.max_sessions} live sessions); try again later")
        if not publishes and self.count(lambda s: s.kind == "whep") >= server.max_viewers:
            return error(503, f"server is full ({server.max_viewers} viewers); try again later")
        return None

    async def admit(self, kind: str, channel_name) -> tuple[Session | None, web.Response | None]:
        """A new session of `kind` on `channel_name` within the limits, its voice attached if it
        publishes: (session, None) or (None, the error to answer)."""
        if not isinstance(channel_name, str) or not NAME_RE.fullmatch(channel_name):
            return None, error(400, "channel names are 1-64 letters, digits, '-' or '_'")
        publishes = kind != "whep"
        if full := self._full(publishes):
            return None, full
        busy = f"channel {channel_name} already has a voice; use another channel name"
        ch = await self.channel(channel_name)
        if publishes and ch.publisher is not None:
            old = self.sessions.get(ch.publisher)
            if old is None or old.kind not in ("talk", "whip") or ch.silent_for() < TAKEOVER_S:
                return None, error(409, busy)  # the channel stays: its voice holds it
            # A WebRTC sender sends packets even in silence; none for seconds: a page killed or reloaded
            # without saying goodbye, which ICE would notice only after ~30 s. Its user is back.
            log.info("[%s] %s on %s has sent nothing for %.1f s: closed, the channel goes to a new %s", old.id,
                     old.kind, channel_name, ch.silent_for(), kind)
            await self.close_session(old.id)
            ch = await self.channel(channel_name)  # closed with it if nobody else watched: opened afresh
            if ch.publisher is not None:  # another newcomer was quicker
                return None, error(409, busy)
        if full := self._full(publishes):  # opening the channel awaited: others may have come in meanwhile
            self._release(ch)
            return None, full
        session = Session(secrets.token_urlsafe(8), kind, None, ch)
        self.sessions[session.id] = session
        if session.publishes:
            ch.attach_voice(session.id)
        if session.views:
            ch.viewers += 1
        return session, None

    async def _start(self, kind: str, channel_name: str, sdp: str) -> tuple[Session | None, web.Response | None]:
        """Answer an offer for a session of `kind` on `channel_name`: (session, None) or (None, error)."""
        if kind != "whep" and "m=audio" not in sdp:
            return None, error(400, "the offer has no audio: the avatar needs a voice to lip-sync to")
        session, err = await self.admit(kind, channel_name)
        if err:
            return None, err
        sid, ch = session.id, session.channel
        pc = session.pc = RTCPeerConnection(self._ice())

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio" and session.publishes:
                receiver = next(r for r in pc.getReceivers() if r.track is track)
                wire = unbuffered(receiver, ch.clock)  # (no packet can have come yet: ICE has not started)
                session.tasks.add(self._spawn(read_voice(track, ch, wire), f"voice-{sid}"))

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("[%s] %s on %s: connection %s", sid, kind, channel_name, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close_session(sid)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.name == "opus"]
            for t in pc.getTransceivers():
                if t.kind == "audio":
                    t.setCodecPreferences(opus)
            if session.views:
                if not any(t.kind == "video" for t in pc.getTransceivers()):  # (else aiortc fails in addTrack)
                    raise OfferError("the offer does not receive video")
                pc.addTrack(VoiceTrack(ch))
                video = AvatarVideoTrack(ch)
                pc.addTrack(video)
                if not any(t.kind == "video" and t.sender.track is video for t in pc.getTransceivers()):
                    raise OfferError("the offer does not receive video")
            else:
                for t in pc.getTransceivers():
                    if t.kind == "video":  # a WHIP publisher's camera is not used: don't receive it
                        t.direction = "inactive"
            answer = await pc.createAnswer()
            if kind == "whip":
                # Be the DTLS server: webrtcbin's RSA certificate and aiortc's ECDSA-only client
                # suites do not meet otherwise (the WHIP spec's own example answers passive too).
                answer = RTCSessionDescription(sdp=answer.sdp.replace("a=setup:active", "a=setup:passive"),
                                               type="answer")
            await pc.setLocalDescription(answer)
            if session.views:
                sender = next(t.sender for t in pc.getTransceivers() if t.sender.track is video)
                if can_share(pc, sender):  # VP8: the channel's one encode
                    sender.replaceTrack(SharedVideoTrack(ch, sender))
        except Exception as e:  # noqa: BLE001 - a bad offer fails this session only
            await self.close_session(sid)
            log.info("[%s] offer refused: %r", sid, e)
            return None, error(400, f"cannot use this offer: {offer_problem(e)}")
        session.tasks.add(self._spawn(self._watch(sid), f"watch-{sid}"))
        log.info("[%s] %s session started on channel %s (%d sessions)", sid, kind, channel_name, len(self.sessions))
        return session, None

    async def offer(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":  # a form post from any web page needs no preflight
            return error(415, "send the offer as Content-Type: application/json")
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"offer larger than {MAX_BODY} bytes")
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past Python's limit
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            return error(400, "body must be JSON: {\"sdp\": ..., \"type\": \"offer\", \"channel\": optional}")
        session, err = await self._start("talk", body.get("channel", "default"), body["sdp"])
        if err:
            return err
        desc = session.pc.localDescription
        return web.json_response({"sdp": desc.sdp, "type": desc.type, "session": session.id,
                                  "channel": session.channel.name})

    async def _sdp_body(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        if request.content_type != "application/sdp":
            return None, error(415, "send the offer as Content-Type: application/sdp")
        try:
            return (await request.read()).decode("utf-8"), None  # SDP is UTF-8 whatever the charset says
        except web.HTTPRequestEntityTooLarge:
            return None, error(413, f"offer larger than {MAX_BODY} bytes")
        except UnicodeDecodeError:
            return None, error(400, "the offer is not UTF-8 text")

    async def _whxp(self, request: web.Request, kind: str) -> web.Response:
        sdp, err = await self._sdp_body(request)
        if err:
            return err
        name = request.match_info["channel"]
        session, err = await self._start(kind, name, sdp)
        if err:
            return err
        return web.Response(status=201, text=session.pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/{kind}/{name}/{session.id}"})

    async def whip(self, request: web.Request) -> web.Response:
        return await self._whxp(request, "whip")

    async def whep(self, request: web.Request) -> web.Response:
        return await self._whxp(request, "whep")

    async def resource_delete(self, request: web.Request) -> web.Response:
        s = self.sessions.get(request.match_info["id"])
        kind = request.path.split("/")[1]
        if s is None or s.kind != kind or s.channel.name != request.match_info["channel"]:
            return error(404, "no such session")
        await self.close_session(s.id)
        return web.Response(status=200)

    async def options(self, request: web.Request) -> web.Response:
        return preflight(request)

    async def _watch(self, sid: str) -> None:
        """Close a session whose peer never connects."""
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        s = self.sessions.get(sid)
        if s and s.pc.connectionState != "connected":
            log.info("[%s] never connected; closing", sid)
            await self.close_session(sid)

    async def close_session(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        current = asyncio.current_task()
        for task in s.tasks:
            if task is not current:
                task.cancel()
        ch = s.channel
        if s.publishes:
            ch.detach_voice(sid)
        if s.views:
            ch.viewer_left()
        if s.pc is not None:
            await s.pc.close()
        st = ch.stats()
        log.info("[%s] %s session ended on channel %s: %d frames sent, %d lip-synced, %d late (%d held the last "
                 "mouth), delay p95 %s ms", sid, s.kind, ch.name, st["frames_sent"], st["lipsync_frames"],
                 st["late_frames"], st["held_frames"], st["delay_ms_p95"])
        self._release(ch)

    # pages and stats

    async def page(self, request: web.Request) -> web.StreamResponse:
        return await page(self.web_dir, request)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.web_dir / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "sessions": len(self.sessions), "channels": len(self.channels),
                                  "engine": self.engine.name, "avatar": self.avatar.name})

    async def load(self, request: web.Request) -> web.Response:
        """What the front of a multi-process server places channels by (token-protected)."""
        return web.json_response({"channels": sorted(self.channels), "sessions": sorted(self.sessions),
                                  "engine": self.engine.name, "avatar": self.avatar.name})

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

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(10)
            for name, ch in list(self.channels.items()):
                st = ch.stats()
                log.info("channel %s: %d viewers, %.1f fps, %d lip-synced, %d late (%d held), delay p50 %s p95 %s "
                         "ms, %s", name, st["viewers"], st["fps"], st["lipsync_frames"], st["late_frames"],
                         st["held_frames"], st["delay_ms_p50"], st["delay_ms_p95"],
                         "speaking" if st["speaking"] else "idle")

    async def _on_shutdown(self, app) -> None:
        for sid in list(self.sessions):
            await self.close_session(sid)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.close)
