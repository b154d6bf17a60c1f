"""The HTTP API as an OpenAPI 3.1 document (served at /openapi.json; a test holds it to the routes)."""

from __future__ import annotations

from streamer import __version__

ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
CHANNEL = {"name": "channel", "in": "path", "required": True, "description": "1-64 letters, digits, '-' or '_'",
           "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"}}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
SDP = {"content": {"application/sdp": {"schema": {"type": "string"}}}}
PREFLIGHT = {"summary": "CORS preflight (pages of server.cors_origins)", "security": [],
             "responses": {"204": {"description": "allowed"}}}


def _errors(*codes: int) -> dict:
    return {str(c): ERROR for c in codes}


def _whxp(kind: str, what: str) -> dict:
    busy = (409,) if kind == "whip" else ()  # a channel has one voice; viewers, up to server.max_viewers
    return {
        f"/{kind}/{{channel}}": {
            "parameters": [CHANNEL],
            "post": {"summary": what, "requestBody": {"required": True, **SDP},
                     "responses": {"201": {"description": "the SDP answer; Location names the session",
                                           "headers": {"Location": {"schema": {"type": "string"}}}, **SDP},
                                   **_errors(400, 401, *busy, 413, 415, 503)}},
            "patch": {"summary": "trickle ICE: not supported (answers carry every candidate)",
                      "responses": {"405": {"description": "not supported"}}},
            "options": PREFLIGHT,
        },
        f"/{kind}/{{channel}}/{{id}}": {
            "parameters": [CHANNEL, ID],
            "delete": {"summary": f"end the {kind.upper()} session", "responses": {"200": {"description": "ended"},
                                                                                 **_errors(401, 404, 410)}},
            "patch": {"summary": "trickle ICE: not supported", "responses": {"405": {"description": "not supported"}}},
            "options": PREFLIGHT,
        },
    }


def document() -> dict:
    ws_protocol = (
        "Upgrade to a WebSocket. Client messages: first JSON {\"type\": \"start\", \"sample_rate\": "
        "16000|24000|48000}; then binary PCM s16le mono at that rate, any size up to 1 MiB a message; JSON {\"type\": "
        "\"end\"} ends an utterance; {\"type\": \"clear\"} interrupts (mouth and voice stop within 100 ms at the "
        "server's output). Server messages: {\"type\": \"ready\", \"session\", \"channel\", \"delay_ms\"}; {\"type\": "
        "\"playback_started\", \"utterance\"}; {\"type\": \"playback_finished\", \"utterance\", \"position\" (seconds "
        "heard), \"interrupted\"}; {\"type\": \"error\", \"message\"} then close (1008). Audio may come faster than "
        "real time: up to 30 s is queued, then the server stops reading until it plays down. One voice per channel.")
    return {
        "openapi": "3.1.0",
        "info": {"title": "streamer", "version": __version__,
                 "description": "Real-time talking-head server. With `server.token` set, every endpoint but the pages, "
                                "/healthz and /openapi.json needs `Authorization: Bearer <token>`. Every error is JSON "
                                "{\"error\": ...}; any endpoint may answer 405 (a method its path does not "
                                "answer, Allow naming those it does) and, while the server listens on loopback, 421 "
                                "for a Host other than localhost (DNS rebinding)."},
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/offer": {"options": PREFLIGHT, "post": {
                "summary": "talk session (the web page): your voice in, the avatar back",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["sdp", "type"],
                    "properties": {"sdp": {"type": "string"}, "type": {"const": "offer"},
                                   "channel": {"type": "string", "default": "default"}}}}}},
                "responses": {"200": {"description": "the answer", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"sdp": {"type": "string"}, "type": {"const": "answer"},
                                                     "session": {"type": "string"}, "channel": {"type": "string"}}}}}},
                              **_errors(400, 401, 409, 413, 415, 503)}}},
            **_whxp("whip", "WHIP ingest (RFC 9725): a publisher's voice drives the channel"),
            **_whxp("whep", "WHEP viewer: the channel's avatar video and delayed voice"),
            "/ws/{channel}": {"parameters": [CHANNEL], "get": {
                "summary": "a program's voice (TTS, an agent) drives the channel over a WebSocket",
                "description": ws_protocol,
                "responses": {"101": {"description": "switching to the WebSocket protocol"},
                              **_errors(400, 401, 403, 409, 503)}}},
            "/speak/{channel}": {"parameters": [CHANNEL], "options": PREFLIGHT,
                "post": {"summary": "speak an audio file (any format FFmpeg reads; at most 50 MB and 600 s)",
                         "requestBody": {"required": True, "content": {"application/octet-stream": {
                             "schema": {"type": "string", "format": "binary"}}}},
                         "responses": {"202": {"description": "playing", "content": {"application/json": {"schema": {
                             "type": "object", "properties": {"session": {"type": "string"},
                                                              "channel": {"type": "string"},
                                                              "seconds": {"type": "number"}}}}}},
                                       **_errors(400, 401, 403, 409, 413, 503)}},
                "delete": {"summary": "interrupt what is being spoken", "responses": {
                    "200": {"description": "interrupted", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"session": {"type": "string"}, "position": {"type": "number"},
                                                         "interrupted": {"type": "boolean"}}}}}},
                    **_errors(401, 404)}}},
            "/session/{id}": {"parameters": [ID], "options": PREFLIGHT,
                "get": {"summary": "live stats of any session (talk, WHIP, WHEP, /speak, WebSocket: the id each "
                                   "gave) and of its channel (frames sent, lip-synced, late, delay)",
                        "responses": {"200": {"description": "stats", "content": {"application/json": {
                            "schema": {"type": "object"}}}}, **_errors(401, 404, 410)}},
                "delete": {"summary": "end a session", "responses": {"204": {"description": "ended"},
                                                                     **_errors(401, 404, 410)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(401)}}},
            "/healthz": {"get": {"summary": "liveness", "security": [], "responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "security": [], "responses": {
                "200": {"description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/": {"get": {"summary": "the talk page (web/index.html)",
                          "security": [], "responses": {"200": {"description": "HTML"}}}},
            "/{page}": {"parameters": [{"name": "page", "in": "path", "required": True, "schema": {"type": "string"}}],
                        "get": {"summary": "a file of web/: viewer.html is the OBS and viewer page", "security": [],
                                "responses": {"200": {"description": "the file"}, **_errors(404)}}},
        },
        "security": [{"bearer": []}],
    }
