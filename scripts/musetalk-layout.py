#!/usr/bin/env python3
"""Write a MuseTalk v1.5 model folder in the released layout, with random weights.

    python scripts/musetalk-layout.py DIR [--tiny] [--seed N]

Without --tiny: the released sizes (UNet as musetalkV15/musetalk.json, sd-vae-ft-mse, whisper-tiny:
~3.4 GB, for measuring speed). --tiny: the same layout and model classes at toy widths (a few MB,
for tests). Either way `streamer render|serve --model musetalk:DIR` runs on it: the mouths are
noise, since the weights are. Needs the musetalk extra (diffusers, transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# as published (musetalkV15/musetalk.json; the sd-vae-ft-mse and whisper-tiny configs)
UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0.dev0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 8, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
WHISPER = {
    "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
    "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865,
}
PREPROCESSOR = {
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
    "hop_length": 160, "chunk_length": 30, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
}
# toy widths, same classes and the same 8x VAE and 30 s whisper geometry
TINY_UNET = {**UNET, "block_out_channels": [32, 64], "attention_head_dim": 4, "cross_attention_dim": 32,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}
TINY_VAE = {**VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
TINY_WHISPER = {**WHISPER, "d_model": 32, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_layers": 1,
                "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "vocab_size": 64, "max_target_positions": 16,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}


def build(folder: Path, tiny: bool, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    unet_cfg, vae_cfg, whisper_cfg = (TINY_UNET, TINY_VAE, TINY_WHISPER) if tiny else (UNET, VAE, WHISPER)
    (folder / "musetalkV15").mkdir(parents=True, exist_ok=True)
    (folder / "musetalkV15" / "musetalk.json").write_text(json.dumps(unet_cfg, indent=2))
    unet = UNet2DConditionModel.from_config(unet_cfg)
    if tiny:  # default init leaves the output conv at zero: make the toy's mouths depend on their inputs
        for p in unet.parameters():
            p.data.normal_(0, 0.05)
    torch.save(unet.state_dict(), folder / "musetalkV15" / "unet.pth")
    AutoencoderKL.from_config(vae_cfg).save_pretrained(str(folder / "sd-vae"), safe_serialization=False)
    whisper = WhisperModel(WhisperConfig(**whisper_cfg))
    whisper.config.save_pretrained(str(folder / "whisper"))
    torch.save(whisper.state_dict(), folder / "whisper" / "pytorch_model.bin")  # the released file name
    WhisperFeatureExtractor(**{k: v for k, v in PREPROCESSOR.items() if k != "feature_extractor_type"}) \
        .save_pretrained(str(folder / "whisper"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tiny", action="store_true", help="toy widths (tests), not the released sizes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        build(args.folder, args.tiny, args.seed)
    except ImportError as e:
        print(f"musetalk-layout: needs the musetalk extra (pip install -e '.[musetalk]'): {e}", file=sys.stderr)
        return 1
    print(f"wrote a random-weight MuseTalk layout ({'tiny' if args.tiny else 'released sizes'}) to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
