"""`streamer bench`: speed figures measured on this machine, printed and optionally recorded in
BENCHMARKS.md. Benchmarks, not tests: they never fail on a number."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import socket
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


def musetalk_rows(model: str, batches: list[int], seconds: float, log=print, only: str | None = None) -> list[dict]:
    """MuseTalk (musetalk:DIR): ms/frame of `predict_crops` (VAE encode of new crops, UNet, VAE decode)
    with the latents of the avatar's crops cached, as live; and the whisper encoder's time per block."""
    from streamer.lipsync.engine import cuda_available, load_engine

    devices = [d for d in (["cuda", "cpu"] if cuda_available() else ["cpu"]) if only in (None, d)]
    rows = []
    for device in devices:
        for dtype in (("fp16", "fp32") if device == "cuda" else ("fp32",)):
            eng = load_engine(model, device=device, dtype=dtype)
            f = eng.features
            audio = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
            block = time_call(lambda f=f, audio=audio: f.encode(audio, 0, audio.size, 0), seconds)
            log(f"musetalk {device} {dtype}: whisper encoder {1000 * block:.1f} ms per {f.block * 20} ms block")
            for b in batches:
                windows = np.zeros((b, *f.shape), np.float32)
                crops = np.full((b, eng.face_size, eng.face_size, 3), 128, np.uint8)
                eng.predict_crops(windows, crops)
                sec = time_call(lambda eng=eng, windows=windows, crops=crops: eng.predict_crops(windows, crops),
                                seconds)
                row = {"backend": "musetalk torch", "device": device, "dtype": dtype, "batch": b,
                       "ms_per_frame": 1000 * sec / b, "fps": b / sec, "ms_per_call": 1000 * sec,
                       "whisper_ms": 1000 * block, "block_ms": f.block * 20}
                rows.append(row)
                log(f"musetalk {device} {dtype} batch {b}: {row['ms_per_frame']:.1f} ms/frame, "
                    f"{row['fps']:.2f} frames/s")
                if row["ms_per_frame"] > 2000:
                    log("over 2 s a frame: larger batches skipped")
                    break
    return rows


def musetalk_table(rows: list[dict]) -> str:
    lines = ["`predict_crops` with the avatar crop's latents cached (as live); whisper: one encoder run over its 30 s "
             "input, which each block of audio needs.", "",
             "| device | dtype | batch | ms/call | ms/frame | frames/s | whisper ms/block (block ms) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['dtype']} | {r['batch']} | {r['ms_per_call']:.1f} "
                     f"| {r['ms_per_frame']:.1f} | {r['fps']:.2f} | {r['whisper_ms']:.1f} ({r['block_ms']}) |")
    return "\n".join(lines)


def audio_pe_rows(model: str, voice: str | None, avatars: str = "avatars", batch: int = 8, log=print) -> list[tuple]:
    """MuseTalk's mouths for the same clip with the audio positional encoding on and off: how much they
    differ (speech frames, the 256 px predicted faces, lower half where the mouth is)."""
    from streamer.audio import VoiceActivity, resample
    from streamer.avatar.cache import demo_avatar
    from streamer.errors import UserError
    from streamer.lipsync.engine import load_engine
    from streamer.mouth import FPS, face_crop, source_frame
    from streamer.render import plan

    audio16 = resample(_voice(voice, 10.0, 0.0), 48000)
    frames = round(audio16.size / 16000 * FPS)
    eng = load_engine(model)
    avatar = demo_avatar(avatars)
    windows, strength = plan(audio16, frames, VoiceActivity(fps=FPS), features=eng.features)
    speech = np.flatnonzero(strength > 0)
    if not len(speech):
        raise UserError("no speech found in the clip")
    windows = windows[speech]  # made once for both passes
    still = next(iter(avatar.read_frames(0, count=1)))[2]
    crops = np.stack([face_crop(avatar, source_frame(int(i), avatar), still, eng.face_size) for i in speech])
    out = {}
    for pe in (True, False):
        eng.audio_pe = pe
        out[pe] = np.concatenate([eng.predict_crops(windows[k : k + batch], crops[k : k + batch])
                                  for k in range(0, len(speech), batch)])
        log(f"audio_pe {'on' if pe else 'off'}: {len(speech)} speech frames predicted")
    half = eng.face_size // 2
    d = np.abs(out[True][:, half:].astype(np.float32) - out[False][:, half:])
    mse = float((d**2).mean())
    psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
    return [("engine", eng.name.replace("audio_pe off", "audio_pe on vs off")),
            ("clip", f"{audio16.size / 16000:.1f} s, {len(speech)} speech frames"),
            ("lower face, mean abs difference", f"{d.mean():.2f} of 255"),
            ("lower face, PSNR on vs off", f"{psnr:.1f} dB"),
            ("pixels differing by more than 8", f"{100 * (d.max(axis=-1) > 8).mean():.1f}%")]


def engine_rows(model: str | None, batches: list[int], seconds: float, log=print,
                only: str | None = None) -> list[dict]:
    """ms/frame and frames/s for each backend x dtype x batch available here."""
    import torch

    from streamer.lipsync.checkpoint import reference_state_dict
    from streamer.lipsync.engine import Wav2LipInfer, cuda_available
    from streamer.lipsync.export import export_onnx, sample_inputs

    devices = [d for d in (["cuda", "cpu"] if cuda_available() else ["cpu"]) if only in (None, d)]
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
                crops = np.ascontiguousarray(np.clip(faces[:, 3:].transpose(0, 2, 3, 1) * 255, 0, 255), np.uint8)
                eng.predict(mel, faces)
                sec = time_call(lambda eng=eng, mel=mel, faces=faces: eng.predict(mel, faces), seconds)
                eng.predict_crops(mel[:, 0], crops)
                crops_sec = time_call(lambda eng=eng, mel=mel, crops=crops: eng.predict_crops(mel[:, 0], crops),
                                      seconds)
                row = {"backend": eng.backend, "device": device, "dtype": dtype, "batch": b,
                       "ms_per_frame": 1000 * sec / b, "fps": b / sec, "ms_per_call": 1000 * sec,
                       "crops_fps": b / crops_sec}
                rows.append(row)
                log(f"{row['backend']:12s} {device:4s} {dtype} batch {b:4d}: "
                    f"{row['ms_per_frame']:7.2f} ms/frame {row['fps']:8.1f} frames/s; "
                    f"uint8 crops {row['crops_fps']:8.1f} frames/s")
    return rows


def engine_table(rows: list[dict]) -> str:
    lines = ["`predict`: fp32 arrays in and out (the original conventions); `predict_crops`: uint8 crops in, "
             "uint8 mouths out (what live and render use).", "",
             "| backend | device | dtype | batch | predict ms/call | ms/frame | frames/s | GFLOP/s "
             "| predict_crops frames/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['ms_per_call']:.1f} | "
                     f"{r['ms_per_frame']:.2f} | {r['fps']:.1f} | {GFLOP_PER_FRAME * r['fps']:.0f} "
                     f"| {r.get('crops_fps', float('nan')):.1f} |")
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


def _synthetic_video(path: Path, seconds: float, height: int, log=print, width: int | None = None) -> None:
    """A talking-head-like source: the demo portrait panning and zooming, encoded as H.264 (16:9
    unless `width` is given)."""
    import av
    import cv2

    from streamer.avatar.cache import DEMO_IMAGE

    img = cv2.imread(str(DEMO_IMAGE))
    width = width or height * 16 // 9
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
                 ("cache on disk", f"{disk:.0f} MB "
                                   f"(frames.mkv {(avatar.path / 'frames.mkv').stat().st_size / 1e6:.0f} MB, "
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
        windows = np.zeros((16, 80, 16), np.float32)  # speech: the mouth open
        crops = np.ascontiguousarray(avatar.crops[:16])
        per = time_call(lambda: eng.predict_crops(windows, crops), 1.0) / 16  # (what live and render call)
        pred = eng.predict_crops(windows, crops)[0]
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


def _voice(path: str | None, seconds: float, pause: float) -> np.ndarray:
    """`pause` s of silence, then the voice in `path` (espeak-ng speech if None) looped, at 48 kHz mono,
    `seconds` long."""
    if path is None:
        voice = _espeak_voice()
    else:
        from math import gcd

        from scipy import signal

        from streamer.render import read_audio

        audio, rate = read_audio(path)
        g = gcd(rate, 48000)
        voice = signal.resample_poly(audio.mean(axis=0), 48000 // g, rate // g).astype(np.float32)
    need = int(48000 * seconds)
    voice = np.tile(voice, need // max(1, voice.size) + 1)
    return np.concatenate([np.zeros(int(48000 * pause), np.float32), voice])[:need]


def _espeak_voice() -> np.ndarray:
    """espeak-ng speech at 48 kHz, about 20 s."""
    import io
    import shutil
    import subprocess
    import wave

    from scipy import signal

    from streamer.errors import UserError

    if not shutil.which("espeak-ng"):
        raise UserError("bench live speaks with espeak-ng: apt-get install espeak-ng")
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump. ") * 2
    wav = subprocess.run(["espeak-ng", "-s", "160", "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    return signal.resample_poly(x, 48000 // 100, rate // 100).astype(np.float32)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server's media workers and inference service)."""
    out = [pid]
    try:
        # children are listed by the thread that started them (a front starts its workers off its loop)
        for task in Path(f"/proc/{pid}/task").iterdir():
            for c in (task / "children").read_text().split():
                out += process_tree(int(c))
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU seconds used by process `pid` and its descendants, 0 for those gone."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


@contextlib.contextmanager
def server_process(args: list[str], video_avatar: float = 0, cores: list[int] | None = None):
    """`streamer serve ARGS` on a free loopback port, its avatars in a temporary folder, until ready:
    yields (process, url, /healthz answer); stopped on the way out. Its log ends any start failure.
    video_avatar: serve a 512x512 video avatar of that many seconds (made and prepared here), not the photo.
    cores: the only cores it and its child processes may run on (its `auto` settings count these)."""
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        if video_avatar:
            from streamer.avatar.cache import prepare

            _synthetic_video(Path(tmp) / "video.mp4", video_avatar, 512, log=lambda _: None, width=512)
            prepare(Path(tmp) / "video.mp4", "video", tmp, progress=False)
            args = [*args, "--avatar", "video"]
        log = Path(tmp) / "serve.log"
        with open(log, "w") as err:
            server = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--port", str(port), "--avatars",
                                       tmp, "-q", *args], stdout=subprocess.DEVNULL, stderr=err,
                                      preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        try:
            for _ in range(900):
                try:
                    health = json.loads(urllib.request.urlopen(url + "/healthz", timeout=1).read())
                    if health.get("ok", True):
                        break
                except OSError:
                    pass
                if server.poll() is not None:
                    raise RuntimeError(log.read_text()[-3000:])
                time.sleep(0.2)
            yield server, url, health
        finally:
            server.terminate()
            server.wait(timeout=30)


def _gpu_busy(samples: list[float], stop) -> None:
    """GPU utilisation (%) every half second until `stop` is set, where nvidia-smi answers."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return
    while not stop.wait(0.5):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout.split()
            samples.append(float(out[0]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return


def _clients(url: str, voice: np.ndarray, seconds: float, channels: list[str], viewers: int,
             decode: bool = True) -> list[dict]:
    """One client process: talkers on `channels` and `viewers` WHEP viewers of bench0. Returns a summary
    per connection (frames are decoded here, unless not `decode`, and dropped: only their arrival times
    travel back)."""
    import asyncio

    from streamer.live.client import count_video_only, talk, watch

    if not decode:
        count_video_only()

    async def run():
        jobs = [talk(url, voice, seconds, offer_extra={"channel": ch}, keep=False) for ch in channels]
        jobs += [watch(url, "bench0", seconds - 1.5, keep=False) for _ in range(viewers)]
        return await asyncio.gather(*jobs)

    out = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    answers = asyncio.run(run())
    share = (time.process_time() - cpu0) / (time.perf_counter() - t0) / max(1, len(answers))
    for k, (got, extra) in enumerate(answers):
        t = np.array([a for a, _ in got.video])
        steady = t[t > t[0] + 1] if len(t) > 1 else t  # after the first second (connection set-up)
        gaps = np.diff(steady) if len(steady) > 1 else np.zeros(1)
        out.append({"talker": k < len(channels), "frames": len(t), "stats": extra if k < len(channels) else None,
                    "fps": (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0,
                    "gap_p99_ms": 1000 * float(np.percentile(gaps, 99)), "cpu": share})
    return out


def _sum_metric(metrics: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def live_rows(model: str | None, seconds: float, delay_ms: int | str | None, sessions: int = 1,
              viewers: int = 0, voice_path: str | None = None, pause: float = 1.0, workers: int | str | None = None,
              client_processes: int | None = None, max_batch: int | None = None,
              decode: bool = True, video_avatar: float = 0, client_cores: int = 0) -> list[tuple[str, str]]:
    """Real sessions on this machine: `streamer serve` in its own process (and its media workers); aiortc
    clients (`sessions` talkers on their own channels, `viewers` WHEP viewers of the first channel)
    in `client_processes` other processes, over the host address. The server's CPU (all its
    processes) is measured apart from the clients' (which decode every frame). client_cores K: the
    clients run on the last K usable cores and the server on the others."""
    import multiprocessing
    import re
    import threading
    import urllib.request

    from streamer.errors import UserError

    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = len(usable)
    server_cores = client_set = None
    if client_cores:
        if not hasattr(os, "sched_setaffinity"):
            raise UserError("--client-cores needs a system that can pin processes to cores (Linux)")
        if not 0 < client_cores < cores:
            raise UserError(f"--client-cores must leave the server a core: 1 to {cores - 1} here")
        server_cores, client_set = usable[:-client_cores], usable[-client_cores:]
    procs = client_processes or max(1, min(8, sessions + viewers, client_cores or cores // 2))
    voice = _voice(voice_path, seconds, pause)  # (after the checks: it may synthesize speech)
    args = ["--max-sessions", str(max(sessions, 4))]
    args += ["--model", model] if model else []
    args += ["--delay-ms", str(delay_ms)] if delay_ms else []
    args += ["--workers", str(workers)] if workers else []
    args += ["--max-batch", str(max_batch)] if max_batch else []
    with server_process(args, video_avatar, server_cores) as (server, url, health):
        channels = [f"bench{k}" for k in range(sessions)]
        jobs = [(url, voice, seconds, channels[p::procs], viewers // procs + (p < viewers % procs), decode)
                for p in range(procs)]
        gpu, stop = [], threading.Event()
        watcher = threading.Thread(target=_gpu_busy, args=(gpu, stop), daemon=True)
        watcher.start()
        cpu0, t0 = _cpu_seconds(server.pid), time.perf_counter()
        pin = (os.sched_setaffinity, (0, client_set)) if client_set else (None, ())
        with multiprocessing.get_context("spawn").Pool(procs, *pin) as pool:
            results = [r for part in pool.starmap(_clients, jobs) for r in part]
        cpu = (_cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - t0)
        stop.set()
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    talks = [r for r in results if r["talker"]]
    fps = [r["fps"] for r in talks]
    stats = [r["stats"] for r in talks]
    p50 = [st["delay_ms_p50"] for st in stats if st.get("delay_ms_p50") is not None]
    p95 = [st["delay_ms_p95"] for st in stats if st.get("delay_ms_p95") is not None]
    synced = sum(st.get("lipsync_frames", 0) for st in stats)
    speech = synced + sum(st.get("late_frames", 0) for st in stats)
    held = sum(st.get("held_frames", 0) for st in stats)
    calls: dict[int, list[float]] = {}
    for line in metrics.splitlines():
        m = re.match(r'streamer_inference_call_seconds\{.*batch="(\d+)".*\} (\S+)', line)
        if m:
            calls.setdefault(int(m.group(1)), []).append(float(m.group(2)))
    count = _sum_metric(metrics, "streamer_inference_batch_size_count")
    mean_batch = _sum_metric(metrics, "streamer_inference_batch_size_sum") / count if count else 0.0
    targets = sorted({st.get("target_delay_ms") for st in stats if st.get("target_delay_ms")})
    rows = [("engine", health["engine"]),
            ("avatar", f"a {video_avatar:g} s 512x512 video (the portrait panning)"
                       if video_avatar else "the demo photo, 512x512"),
            ("sessions", f"{sessions} talkers for {seconds:g} s, voice after {pause:g} s of silence"
                         + (f", {viewers} WHEP viewers of the first" if viewers else "")
                         + f"; clients in {procs} processes{'' if decode else ', video counted, not decoded'}; "
                           f"server workers: {health.get('workers', 1)}"
                         + (f"; server on cores {_span(server_cores)}, clients on {_span(client_set)}"
                            if client_set else "")),
            ("video received per talker", f"min {min(fps):.2f} fps, mean {np.mean(fps):.2f} fps; frame gap p99 "
                                          f"worst {max(r['gap_p99_ms'] for r in talks):.0f} ms"),
            ("voice in -> lips out at the server", f"p50 {np.median(p50):.1f} ms, worst p95 {max(p95):.1f} ms "
                                                    f"(target {', '.join(map(str, targets))} ms)"
             if p50 else "not measured (no voice reached a frame)"),
            ("speech frames lip-synced in time", f"{synced} of {speech} ({100 * synced / max(1, speech):.1f}%); "
                                                  f"late ones showing the previous mouth: {held}"),
            ("engine speed in the server (median call)", ", ".join(
                f"batch {n}: {1000 * np.mean(v) / n:.1f} ms/frame" for n, v in sorted(calls.items()))),
            ("mean inference batch", f"{mean_batch:.2f} frames"),
            ("inference work", f"{_sum_metric(metrics, 'streamer_inference_frames_total'):.0f} frames run, "
                               f"{_sum_metric(metrics, 'streamer_inference_dropped_total'):.0f} skipped; in calls "
                               f"{_sum_metric(metrics, 'streamer_inference_seconds_total'):.1f} s"),
            ("server CPU, all its processes", f"{100 * cpu:.0f}% of one core ({100 * cpu / max(1, sessions):.1f}% "
                                              f"per talker)")]
    rows.append(("client CPU, all client processes", f"{100 * sum(r['cpu'] for r in results):.0f}% of one core"))
    if gpu:
        rows.append(("GPU utilisation", f"mean {np.mean(gpu):.0f}%, max {max(gpu):.0f}%"))
    if viewers:
        rows.append(("frames received per viewer", f"min {min(r['frames'] for r in results if not r['talker'])}"))
    return rows


def _span(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 and cores[-1] - cores[0] == len(cores) - 1 else \
        ",".join(map(str, cores))


def fine_detail(img: np.ndarray, where: np.ndarray) -> float:
    """Mean power of the detail finer than about 2 px (grey) over the pixels `where`."""
    import cv2

    g = img.astype(np.float32).mean(axis=2)
    return float(((g - cv2.GaussianBlur(g, (0, 0), 2.0))[where] ** 2).mean())


def sharpness_rows(seconds: float = 4.0, log=print) -> list[tuple[str, str]]:
    """How much of a 1080p close-up's fine detail (a face ~600 px tall, with skin texture) the lower face
    keeps outside the mouth in speech frames of a render, against the source frame, with the blend's
    detail keeping and without, with the builtin engine. (Wav2Lip needs its real weights for this: the
    reference weights the tests use are untrained and draw noise, which measures as "detail".)"""
    import functools
    import wave

    import av
    import cv2

    import streamer.mouth as mouth_mod
    from streamer.audio import VoiceActivity
    from streamer.avatar.blend import blend, lower_face_mask
    from streamer.avatar.cache import DEMO_IMAGE, prepare
    from streamer.lipsync.engine import load_engine
    from streamer.mouth import FPS, source_frame
    from streamer.render import plan, read_audio, render, resample

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = cv2.resize(cv2.imread(str(DEMO_IMAGE)), (2360, 2360), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        rng = np.random.default_rng(0)
        skin = cv2.GaussianBlur(rng.normal(0, 12, big.shape[:2]).astype(np.float32), (0, 0), 0.8)[..., None]
        big = np.clip(big + skin, 0, 255).astype(np.uint8)
        src = tmp / "closeup.mp4"
        with av.open(str(src), "w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt, s.options = 1920, 1080, "yuv420p", {"crf": "12", "preset": "veryfast"}
            for i in range(int(seconds * 25)):
                x, y = 80 + int(6 * np.sin(i / 9)), 30 + int(4 * np.sin(i / 13))
                for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(big[y : y + 1080, x : x + 1920]),
                                                             format="bgr24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        avatar = prepare(src, "closeup", tmp / "avatars", progress=False)
        face_h = float(np.median(avatar.boxes[:, 3] - avatar.boxes[:, 1]))
        rows.append(("source", f"{avatar.size[0]}x{avatar.size[1]}, {avatar.frames} frames, "
                               f"face box {face_h:.0f} px tall, skin texture"))
        voice = tmp / "voice.wav"
        speech = np.concatenate([np.zeros(48000, np.float32), _espeak_voice()])  # 1 s silent: the round trip alone
        pcm = np.round(speech[: int(48000 * seconds)] * 32767).astype(np.int16)
        with wave.open(str(voice), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(48000)
            w.writeframes(pcm.tobytes())
        audio, rate = read_audio(voice)
        audio16 = resample(audio.mean(axis=0), rate)
        frames = max(1, round(audio16.size / 16000 * FPS))
        _, strength = plan(audio16, frames, VoiceActivity(fps=FPS))
        originals = {k: f for _, k, f in avatar.read_frames(0, count=avatar.frames)}
        engine = load_engine(None, mouth=avatar.mouth_in_crop())
        real_blend = mouth_mod.blend
        kept = {}
        for detail in (False, True):
            mouth_mod.blend = functools.partial(blend, detail=detail)
            try:
                out = tmp / f"out_{detail}.mp4"
                render(avatar, voice, out, engine, progress=False, force=True)
            finally:
                mouth_mod.blend = real_blend
            ratios, still = [], []
            with av.open(str(out)) as c:
                for k, frame in enumerate(c.decode(video=0)):
                    if k >= len(strength):
                        break
                    j = source_frame(k, avatar)
                    x1, y1, x2, y2 = (int(v) for v in avatar.boxes[j])
                    where = cv2.resize(lower_face_mask(96), (x2 - x1, y2 - y1)) > 0.5
                    cx, cy = avatar.landmarks[j, 3:5].mean(axis=0) - (x1, y1)
                    zone = np.zeros(where.shape, np.uint8)
                    cv2.ellipse(zone, (int(cx), int(cy)), (int(0.3 * (x2 - x1)), int(0.15 * (y2 - y1))),
                                0, 0, 360, 1, -1)
                    where &= zone == 0
                    got = frame.to_ndarray(format="bgr24")[y1:y2, x1:x2]
                    ratio = fine_detail(got, where) / fine_detail(originals[j][y1:y2, x1:x2], where)
                    (ratios if strength[k] >= 1 else still).append(ratio)
            kept[detail] = (np.mean(ratios), np.mean(still) if still else float("nan"), len(ratios))
        rows.append(("builtin: detail kept outside the mouth, speech frames",
                     f"{100 * kept[False][0]:.0f}% without detail keeping, {100 * kept[True][0]:.0f}% with "
                     f"({kept[True][2]} frames)"))
        rows.append(("builtin: the same in silent frames (the H.264 round trip alone)", f"{100 * kept[True][1]:.0f}%"))
        log(rows[-2][1])
    return rows
