"""A WHIP publisher on GStreamer's webrtcbin (another WebRTC stack than aiortc, with an RSA DTLS
certificate), run by the system Python with Debian's GObject bindings:

    /usr/bin/python3 tests/gst_whip.py URL/whip/CHANNEL speech.wav SECONDS

Streams the wav in real time as Opus, then DELETEs the session. Prints the answer's DTLS setup line.
"""

import sys
import threading
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

url, wav, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
Gst.init(None)
pipe = Gst.parse_launch(
    "webrtcbin name=w bundle-policy=max-bundle "
    f"filesrc location={wav} ! wavparse ! clocksync ! audioconvert ! audioresample ! audio/x-raw,rate=48000 "
    "! opusenc ! rtpopuspay pt=111 ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111 ! w.")
w = pipe.get_by_name("w")
loop = GLib.MainLoop()
state = {"location": None, "error": None}


def fail(message):
    state["error"] = message
    loop.quit()


def post_offer():
    offer = w.get_property("local-description").sdp.as_text()
    req = urllib.request.Request(url, data=offer.encode(), method="POST", headers={"Content-Type": "application/sdp"})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            if res.status != 201:
                return GLib.idle_add(fail, f"WHIP answered {res.status}")
            state["location"] = res.headers["Location"]
            answer = res.read().decode()
    except Exception as e:  # noqa: BLE001
        return GLib.idle_add(fail, f"WHIP request failed: {e}")
    print("answer", [line for line in answer.splitlines() if line.startswith("a=setup")][0], flush=True)
    _, msg = GstSdp.SDPMessage.new_from_text(answer)
    desc = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, msg)
    GLib.idle_add(lambda: w.emit("set-remote-description", desc, Gst.Promise.new()) and False)


def on_gathering(element, _):
    if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE \
            and not state.get("sent"):
        state["sent"] = True
        threading.Thread(target=post_offer, daemon=True).start()


def on_offer(promise, element, _):
    reply = promise.get_reply()
    offer = reply.get_value("offer") if reply and reply.has_field("offer") else None
    if offer is None:
        return GLib.idle_add(fail, f"webrtcbin made no offer: {reply.to_string() if reply else None}")
    element.emit("set-local-description", offer, Gst.Promise.new())


def on_negotiation_needed(element):
    element.emit("create-offer", None, Gst.Promise.new_with_change_func(on_offer, element, None))


def on_state(element, _):
    print("connection", element.get_property("connection-state").value_nick, flush=True)


w.connect("on-negotiation-needed", on_negotiation_needed)
w.connect("notify::ice-gathering-state", on_gathering)
w.connect("notify::connection-state", on_state)
bus = pipe.get_bus()
bus.add_signal_watch()
bus.connect("message::error", lambda _b, m: fail(m.parse_error()[0].message))
pipe.set_state(Gst.State.PLAYING)
GLib.timeout_add(int(seconds * 1000), loop.quit)
loop.run()
pipe.set_state(Gst.State.NULL)
if state["location"]:
    base = url.split("/whip/")[0]
    urllib.request.urlopen(urllib.request.Request(base + state["location"], method="DELETE"), timeout=5)
if state["error"]:
    print("error", state["error"], flush=True)
    sys.exit(1)
