"""`streamer render`: an audio file to a lip-synced mp4, offline, batched, with the live path's parts
(the engine's audio windows, voice activity, the mouth's strength, crop and blend in streamer/mouth.py, the engine):
the same frames a live channel makes of the same voice, at the same 25 fps."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

from streamer import outfile
from streamer.audio import VoiceActivity, resample
from streamer.audio.features import MelFeatures
from streamer.avatar.cache import Avatar
from streamer.errors import UserError, need_file
from streamer.mouth import FADE_FRAMES, FPS, face_crop, loop_step, speech_strength, with_mouth

log = logging.getLogger(__name__)

OUT_SUFFIXES = (".mp4",)  # what it writes: naming it .avi or .mkv would not make it one
AAC_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any audio PyAV reads -> (channels, samples) float32 planar, sample rate."""
    import av

    path = need_file(path, "audio")
    try:
        with av.open(str(path), metadata_errors="replace") as container:  # a damaged tag is no reason to fail
            if not container.streams.audio:
                raise UserError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            rate = ctx.sample_rate if ctx is not None else 0  # a damaged header may leave no codec
            if not rate:
                raise UserError(f"{path} is not a readable audio file (no codec or sample rate)")
            channels = min(2, ctx.channels or 1)
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


def plan(audio16: np.ndarray, frames: int, vad: VoiceActivity, fade: int = FADE_FRAMES,
         features=None) -> tuple[np.ndarray, np.ndarray]:
    """(frames, *window) audio windows of the engine's `features` (default: Wav2Lip's 80x16 mel; made
    as render asks for them where they are large) and (frames,) mouth strengths for an audio clip, at 25 fps."""
    windows = (features or MelFeatures(FPS)).for_clip(audio16, frames)
    decided = dict(vad.push(audio16) + vad.flush())
    speech = np.array([decided.get(i, False) for i in range(frames)])
    return windows, speech_strength(speech, fade)


def avatar_frames(avatar: Avatar, count: int):
    """(output frame, source index, image) for output frames 0..count-1 at 25 fps, the avatar's own
    frames picked by time (a 30 fps avatar plays at its speed, not 17% slow)."""
    reader = avatar.read_frames(0)
    try:
        step, src, frame = next(reader)
        for n in range(count):
            want = loop_step(n, avatar)
            while step < want:
                step, src, frame = next(reader)
            yield n, src, frame
    finally:
        reader.close()


def render_frames(avatar: Avatar, windows: np.ndarray, strength: np.ndarray, engine, batch_size: int = 16):
    """The output images for a clip's `plan`, batched through the engine: what `render` encodes."""
    frames = len(strength)
    batch = []
    for n, src, frame in avatar_frames(avatar, frames):
        batch.append((n, src, frame))
        if len(batch) == batch_size or n == frames - 1:
            yield from _animate(batch, avatar, engine, windows, strength)
            batch = []


def render(avatar: Avatar, audio_path: str | Path | tuple[np.ndarray, int], out: str | Path, engine,
           batch_size: int = 16, vad: VoiceActivity | None = None, force: bool = False, progress: bool = True,
           crf: int = 18, fade: int = FADE_FRAMES) -> dict:
    """Write `out` (H.264 + AAC mp4) for an audio file, or one already read (`read_audio`'s
    (samples, rate)); returns a summary. The file appears only when complete."""
    import av
    from tqdm import tqdm

    out = outfile.check(out, force, OUT_SUFFIXES)
    if batch_size < 1 or batch_size > 1024:
        raise UserError("--batch-size must be 1 to 1024")
    audio, rate = audio_path if isinstance(audio_path, tuple) else read_audio(audio_path)
    mono = audio.mean(axis=0)
    seconds = mono.size / rate
    fps = FPS
    audio16 = resample(mono, rate)
    frames = max(1, round(audio16.size / 16000 * FPS))
    windows, strength = plan(audio16, frames, vad or VoiceActivity(fps=FPS), fade, engine.features)
    speech_frames = int((strength > 0).sum())
    if not speech_frames:
        log.warning("no speech found in %s: the avatar will not move its mouth",
                    "the audio" if isinstance(audio_path, tuple) else audio_path)

    rate_out = rate if rate in AAC_RATES else 48000
    width, height = avatar.size
    with outfile.writing(out) as tmp:
        with outfile.writes(out):
            container = av.open(str(tmp), "w", format="mp4")

        def mux(packets) -> None:  # only the writes: an error reading frames or inferring is not the output's
            with outfile.writes(out):  # the disk filled, or the folder went away
                for packet in packets:
                    container.mux(packet)

        written = False
        try:
            vs = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.options = {"crf": str(crf), "preset": "veryfast"}
            layout = "stereo" if audio.shape[0] == 2 else "mono"
            aud = container.add_stream("aac", rate=rate_out, layout=layout)
            _write_audio(aud, audio, rate, rate_out, layout, mux)

            bar = tqdm(total=frames, desc="render", unit="frame", disable=not progress)
            for image in render_frames(avatar, windows, strength, engine, batch_size):
                mux(vs.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
                bar.update(1)
            mux(vs.encode())
            bar.close()
            written = True
        finally:
            try:
                container.close()  # (writes the index: a full disk shows here too)
            except OSError as e:
                if written:
                    raise outfile.cannot_write(out, e) from None
    return {"frames": frames, "fps": fps, "seconds": seconds, "speech_frames": speech_frames}


def _animate(batch, avatar: Avatar, engine, windows, strength):
    """One batch of output frames: the speech ones get their predicted mouth, as a live channel does."""
    todo = [k for k, (n, _, _) in enumerate(batch) if strength[n] > 0]
    images = [frame for _, _, frame in batch]
    if not todo:
        return images
    crops = np.stack([face_crop(avatar, batch[k][1], batch[k][2], engine.face_size) for k in todo])
    mouths = engine.predict_crops(windows[[batch[k][0] for k in todo]], crops)
    for k, mouth, face in zip(todo, mouths, crops):
        n, src, frame = batch[k]
        images[k] = with_mouth(frame, avatar, src, mouth, float(strength[n]), face)
    return images


def _write_audio(stream, audio: np.ndarray, rate: int, rate_out: int, layout: str, mux) -> None:
    import av

    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate_out,
                                  frame_size=stream.codec_context.frame_size or 1024)
    step = 4096
    for i in range(0, audio.shape[1], step):
        chunk = np.ascontiguousarray(audio[:, i : i + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = i
        frame.time_base = Fraction(1, rate)
        for piece in resampler.resample(frame):
            mux(stream.encode(piece))
    for piece in resampler.resample(None):
        mux(stream.encode(piece))
    mux(stream.encode(None))
