"""The Wav2Lip generator, layer for layer as published, so released checkpoints load as they are.

Module names and order define the state-dict keys; they must not change.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding, residual=False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x):
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding, output_padding=0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv_block(x))


def _res(c):
    return Conv2d(c, c, 3, 1, 1, residual=True)


class Wav2Lip(nn.Module):
    """Inputs: mel windows (B, 1, 80, 16) and faces (B, 6, 96, 96); output (B, 3, 96, 96) in [0, 1]."""

    face_size = 96

    def __init__(self):
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(6, 16, 7, 1, 3)),  # 96
            nn.Sequential(Conv2d(16, 32, 3, 2, 1), _res(32), _res(32)),  # 48
            nn.Sequential(Conv2d(32, 64, 3, 2, 1), _res(64), _res(64), _res(64)),  # 24
            nn.Sequential(Conv2d(64, 128, 3, 2, 1), _res(128), _res(128)),  # 12
            nn.Sequential(Conv2d(128, 256, 3, 2, 1), _res(256), _res(256)),  # 6
            nn.Sequential(Conv2d(256, 512, 3, 2, 1), _res(512)),  # 3
            nn.Sequential(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),  # 1
        ])
        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, 3, 1, 1), _res(32), _res(32),
            Conv2d(32, 64, 3, (3, 1), 1), _res(64), _res(64),
            Conv2d(64, 128, 3, 3, 1), _res(128), _res(128),
            Conv2d(128, 256, 3, (3, 2), 1), _res(256),
            Conv2d(256, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0),
        )  # fmt: skip
        self.face_decoder_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(512, 512, 1, 1, 0)),  # 1
            nn.Sequential(Conv2dTranspose(1024, 512, 3, 1, 0), _res(512)),  # 3
            nn.Sequential(Conv2dTranspose(1024, 512, 3, 2, 1, 1), _res(512), _res(512)),  # 6
            nn.Sequential(Conv2dTranspose(768, 384, 3, 2, 1, 1), _res(384), _res(384)),  # 12
            nn.Sequential(Conv2dTranspose(512, 256, 3, 2, 1, 1), _res(256), _res(256)),  # 24
            nn.Sequential(Conv2dTranspose(320, 128, 3, 2, 1, 1), _res(128), _res(128)),  # 48
            nn.Sequential(Conv2dTranspose(160, 64, 3, 2, 1, 1), _res(64), _res(64)),  # 96
        ])
        self.output_block = nn.Sequential(Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        x = face
        skips = []
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)
        x = self.audio_encoder(mel)
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), skips.pop()), dim=1)
        return self.output_block(x)
