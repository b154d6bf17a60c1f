"""One typed settings tree: defaults here, `configs/*.yaml` over them, CLI flags over that.

Every value is checked at start, so a bad setting fails with one clear line before any work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from streamer.errors import UserError


def _opt(default, help: str, choices=None, min=None, max=None, auto=False):  # noqa: A002 - mirrors argparse
    """A setting; `auto=True` lets it also be the word "auto" (chosen at run time)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max, "auto": auto})


@dataclass
class ModelConfig:
    path: str | None = _opt(None, "Wav2Lip .onnx or .pth (a path, or a file name in models/), or musetalk:DIR (a "
                                  "MuseTalk v1.5 folder in the released layout); none: builtin engine")
    device: str = _opt("auto", "where inference runs", choices=("auto", "cuda", "cpu"))
    dtype: str = _opt("auto", "fp16 on CUDA and fp32 on CPU when auto", choices=("auto", "fp16", "fp32"))


@dataclass
class MuseTalkConfig:
    audio_pe: str = _opt("on", "add the positional encoding the released inference adds to the whisper features "
                               "(on: as the authors run their weights) or not (off: as the model was trained)",
                         choices=("on", "off"))
    block_ms: int = _opt(80, "whisper features are computed in blocks of this many ms (a multiple of 20): smaller "
                             "blocks, less delay, more encoder runs", min=20, max=1000)
    context_ms: int = _opt(160, "audio the whisper encoder hears past each block (a multiple of 20): more, features "
                                "closer to the offline release's, and more delay", min=0, max=5000)


@dataclass
class AudioConfig:
    vad_aggressiveness: int = _opt(2, "webrtcvad aggressiveness, 0 (least) to 3 (most)", min=0, max=3)
    vad_frame_ms: int = _opt(20, "webrtcvad analysis frame", choices=(10, 20, 30))
    vad_preroll_ms: int = _opt(40, "speech starts this much before the detector says so (the mouth also fades in "
                                   "over live.fade_frames before that)", min=0, max=1000)
    vad_hangover_ms: int = _opt(240, "speech lasts this much after the detector stops", min=0, max=3000)
    vad_min_snr_db: float = _opt(9.0, "speech must be this much louder than the noise floor of the last 2 s "
                                      "(0: off; steady noise then counts as speech)", min=0.0, max=40.0)

    def voice_activity(self, fps: float):
        """A VoiceActivity detector with these settings, deciding per video frame at `fps`."""
        from streamer.audio import VoiceActivity

        return VoiceActivity(self.vad_aggressiveness, self.vad_frame_ms, self.vad_preroll_ms, self.vad_hangover_ms,
                             fps=fps, min_snr_db=self.vad_min_snr_db)


@dataclass
class AvatarConfig:
    dir: str = _opt("avatars", "folder of prepared avatars")
    name: str = _opt("astronaut", "avatar used when none is named (astronaut: the bundled demo)")
    face_size: int = _opt(96, "face crop size cached for the model (96 for Wav2Lip; prepare --model sets it)",
                          min=32, max=512)
    max_height: int = _opt(1080, "taller sources are scaled down when prepared", min=64, max=4320)
    raw_frames_mb: int = _opt(2048, "prepare also keeps every frame decoded (frames.npy) when they fit in this many "
                                    "MB: served channels then read frames instead of decoding them (a 512x512 frame: "
                                    "~5 ms of CPU). 0: never", min=0, max=1_000_000)


@dataclass
class RenderConfig:
    batch_size: int = _opt(16, "frames per inference call when rendering", min=1, max=1024)
    crf: int = _opt(18, "H.264 quality of rendered mp4s: 0 lossless .. 51 worst", min=0, max=51)


@dataclass
class ServerConfig:
    host: str = _opt("127.0.0.1", "address to listen on; 0.0.0.0 serves other machines too")
    port: int = _opt(8080, "HTTP port (0: any free one, printed at start)", min=0, max=65535)
    max_sessions: int = _opt(4, "voices at once (talk pages, WHIP publishers, programs over /ws and /speak); "
                                "more get HTTP 503", min=1, max=1000)
    max_viewers: int = _opt(50, "WHEP viewers at once; more get HTTP 503", min=0, max=10000)
    workers: int | str = _opt("auto", "media worker processes, each holding whole channels (one process uses about "
                                      "two cores); 1: everything in one process; auto: one per two cores",
                              min=1, max=64, auto=True)
    token: str | None = _opt(None, "when set, signalling and /metrics need 'Authorization: Bearer <token>'")
    max_connections_per_client: int = _opt(256, "HTTP connections open at once from one address; more are closed",
                                           min=1, max=100000)
    header_timeout_s: float = _opt(10.0, "a new connection must send a complete request's headers within this",
                                   min=0.5, max=300.0)
    cors_origins: str | None = _opt(None, "web origins whose pages may call the API from a browser, comma-separated "
                                          "(e.g. https://app.example.com), or *; none: only the pages "
                                          "this server serves")
    stun: str | None = _opt(None, "STUN server for clients behind NAT, e.g. stun:stun.example.org:3478 (none: host "
                                  "addresses only, nothing contacted)")


@dataclass
class LiveConfig:
    delay_ms: int | str = _opt("auto", "voice-in to lips-out delay in ms, at least the floor: the model's lookahead "
                                       "and the resampler's 0.6 ms (213.1 ms for Wav2Lip, 340.6 for MuseTalk at its "
                                       "defaults; at the floor inference has no time left); "
                                       "the rest is the budget for inference. auto: starts at that + what this "
                                       "machine's measured feature and inference times need + 30 ms, then follows "
                                       "what the speech frames needed (their 99th percentile + 10 ms; at most 500, "
                                       "unless the floor and feature time alone are more)",
                               min=214, max=3000, auto=True)
    max_batch: int = _opt(8, "most frames in one inference call, across all sessions", min=1, max=256)
    fade_frames: int = _opt(2, "frames over which the mouth fades into and out of speech", min=0, max=12)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    musetalk: MuseTalkConfig = field(default_factory=MuseTalkConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    avatar: AvatarConfig = field(default_factory=AvatarConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    live: LiveConfig = field(default_factory=LiveConfig)


_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _check(name: str, f: dataclasses.Field, hint, value):
    if f.metadata.get("auto"):
        if value == "auto":
            return value
        hint = int
    kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    optional = type(None) in kinds
    (kind,) = kinds - {type(None)}
    if value is None:
        if not optional:
            raise UserError(f"setting {name} must not be empty")
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(f"setting {name} must be {_KIND_WORDS[kind]}, not {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"setting {name} must be one of {', '.join(map(str, meta['choices']))}, not {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise UserError(f"setting {name} must be at least {meta['min']}, not {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise UserError(f"setting {name} must be at most {meta['max']}, not {value!r}")
    return value


type_holder = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def load_config(path: str | Path | None = None, overrides: dict[str, object] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `overrides` ({"model.path": ..., ...}; None = unset)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():  # (a pipe, as `--config <(...)`, is read like a file)
            raise UserError(f"config file {path} is a folder, not a file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not a text file (YAML)") from None
        except OSError as e:
            raise UserError(f"config file {path} cannot be read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold sections of settings")
    flat: dict[str, object] = {}
    for section, values in data.items():
        if section not in type_holder:
            raise UserError(f"unknown config section {section!r} (known: {', '.join(type_holder)})")
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must hold settings")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})

    sections = {}
    for section, factory in type_holder.items():
        fields = {f.name: f for f in dataclasses.fields(factory)}
        hints = typing.get_type_hints(factory)
        kwargs = {}
        for key, value in list(flat.items()):
            sec, _, name = key.partition(".")
            if sec != section:
                continue
            if name not in fields:
                raise UserError(f"unknown setting {key!r} (known in {section}: {', '.join(fields)})")
            kwargs[name] = _check(key, fields[name], hints[name], value)
        sections[section] = factory(**kwargs)
    return Config(**sections)


def describe() -> str:
    """Every setting with its default and help, in YAML: what configs/default.yaml holds."""
    lines = []
    for section, factory in type_holder.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(factory):
            default = f.default
            text = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  # {f.metadata['help']}")
            lines.append(f"  {f.name}: {text}")
    return "\n".join(lines) + "\n"
