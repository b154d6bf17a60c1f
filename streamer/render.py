"""`streamer render`: an audio file to a lip-synced mp4, offline, batched, with the live path's parts
(mel windows, voice activity, the engine, blending)."""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from streamer.audio import VoiceActivity, mel_windows, melspectrogram, resample
from streamer.avatar.blend import blend
from streamer.avatar.cache import Avatar, crop
from streamer.errors import UserError

log = logging.getLogger(__name__)

AAC_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}
FADE_FRAMES = 2  # frames over which the mouth fades into and out of speech


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any audio PyAV reads -> (channels, samples) float32 planar, sample rate."""
    import av

    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise UserError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            channels = min(2, stream.codec_context.channels or 1)
            resampler = av.AudioResampler(format="fltp", layout="stereo" if channels == 2 else "mono", rate=rate)
            parts = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray())
            for out in resampler.resample(None):
                parts.append(out.to_ndarray())
    except av.FFmpegError as e:
        raise UserError(f"{path} is not a readable audio file ({type(e).__name__})") from None
    if not parts or sum(p.shape[1] for p in parts) == 0:
        raise UserError(f"{path} holds no audio samples")
    return np.concatenate(parts, axis=1).astype(np.float32), int(rate)


def speech_strength(speech: np.ndarray, fade: int = FADE_FRAMES) -> np.ndarray:
    """Per-frame mouth strength: 1 in speech, fading linearly to 0 over `fade` frames around it."""
    s = speech.astype(np.float32)
    if fade <= 0 or not s.any():
        return s
    out = s.copy()
    for d in range(1, fade + 1):
        w = 1 - d / (fade + 1)
        out[d:] = np.maximum(out[d:], s[:-d] * w)
        out[:-d] = np.maximum(out[:-d], s[d:] * w)
    return out


def plan(audio16: np.ndarray, frames: int, fps: float, vad: VoiceActivity) -> tuple[np.ndarray, np.ndarray]:
    """(frames, 80, 16) mel windows and (frames,) strengths for an audio clip."""
    windows = mel_windows(melspectrogram(audio16), fps)
    if len(windows) < frames:  # the original rule stops ~0.1 s short of the audio's end
        windows = np.concatenate([windows, np.repeat(windows[-1:], frames - len(windows), axis=0)])
    decided = dict(vad.push(audio16) + vad.flush())
    speech = np.array([decided.get(i, False) for i in range(frames)])
    return windows[:frames], speech_strength(speech)


def check_output(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist")
    return out


def render(avatar: Avatar, audio_path: str | Path, out: str | Path, engine, batch_size: int = 16,
           vad: VoiceActivity | None = None, force: bool = False, progress: bool = True, crf: int = 18) -> dict:
    """Write `out` (H.264 + AAC mp4); returns a summary. The file appears only when complete."""
    import av
    from tqdm import tqdm

    out = check_output(out, force)
    if batch_size < 1 or batch_size > 1024:
        raise UserError("--batch-size must be 1 to 1024")
    audio, rate = read_audio(audio_path)
    mono = audio.mean(axis=0)
    seconds = mono.size / rate
    fps = avatar.fps
    frames = max(1, round(seconds * fps))
    audio16 = resample(mono, rate)
    windows, strength = plan(audio16, frames, fps, vad or VoiceActivity(fps=fps))
    if not strength.any():
        log.warning("no speech found in %s: the avatar will not move its mouth", audio_path)

    rate_out = rate if rate in AAC_RATES else 48000
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    size = engine.face_size
    width, height = avatar.size
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.options = {"crf": str(crf), "preset": "veryfast"}
            layout = "stereo" if audio.shape[0] == 2 else "mono"
            aud = container.add_stream("aac", rate=rate_out, layout=layout)
            _write_audio(container, aud, audio, rate, rate_out, layout)

            bar = tqdm(total=frames, desc="render", unit="frame", disable=not progress)
            batch = []
            for step, src, frame in avatar.read_frames(0, count=frames):
                batch.append((step, src, frame))
                if len(batch) == batch_size or step == frames - 1:
                    for image in _animate(batch, avatar, engine, windows, strength, size):
                        vf = av.VideoFrame.from_ndarray(image, format="bgr24")
                        for packet in vs.encode(vf):
                            container.mux(packet)
                    bar.update(len(batch))
                    batch = []
            for packet in vs.encode():
                container.mux(packet)
            bar.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"frames": frames, "fps": fps, "seconds": seconds, "speech_frames": int((strength > 0).sum())}


def _animate(batch, avatar: Avatar, engine, windows, strength, size):
    todo = [k for k, (step, _, _) in enumerate(batch) if strength[step] > 0]
    images = [frame for _, _, frame in batch]
    if not todo:
        return images
    crops = np.stack([avatar.crops[batch[k][1]] if avatar.crops.shape[1] == size
                      else crop(batch[k][2], avatar.boxes[batch[k][1]], size) for k in todo])
    preds = engine.predict_crops(windows[[batch[k][0] for k in todo]], crops)
    for k, pred, c in zip(todo, preds, crops):
        step, src, frame = batch[k]
        images[k] = blend(frame, avatar.boxes[src], pred, strength=float(strength[step]), crop=c)
    return images


def _write_audio(container, stream, audio: np.ndarray, rate: int, rate_out: int, layout: str) -> None:
    import av

    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate_out, frame_size=stream.codec_context.frame_size or 1024)
    step = 4096
    for i in range(0, audio.shape[1], step):
        chunk = np.ascontiguousarray(audio[:, i : i + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = i
        frame.time_base = Fraction(1, rate)
        for piece in resampler.resample(frame):
            for packet in stream.encode(piece):
                container.mux(packet)
    for piece in resampler.resample(None):
        for packet in stream.encode(piece):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
