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
