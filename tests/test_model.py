import json

import numpy as np
import torch

from streamer.lipsync.checkpoint import reference_model
from streamer.lipsync.model import Wav2Lip
from tests.conftest import DATA


def test_state_dict_matches_the_original_layout():
    ref = json.loads((DATA / "wav2lip_state_dict.json").read_text())
    model = Wav2Lip()
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref["entries"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["params"]


def test_reference_weights_reproduce_the_golden_output(golden):
    with torch.inference_mode():
        out = reference_model()(torch.from_numpy(golden["mel"]), torch.from_numpy(golden["face"])).numpy()
    assert out.shape == (6, 3, 96, 96)
    assert np.abs(out - golden["out"]).max() < 1e-4
