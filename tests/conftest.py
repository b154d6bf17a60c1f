import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"


def run_cli(*args, check=False):
    """Run `streamer ARGS` as a user would, in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"streamer {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(DATA / "wav2lip_golden.npz"))


@pytest.fixture(scope="session")
def released_checkpoint(tmp_path_factory):
    """A checkpoint laid out as the Wav2Lip authors release theirs, with the reference weights."""
    from streamer.lipsync.checkpoint import reference_state_dict

    state = {f"module.{k}": v for k, v in reference_state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "wav2lip_gan.pth"
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.999), "params": [0]}]}
    torch.save({"state_dict": state, "optimizer": optimizer, "global_step": 123, "global_epoch": 4}, path)
    return path


@pytest.fixture(scope="session")
def exported(released_checkpoint, tmp_path_factory):
    """models exported through the CLI, by dtype."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for dtype in ("fp32", "fp16"):
        paths[dtype] = out / f"wav2lip_{dtype}.onnx"
        run_cli("export", "--checkpoint", released_checkpoint, "--out", paths[dtype], "--dtype", dtype, check=True)
    return paths


def write_wav(path, mono, rate: int) -> Path:
    """Mono float audio as a 16-bit wav (for fake microphones and publishers)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(mono, -1, 1) * 32767).astype(np.int16).tobytes())
    return Path(path)


def speak(text: str, voice: str = "en-us", speed: int = 150) -> tuple[np.ndarray, int]:
    """Speech from espeak-ng as (mono float32, sample rate)."""
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is needed for speech tests: apt-get install espeak-ng (.ci/run does)")
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True,
                         check=True).stdout
    import io

    with wave.open(io.BytesIO(out)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    return pcm.astype(np.float32) / 32768, rate


@pytest.fixture(scope="session")
def speech16k():
    """Two clips the project has never seen, at 16 kHz, with silence around them."""
    from streamer.audio import resample

    clips = []
    for text, voice in (("Hello there, this is a new sentence for the lips to follow.", "en-us"),
                        ("Bonjour, je parle un peu plus vite maintenant.", "fr")):
        x, rate = speak(text, voice)
        x = resample(x, rate)
        clips.append(np.concatenate([np.zeros(8000, np.float32), x, np.zeros(8000, np.float32)]))
    return clips


ASTRONAUT = Path(__file__).parents[1] / "streamer" / "avatar" / "data" / "astronaut.png"


def write_video(path, frames, fps=25, codec="libx264"):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_video(path):
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def write_audio(path, mono, rate, codec=None):
    """Mono float audio to any container PyAV writes (wav, m4a, ...)."""
    from fractions import Fraction

    import av

    if len(mono) == 0:  # a valid wav with a header and no samples (PyAV writes no header without data)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        return
    codec = codec or {".wav": "pcm_s16le", ".m4a": "aac", ".mp3": "libmp3lame"}[Path(path).suffix]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate, layout="mono")
        fmt = "s16" if codec == "pcm_s16le" else "fltp"
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate,
                                      frame_size=s.codec_context.frame_size or 1024)
        pcm = np.asarray(mono, np.float32)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for piece in resampler.resample(frame) + resampler.resample(None):
            for p in s.encode(piece):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.fixture(scope="session")
def talk_video(tmp_path_factory):
    """3 s at 25 fps, 480x400: the portrait panning and zooming slowly; frames 30-32 blacked out."""
    import cv2

    img = cv2.imread(str(ASTRONAUT))
    frames = []
    for i in range(75):
        scale = 1.0 + 0.1 * i / 74
        m = np.float32([[scale, 0, -20 - 0.6 * i], [0, scale, -10]])
        f = cv2.warpAffine(img, m, (480, 400), borderMode=cv2.BORDER_REFLECT)
        if 30 <= i <= 32:
            f[:] = 0
        frames.append(f)
    path = tmp_path_factory.mktemp("media") / "talk.mp4"
    write_video(path, frames)
    return path


@pytest.fixture(scope="session")
def speech_m4a(tmp_path_factory):
    """1 s of silence, espeak-ng speech, 1 s of silence, as AAC in m4a (44.1 kHz)."""
    x, rate = speak("Hello, I am a talking avatar and my lips move when I speak.")
    x44 = np.concatenate([np.zeros(44100), _to_rate(x, rate, 44100), np.zeros(44100)])
    path = tmp_path_factory.mktemp("media") / "speech.m4a"
    write_audio(path, x44 * 0.8, 44100)
    return path, len(x44) / 44100


def _to_rate(x, rate, target):
    from math import gcd

    from scipy import signal

    g = gcd(rate, target)
    return signal.resample_poly(x, target // g, rate // g).astype(np.float32)


@pytest.fixture(scope="session")
def musetalk_dir(tmp_path_factory):
    """A MuseTalk v1.5 folder in the released layout, random weights at toy widths, written by the
    project's script as a user would."""
    folder = tmp_path_factory.mktemp("musetalk") / "models"
    script = Path(__file__).parents[1] / "scripts" / "musetalk-layout.py"
    subprocess.run([sys.executable, str(script), str(folder), "--tiny"], check=True, capture_output=True)
    return folder
