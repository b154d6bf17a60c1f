"""`streamer bench`: speed figures measured on this machine, printed and optionally recorded in
BENCHMARKS.md. Benchmarks, not tests: they never fail on a number."""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GFLOP_PER_FRAME = 7.94  # Wav2Lip 96px: 3.97 GMAC per frame


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores"
    from streamer.lipsync.engine import cuda_available

    if cuda_available():
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def time_call(fn, min_seconds: float, min_calls: int = 3) -> float:
    """Median seconds per call over at least `min_calls` calls and `min_seconds` in all."""
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > 20 * min_seconds:
            break
    return float(np.median(times))


def engine_rows(model: str | None, batches: list[int], seconds: float, log=print) -> list[dict]:
    """ms/frame and frames/s for each backend x dtype x batch available here."""
    import torch

    from streamer.lipsync.checkpoint import reference_state_dict
    from streamer.lipsync.engine import Wav2LipInfer, cuda_available
    from streamer.lipsync.export import export_onnx, sample_inputs

    devices = ["cuda", "cpu"] if cuda_available() else ["cpu"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            ckpt = Path(tmp) / "reference.pth"
            torch.save({"state_dict": reference_state_dict()}, ckpt)
            log("no --model: using the reference weights (speed does not depend on weights)")
        else:
            ckpt = Path(model)
        candidates = []
        if ckpt.suffix == ".onnx":
            candidates = [(ckpt, d, dt) for d in devices for dt in ("fp32", "fp16")]
        else:
            for dt in ("fp32", "fp16"):
                onnx_path = Path(tmp) / f"wav2lip_{dt}.onnx"
                log(f"exporting {dt} ONNX for the onnxruntime rows...")
                export_onnx(ckpt, onnx_path, dtype=dt)
                candidates += [(onnx_path, d, dt) for d in devices]
            candidates += [(ckpt, d, dt) for d in devices for dt in ("fp32", "fp16")]
        for path, device, dtype in candidates:
            try:
                eng = Wav2LipInfer(path, device=device, dtype=dtype)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
                log(f"skip {path.suffix} {device} {dtype}: {e}")
                continue
            if eng.device != device or eng.dtype != dtype:
                continue
            for b in batches:
                if rows and rows[-1]["device"] == device and rows[-1]["dtype"] == dtype \
                        and rows[-1]["backend"] == eng.backend and rows[-1]["ms_per_frame"] > 500:
                    log(f"{eng.backend} {device} {dtype}: over 500 ms/frame, larger batches skipped")
                    break
                mel, faces = sample_inputs(batch=b, size=eng.face_size)
                eng.predict(mel, faces)
                sec = time_call(lambda: eng.predict(mel, faces), seconds)
                row = {"backend": eng.backend, "device": device, "dtype": dtype, "batch": b,
                       "ms_per_frame": 1000 * sec / b, "fps": b / sec, "ms_per_call": 1000 * sec}
                rows.append(row)
                log(f"{row['backend']:12s} {device:4s} {dtype} batch {b:4d}: "
                    f"{row['ms_per_frame']:7.2f} ms/frame {row['fps']:8.1f} frames/s")
    return rows


def engine_table(rows: list[dict]) -> str:
    lines = ["| backend | device | dtype | batch | ms/call | ms/frame | frames/s | GFLOP/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['ms_per_call']:.1f} | "
                     f"{r['ms_per_frame']:.2f} | {r['fps']:.1f} | {GFLOP_PER_FRAME * r['fps']:.0f} |")
    return "\n".join(lines)


def record(path: Path, title: str, body: str) -> None:
    """Append a dated section with the machine and the command that produced it."""
    stamp = datetime.date.today().isoformat()
    cmd = "streamer " + " ".join(sys.argv[1:])
    section = f"\n## {title} ({stamp})\nMachine: {machine()}. Command: `{cmd}`.\n\n{body}\n"
    with open(path, "a") as f:
        f.write(section)


def audio_rows(seconds_of_audio: float = 60.0) -> list[dict]:
    """CPU cost of the live audio path per second of audio, in 20 ms packets as WebRTC delivers."""
    from streamer.audio import MelStream, StreamResampler, VoiceActivity, melspectrogram, to_mono_float

    rng = np.random.default_rng(0)
    n48 = int(48000 * seconds_of_audio)
    t = np.arange(n48) / 48000
    voice = (0.1 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.01 * rng.standard_normal(n48))
    pcm = np.round(np.repeat(voice, 2) * 32767).astype(np.int16)  # interleaved stereo s16
    packets = [pcm[i : i + 1920] for i in range(0, pcm.size, 1920)]
    mono16 = StreamResampler(48000)
    audio16 = np.concatenate([mono16.push(to_mono_float(p, 2)) for p in packets])
    chunks16 = [audio16[i : i + 320] for i in range(0, audio16.size, 320)]

    def run_resample():
        r = StreamResampler(48000)
        for p in packets:
            r.push(to_mono_float(p, 2))

    def run_mel():
        s = MelStream()
        for c in chunks16:
            s.push(c)
        s.flush()

    def run_vad():
        v = VoiceActivity()
        for c in chunks16:
            v.push(c)
        v.flush()

    rows = []
    for name, fn in (("resample 48 kHz stereo -> 16 kHz mono", run_resample), ("MelStream (20 ms pushes)", run_mel),
                     ("VoiceActivity (20 ms pushes)", run_vad),
                     ("melspectrogram, whole clip at once", lambda: melspectrogram(audio16))):
        sec = time_call(fn, 1.0, min_calls=2)
        rows.append({"stage": name, "ms_per_audio_s": 1000 * sec / seconds_of_audio,
                     "realtime_factor": seconds_of_audio / sec})
    return rows


def audio_table(rows: list[dict]) -> str:
    lines = ["| stage | CPU ms per second of audio | times faster than real time |", "|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['ms_per_audio_s']:.2f} | {r['realtime_factor']:.0f}x |" for r in rows]
    return "\n".join(lines)


def _synthetic_video(path: Path, seconds: float, height: int, log=print) -> None:
    """A talking-head-like source: the demo portrait panning and zooming, encoded as H.264."""
    import av
    import cv2

    from streamer.avatar.cache import DEMO_IMAGE

    img = cv2.imread(str(DEMO_IMAGE))
    width = height * 16 // 9
    frames = int(seconds * 25)
    base = cv2.resize(img, (height, height))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": "18", "preset": "veryfast"}
        for i in range(frames):
            t = i / 25
            scale = 1 + 0.05 * np.sin(t)
            m = np.float32([[scale, 0, (width - height) / 2 + 20 * np.sin(0.7 * t)], [0, scale, 10 * np.sin(0.5 * t)]])
            frame = cv2.warpAffine(base, m, (width, height), borderMode=cv2.BORDER_REFLECT)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    log(f"made a {seconds:g} s {width}x{height} source video ({path.stat().st_size / 1e6:.0f} MB)")


_LOAD_PROBE = """
import json, resource, sys, time
t = time.perf_counter()
from streamer.avatar.cache import Avatar
a = Avatar.load(sys.argv[1], sys.argv[2])
loaded = time.perf_counter() - t
reader = a.read_frames(0, count=int(sys.argv[3]))
t = time.perf_counter(); next(reader); first = time.perf_counter() - t
t = time.perf_counter(); n = sum(1 for _ in reader)
fps = n / (time.perf_counter() - t)
print(json.dumps({"load_s": loaded, "first_frame_s": first, "decode_fps": fps,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def avatar_rows(seconds: float = 60, height: int = 1080, log=print) -> list[tuple[str, str]]:
    """Preparing and loading a long avatar: time, disk, RAM; and per-frame costs of the live path."""
    import json
    import subprocess

    import cv2

    from streamer.avatar.blend import blend
    from streamer.avatar.cache import prepare
    from streamer.lipsync.builtin import BuiltinEngine
    from streamer.lipsync.engine import face_input, to_images

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.mp4"
        _synthetic_video(src, seconds, height, log)
        t = time.perf_counter()
        avatar = prepare(src, "long", Path(tmp) / "avatars", progress=True)
        prep = time.perf_counter() - t
        w, h = avatar.size
        disk = sum(p.stat().st_size for p in avatar.path.iterdir()) / 1e6
        raw = avatar.frames * w * h * 3 / 1e9
        rows += [("avatar", f"{avatar.frames} frames, {w}x{h}, {seconds:g} s"),
                 ("prepare (detect, lossless encode, crops)", f"{prep:.0f} s ({avatar.frames / prep:.1f} frames/s)"),
                 ("cache on disk", f"{disk:.0f} MB (frames.mkv {(avatar.path / 'frames.mkv').stat().st_size / 1e6:.0f} MB, "
                                   f"crops {(avatar.path / 'crops.npy').stat().st_size / 1e6:.0f} MB)"),
                 ("all frames decoded as BGR (what a naive cache holds)", f"{raw:.1f} GB")]
        probe = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(Path(tmp) / "avatars"), "long", "250"],
                               capture_output=True, text=True, check=True)
        p = json.loads(probe.stdout)
        rows += [("load (meta, boxes, crops mapped)", f"{1000 * p['load_s']:.0f} ms"),
                 ("first full frame", f"{1000 * p['first_frame_s']:.0f} ms"),
                 ("decode-ahead reading, 250 frames", f"{p['decode_fps']:.0f} frames/s"),
                 ("peak RSS of a process that loaded it and read 250 frames", f"{p['peak_rss_mb']:.0f} MB")]

        frame = next(iter(avatar.read_frames(0, count=1)))[2]
        eng = BuiltinEngine()
        mel = np.zeros((16, 1, 80, 16), np.float32)
        faces = face_input(np.ascontiguousarray(avatar.crops[:16]))
        per = time_call(lambda: eng.predict(mel, faces), 1.0) / 16
        pred = to_images(eng.predict(mel, faces))[0]
        blend_s = time_call(lambda: blend(frame, avatar.boxes[0], pred, crop=avatar.crops[0]), 1.0)
        small = cv2.resize(frame, (512 * w // h // 2 * 2, 512))
        box512 = (avatar.boxes[0] * 512 / h).astype(int)
        blend512 = time_call(lambda: blend(small, box512, pred, crop=avatar.crops[0]), 1.0)
        rows += [("builtin engine (mouth from mel, 96 px)", f"{1000 * per:.2f} ms/frame"),
                 (f"blend into a {w}x{h} frame", f"{1000 * blend_s:.2f} ms/frame"),
                 (f"blend into a {small.shape[1]}x512 frame", f"{1000 * blend512:.2f} ms/frame")]
    return rows


def kv_table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def live_rows(model: str | None, seconds: float, delay_ms: int | None, log=print) -> list[tuple[str, str]]:
    """One real talk session on this machine: an aiortc client sends espeak-ng speech to an in-process
    server over the host address; what the server measured (voice in -> lips out) and what arrived."""
    import asyncio
    import resource
    import shutil
    import subprocess

    from aiohttp import web
    from scipy import signal

    from streamer.avatar.cache import demo_avatar
    from streamer.config import load_config
    from streamer.errors import UserError
    from streamer.lipsync.engine import load_engine
    from streamer.live.client import talk
    from streamer.server.app import Server

    if not shutil.which("espeak-ng"):
        raise UserError("bench live speaks with espeak-ng: apt-get install espeak-ng")
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump. ") * 8
    wav = subprocess.run(["espeak-ng", "-s", "160", "--stdout", text], capture_output=True, check=True).stdout
    import io
    import wave

    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    voice = signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)
    voice = np.concatenate([np.zeros(48000, np.float32), voice])[: int(48000 * seconds)]

    cfg = load_config(None, {"live.delay_ms": delay_ms})
    with tempfile.TemporaryDirectory() as tmp:
        avatar = demo_avatar(tmp)
        engine = load_engine(model, "auto", "auto")
        log(f"engine: {engine.name}; {seconds:g} s session, target delay {cfg.live.delay_ms} ms")

        async def run():
            server = Server(cfg, engine, avatar)
            runner = web.AppRunner(server.app())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            got, stats = await talk(f"http://127.0.0.1:{port}", voice, seconds)
            wall = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            worker = server.worker
            batches = list(worker.batch_sizes)
            infer_ms = 1000 * worker.busy_s / max(1, worker.frames)
            await runner.cleanup()
            cpu = (cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime) / wall
            return got, stats, cpu, batches, infer_ms, worker.dropped

        got, stats, cpu, batches, infer_ms, dropped = asyncio.run(run())
    times = np.array([t for t, _ in got.video])
    fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    speech = stats["lipsync_frames"] + stats["late_frames"]
    return [("engine", engine.name), ("session", f"{seconds:g} s, espeak-ng speech after 1 s of silence"),
            ("video received by the client", f"{len(times)} frames, {fps:.2f} fps"),
            ("voice in -> lips out at the server", f"p50 {stats['delay_ms_p50']} ms, p95 {stats['delay_ms_p95']} ms "
                                                    f"(target {stats['target_delay_ms']} ms)"),
            ("speech frames lip-synced in time", f"{stats['lipsync_frames']} of {speech}"
                                                  f" ({100 * stats['lipsync_frames'] / max(1, speech):.0f}%); late ones "
                                                  "showed the idle mouth"),
            ("inference + blend per frame (worker)", f"{infer_ms:.1f} ms; batch sizes mean "
                                                     f"{np.mean(batches) if batches else 0:.2f}, max {max(batches, default=0)}"),
            ("stale jobs dropped by the worker", str(dropped)),
            ("CPU used by server and client together", f"{100 * cpu:.0f}% of one core")]
