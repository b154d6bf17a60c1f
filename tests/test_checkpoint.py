import pickle

import pytest
import torch

from streamer.errors import UserError
from streamer.lipsync.checkpoint import load_state_dict, reference_state_dict
from tests.conftest import run_cli


def test_released_format_loads_with_prefix_stripped(released_checkpoint):
    state = load_state_dict(released_checkpoint)
    ref = reference_state_dict()
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_legacy_serialization_and_bare_state_dict_load(tmp_path):
    ref = reference_state_dict()
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": ref, "global_step": 1}, legacy, _use_new_zipfile_serialization=False)
    bare = tmp_path / "bare.pth"
    torch.save(ref, bare)
    for path in (legacy, bare):
        assert torch.equal(load_state_dict(path)["output_block.1.weight"], ref["output_block.1.weight"])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_files(tmp_path, released_checkpoint):
    ref = reference_state_dict()
    files = {}
    files["empty"] = tmp_path / "empty.pth"
    files["empty"].write_bytes(b"")
    data = released_checkpoint.read_bytes()
    files["truncated"] = tmp_path / "truncated.pth"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"] = tmp_path / "notes.pth"
    files["text"].write_text("hello, this is not a checkpoint\n")
    files["wrong keys"] = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, files["wrong keys"])
    shape = dict(ref)
    shape["output_block.1.weight"] = torch.zeros(3, 32, 3, 3)
    files["wrong shape"] = tmp_path / "shape.pth"
    torch.save({"state_dict": shape}, files["wrong shape"])
    files["code"] = tmp_path / "code.pth"
    files["code"].write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
    files["code4"] = tmp_path / "code4.pth"
    files["code4"].write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=4))
    files["missing"] = tmp_path / "nope.pth"
    return files


EXPECT = {"empty": "is empty", "truncated": "not a readable PyTorch checkpoint",
          "text": "not a readable PyTorch checkpoint",
          "wrong keys": "missing keys", "wrong shape": "wrong shape", "code": "holds code or objects (print)",
          "missing": "does not exist", "code4": "safe loader refused it"}


def test_bad_checkpoints_give_one_clear_sentence(tmp_path, released_checkpoint):
    for kind, path in _bad_files(tmp_path, released_checkpoint).items():
        with pytest.raises(UserError) as info:
            load_state_dict(path)
        message = str(info.value)
        assert EXPECT[kind] in message, (kind, message)
        assert "\n" not in message


def test_wrong_keys_are_summarised(tmp_path):
    path = tmp_path / "partial.pth"
    state = reference_state_dict()
    state.pop("audio_encoder.0.conv_block.0.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(UserError, match=r"1 missing keys \(audio_encoder.0.conv_block.0.weight\); "
                                        r"1 unexpected keys \(extra.weight\)"):
        load_state_dict(path)


def test_export_of_a_bad_checkpoint_fails_cleanly_and_writes_nothing(tmp_path, released_checkpoint):
    files = _bad_files(tmp_path, released_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for kind in ("empty", "truncated", "wrong keys", "code", "code4"):
        proc = run_cli("export", "--checkpoint", files[kind], "--out", out_dir / "m.onnx")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert EXPECT[kind] in proc.stderr
        assert "pwned" not in proc.stdout
        assert list(out_dir.iterdir()) == []
