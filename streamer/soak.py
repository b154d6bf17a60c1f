"""`streamer bench soak`: a server under hours of real use. Talkers speak in back-to-back sessions,
a WHEP viewer comes and goes, another client connects and disconnects over and over and sends offers
that never complete ICE; the server's memory, threads, open files and gauges are sampled each
minute, and must come back to where they started once everyone has left."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import urllib.request
from pathlib import Path

import numpy as np

from streamer.bench import _espeak_voice, process_tree, server_process

SEGMENT_S = 60.0  # a talker's session length: it reconnects after each


def resources(pid: int) -> dict:
    """RSS (MB), threads and open files of a server and its child processes."""
    rss = threads = fds = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return {"rss_mb": rss, "threads": threads, "fds": fds}


def gauges(url: str) -> dict:
    """The server's live-session and channel gauges, summed."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {"sessions": 0.0, "channels": 0.0}
    for line in text.splitlines():
        if line.startswith("streamer_sessions{") or line.startswith("streamer_sessions "):
            out["sessions"] += float(line.split()[-1])
        elif line.startswith("streamer_channels"):
            out["channels"] += float(line.split()[-1])
    return out


def _talker(url: str, channel: str, voice: np.ndarray, until: float) -> list[dict]:
    """Back-to-back talk sessions until `until` (wall clock); per session: when, fps, stats."""
    from streamer.live.client import talk

    out = []
    while time.time() + 10 < until:
        seconds = min(SEGMENT_S, until - time.time())
        start = time.time()
        got, stats = asyncio.run(talk(url, np.resize(voice, int(seconds * 48000)), seconds,
                                      offer_extra={"channel": channel}, keep=False))
        t = np.array([a for a, _ in got.video])
        steady = t[t > t[0] + 1] if len(t) > 1 else t
        out.append({"start": start, "fps": (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0,
                    "stats": stats})
    return out


def _viewer(url: str, channel: str, until: float) -> list[dict]:
    """A WHEP viewer of `channel` that watches 20 s, leaves for 5 s, and again, until `until`."""
    from streamer.live.client import watch

    out = []
    while time.time() + 25 < until:
        start = time.time()
        got, _ = asyncio.run(watch(url, channel, 20, keep=False))
        out.append({"start": start, "frames": len(got.video)})
        time.sleep(5)
    return out


def _churn(url: str, cycles: int, half_open: int, voice: np.ndarray) -> dict:
    """`cycles` short talk sessions (connect, 1 s, disconnect) and `half_open` offers never completed."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection

    from streamer.live.client import talk

    async def never_connects(k: int) -> int:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                       "channel": f"halfopen{k}"}) as r:
                status = r.status
        await pc.close()  # the server's side waits for ICE that never comes
        return status

    done = opened = 0
    failed: dict[str, int] = {}
    every = max(1, cycles // max(1, half_open))
    for k in range(cycles):
        if k % every == 0 and opened < half_open:
            opened += asyncio.run(never_connects(k)) == 200
        try:
            got, _ = asyncio.run(talk(url, voice[:48000], 1.0, offer_extra={"channel": "churn"}, keep=False))
            done += 1 if got.video else 0
        except Exception as e:  # noqa: BLE001 - counted, the soak goes on
            why = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
            failed[why] = failed.get(why, 0) + 1
    return {"cycles": done, "failed": failed, "half_open": opened}


def soak_rows(seconds: float, talkers: int = 4, cycles: int = 200, half_open: int = 50, model: str | None = None,
              workers: int | str | None = None, voice: np.ndarray | None = None, log=print) -> list[tuple[str, str]]:
    voice = _espeak_voice() if voice is None else voice
    args = ["--max-sessions", str(talkers + 8)]
    args += ["--model", model] if model else []
    args += ["--workers", str(workers)] if workers else []
    with server_process(args) as (server, url, _):
        time.sleep(2)
        before = {**resources(server.pid), **gauges(url)}
        until = time.time() + seconds
        samples = []
        with multiprocessing.get_context("spawn").Pool(talkers + 2) as pool:
            talks = [pool.apply_async(_talker, (url, f"soak{k}", voice, until)) for k in range(talkers)]
            view = pool.apply_async(_viewer, (url, "soak0", until))
            churn = pool.apply_async(_churn, (url, cycles, half_open, voice))
            t0 = time.time()
            while time.time() < until or not churn.ready():
                time.sleep(min(60.0, max(1.0, until - time.time())) if time.time() < until else 2.0)
                samples.append({"minute": (time.time() - t0) / 60, **resources(server.pid)})
                log(f"soak: {samples[-1]['minute']:.1f} min, server RSS {samples[-1]['rss_mb']:.0f} MB, "
                    f"{samples[-1]['threads']} threads, {samples[-1]['fds']} open files")
            talks = [r for t in talks for r in t.get()]
            views, churned = view.get(), churn.get()
        time.sleep(12)  # half-open sessions time out, channels close
        after = {**resources(server.pid), **gauges(url)}
    return _rows(seconds, talkers, before, after, samples, talks, views, churned)


def _rows(seconds, talkers, before, after, samples, talks, views, churned) -> list[tuple[str, str]]:
    talks.sort(key=lambda r: r["start"])
    t0 = talks[0]["start"] if talks else 0.0
    first = [r for r in talks if r["start"] - t0 < SEGMENT_S]
    last = [r for r in talks if r["start"] >= max(x["start"] for x in talks) - SEGMENT_S / 2]

    def summary(rs):
        stats = [r["stats"] for r in rs]
        synced = sum(s.get("lipsync_frames", 0) for s in stats)
        speech = synced + sum(s.get("late_frames", 0) for s in stats)
        p95 = [s["delay_ms_p95"] for s in stats if s.get("delay_ms_p95") is not None]
        return (f"fps min {min(r['fps'] for r in rs):.2f}, mean {np.mean([r['fps'] for r in rs]):.2f}; delay p95 worst "
                f"{max(p95) if p95 else float('nan'):.0f} ms; lip-synced in time {100 * synced / max(1, speech):.1f}%")

    peak = max(s["rss_mb"] for s in samples) if samples else after["rss_mb"]
    return [
        ("run", f"{seconds / 60:.0f} min, {talkers} talkers in back-to-back {SEGMENT_S:.0f} s sessions "
                f"({len(talks)} sessions), a WHEP viewer coming and going ({len(views)} visits)"),
        ("churn", f"{churned['cycles']} connect/disconnect cycles ({sum(churned['failed'].values())} failed"
                  + "".join(f"; {n}x {why}" for why, n in churned['failed'].items()) + "), "
                  f"{churned['half_open']} offers that never complete ICE"),
        ("first minute", summary(first) if first else "-"),
        ("last minute", summary(last) if last else "-"),
        ("all sessions", summary(talks) if talks else "-"),
        ("server RSS (all processes)", f"{before['rss_mb']:.0f} MB at start, peak {peak:.0f} MB, "
                                       f"{after['rss_mb']:.0f} MB after "
                                       f"(growth {after['rss_mb'] - before['rss_mb']:+.0f} MB)"),
        ("threads", f"{before['threads']} at start, {after['threads']} after"),
        ("open files", f"{before['fds']} at start, {after['fds']} after"),
        ("gauges after", f"sessions {after['sessions']:.0f}, channels {after['channels']:.0f}"),
    ]
