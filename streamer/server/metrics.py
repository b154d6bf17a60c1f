"""/metrics in the Prometheus text format, written by hand (a few gauges, counters, histograms)."""

from __future__ import annotations

import threading

from aiohttp import web

from streamer.live.channel import VOICE_RATE

DELAY_BUCKETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.total += 1
            self.sum += value
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1

    @classmethod
    def of_counts(cls, buckets, counts: dict[int, int]) -> Histogram:
        """The histogram of values observed `counts[value]` times each."""
        h = cls(buckets)
        for value, n in counts.items():
            h.total += n
            h.sum += value * n
            for i, b in enumerate(buckets):
                if value <= b:
                    h.counts[i] += n
        return h

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.total}"]
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, server):
        self.server = server
        self.delay = Histogram(DELAY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        server.worker.on_batch = self.batch.observe  # fed as things happen: nothing is lost when a
        # channel closes between two scrapes

    def text(self) -> str:
        s = self.server
        w = s.worker
        out = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        kinds = ("talk", "whip", "whep", "ws", "speak")
        metric("streamer_sessions", "gauge", "live sessions by kind (ws: a program's WebSocket voice; speak: a file)",
               [f'streamer_sessions{{kind="{k}"}} {s.count(lambda x, k=k: x.kind == k)}' for k in kinds])
        metric("streamer_channels", "gauge", "open channels", [f"streamer_channels {len(s.channels)}"])
        chans = list(s.channels.values())
        label = [f'channel="{_escape(c.name)}"' for c in chans]

        def per_channel(name, kind, help_text, values):
            metric(name, kind, help_text, [f"{name}{{{lab}}} {v}" for lab, v in zip(label, values)])

        per_channel("streamer_viewers", "gauge", "viewers per channel", [c.viewers for c in chans])
        per_channel("streamer_fps_out", "gauge", "video frames sent per second over the last two seconds",
                    [c.fps() for c in chans])
        per_channel("streamer_frames_sent_total", "counter", "video frames sent", [c.sent for c in chans])
        per_channel("streamer_video_encoded_total", "counter", "VP8 frames encoded once for all the channel's VP8 "
                    "viewers (each other viewer's frames are encoded for it alone)", [c.encoded for c in chans])
        per_channel("streamer_video_keyframes_total", "counter", "of those, keyframes: one when a viewer joins or "
                    "falls behind, at most one per half second for receivers that lost a picture",
                    [c.keyframes for c in chans])
        per_channel("streamer_frames_lipsync_total", "counter", "frames sent with a lip-synced mouth",
                    [c.lipsync_frames for c in chans])
        per_channel("streamer_frames_late_total", "counter", "speech frames whose own mouth was not ready in time",
                    [c.late for c in chans])
        per_channel("streamer_frames_held_total", "counter", "late speech frames shown with the previous mouth "
                    "(the rest showed the idle mouth)", [c.held for c in chans])
        lost = [c.voice_losses() for c in chans]
        per_channel("streamer_voice_lost_seconds_total", "counter", "voice lost on the way in and made up "
                    "(concealed, or rebuilt from the next packet's FEC copy; not gaps too long to make up, left "
                    "silent)", [f"{m[0] / VOICE_RATE:.3f}" for m in lost])
        per_channel("streamer_voice_fec_seconds_total", "counter", "of the voice lost, what was rebuilt from FEC "
                    "copies", [f"{m[1] / VOICE_RATE:.3f}" for m in lost])
        per_channel("streamer_voice_late_packets_total", "counter", "voice packets placed late: after a later one, "
                    "or after their time was made up (network jitter, or a busy event loop)", [m[2] for m in lost])
        per_channel("streamer_interrupts_total", "counter", "barge-ins: voice and mouths dropped at a program's clear",
                    [c.interrupts for c in chans])
        metric("streamer_inference_queue_depth", "gauge", "frames waiting for the inference worker",
               [f"streamer_inference_queue_depth {w.depth()}"])
        metric("streamer_inference_frames_total", "counter", "frames inferred",
               [f"streamer_inference_frames_total {w.frames}"])
        metric("streamer_inference_dropped_total", "counter", "frames skipped by the worker (could not be done in "
               "time, or queue full)",
               [f"streamer_inference_dropped_total {w.dropped}"])
        metric("streamer_inference_seconds_total", "counter", "time spent in inference calls",
               [f"streamer_inference_seconds_total {w.busy_s:.6f}"])
        metric("streamer_inference_call_seconds", "gauge", "current estimate of an inference call's time by batch "
               "size (median of recent calls), what the worker plans its deadlines with",
               [f'streamer_inference_call_seconds{{batch="{n}"}} {sec:.6f}' for n, sec in w.cost.known().items()])
        batch = self.batch
        if hasattr(w, "batch_counts"):  # a media worker: batches happen in the inference service
            batch = Histogram.of_counts(BATCH_BUCKETS, w.batch_counts)
        metric("streamer_inference_batch_size", "histogram", "frames per inference call",
               batch.lines("streamer_inference_batch_size"))
        metric("streamer_delay_seconds", "histogram", "voice in -> its lip-synced frame out, at the server",
               self.delay.lines("streamer_delay_seconds"))
        return "\n".join(out) + "\n"

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(text=self.text(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})
