"""Hostile and malformed requests get a 4xx JSON error, never a 500 or a traceback; fuzzed with
hypothesis against a running server (one process, token set)."""

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.avatar.cache import demo_avatar
from streamer.config import load_config
from streamer.lipsync.builtin import BuiltinEngine
from streamer.live.client import watch
from streamer.server.app import Server
from streamer.server.guard import ConnectionGuard

TOKEN = "t0k"


@pytest.fixture(scope="module")
def avatars(tmp_path_factory):
    folder = tmp_path_factory.mktemp("avatars")
    demo_avatar(folder)
    return folder


@contextlib.contextmanager
def running(avatars, header_s: float | None = None):
    """(host, port, Server) of a server running on its own event loop thread; with `header_s`, behind
    the connection guard `streamer serve` puts in front of it."""
    cfg = load_config(None, {"server.token": TOKEN})
    srv = Server(cfg, BuiltinEngine(), demo_avatar(avatars))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    async def start():
        runner = web.AppRunner(srv.app())
        await runner.setup()
        if header_s is not None:
            ConnectionGuard.install(runner, 100, header_s)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["runner"], box["port"] = runner, site._server.sockets[0].getsockname()[1]
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield "127.0.0.1", box["port"], srv
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def server(avatars):
    with running(avatars) as s:
        yield s


def request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None, auth: bool = True):
    """(status, parsed JSON body or raw bytes); headers may hold any bytes (sent as they are)."""
    host, port, _ = server
    conn = http.client.HTTPConnection(host, port, timeout=20)
    conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
    for k, v in {**({"Authorization": f"Bearer {TOKEN}"} if auth else {}), **(headers or {})}.items():
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def assert_clean(status, body, *allowed):
    assert 400 <= status < 500 and (not allowed or status in allowed), (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert "Traceback" not in body["error"] and "/streamer/" not in body["error"], body


def test_each_known_hostile_request_is_a_json_4xx(server):
    sdp = {"Content-Type": "application/sdp"}
    jsn = {"Content-Type": "application/json"}
    cases = [
        ("POST", "/offer", b"[" * 100000, jsn, (400,)),  # nested past Python's recursion limit
        ("POST", "/offer", json.dumps({"sdp": "v=0", "type": "offer"}).encode(),
         {"Content-Type": "text/plain"}, (415,)),
        ("POST", "/offer", json.dumps({"sdp": "v=0", "type": "offer"}).encode(),
         {"Content-Type": "application/json; charset=x-nonsense"}, (400,)),
        ("POST", "/offer", b"\xff\xfe\xfa", jsn, (400,)),
        ("POST", "/offer", json.dumps({"sdp": "v=0\r\nm=audio garbage", "type": "offer"}).encode(), jsn, (400,)),
        ("POST", "/whip/x", b"\xff\xfe v=0", sdp, (400,)),
        ("POST", "/whip/x", b"v=0\r\nm=audio 9 x", {"Content-Type": "application/sdp; charset=x-nonsense"}, (400,)),
        ("POST", "/whep/abc%0A", b"v=0", sdp, (400, 404)),  # a newline at the end of a channel name
        ("POST", "/whip/" + "a" * 65, b"v=0\r\nm=audio", sdp, (400,)),
        ("GET", "/no/such/page", b"", {}, (404,)),
        ("GET", "/%00", b"", {}, (404,)),
        ("PUT", "/offer", b"", {}, (405,)),
        ("GET", "/session/nosuch", b"", {}, (404,)),
        ("GET", "/metrics", b"", {"Authorization": "Bearer \xff\xfe"}, (401,)),  # not UTF-8
        ("GET", "/healthz", b"", {"Host": "evil.example:8080"}, (421,)),  # DNS rebinding: a page's own name
        ("POST", "/offer", b"{}", {**jsn, "Host": "attacker.example"}, (421,)),
    ]
    for method, path, body, headers, allowed in cases:
        auth = "Authorization" not in headers
        status, got = request(server, method, path, body, headers, auth=auth)
        assert_clean(status, got, *allowed)
        if status == 400 and path == "/offer" and b"m=audio" in body:
            assert "AssertionError" not in got["error"] and "not in list" not in got["error"], got
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST"):
        assert request(server, "GET", "/healthz", headers={"Host": host})[0] == 200, host
    assert not server[2].sessions  # nothing half-open left behind
    status, got = request(server, "PUT", "/offer")
    assert "POST" in http_allow(server, "PUT", "/offer")


def http_allow(server, method, path):
    host, port, _ = server
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
    r = conn.getresponse()
    r.read()
    return r.headers.get("Allow", "")


names = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=0, max_size=80)
bodies = st.one_of(st.binary(max_size=3000), st.text(max_size=2000).map(str.encode),
                   st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                max_leaves=30).map(lambda v: json.dumps(v).encode()))
types = st.sampled_from(["application/json", "application/sdp", "text/plain", "application/json; charset=latin-1",
                         "application/sdp; charset=\xe9", "multipart/form-data", ""])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["offer", "whip", "whep", "speak", "session"]), name=names, body=bodies, ctype=types,
       auth=st.sampled_from([None, f"Bearer {TOKEN}", "Bearer \udcff", "Basic x"]))
def test_fuzzed_requests_never_crash_the_server(server, kind, name, body, ctype, auth):
    from urllib.parse import quote

    path = "/offer" if kind == "offer" else f"/{kind}/{quote(name, safe='')}"
    headers = {"Content-Type": ctype} if ctype else {}
    if auth is not None:
        headers["Authorization"] = auth.encode("utf-8", "surrogateescape").decode("latin-1")
    status, got = request(server, "POST", path, body, headers, auth=False)
    if status < 400:  # a well-formed request may pass: end what it opened
        for sid in list(server[2].sessions):
            request(server, "DELETE", f"/session/{sid}")
        return
    assert_clean(status, got)


def test_connections_are_bounded_per_client_and_must_send_headers_in_time(tmp_path):
    """`streamer serve` as users run it: a client cannot hold more than its share of connections, a
    connection that never finishes its headers is closed, malformed HTTP gets a JSON 400 and no traceback."""
    import socket
    import subprocess
    import sys
    import time

    cfg = tmp_path / "s.yaml"
    cfg.write_text("server:\n  max_connections_per_client: 4\n  header_timeout_s: 1.0\n")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--port", "0", "--workers", "1", "--config",
                             str(cfg), "--avatars", str(tmp_path / "av")], stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("localhost:")[1].split("/")[0])
        partial = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            partial.append(s)
        time.sleep(0.2)
        fifth = socket.create_connection(("127.0.0.1", port))
        fifth.settimeout(3)
        assert fifth.recv(100) == b""  # closed at once: four are open from this address
        for s in partial:
            s.settimeout(3)
            assert s.recv(100) == b""  # closed once the header time ran out
        bad = socket.create_connection(("127.0.0.1", port))
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here \xff\r\n\r\n")
        bad.settimeout(3)
        answer = b""
        while chunk := bad.recv(4096):
            answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.split(b" ")[1] == b"400" and b"application/json" in head, head
        assert json.loads(body) == {"error": "malformed HTTP request"}
        status, got = request(("127.0.0.1", port, None), "GET", "/healthz", auth=False)  # still serving
        assert status == 200 and got["ok"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-2000:]
    assert "sent no complete request" in text and "more refused" in text


def test_a_known_path_asked_with_another_method_is_a_405_naming_only_what_answers(server):
    host, port, _ = server
    cases = [("GET", "/offer", "OPTIONS, POST"), ("DELETE", "/offer", "OPTIONS, POST"),
             ("GET", "/whip/a", "OPTIONS, POST"), ("DELETE", "/whip/a", "OPTIONS, POST"),
             ("PATCH", "/whep/a/b", "DELETE, OPTIONS"), ("GET", "/speak/x", "DELETE, OPTIONS, POST"),
             ("PUT", "/session/x", "DELETE, GET, HEAD, OPTIONS"), ("POST", "/metrics", "GET, HEAD"),
             ("POST", "/index.html", "GET, HEAD"), ("POST", "/no/such/page", None), ("GET", "/whip/a/b/c", None)]
    for method, path, allow in cases:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        assert (r.status, r.headers.get("Allow")) == ((405, allow) if allow else (404, None)), (method, path, body)
        assert isinstance(body.get("error"), str)


def test_a_client_gone_mid_body_is_one_info_line_and_a_stalled_body_is_cut(avatars, caplog):
    caplog.set_level(logging.INFO, logger="streamer.server.guard")
    head = (f"POST /offer HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n")
    with running(avatars, header_s=1.0) as (host, port, _):
        gone = socket.create_connection((host, port))
        gone.sendall(head.format(100000).encode() + b"{" * 1000)
        time.sleep(0.3)
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # hangs up: a reset
        gone.close()
        stalled = socket.create_connection((host, port))
        stalled.sendall(head.format(100).encode() + b"{")  # and never the rest
        stalled.settimeout(10)
        start = time.monotonic()
        assert stalled.recv(100) == b""  # closed
        assert 0.9 < time.monotonic() - start < 1.25 + 0.5  # a pause of header_s is cut (looked at each header_s / 4)
        time.sleep(0.2)
    lines = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "streamer.server.guard"]
    assert lines == [(logging.INFO, "127.0.0.1 went away before its request was complete", None),
                     (logging.INFO, "127.0.0.1 sent nothing more of its request body for 1 s: connection closed",
                      None)], lines


def test_webrtc_libraries_chatter_stays_out_of_the_log(server, caplog):
    host, port, _ = server
    caplog.set_level(logging.INFO)  # as `streamer serve` logs, without --verbose
    got, _ = asyncio.run(watch(f"http://{host}:{port}", "quiet", 1.5, token=TOKEN))
    assert got.video  # connected: ICE checked its candidate pairs
    assert any("whep session started" in r.getMessage() for r in caplog.records)
    chatter = [r.getMessage() for r in caplog.records if r.name.startswith(("aioice", "aiortc"))]
    assert not chatter, chatter[:3]


def test_serve_with_workers_checks_its_port_before_starting_anything(avatars):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        run = subprocess.run([sys.executable, "-m", "streamer", "serve", "--port", str(port), "--workers", "2",
                              "--avatars", str(avatars)], capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()  # no inference service nor worker started first
    assert len(lines) == 1 and lines[0].startswith(f"streamer serve: error: cannot listen on 127.0.0.1:{port} ("), lines
