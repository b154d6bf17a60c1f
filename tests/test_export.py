import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch

from streamer.errors import UserError
from streamer.lipsync.engine import Wav2LipInfer, face_input, to_images
from tests.conftest import run_cli


def _ort(path, mel, face, dtype=np.float32):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"mel": mel.astype(dtype), "face": face.astype(dtype)})[0].astype(np.float32)


def test_fp32_export_matches_golden_in_plain_onnxruntime(exported, golden):
    out = _ort(exported["fp32"], golden["mel"], golden["face"])
    assert np.abs(out - golden["out"]).max() < 1e-4
    # dynamic batch axis: one frame at a time gives the same
    one = _ort(exported["fp32"], golden["mel"][3:4], golden["face"][3:4])
    assert np.abs(one - golden["out"][3:4]).max() < 1e-4


def test_fp16_export_matches_golden_in_plain_onnxruntime(exported, golden):
    sess = ort.InferenceSession(str(exported["fp16"]), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[1].type == "tensor(float16)"
    out = _ort(exported["fp16"], golden["mel"], golden["face"], np.float16)
    assert np.abs(out - golden["out"]).max() < 1e-2


def test_export_refuses_to_clobber_without_force(exported, released_checkpoint):
    target = exported["fp32"]
    before = target.read_bytes()
    proc = run_cli("export", "--checkpoint", released_checkpoint, "--out", target, "--dtype", "fp32")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert target.read_bytes() == before


def test_export_writes_the_opset_asked_for_or_says_why_not(released_checkpoint, golden, tmp_path):
    import onnx

    out = tmp_path / "m17.onnx"
    proc = run_cli("export", "--checkpoint", released_checkpoint, "--out", out, "--dtype", "fp32", "--opset", "17")
    assert proc.returncode == 0, proc.stderr
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert np.abs(_ort(out, golden["mel"], golden["face"]) - golden["out"]).max() < 1e-3
    (tmp_path / "dir.onnx").mkdir()
    for args, expect in ((["--out", tmp_path / "x.onnx", "--opset", "3"], "--opset must be 7 to"),
                         (["--out", tmp_path / "dir.onnx", "--force"], "not a regular file")):
        proc = run_cli("export", "--checkpoint", released_checkpoint, *args)
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "m17.onnx"]


def test_infer_runs_every_model_kind_on_cpu(exported, released_checkpoint, golden):
    cases = [(released_checkpoint, "auto", "fp32", 1e-4), (exported["fp32"], "auto", "fp32", 1e-4),
             (exported["fp16"], "auto", "fp32", 1e-2), (exported["fp16"], "fp16", "fp16", 1e-2)]
    for path, dtype, expect_dtype, tol in cases:
        eng = Wav2LipInfer(path, device="auto", dtype=dtype)
        assert (eng.device, eng.dtype, eng.face_size) == ("cpu", expect_dtype, 96)
        out = eng.predict(golden["mel"], golden["face"])
        assert out.dtype == np.float32 and out.shape == (6, 3, 96, 96)
        assert np.abs(out - golden["out"]).max() < tol, (path.name, dtype)


def test_infer_rejects_what_it_cannot_run(tmp_path, exported):
    with pytest.raises(UserError, match="does not exist"):
        Wav2LipInfer(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        Wav2LipInfer(bad)
    with pytest.raises(UserError, match="fp32 model"):
        Wav2LipInfer(exported["fp32"], dtype="fp16")
    other = tmp_path / "model.bin"
    other.write_text("x")
    with pytest.raises(UserError, match="must end in"):
        Wav2LipInfer(other)


def test_infer_is_thread_safe(exported, golden):
    eng = Wav2LipInfer(exported["fp32"])
    results = [None] * 4

    def work(i):
        results[i] = eng.predict(golden["mel"][i : i + 2], golden["face"][i : i + 2])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert np.abs(r - golden["out"][i : i + 2]).max() < 1e-4


def test_face_input_follows_the_original_convention(golden):
    crops = to_images(golden["face"][:, 3:])  # the unmasked reference crop, as uint8 images
    faces = face_input(crops)
    assert faces.shape == (6, 6, 96, 96)
    assert np.abs(faces - golden["face"]).max() < 1 / 255


class TinyVariant(torch.nn.Module):
    """Same signature as Wav2Lip at another face size, like community 192/256/288 models."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 3, 3, padding=1)
        self.audio = torch.nn.Linear(80 * 16, 3)

    def forward(self, mel, face):
        return torch.sigmoid(self.conv(face) + self.audio(mel.flatten(1))[:, :, None, None])


def test_face_size_comes_from_the_model(tmp_path):
    path = tmp_path / "variant192.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(TinyVariant().eval(), (torch.zeros(2, 1, 80, 16), torch.zeros(2, 6, 192, 192)), str(path),
                      input_names=["audio_sequences", "face_sequences"], output_names=["y"],
                      dynamic_shapes={"mel": {0: batch}, "face": {0: batch}}, dynamo=True, verbose=False)
    eng = Wav2LipInfer(path)
    assert eng.face_size == 192
    out = eng.predict(np.zeros((3, 1, 80, 16), np.float32), np.zeros((3, 6, 192, 192), np.float32))
    assert out.shape == (3, 3, 192, 192)
