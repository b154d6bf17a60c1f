"""Running Wav2Lip on a CUDA GPU at the GPU's speed: fixed batch buckets with buffers allocated once,
host arrays staged through pinned memory, input conversion (dtype, mask, layout) and output
conversion done on the GPU, and one stream shared by torch and onnxruntime. Arrays in, arrays out;
no asyncio; callers hold the engine's lock.

Two ways to run the model on those buffers:
  `graph_runner`: a torch module; conversion in, model and conversion out are captured once per
                  bucket as one CUDA graph and replayed;
  `ort_runner`:   an onnxruntime session bound to the buffers (IO binding), on the same stream,
                  replayed by onnxruntime as CUDA graphs, with the conversions as torch kernels
                  around it.
"""

from __future__ import annotations

import numpy as np

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # a batch is padded up to the next one
CROPS, FACES = "crops", "faces"  # the two ways in: uint8 crops (live, render) or the original conventions


class Buffers:
    """Device tensors of one bucket and one way in: the host-shaped input and output, and the model's
    own inputs and output in its dtype."""

    def __init__(self, torch, way: str, bucket: int, size: int, dtype, channels_last: bool):
        dev = torch.device("cuda")
        self.way, self.bucket = way, bucket
        if way == CROPS:
            self.host_in = (torch.zeros((bucket, 80, 16), dtype=torch.float32, device=dev),
                            torch.zeros((bucket, size, size, 3), dtype=torch.uint8, device=dev))
            self.host_out = torch.zeros((bucket, size, size, 3), dtype=torch.uint8, device=dev)
        else:
            self.host_in = (torch.zeros((bucket, 1, 80, 16), dtype=torch.float32, device=dev),
                            torch.zeros((bucket, 6, size, size), dtype=torch.float32, device=dev))
            self.host_out = torch.zeros((bucket, 3, size, size), dtype=torch.float32, device=dev)
        self.mel = torch.zeros((bucket, 1, 80, 16), dtype=dtype, device=dev)
        faces = torch.zeros((bucket, 6, size, size), dtype=dtype, device=dev)
        self.faces = faces.contiguous(memory_format=torch.channels_last) if channels_last else faces
        self.out = torch.zeros((bucket, 3, size, size), dtype=dtype, device=dev)

    def convert_in(self) -> None:
        if self.way == CROPS:
            windows, crops = self.host_in
            self.mel[:, 0].copy_(windows)
            face = crops.permute(0, 3, 1, 2).float().mul_(1 / 255)
            self.faces[:, 3:].copy_(face)
            self.faces[:, :3].copy_(face)
            self.faces[:, :3, face.shape[2] // 2 :].zero_()  # the original masks the lower half
        else:
            self.mel.copy_(self.host_in[0])
            self.faces.copy_(self.host_in[1])

    def convert_out(self) -> None:
        if self.way == CROPS:  # as to_images: round half up, clip, uint8 HxWx3
            img = self.out.float().mul_(255).add_(0.5).clamp_(0, 255).to(self.host_out.dtype)
            self.host_out.copy_(img.permute(0, 2, 3, 1))
        else:
            self.host_out.copy_(self.out)


class CudaBatcher:
    """Host arrays in and out of a model that runs on fixed device buffers.

    compute(buffers) must fill buffers.host_out from buffers.host_in on the current stream (it calls
    convert_in, runs the model, calls convert_out); prepare(buffers), if given, runs once per new
    bucket first (allocation, kernel choice, graph capture).
    """

    def __init__(self, size: int, dtype: str, compute, prepare=None, channels_last: bool = False, stream=None):
        import torch

        self.torch = torch
        self.size = size
        self.dtype = torch.float16 if dtype == "fp16" else torch.float32
        self.stream = stream or torch.cuda.Stream()
        self.channels_last = channels_last
        self._compute = compute
        self._prepare = prepare
        self._buffers: dict[tuple[str, int], Buffers] = {}
        self._pinned: dict[tuple[str, int], object] = {}  # host staging by (name, slot)

    def _bucket(self, way: str, n: int) -> Buffers:
        bucket = next(b for b in BUCKETS if b >= n)
        buf = self._buffers.get((way, bucket))
        if buf is None:
            buf = Buffers(self.torch, way, bucket, self.size, self.dtype, self.channels_last)
            if self._prepare:
                self._prepare(buf)
            self._buffers[(way, bucket)] = buf
        return buf

    def _stage(self, key: tuple[str, int], like) -> object:
        """A pinned host tensor shaped and typed as the device tensor `like` (allocated once)."""
        t = self._pinned.get(key)
        if t is None:
            t = self.torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self._pinned[key] = t
        return t

    def run(self, way: str, inputs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """inputs as `way` takes them (see Buffers) -> the host-shaped output, as numpy."""
        torch = self.torch
        total = len(inputs[0])
        outs = []
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            for lo in range(0, total, BUCKETS[-1]):
                hi = min(total, lo + BUCKETS[-1])
                n = hi - lo
                buf = self._bucket(way, n)
                for k, (arr, dev) in enumerate(zip(inputs, buf.host_in)):
                    host = self._stage((way, buf.bucket, k), dev)
                    host[:n].copy_(torch.from_numpy(np.ascontiguousarray(arr[lo:hi])))
                    dev[:n].copy_(host[:n], non_blocking=True)
                self._compute(buf)
                host = self._stage((way, buf.bucket, "out"), buf.host_out)
                host[:n].copy_(buf.host_out[:n], non_blocking=True)
                self.stream.synchronize()
                outs.append(host[:n].numpy().copy())
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def predict(self, mel: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Original conventions: mel (B,1,80,16) and faces (B,6,S,S) float in [0,1] -> (B,3,S,S) float32."""
        return self.run(FACES, (mel, faces))

    def predict_crops(self, windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """Live and render path: windows (B,80,16) float32 and crops (B,S,S,3) uint8 BGR -> mouths
        (B,S,S,3) uint8 BGR. A quarter of the bytes cross the bus; masking and scaling on the GPU."""
        return self.run(CROPS, (windows, crops))


def graph_runner(module, size: int, dtype: str) -> CudaBatcher:
    """A torch Wav2Lip on CUDA: conversion in, model, conversion out replayed as one CUDA graph per
    bucket and way in (captured on first use)."""
    import torch

    graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
    pool = torch.cuda.graph_pool_handle()

    def step(buf: Buffers) -> None:
        buf.convert_in()
        buf.out.copy_(module(buf.mel, buf.faces))
        buf.convert_out()

    def prepare(buf: Buffers) -> None:
        for _ in range(3):  # kernel choice and lazy loading happen before capture
            step(buf)
        batcher.stream.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, stream=batcher.stream, capture_error_mode="thread_local"):
            step(buf)
        graphs[(buf.way, buf.bucket)] = g

    def compute(buf: Buffers) -> None:
        graphs[(buf.way, buf.bucket)].replay()

    batcher = CudaBatcher(size, dtype, compute, prepare, channels_last=True)
    return batcher


def ort_runner(session, mel_name: str, face_name: str, out_name: str, size: int, dtype: str,
               stream, graphs: bool = False) -> CudaBatcher:
    """An onnxruntime CUDA session run on the batcher's buffers through IO binding (no copies by
    onnxruntime); `session` must have been made with user_compute_stream = `stream`, and with
    enable_cuda_graph when `graphs` (then onnxruntime replays one CUDA graph per bucket and way in:
    the buffers never move, as its graphs need)."""
    import onnxruntime as ort

    np_dtype = np.float16 if dtype == "fp16" else np.float32
    bindings = {}

    def prepare(buf: Buffers) -> None:
        io = session.io_binding()
        for name, t in ((mel_name, buf.mel), (face_name, buf.faces), (out_name, buf.out)):
            bind = io.bind_output if name == out_name else io.bind_input
            bind(name, "cuda", 0, np_dtype, list(t.shape), t.data_ptr())
        opts = ort.RunOptions()
        if graphs:
            opts.add_run_config_entry("gpu_graph_id", str(len(bindings) + 1))
        bindings[(buf.way, buf.bucket)] = io, opts
        for _ in range(2):  # allocation and kernel choice, then the graph's capture
            session.run_with_iobinding(io, opts)

    def compute(buf: Buffers) -> None:
        buf.convert_in()
        session.run_with_iobinding(*bindings[(buf.way, buf.bucket)])
        buf.convert_out()

    return CudaBatcher(size, dtype, compute, prepare, channels_last=False, stream=stream)
