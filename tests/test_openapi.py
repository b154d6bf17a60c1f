"""/openapi.json describes every route the server (one process or a front with workers) answers."""

import re

from streamer.avatar.cache import demo_avatar
from streamer.config import load_config
from streamer.lipsync.builtin import BuiltinEngine
from streamer.server.app import Server
from streamer.server.front import Front
from streamer.server.openapi import document

METHODS = {"GET", "POST", "DELETE", "PATCH", "OPTIONS", "PUT"}


def routes(app) -> dict[str, set[str]]:
    """{path template: methods} of an aiohttp app, without static files, internals and HEAD."""
    out: dict[str, set[str]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("formatter") or info.get("path")
        if path is None or path.startswith("/internal/") or "directory" in info:
            continue
        methods = METHODS - {"PUT"} if route.method == "*" else {route.method}
        out.setdefault(path, set()).update(methods & METHODS)
    return out


def documented() -> dict[str, set[str]]:
    return {path: {m.upper() for m in ops if m.upper() in METHODS} for path, ops in document()["paths"].items()}


def test_the_document_matches_the_worker_routes(tmp_path):
    server = Server(load_config(None), BuiltinEngine(), demo_avatar(tmp_path))
    try:
        assert routes(server.app()) == documented()
    finally:
        server.worker.close()


def test_the_front_answers_every_documented_path(tmp_path):
    front = Front(load_config(None), 1)
    assert routes(front.app()) == documented()  # the same methods as a worker: the same 405s


def test_the_document_is_openapi_3_1_with_its_parameters():
    doc = document()
    assert doc["openapi"] == "3.1.0"
    for path, ops in doc["paths"].items():
        names = {p["name"] for p in ops.get("parameters", [])}
        assert names == set(re.findall(r"{(\w+)}", path)), path
        for method, op in ops.items():
            if method != "parameters":
                assert op["responses"] and op["summary"], (path, method)
