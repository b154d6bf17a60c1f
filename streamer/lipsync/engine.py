"""One inference API for Wav2Lip: `.onnx` (onnxruntime) or `.pth` (torch), fp16 or fp32, CUDA or CPU.

Arrays in, arrays out; no asyncio. `predict` is thread-safe, so a worker thread may call it.

Conventions (those of the original inference):
  mel   (B, 1, 80, 16) float32, one mel window per video frame
  faces (B, 6, S, S) float32 in [0, 1], BGR; channels 0-2 the crop with rows S/2.. zeroed,
        channels 3-5 the unmasked reference crop (see `face_input`)
  out   (B, 3, S, S) float32 in [0, 1], BGR (see `to_images` for uint8 HxWx3)
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from streamer.audio.features import MelFeatures
from streamer.errors import UserError, need_file

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "fp16", "fp32")
ORT_CUDA_GRAPHS = os.environ.get("STREAMER_ORT_CUDA_GRAPHS", "1") != "0"  # 0: plain IO-bound runs


def cuda_available() -> bool:
    """True when a CUDA GPU can be used, asked quietly (no provider error spam on CPU machines)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:  # noqa: BLE001 - a broken torch install just means "no torch CUDA"
        pass
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def face_input(crops: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 BGR crops -> (B, 6, S, S) float32 model input: masked crop + reference."""
    if crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2]:
        raise ValueError(f"crops must be (B, S, S, 3), got {crops.shape}")
    ref = crops.transpose(0, 3, 1, 2).astype(np.float32) * (1 / 255)
    masked = ref.copy()
    masked[:, :, crops.shape[1] // 2 :] = 0
    return np.concatenate([masked, ref], axis=1)


def predict_crops(engine, windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """windows (B,80,16) + crops (B,S,S,3) uint8 -> mouths (B,S,S,3) uint8, through `engine.predict`."""
    return to_images(engine.predict(windows[:, None], face_input(crops)))


def _torch_cuda_stream():
    """A torch CUDA stream for onnxruntime to share, or None without CUDA torch."""
    try:
        import torch

        return torch.cuda.Stream() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a CPU-only or broken torch: onnxruntime copies by itself
        return None


def check_inputs(mel: np.ndarray, faces: np.ndarray, size: int) -> None:
    """Raise ValueError unless mel is (B, 1, 80, 16) and faces (B, 6, size, size)."""
    if mel.ndim != 4 or mel.shape[1:] != (1, 80, 16):
        raise ValueError(f"mel must be (B, 1, 80, 16), got {mel.shape}")
    if faces.shape != (mel.shape[0], 6, size, size):
        raise ValueError(f"faces must be ({mel.shape[0]}, 6, {size}, {size}), got {faces.shape}")


def to_images(out: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) float in [0, 1] -> (B, S, S, 3) uint8 BGR."""
    return np.clip(out.transpose(0, 2, 3, 1) * 255 + 0.5, 0, 255).astype(np.uint8)


class Wav2LipInfer:
    """A loaded Wav2Lip model, ready to run. Choose the backend by file type.

    device: 'auto' (CUDA when usable, else CPU), 'cuda' or 'cpu'.
    dtype:  'auto' (fp16 on CUDA, fp32 on CPU), 'fp16' or 'fp32'. An fp16 ONNX file on the CPU
            with dtype 'auto' is widened to fp32 at load: faster there and supported everywhere.
    """

    features = MelFeatures()  # what it hears: 80x16 mel windows

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", warmup: bool = True,
                 threads: int | None = None):
        self.path = Path(path)
        if device not in DEVICES:
            raise UserError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        need_file(self.path, "model file")
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        elif device == "cuda" and not cuda_available():
            raise UserError("device 'cuda' was asked for, but no usable CUDA GPU was found")
        self.device = device
        self._lock = threading.Lock()
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self.backend = "onnxruntime"
            self._init_onnx(dtype, threads)
        elif suffix in (".pth", ".pt", ".tar", ".ckpt"):
            from streamer.lipsync.checkpoint import load_model

            self.backend = "torch"
            self._init_torch(load_model(self.path), dtype)
        else:
            raise UserError(f"{self.path.name}: model files must end in .onnx or .pth")
        if warmup:
            self.warmup()

    @classmethod
    def from_module(cls, model, device: str = "cpu", dtype: str = "fp32", warmup: bool = True):
        """Wrap an in-memory torch Wav2Lip (e.g. reference weights for benchmarks)."""
        self = cls.__new__(cls)
        self.path = Path("<module>")
        self.device = device
        self._lock = threading.Lock()
        self.backend = "torch"
        self._init_torch(model, dtype)
        if warmup:
            self.warmup()
        return self

    # backends

    def _init_onnx(self, dtype: str, threads: int | None) -> None:
        import onnx
        import onnxruntime as ort

        from streamer.lipsync.onnx_utils import F16, fp16_to_fp32

        try:
            model = onnx.load(str(self.path))
        except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
            raise UserError(f"{self.path} is not a readable ONNX model ({type(e).__name__})") from None
        graph_fp16 = any(i.type.tensor_type.elem_type == F16 for i in model.graph.input)
        if dtype == "auto":
            dtype = "fp16" if graph_fp16 and self.device == "cuda" else "fp32"
        if graph_fp16 and dtype == "fp32":
            log.info("%s: fp16 graph widened to fp32 for the %s", self.path.name, self.device)
            model = fp16_to_fp32(model)
        elif not graph_fp16 and dtype == "fp16":
            raise UserError(f"{self.path.name} is an fp32 model; export it with --dtype fp16 to run fp16")
        self.dtype = dtype
        self._np_dtype = np.float16 if dtype == "fp16" else np.float32

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle threads must not spin: live serving shares the cores with encoding and networking.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        stream = None
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("onnxruntime has no CUDA provider here; install onnxruntime-gpu "
                                "(and not onnxruntime) or use --device cpu")
            if hasattr(ort, "preload_dlls"):
                try:
                    ort.preload_dlls()
                except Exception:  # noqa: BLE001 - missing pip CUDA libs: the system ones may do
                    pass
            # NHWC kernels: 1.3-1.5x faster on tensor cores (measured, BENCHMARKS.md)
            cuda_opts = {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"}
            stream = _torch_cuda_stream()
            if stream is not None:  # torch and onnxruntime on one stream: the IO-bound path below
                cuda_opts["user_compute_stream"] = str(stream.cuda_stream)
                if ORT_CUDA_GRAPHS:
                    cuda_opts["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"onnxruntime cannot load {self.path.name}: {str(e).splitlines()[0]}") from None
        if self.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            log.warning("CUDA provider failed to start (CUDA 13 / cuDNN 9 libraries missing?); running on CPU")
            self.device = "cpu"
        try:
            from streamer.lipsync.onnx_utils import io_layout

            mel_name, face_name, self.face_size = io_layout(sess)
        except ValueError as e:
            raise UserError(f"{self.path.name}: {e}") from None
        self._sess = sess
        self._batcher = None
        if self.device == "cuda" and stream is not None:
            from streamer.lipsync.cuda_io import ort_runner

            self._batcher = ort_runner(sess, mel_name, face_name, sess.get_outputs()[0].name, self.face_size,
                                       dtype, stream, graphs=ORT_CUDA_GRAPHS)

        def run(mel, faces):
            feeds = {mel_name: mel.astype(self._np_dtype, copy=False),
                     face_name: faces.astype(self._np_dtype, copy=False)}
            return sess.run(None, feeds)[0]

        self._run = run

    def _init_torch(self, model, dtype: str) -> None:
        import torch

        if dtype == "auto":
            dtype = "fp16" if self.device == "cuda" else "fp32"
        self.dtype = dtype
        tdtype = torch.float16 if dtype == "fp16" else torch.float32
        dev = torch.device(self.device)
        model = model.to(dev, tdtype).eval()
        if self.device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.face_size = int(getattr(model, "face_size", 96))
        self._module = model
        self._batcher = None
        if self.device == "cuda":
            from streamer.lipsync.cuda_io import graph_runner

            self._batcher = graph_runner(model, self.face_size, dtype)

        def run(mel, faces):
            with torch.inference_mode():
                m = torch.from_numpy(np.ascontiguousarray(mel)).to(dev, tdtype, non_blocking=True)
                f = torch.from_numpy(np.ascontiguousarray(faces)).to(dev, tdtype, non_blocking=True)
                if self.device == "cuda":
                    f = f.contiguous(memory_format=torch.channels_last)
                return model(m, f).float().cpu().numpy()

        self._run = run

    # API

    @property
    def name(self) -> str:
        return f"wav2lip {self.backend} {self.dtype} {self.device} ({self.path.name}, {self.face_size}px)"

    def predict(self, mel: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Mouths for B frames: see the module docstring for shapes and ranges."""
        check_inputs(mel, faces, self.face_size)
        with self._lock:
            out = self._batcher.predict(mel, faces) if self._batcher else self._run(mel, faces)
        return np.asarray(out, dtype=np.float32)

    def predict_crops(self, windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """What live and render need: windows (B,80,16) and crops (B,S,S,3) uint8 BGR -> mouths
        (B,S,S,3) uint8 BGR. Equal to `to_images(predict(windows[:, None], face_input(crops)))`; on a
        GPU the crops cross the bus as uint8 and are masked and scaled there."""
        if self._batcher is None:
            return predict_crops(self, windows, crops)
        s = self.face_size
        if windows.ndim != 3 or windows.shape[1:] != (80, 16) or crops.shape != (len(windows), s, s, 3):
            raise ValueError(f"need windows (B, 80, 16) and crops (B, {s}, {s}, 3), got {windows.shape} and "
                             f"{crops.shape}")
        with self._lock:
            return self._batcher.predict_crops(windows, crops)

    def warmup(self, batch_sizes=(1,)) -> float:
        """Run once per batch size so the first real call is not slow (on a GPU: buffers allocated and
        CUDA graphs captured); returns seconds spent."""
        t = time.perf_counter()
        for b in batch_sizes:
            size = self.face_size
            self.predict(np.zeros((b, 1, 80, 16), np.float32), np.zeros((b, 6, size, size), np.float32))
        return time.perf_counter() - t



def load_engine(model: str | Path | None, device: str = "auto", dtype: str = "auto",
                models_dir: str | Path = "models", mouth: tuple[float, float] | None = None, musetalk=None,
                audio: bool = True):
    """The engine for `model`: a path, or a file name in `models_dir`, or musetalk:DIR; None gives the
    builtin engine, which animates the mouth at `mouth` (crop fractions, from the avatar's landmarks)
    when given. musetalk: a MuseTalkConfig (default settings when None). audio False: an engine that
    is given its audio windows and never makes them (MuseTalk then loads no whisper encoder)."""
    if model is None:
        from streamer.lipsync.builtin import MOUTH, BuiltinEngine

        return BuiltinEngine(mouth=mouth or MOUTH)
    from streamer.lipsync.musetalk import MuseTalkInfer, is_musetalk

    if is_musetalk(model):
        from streamer.config import MuseTalkConfig

        mt = musetalk or MuseTalkConfig()
        return MuseTalkInfer(resolve_model(model, models_dir), device=device, dtype=dtype, audio_pe=mt.audio_pe == "on",
                             block_ms=mt.block_ms, context_ms=mt.context_ms, audio=audio)
    return Wav2LipInfer(resolve_model(model, models_dir), device=device, dtype=dtype)


def load_features(model: str | Path | None, device: str = "auto", dtype: str = "auto",
                  models_dir: str | Path = "models", musetalk=None):
    """The audio front end of `model`'s engine, without the engine: for a media worker, whose inference
    runs in the inference service."""
    from streamer.lipsync.musetalk import is_musetalk
    from streamer.lipsync.musetalk import load_features as musetalk_features

    if model is not None and is_musetalk(model):
        from streamer.config import MuseTalkConfig

        mt = musetalk or MuseTalkConfig()
        return musetalk_features(resolve_model(model, models_dir), device, dtype, mt.block_ms, mt.context_ms)
    return MelFeatures()


def model_lookahead_s(model: str | Path | None, musetalk=None) -> float:
    """The audio `model`'s engine needs past a frame's start (its features' `lookahead_s`), from the
    settings alone: nothing is loaded."""
    from streamer.lipsync.musetalk import is_musetalk

    if model is not None and is_musetalk(model):
        from streamer.audio.whisper import lookahead_s
        from streamer.config import MuseTalkConfig

        mt = musetalk or MuseTalkConfig()
        return lookahead_s(mt.block_ms, mt.context_ms)
    return MelFeatures.lookahead_s


def resolve_model(model: str | Path, models_dir: str | Path = "models") -> Path:
    """The file `model` names: a path, or a file name in `models_dir`; for musetalk:DIR, the folder
    (checked to hold the released layout)."""
    from streamer.lipsync.musetalk import PREFIX, check_layout, is_musetalk

    if is_musetalk(model):
        folder = Path(str(model)[len(PREFIX) :]).expanduser()  # the shell leaves ~ after a colon alone
        if not folder.exists() and not folder.is_absolute() and (Path(models_dir) / folder).is_dir():
            folder = Path(models_dir) / folder
        check_layout(folder)
        return folder
    path = Path(model).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(models_dir) / path).exists():
        path = Path(models_dir) / path
    if not path.exists():
        raise UserError(f"model {model} not found (looked for the path and in {models_dir}/)")
    if not path.is_file():
        raise UserError(f"model {model} is not a file: give a .onnx or .pth file, or musetalk:DIR for MuseTalk")
    return path
