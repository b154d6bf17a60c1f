"""Export a Wav2Lip checkpoint to ONNX with a dynamic batch axis, then check it against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from streamer import outfile
from streamer.errors import UserError
from streamer.lipsync.engine import face_input

log = logging.getLogger(__name__)

# What an export may differ from torch fp32 on the check inputs before we refuse to keep it.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}
MIN_OPSET = 7  # the oldest the converter knows


def sample_inputs(batch: int = 3, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic inputs in the model's ranges: mel in [-4, 4], crops of smooth random faces."""
    rng = np.random.default_rng(seed)
    mel = rng.uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
    small = rng.integers(0, 256, (batch, size // 8, size // 8, 3)).astype(np.float32)
    crops = np.kron(small, np.ones((1, 8, 8, 1), np.float32)).astype(np.uint8)
    return mel, face_input(crops)


def _quiet_export(model, args, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    # The exporter narrates each stage on stdout and warns about optional packages; keep the CLI clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        torch.onnx.export(
            model, args, str(path), input_names=["mel", "face"], output_names=["out"],
            dynamic_shapes={"mel": {0: batch}, "face": {0: batch}}, opset_version=opset,
            dynamo=True, external_data=False, verbose=False,
        )


def export_onnx(checkpoint: str | Path, out: str | Path, dtype: str = "fp16", opset: int = 18,
                force: bool = False) -> float:
    """Write `out` from `checkpoint`; returns the max abs error against torch fp32 on sample inputs.

    The file appears only when complete and checked: it is written beside `out` under a temporary
    name and renamed at the end. An existing `out` is kept unless `force`.
    """
    import onnx
    import onnxruntime as ort

    from streamer.lipsync.checkpoint import load_model
    from streamer.lipsync.onnx_utils import io_layout

    if dtype not in TOLERANCE:
        raise UserError(f"dtype must be fp16 or fp32, not {dtype!r}")
    out = outfile.check(out, force, (".onnx",))
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"--opset must be {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (this onnx's newest), "
                        f"not {opset}")
    model = load_model(checkpoint)
    mel, faces = sample_inputs()
    with torch.inference_mode():
        expected = model(torch.from_numpy(mel), torch.from_numpy(faces)).numpy()

    with outfile.writing(out) as tmp:
        tdtype = torch.float16 if dtype == "fp16" else torch.float32
        m = model.to(tdtype)
        with outfile.writes(out):
            _quiet_export(m, (torch.from_numpy(mel[:2]).to(tdtype), torch.from_numpy(faces[:2]).to(tdtype)), tmp,
                          opset)
            proto = onnx.load(str(tmp))
        proto = _at_opset(proto, opset)
        for key, value in (("streamer.model", "wav2lip"), ("streamer.dtype", dtype),
                           ("streamer.source", Path(checkpoint).name)):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        with outfile.writes(out):  # a second model-sized write: the disk may fill here
            onnx.save(proto, str(tmp))

        try:
            sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; an opset newer than it knows
            raise UserError(f"onnxruntime {ort.__version__} cannot load the exported model at opset {opset} "
                            f"({str(e).strip().splitlines()[0][:200]}); not written") from None
        mel_name, face_name, _ = io_layout(sess)
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        got = sess.run(None, {mel_name: mel.astype(np_dtype), face_name: faces.astype(np_dtype)})[0]
        err = float(np.abs(got.astype(np.float32) - expected).max())
        if not err <= TOLERANCE[dtype]:
            raise UserError(f"exported model differs from torch by {err:.2e} (limit {TOLERANCE[dtype]:.0e}); "
                            "not written")
    return err


def _at_opset(proto, opset: int):
    """`proto` at `opset`: torch's exporter writes its own (18 in torch 2.13) whatever it is asked, so an
    older one is converted to, and refused where onnx has no conversion for one of the model's ops."""
    from onnx import version_converter

    have = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if have == opset:
        return proto
    try:
        converted = version_converter.convert_version(proto, opset)
    except Exception as e:  # noqa: BLE001 - the converter asserts in C++ for what it cannot do
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot write opset {opset}: the exporter made opset {have} and onnx cannot convert it "
                        f"({why.split('failed: ')[-1]})") from None
    return converted
