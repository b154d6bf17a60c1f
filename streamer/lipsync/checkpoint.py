"""Loading released Wav2Lip checkpoints safely, and the deterministic weights of the reference data."""

from __future__ import annotations

import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from streamer.errors import UserError, need_file
from streamer.lipsync.model import Wav2Lip


def _summarise(keys, limit=3):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Wav2Lip checkpoint as released (a dict with `state_dict`, keys maybe prefixed `module.`,
    zip or legacy serialization) or a bare state dict. Never unpickles code: weights_only=True.

    Raises UserError with one sentence saying what is wrong.
    """
    path = need_file(path, "checkpoint")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from torch's reader are not the user's business
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file fails anywhere inside torch's reader
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UserError(f"{path} is not a plain PyTorch weights file: it holds code or objects "
                            f"({found.group(1)}), which are never loaded") from None
        if "Weights only load failed" in str(e):
            raise UserError(f"{path} is not a plain PyTorch weights file; the safe loader refused it") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or another format: "
                        f"{type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (expected a dict of tensors or {{'state_dict': ...}})")
    state = {k.removeprefix("module."): v for k, v in obj.items()}

    expected = Wav2Lip().state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
        raise UserError(f"{path} is not a Wav2Lip checkpoint: " + "; ".join(parts))
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path} is not a Wav2Lip checkpoint: {len(wrong)} tensors have the wrong shape "
                        f"(e.g. {k}: {tuple(state[k].shape)}, expected {tuple(expected[k].shape)})")
    return state


def load_model(path: str | Path) -> Wav2Lip:
    """A Wav2Lip model in eval mode, fp32 on the CPU, with the checkpoint's weights."""
    model = Wav2Lip()
    model.load_state_dict(load_state_dict(path))
    return model.eval()


def reference_state_dict() -> dict[str, torch.Tensor]:
    """Deterministic weights by the rule of the reference data (shared/reference/README.md).

    They make the model compute known outputs without the real checkpoints: used by tests and by
    `streamer bench` when no weights are given.
    """
    out = {}
    for key, value in Wav2Lip().state_dict().items():
        shape = tuple(value.shape)
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            arr = np.zeros(shape, dtype=np.int64)
        elif key.endswith("running_var"):
            arr = 0.5 + rng.random(shape)
        elif key.endswith("running_mean"):
            arr = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1 and key.endswith(".weight"):
            arr = 1 + 0.1 * rng.standard_normal(shape)
        elif key.endswith(".bias"):
            arr = 0.05 * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) * np.sqrt(1 / np.prod(shape[1:]))
        if arr.dtype != np.int64:
            arr = arr.astype(np.float32)
        out[key] = torch.from_numpy(arr.copy())  # copy keeps 0-d shapes (ascontiguousarray would not)
    return out


def reference_model() -> Wav2Lip:
    model = Wav2Lip()
    model.load_state_dict(reference_state_dict())
    return model.eval()
