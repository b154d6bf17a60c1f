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
