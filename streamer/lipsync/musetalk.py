"""The MuseTalk (v1.5) engine: 256 px faces from a VAE + UNet, audio from whisper-tiny; a GPU engine.

Loads the layout the authors publish (https://huggingface.co/TMElyralab/MuseTalk, with
stabilityai/sd-vae-ft-mse and openai/whisper-tiny, as their download_weights.sh arranges them):

  DIR/musetalkV15/musetalk.json   UNet2DConditionModel config
  DIR/musetalkV15/unet.pth        its state dict
  DIR/sd-vae/config.json + diffusion_pytorch_model.bin (or .safetensors)
  DIR/whisper/config.json + pytorch_model.bin (or model.safetensors) + preprocessor_config.json

The pipeline as released: the crop with its lower half blacked out and the whole crop, each
VAE-encoded and scaled (8 latent channels, cached per avatar crop: they never change), the UNet at
timestep 0 once with the frame's whisper window as its cross-attention input, then VAE decode.
Two choices follow the training code rather than the released inference, where they differ:
the posterior's mean is the latent (training: `latent_dist.mode()`; inference samples, which would
make live differ from offline), and `audio_pe` (below) is an option.

audio_pe: the released inference adds a sinusoidal positional encoding over the window's 50 rows to
the whisper features; training never does. On (default) runs the released weights as their authors
run them; off feeds the UNet what it was trained on.

Needs the `musetalk` extra (diffusers, transformers). Same interface as Wav2LipInfer; no asyncio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from streamer.errors import UserError

log = logging.getLogger(__name__)

FACE = 256
LATENT_CACHE = 2048  # crops outside the avatar's whose latents are kept (16 KB each at fp16)
LATENTS = "musetalk-latents-{key}.npz"  # in the avatar's folder: its crops' digests and latents
ENCODE_BATCH = 16
LAYOUT = {
    "unet config": ("musetalkV15/musetalk.json",),
    "unet weights": ("musetalkV15/unet.pth",),
    "vae config": ("sd-vae/config.json",),
    "vae weights": ("sd-vae/diffusion_pytorch_model.bin", "sd-vae/diffusion_pytorch_model.safetensors"),
    "whisper config": ("whisper/config.json",),
    "whisper weights": ("whisper/pytorch_model.bin", "whisper/model.safetensors"),
    "whisper preprocessor": ("whisper/preprocessor_config.json",),
}
PREFIX = "musetalk:"


def is_musetalk(model) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def check_layout(folder: Path) -> dict[str, Path]:
    """The released layout's files in `folder`, or a UserError naming the first one missing."""
    if not folder.is_dir():
        raise UserError(f"musetalk: model folder {folder} does not exist")
    found = {}
    for what, names in LAYOUT.items():
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            raise UserError(f"musetalk: {folder / names[0]} is missing ({what}; see README, 'MuseTalk weights')")
        found[what] = path
    return found


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"musetalk: {path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"musetalk: {path} is not a JSON object")
    return data


def positional_encoding(rows: int, width: int) -> np.ndarray:
    """(rows, width) sinusoidal encoding, as the released inference's PositionalEncoding(d_model=384)
    computes it (in torch float32, so the values are its values to the bit)."""
    import torch

    position = torch.arange(0, rows, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))
    pe = torch.zeros(rows, width)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe.numpy()


class MuseTalkInfer:
    """A loaded MuseTalk, ready to run. device 'auto' | 'cuda' | 'cpu'; dtype 'auto' (fp16 on CUDA, fp32
    on the CPU) | 'fp16' | 'fp32'."""

    backend = "torch"
    face_size = FACE

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "auto", audio_pe: bool = True,
                 block_ms: int = 80, context_ms: int = 160, warmup: bool = True, audio: bool = True):
        """audio False: whisper's config only, not its encoder (a server's inference service runs the UNet
        on windows its media workers make)."""
        try:
            import diffusers  # noqa: F401
            import torch
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("the musetalk engine needs its extra: pip install -e '.[musetalk]' (diffusers, "
                            "transformers)") from None
        _quiet()
        self.folder = Path(folder)
        files = self._files = check_layout(self.folder)
        self.device, self.dtype, self._tdtype = _placement(device, dtype)
        self.audio_pe = audio_pe
        self._lock = threading.Lock()
        self._latents: OrderedDict = OrderedDict()  # crop digest -> (8, 32, 32) tensor on the device
        self._avatar: dict[bytes, int] = {}  # crop digest -> row of _avatar_latents (use_avatar)
        self._avatar_latents = None
        self.encoded = 0  # crops VAE-encoded so far
        self.unet = self._load_unet(files)
        self.vae = self._load_vae(files)
        self.features = _whisper(files, self.device, self._tdtype, block_ms, context_ms, warmup, audio)
        self._check_fit()
        rows, width = self.features.shape
        self._pe = torch.from_numpy(positional_encoding(rows, width)).to(self.device, self._tdtype)
        self.scale = float(self.vae.config.scaling_factor)
        if warmup:
            self.warmup()

    # loading

    def _load_unet(self, files):
        import torch
        from diffusers import UNet2DConditionModel

        config = _read_json(files["unet config"])
        try:
            unet = UNet2DConditionModel.from_config(config)
        except Exception as e:  # noqa: BLE001 - any bad value: one line naming the file
            raise UserError(f"musetalk: {files['unet config']} is not a UNet2DConditionModel config "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        path = files["unet weights"]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"musetalk: {path} is not a readable torch state dict ({type(e).__name__})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"musetalk: {path} holds no state dict")
        _load_state(unet, state, path, files["unet config"])
        return unet.to(self.device, self._tdtype).eval()

    def _load_vae(self, files):
        from diffusers import AutoencoderKL

        folder = files["vae config"].parent
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True,
                                                use_safetensors=files["vae weights"].suffix == ".safetensors")
        except Exception as e:  # noqa: BLE001
            raise UserError(f"musetalk: cannot load the VAE in {folder} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return vae.to(self.device, self._tdtype).eval()

    def _check_fit(self) -> None:
        u, v = self.unet.config, self.vae.config
        width = self.features.shape[1]
        if u.in_channels != 2 * v.latent_channels or u.out_channels != v.latent_channels:
            raise UserError(f"musetalk: the UNet takes {u.in_channels} channels and gives {u.out_channels}; the "
                            f"VAE's latents have {v.latent_channels} (need 2x in, 1x out)")
        if u.cross_attention_dim != width:
            raise UserError(f"musetalk: the UNet's cross_attention_dim is {u.cross_attention_dim} but whisper's "
                            f"d_model is {width}")

    # the pipeline

    @property
    def name(self) -> str:
        pe = "on" if self.audio_pe else "off"
        return f"musetalk torch {self.dtype} {self.device} ({self.folder.name}, {FACE}px, audio_pe {pe})"

    def audio_input(self, windows: np.ndarray):
        """The UNet's cross-attention input for (B, rows, width) whisper windows: with the released
        positional encoding added when audio_pe is on, as they are otherwise."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(windows, np.float32)).to(self.device, self._tdtype)
        return x + self._pe if self.audio_pe else x

    def _encode(self, faces: np.ndarray):
        """(n, 256, 256, 3) uint8 BGR -> (n, 8, h, w) latents on the device: lower half masked, then whole."""
        import torch

        rgb = torch.from_numpy(np.ascontiguousarray(faces[..., ::-1])).to(self.device)
        x = rgb.permute(0, 3, 1, 2).to(self._tdtype) / 127.5 - 1  # [-1, 1]
        masked = x.clone()
        masked[:, :, FACE // 2 :] = -1  # black lower half
        with torch.inference_mode():
            lat = self.vae.encode(torch.cat([masked, x])).latent_dist.mode() * self.scale
        self.encoded += len(faces)
        n = len(faces)
        return torch.cat([lat[:n], lat[n:]], dim=1)

    def encode_crops(self, crops: np.ndarray):
        """(B, 256, 256, 3) uint8 BGR -> (B, 8, 32, 32) latents: the avatar's (see use_avatar), else
        from a cache of recent crops, else encoded now."""
        import torch

        keys = [digest(c) for c in crops]
        for k in keys:  # hits first become the newest, so this batch's misses cannot evict them
            if k in self._latents:
                self._latents.move_to_end(k)
        todo = [k for k in dict.fromkeys(keys) if k not in self._latents and k not in self._avatar]
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            for k, v in zip(todo, self._encode(crops[[first[k] for k in todo]])):
                self._latents[k] = v.clone()  # its own memory: an evicted one frees it
        batch = torch.stack([self._avatar_latents[self._avatar[k]] if k in self._avatar else self._latents[k]
                             for k in keys])
        while len(self._latents) > LATENT_CACHE:
            self._latents.popitem(last=False)
        return batch

    def use_avatar(self, avatar, progress: bool = False) -> None:
        """Keep the latents of every crop of `avatar` on the device for good, so no frame waits for a VAE
        encode, however long the avatar: read from its folder when computed before for this VAE and
        dtype, else computed now (once) and saved there. `streamer prepare --model musetalk:DIR` does it
        ahead of time."""
        import torch

        path = latents_file(self._files, self.dtype, avatar)
        digests, latents = _read_latents(path, avatar, 2 * self.vae.config.latent_channels)
        if latents is None:
            log.info("musetalk: computing the latents of avatar %s's %d face crops (once; saved with it)",
                     avatar.name, avatar.frames)
            digests, latents = self._avatar_crops_latents(avatar, progress)
            _write_latents(path, digests, latents)
        with self._lock:
            self._avatar_latents = torch.from_numpy(latents).to(self.device, self._tdtype)
            self._avatar = {bytes(d): i for i, d in enumerate(digests)}

    def _avatar_crops_latents(self, avatar, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        digests, latents, batch = [], [], []

        def flush():
            with self._lock:
                latents.append(self._encode(np.stack(batch)).float().cpu().numpy())
            batch.clear()

        with tqdm(total=avatar.frames, desc=f"musetalk latents of {avatar.name}", unit="frame",
                  disable=not progress) as bar:
            for face in _crops(avatar, range(avatar.frames)):
                digests.append(np.frombuffer(digest(face), np.uint8))
                batch.append(face)
                if len(batch) == ENCODE_BATCH:
                    flush()
                bar.update()
            if batch:
                flush()
        return np.stack(digests), np.concatenate(latents).astype(np.float16 if self.dtype == "fp16" else np.float32)

    def predict_crops(self, windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """windows (B, rows, width) whisper features, crops (B, 256, 256, 3) uint8 BGR -> mouths, same."""
        import torch

        if windows.ndim != 3 or windows.shape[1:] != self.features.shape \
                or crops.shape != (len(windows), FACE, FACE, 3):
            raise ValueError(f"need windows (B, {self.features.shape[0]}, {self.features.shape[1]}) and crops "
                             f"(B, {FACE}, {FACE}, 3), got {windows.shape} and {crops.shape}")
        with self._lock, torch.inference_mode():
            latents = self.encode_crops(crops)
            audio = self.audio_input(windows)
            t = torch.zeros(1, device=self.device, dtype=torch.long)
            pred = self.unet(latents, t, encoder_hidden_states=audio).sample
            image = self.vae.decode(pred / self.scale).sample
            image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return image.permute(0, 2, 3, 1).flip(-1).cpu().numpy()  # RGB -> BGR

    def warmup(self, batch_sizes=(1,)) -> float:
        t = time.perf_counter()
        for b in batch_sizes:
            self.predict_crops(np.zeros((b, *self.features.shape), np.float32),
                               np.full((b, FACE, FACE, 3), 128, np.uint8))
        return time.perf_counter() - t


def digest(crop: np.ndarray) -> bytes:
    return hashlib.blake2b(crop.tobytes(), digest_size=16).digest()


def _crops(avatar, sources):
    """The 256 px crops of the avatar's frames `sources` (rising), cut as live and render cut them: from
    its cached crops when they are 256 px, else from its frames (read in one pass when `sources` is
    every frame, else one at a time)."""
    from streamer.mouth import face_crop

    if avatar.crops.shape[1] == FACE:
        yield from (face_crop(avatar, i, None, FACE) for i in sources)
        return
    every = list(sources) == list(range(avatar.frames))
    for start, count in [(0, avatar.frames)] if every else [(i, 1) for i in sources]:
        frames = avatar.read_frames(start, count=count)  # loop steps below n are frames in order
        try:
            for _, src, frame in frames:
                yield face_crop(avatar, src, frame, FACE)
        finally:
            frames.close()


def latents_file(files: dict[str, Path], dtype: str, avatar) -> Path:
    """Where the avatar keeps its crops' latents from this VAE (config and weights) in this dtype."""
    from streamer.avatar.cache import sha256

    key = hashlib.sha256(f"{dtype} {sha256(files['vae config'])} {sha256(files['vae weights'])}".encode())
    return avatar.path / LATENTS.format(key=key.hexdigest()[:16])


def _read_latents(path: Path, avatar, channels: int):
    """(digests, latents) saved by use_avatar, or (None, None) when absent or not this avatar's: the
    shapes, and the digests of its first, middle and last crops as cut here (a folder copied from a
    machine that resizes differently would otherwise miss every crop, silently)."""
    try:
        with np.load(path) as data:
            digests, latents = data["digests"], data["latents"]
    except FileNotFoundError:
        return None, None
    except Exception as e:  # noqa: BLE001 - a damaged file is computed again
        log.warning("musetalk: %s is damaged (%s); computing it again", path.name, type(e).__name__)
        return None, None
    n = avatar.frames
    if digests.shape != (n, 16) or latents.ndim != 4 or latents.shape[:2] != (n, channels):
        log.warning("musetalk: %s does not fit this avatar; computing it again", path.name)
        return None, None
    probe = sorted({0, n // 2, n - 1})
    if any(digest(c) != bytes(digests[i]) for i, c in zip(probe, _crops(avatar, probe))):
        log.warning("musetalk: %s was made from other crops than this avatar's; computing it again", path.name)
        return None, None
    return digests, latents


def ensure_latents(folder: Path, avatar, device: str = "auto", dtype: str = "auto") -> None:
    """For a server whose model runs in another process (the inference service, on a start deadline):
    the avatar's latents saved beforehand, computed when missing in a child process that loads the
    model, shows its progress and exits (so this process never holds a GPU context)."""
    import multiprocessing

    files = check_layout(folder)
    device, dtype, _ = _placement(device, dtype)
    channels = 2 * int(_read_json(files["vae config"]).get("latent_channels", 4))
    if _read_latents(latents_file(files, dtype, avatar), avatar, channels)[1] is not None:
        return
    log.info("musetalk: computing the latents of avatar %s's %d face crops (once; saved with it)",
             avatar.name, avatar.frames)
    child = multiprocessing.get_context("spawn").Process(
        target=_compute_latents, args=(str(folder), str(avatar.path.parent), avatar.path.name, device, dtype),
        name="musetalk-latents")
    child.start()
    child.join()
    if child.exitcode != 0:
        raise UserError(f"musetalk: computing the latents of avatar {avatar.name} failed (exit code "
                        f"{child.exitcode}); try: streamer prepare --model musetalk:{folder} ...")


def _compute_latents(folder: str, root: str, name: str, device: str, dtype: str) -> None:
    from streamer.avatar.cache import Avatar

    MuseTalkInfer(folder, device, dtype, warmup=False, audio=False).use_avatar(Avatar.load(root, name), progress=True)


def _write_latents(path: Path, digests: np.ndarray, latents: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, digests=digests, latents=latents)
        os.replace(tmp, path)
    except OSError as e:  # a read-only avatars folder: used now, computed again next time
        log.warning("musetalk: cannot save %s (%s); they will be computed again next time", path, e.strerror or e)
        tmp.unlink(missing_ok=True)


def _whisper(files: dict[str, Path], device: str, tdtype, block_ms: int, context_ms: int, warmup: bool = True,
             with_encoder: bool = True):
    from streamer.audio.whisper import load_whisper

    folder = files["whisper config"].parent
    try:
        return load_whisper(folder, device, tdtype, block_ms, context_ms, warmup, with_encoder)
    except ValueError as e:
        raise UserError(f"musetalk: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"musetalk: cannot load whisper from {folder} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_features(folder: Path, device: str = "auto", dtype: str = "auto", block_ms: int = 80, context_ms: int = 160):
    """MuseTalk's audio front end alone (whisper windows), for a process that runs no UNet."""
    _quiet()
    device, _, tdtype = _placement(device, dtype)
    return _whisper(check_layout(folder), device, tdtype, block_ms, context_ms)


def _placement(device: str, dtype: str):
    """(device, dtype name, torch dtype) for 'auto' or asked-for values: fp16 on CUDA, fp32 on the CPU."""
    import torch

    from streamer.lipsync.engine import cuda_available

    if device == "auto":
        device = "cuda" if cuda_available() and torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    if dtype == "auto":
        dtype = "fp16" if device == "cuda" else "fp32"
    return device, dtype, torch.float16 if dtype == "fp16" else torch.float32


def _quiet() -> None:
    """Loading prints advice meant for training code (accelerate, fp32 modules, progress bars): off."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_state(module, state: dict, path: Path, config: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"musetalk: {path.name} does not fit {config.name}: keys " + ", ".join(parts))
    module.load_state_dict(state)
