"""`streamer serve --workers N`: one front process, N media worker processes, one inference service.

One Python process tops out near two cores (every packet, frame and encode shares one interpreter
lock), so a box with more cores runs several. Each worker is a `streamer serve` process on a loopback
port, holding the channels placed on it: their peers, audio front end, blending and encoding run on
its own event loop and cores. Inference for all of them runs in one service process (one model
copy, batches across every channel; see streamer/live/service.py). The front keeps the pages and the signalling: it
places each channel on a worker (where it already is, else the least loaded), forwards the
channel's offers, WHIP and WHEP requests there (media then flows directly between the client and
that worker), enforces the server-wide limits, merges the workers' /metrics, and starts a
replacement when a worker dies (the channels it held end, every other channel keeps running) or when
the service dies (the workers reconnect; mouths are idle meanwhile).

Workers listen on 127.0.0.1 only and take requests only with the front's secret token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from streamer.config import Config
from streamer.errors import UserError
from streamer.pauses import settle
from streamer.server.app import (
    MAX_BODY,
    PAGES,
    WEB_DIR,
    error,
    guarded,
    open_line,
    openapi,
    page,
    preflight,
    refuse,
    refused,
    warn_if_open,
)
from streamer.server.guard import ConnectionGuard
from streamer.server.push import (
    HARD_MAX_MESSAGE,
    MAX_SPEAK_BYTES,
    close_reason,
    foreign_origin,
    read_limited,
    refuse_websocket,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180  # a worker loads its model and warms it up before it listens
WS_REFUSALS = {400: "channel names are 1-64 letters, digits, '-' or '_'",
               409: "channel {channel} already has a voice; use another channel name",
               503: "server is full; try again later"}
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server", "keep-alive"}


class ProcessFailed(UserError):
    """A process the front started exited on a UserError: it printed its own error line already, so the
    CLI need not print this one (`reported`)."""

    reported = True


def workers_for(cores: int) -> int:
    """`server.workers: auto`: one worker per two cores (what one process can use), at most 16."""
    return max(1, min(16, cores // 2))


class Worker:
    """One media worker process."""

    def __init__(self, index: int, proc: subprocess.Popen, port: int):
        self.index, self.proc, self.port = index, proc, port
        self.placing: dict[str, int] = {}  # channel -> offers placed here and not yet answered

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def url(self, path_qs: str) -> str:
        return f"http://127.0.0.1:{self.port}{path_qs}"


class Front:
    def __init__(self, cfg: Config, count: int, web_dir: Path = WEB_DIR):
        self.cfg = cfg
        self.count = count
        self.web_dir = web_dir
        self.secret = secrets.token_urlsafe(24)
        self.workers: list[Worker] = []
        self.restarts = 0
        self.ended: OrderedDict[str, str] = OrderedDict()  # sessions whose worker died -> why (bounded)
        self._dir = tempfile.TemporaryDirectory(prefix="streamer-front-")
        self._config = Path(self._dir.name) / "worker.yaml"
        self._http: aiohttp.ClientSession | None = None
        self._closing = False
        self._procs: list[subprocess.Popen] = []  # every process started, to stop them all
        self.socket = str(Path(self._dir.name) / "inference.sock")  # the folder is private to this user
        self.key = secrets.token_bytes(32)
        self.service: subprocess.Popen | None = None
        self._watch: asyncio.Task | None = None
        self._place_lock = asyncio.Lock()  # placement decisions one at a time; forwarding runs in parallel
        self._pending = {"publishers": 0, "viewers": 0}  # placed offers not yet answered
        # sessions admitted through the front -> (worker, role); pruned to what the workers still hold,
        # so a session is counted once: as a pending offer, then as admitted
        self.admitted: dict[str, tuple[Worker, str, float]] = {}  # sid -> (worker, role, when admitted)

    # workers

    def _write_config(self) -> None:
        """The front's settings for the workers, with a loopback address, any free port, one process
        each and the front's secret as their token (the file is private to this user)."""
        data = dataclasses.asdict(self.cfg)
        data["server"].update(host="127.0.0.1", port=1, token=self.secret, workers=1)
        fd = os.open(self._config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f)

    def _start_process(self, what: str, env: dict) -> tuple[subprocess.Popen, int]:
        """Start a `streamer serve` process (a media worker or the inference service) and wait until it
        writes its port (0 for the service) into its port file: blocking, so call it off the event loop."""
        port_file = Path(self._dir.name) / f"{what.replace(' ', '-')}.port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, **env, "STREAMER_PORT_FILE": str(port_file), "STREAMER_INFERENCE": self.socket,
               "STREAMER_INFERENCE_KEY": self.key.hex()}
        cmd = [sys.executable, "-m", "streamer", "serve", "--config", str(self._config), "--port", "0", "-q"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # Ctrl-C reaches the front, which stops the others
        self._procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and not self._closing:
            if port_file.exists():
                return proc, int(port_file.read_text())
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        failed = ProcessFailed if proc.returncode == UserError.exit_code else UserError
        raise failed(f"{what} did not start (exit code {proc.returncode}); see the log above")

    def _spawn(self, index: int) -> Worker:
        proc, port = self._start_process(f"media worker {index}", {"STREAMER_WORKER": str(index)})
        log.info("worker %d (pid %d) listening on 127.0.0.1:%d", index, proc.pid, port)
        return Worker(index, proc, port)

    def _spawn_service(self) -> subprocess.Popen:
        Path(self.socket).unlink(missing_ok=True)  # left by one that was killed
        proc, _ = self._start_process("inference service", {"STREAMER_ROLE": "inference",
                                                            "STREAMER_WORKER": "inference"})
        log.info("inference service (pid %d) ready", proc.pid)
        return proc

    async def start(self) -> None:
        self._write_config()
        loop = asyncio.get_running_loop()
        self.service = await loop.run_in_executor(None, self._spawn_service)
        self.workers = list(await asyncio.gather(*(loop.run_in_executor(None, self._spawn, i)
                                                   for i in range(self.count))))
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                           headers={"Authorization": f"Bearer {self.secret}"})
        self._watch = loop.create_task(self._watch_workers(), name="watch-workers")
        settle()  # what this process loaded is kept out of the garbage collector's pauses

    async def _watch_workers(self) -> None:
        while not self._closing:
            await asyncio.sleep(0.5)
            if self.service.poll() is not None and not self._closing:
                log.error("the inference service (pid %d) died (exit code %s); starting a new one (the workers "
                          "reconnect, mouths are idle meanwhile)", self.service.pid, self.service.returncode)
                try:
                    self.service = await asyncio.get_running_loop().run_in_executor(None, self._spawn_service)
                    self.restarts += 1
                except UserError as e:
                    log.error("%s; trying again", e)
            for i, w in enumerate(self.workers):
                if w.alive or self._closing:
                    continue
                code = w.proc.returncode
                gone = [sid for sid, (holder, _, _) in self.admitted.items() if holder is w]
                log.error("worker %d (pid %d) died (exit code %s): its %d sessions ended; starting a replacement",
                          w.index, w.proc.pid, code, len(gone))
                for sid in gone:
                    del self.admitted[sid]
                    self.ended[sid] = f"its media worker stopped (exit code {code})"
                while len(self.ended) > 1000:
                    self.ended.popitem(last=False)
                try:
                    self.workers[i] = await asyncio.get_running_loop().run_in_executor(None, self._spawn, w.index)
                    self.restarts += 1
                except UserError as e:
                    log.error("%s; trying again", e)

    async def stop(self) -> None:
        self._closing = True
        if self._watch:
            self._watch.cancel()
        for proc in self._procs:
            if proc.poll() is None and proc is not self.service:
                proc.send_signal(signal.SIGTERM)  # each closes its sessions cleanly
        loop = asyncio.get_running_loop()

        def reap(proc: subprocess.Popen) -> None:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        await asyncio.gather(*(loop.run_in_executor(None, reap, p) for p in self._procs if p is not self.service))
        if self.service is not None and self.service.poll() is None:  # last: the workers needed it
            self.service.send_signal(signal.SIGTERM)
            await loop.run_in_executor(None, reap, self.service)
        if self._http:
            await self._http.close()
        self._dir.cleanup()

    async def _loads(self) -> list[tuple[Worker, dict]]:
        """Each live worker's channels and session counts."""
        async def one(w: Worker):
            try:
                async with self._http.get(w.url("/internal/load")) as r:
                    return w, await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
                return w, None

        got = await asyncio.gather(*(one(w) for w in self.workers if w.alive))
        return [(w, load) for w, load in got if load is not None]

    async def _place(self, channel: str, kind: str) -> tuple[Worker | None, web.Response | None]:
        """The worker for `channel` (where it is, else the least loaded), or an error (full, none alive)."""
        asked = time.monotonic()
        loads = await self._loads()
        if not loads:
            return None, error(503, "no media worker is running; try again in a few seconds")
        server = self.cfg.server
        # sessions that ended on their worker (peer gone, timed out) are forgotten; one admitted while
        # the workers were being asked may not be in their answers yet, and is kept
        held = {w: set(load["sessions"]) for w, load in loads}
        self.admitted = {sid: v for sid, v in self.admitted.items()
                         if v[2] >= asked or v[0] not in held or sid in held[v[0]]}
        role = "viewers" if kind == "whep" else "publishers"
        limit = server.max_viewers if kind == "whep" else server.max_sessions
        if sum(1 for v in self.admitted.values() if v[1] == role) + self._pending[role] >= limit:
            what = "viewers" if kind == "whep" else "live sessions"
            return None, error(503, f"server is full ({limit} {what}); try again later")
        for w, load in loads:
            if channel in load["channels"] or w.placing.get(channel):
                return w, None
        w, _ = min(loads, key=lambda wl: (len(wl[1]["sessions"]) + sum(wl[0].placing.values()),
                                          len(wl[1]["channels"]), wl[0].index))
        return w, None

    @contextlib.asynccontextmanager
    async def _reserved(self, channel: str, kind: str):
        """Place `channel` for a new session of `kind`: yields (worker, None) or (None, the error). Placement
        is serialised, what follows is not: while inside, the session counts on its worker and its limit.
        The caller records the session it created with `_note`."""
        async with self._place_lock:
            w, err = await self._place(channel, kind)
            if err:
                w = None
            else:
                role = "viewers" if kind == "whep" else "publishers"
                w.placing[channel] = w.placing.get(channel, 0) + 1
                self._pending[role] += 1
        if w is None:
            yield None, err
            return
        try:
            yield w, None
        finally:
            self._pending[role] -= 1
            w.placing[channel] -= 1
            if not w.placing[channel]:
                del w.placing[channel]

    async def _placed(self, request: web.Request, channel: str, kind: str, body: bytes):
        """Place `channel`'s request and forward it: (worker, response, body)."""
        async with self._reserved(channel, kind) as (w, err):
            if err:
                return None, err, b""
            resp, data = await self._forward(request, w, body)
        return w, resp, data

    def _note(self, w: Worker, answer: str | bytes, role: str = "publishers") -> None:
        """Record the session a worker's JSON answer names as admitted there."""
        try:
            self.admitted[json.loads(answer)["session"]] = (w, role, time.monotonic())
        except (ValueError, KeyError, TypeError):
            pass

    # HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        r = app.router
        # the methods the workers answer, so that another is the same 405 here as there (`guarded`)
        for method in ("POST", "OPTIONS"):
            r.add_route(method, "/offer", self.offer)
        r.add_get("/session/{id}", self.session)
        for method in ("DELETE", "OPTIONS"):
            r.add_route(method, "/session/{id}", self.session)
        for kind in ("whip", "whep"):
            for method in ("POST", "OPTIONS"):
                r.add_route(method, f"/{kind}/{{channel}}", self.whip_whep)
            for method in ("DELETE", "OPTIONS"):
                r.add_route(method, f"/{kind}/{{channel}}/{{id}}", self.whip_whep)
            r.add_route("PATCH", f"/{kind}/{{channel}}", refused)
            r.add_route("PATCH", f"/{kind}/{{channel}}/{{id}}", refused)
        r.add_get("/ws/{channel}", self.websocket)
        for method in ("POST", "DELETE", "OPTIONS"):
            r.add_route(method, "/speak/{channel}", self.speak)
        r.add_get("/metrics", self.metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get("/openapi.json", openapi)
        r.add_get("/", self.index)
        r.add_get("/{page:.+}", self.page, name=PAGES)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        return await guarded(request, refuse(self.cfg.server.token, request, self.cfg.server.host) or handler,
                             self.cfg.server.cors_origins, self.web_dir)

    async def _forward(self, request: web.Request, w: Worker, body: bytes) -> tuple[web.Response, bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")}
        try:
            async with self._http.request(request.method, w.url(request.path_qs), data=body, headers=headers) as r:
                data = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(status=r.status, body=data, headers=out), data
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return error(502, "the media worker did not answer; try again"), b""

    async def offer(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return preflight(request)
        if request.content_type != "application/json":
            return error(415, "send the offer as Content-Type: application/json")
        body = await request.read()
        try:
            data = json.loads(body)
            channel = data.get("channel", "default") if isinstance(data, dict) else "default"
        except (ValueError, RecursionError):
            channel = "default"  # the worker answers the right 400
        w, resp, data = await self._placed(request, channel if isinstance(channel, str) else "default", "talk", body)
        if w is not None and resp.status == 200:
            self._note(w, data)
        return resp

    def _holder(self, sid: str) -> Worker | None:
        w = self.admitted[sid][0] if sid in self.admitted else None
        return w if w is not None and w.alive else None

    async def session(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return preflight(request)
        sid = request.match_info["id"]
        w = self._holder(sid)
        if w is None:
            why = self.ended.get(sid)
            return error(410, f"session ended: {why}") if why else error(404, "no such session")
        resp, _ = await self._forward(request, w, await request.read())
        if request.method == "DELETE" and resp.status < 300:
            self.admitted.pop(sid, None)
        return resp

    async def whip_whep(self, request: web.Request) -> web.Response:
        channel = request.match_info["channel"]
        kind = request.path.split("/")[1]
        sid = request.match_info.get("id")
        body = await request.read()
        if request.method == "POST" and sid is None:
            w, resp, _ = await self._placed(request, channel, kind, body)
            location = resp.headers.get("Location", "")
            if w is not None and resp.status == 201 and location:
                role = "viewers" if kind == "whep" else "publishers"
                self.admitted[location.rsplit("/", 1)[-1]] = (w, role, time.monotonic())
            return resp
        w = self._holder(sid) if sid else None
        if w is None:
            if sid and sid in self.ended:
                return error(410, f"session ended: {self.ended[sid]}")
            if request.method in ("OPTIONS", "PATCH") or sid is None:  # answered alike by every worker
                w = next((x for x in self.workers if x.alive), None)
            if w is None:
                return error(404, "no such session")
        resp, _ = await self._forward(request, w, body)
        if request.method == "DELETE" and resp.status < 300 and sid:
            self.admitted.pop(sid, None)
        return resp

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """A program's WebSocket, relayed message by message to the worker that holds its channel."""
        client = web.WebSocketResponse(max_msg_size=HARD_MAX_MESSAGE, heartbeat=20)
        refused = refuse_websocket(client, request)
        if refused:
            return refused
        channel = request.match_info["channel"]
        async with self._reserved(channel, "ws") as (w, err):
            if err:
                return err
            try:
                upstream = await self._http.ws_connect(w.url(request.path_qs), max_msg_size=HARD_MAX_MESSAGE,
                                                       timeout=aiohttp.ClientWSTimeout(ws_close=5))
            except aiohttp.WSServerHandshakeError as e:
                return error(e.status, WS_REFUSALS.get(e.status, "the media worker refused").format(channel=channel))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return error(502, "the media worker did not answer; try again")
        async with upstream:
            await client.prepare(request)

            async def down() -> None:  # worker -> client; notes the session once it is ready
                while True:
                    msg = await upstream.receive()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        if '"ready"' in msg.data:
                            self._note(w, msg.data)
                        await client.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await client.send_bytes(msg.data)
                    else:
                        break
                # the worker's close, reason and all (a refusal's reason is what the client is told)
                reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE and isinstance(msg.extra, str) else ""
                code = upstream.close_code or 1000
                await client.close(code=1011 if code in (1005, 1006, 1015) else code,  # codes never sent
                                   message=close_reason(reason))

            relay = asyncio.ensure_future(down())
            try:
                async for msg in client:  # client -> worker, read only as fast as the worker takes it
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await upstream.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await upstream.send_bytes(msg.data)
                    if relay.done():
                        break
            except ConnectionError:
                pass
            finally:
                await upstream.close()
                try:
                    await asyncio.wait_for(relay, 2)
                except (asyncio.TimeoutError, ConnectionError):
                    relay.cancel()
        return client

    async def speak(self, request: web.Request) -> web.Response:
        """An uploaded file to speak (placed like a voice), or its interruption (where its channel is)."""
        channel = request.match_info["channel"]
        if request.method == "OPTIONS":
            return preflight(request)
        if request.method == "POST":
            if foreign_origin(request):
                return error(403, f"requests from another site ({request.headers['Origin']}) refused")
            body = await read_limited(request, MAX_SPEAK_BYTES)
            if body is None:
                return error(413, f"audio files are at most {MAX_SPEAK_BYTES >> 20} MB")
            w, resp, data = await self._placed(request, channel, "speak", body)
            if w is not None and resp.status == 202:
                self._note(w, data)
            return resp
        for w, load in await self._loads():
            if channel in load["channels"]:
                resp, _ = await self._forward(request, w, b"")
                return resp
        return error(404, f"nothing is being spoken on channel {channel}")

    async def page(self, request: web.Request) -> web.StreamResponse:
        return await page(self.web_dir, request)

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.web_dir / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        loads = await self._loads()
        return web.json_response({"ok": bool(loads), "workers": len(loads), "restarts": self.restarts,
                                  "worker_pids": [w.proc.pid for w in self.workers if w.alive],
                                  "inference_pid": self.service.pid if self.service else None,
                                  "sessions": sum(len(load["sessions"]) for _, load in loads),
                                  "channels": sum(len(load["channels"]) for _, load in loads),
                                  "engine": loads[0][1]["engine"] if loads else None,
                                  "avatar": loads[0][1]["avatar"] if loads else None})

    async def metrics(self, request: web.Request) -> web.Response:
        """Every worker's /metrics, each sample labelled with its worker, one HELP/TYPE per family."""
        async def one(w: Worker):
            try:
                async with self._http.get(w.url("/metrics")) as r:
                    return w, await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return w, ""

        texts = await asyncio.gather(*(one(w) for w in self.workers if w.alive))
        return web.Response(text=merge_metrics(texts, self.restarts, len(self.workers), len(texts)),
                            content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


# what the inference service does for all workers: reported by each, merged once (worker="service")
SERVICE_FAMILIES = {"streamer_inference_batch_size", "streamer_inference_seconds_total",
                    "streamer_inference_call_seconds", "streamer_inference_queue_depth"}


def merge_metrics(texts: list[tuple[Worker, str]], restarts: int, workers: int, alive: int) -> str:
    families: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines, then samples
    for w, text in texts:
        for line in text.splitlines():
            if line.startswith("# "):
                name = line.split()[2]
                families.setdefault(name, [])
                if line not in families[name]:
                    families[name].append(line)
                continue
            if not line.strip():
                continue
            metric, _, rest = line.partition(" ")
            base = next((f for f in families if metric.split("{")[0] in (f, f + "_bucket", f + "_sum", f + "_count")),
                        metric.split("{")[0])
            if base in SERVICE_FAMILIES and w is not texts[0][0]:
                continue  # the same service-wide figures, as every worker reports them
            label = 'worker="service"' if base in SERVICE_FAMILIES else f'worker="{w.index}"'
            if "{" in metric:
                sample = metric.replace("{", "{" + label + ",", 1)
            else:
                sample = f"{metric}{{{label}}}"
            families.setdefault(base, []).append(f"{sample} {rest}")
    out = ["# HELP streamer_workers media worker processes running",
           "# TYPE streamer_workers gauge", f"streamer_workers {alive}",
           "# HELP streamer_workers_wanted media worker processes configured",
           "# TYPE streamer_workers_wanted gauge", f"streamer_workers_wanted {workers}",
           "# HELP streamer_worker_restarts_total media workers and inference services that died and were replaced",
           "# TYPE streamer_worker_restarts_total counter", f"streamer_worker_restarts_total {restarts}"]
    for lines in families.values():
        out += lines
    return "\n".join(out) + "\n"


async def check_port(host: str, port: int) -> None:
    """UserError now if `host:port` cannot be listened on, not after the workers have loaded their
    model (freed again for the site: a program taking it meanwhile gets the same error then)."""
    try:
        probe = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    probe.close()
    await probe.wait_closed()


async def serve_front(cfg: Config, count: int) -> None:
    """Run the front with `count` workers until SIGINT/SIGTERM (for `streamer serve`)."""
    await check_port(cfg.server.host, cfg.server.port)
    front = Front(cfg, count)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = loop.create_task(front.start(), name="start-workers")
    waiter = loop.create_task(stop.wait(), name="wait-stop")
    await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():  # stopped while starting
        start.cancel()
        await front.stop()
        return
    waiter.cancel()
    start.result()
    runner = web.AppRunner(front.app(), access_log=None, shutdown_timeout=5)
    await runner.setup()
    ConnectionGuard.install(runner, cfg.server.max_connections_per_client, cfg.server.header_timeout_s)
    host, port = cfg.server.host, cfg.server.port
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await front.stop()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    port = site._server.sockets[0].getsockname()[1]
    warn_if_open(host, cfg.server.token)
    print(f"{open_line(host, port, cfg.server.token)}; {count} media workers", flush=True)
    await stop.wait()
    log.info("stopping: closing every worker")
    await runner.cleanup()
    await front.stop()
