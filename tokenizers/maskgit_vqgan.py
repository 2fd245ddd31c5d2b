"""The MaskGIT-VQGAN pixel decoder (Chang et al., 2022), as TiTok's two-stage models use it.

TiTok's released two-stage checkpoints (titok_l32 / b64 / s128) decode through the decoder of
MaskGIT's VQGAN: their 1D decoder predicts, for every cell of a 16x16 grid, logits over that
VQGAN's 1024 codes; the softmax-weighted mix of its codewords (soft proxy codes) goes through
this decoder. It is a VQGAN decoder without attention: ``conv_in`` -> ``num_res_blocks``
residual blocks -> for each resolution level from the coarsest: residual blocks, then (except at
the finest level) nearest x2 upsampling and a 3x3 conv -> GroupNorm -> SiLU -> 3x3 conv to RGB.

Two details differ from vistok's :mod:`~vistok.tokenizers.conv` blocks and are kept because the
released weights depend on them: the residual convs have no bias, and where a block changes the
channel count its 1x1 shortcut is applied to the block's own output ``h`` (``h + W h``), not to
its input. Output pixels are on the [0, 1] scale (TiTok's convention).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock(nn.Module):
    """GroupNorm(32) -> SiLU -> conv3x3 (no bias), twice; shortcut ``h + nin_shortcut(h)`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class UpLevel(nn.Module):
    """One resolution level: residual blocks, then (``upsample``) nearest x2 and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_res_blocks)])
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class MaskGITDecoder(nn.Module):
    """Tokens (B, g*g, dim) in raster order -> image (B, 3, g*f, g*f) on the [0, 1] scale (unclamped),
    f = 2 ** (len(channel_mult) - 1).

    Args:
        dim: z_channels, the codeword width.
        channels: hidden_channels; level i has ``channels * channel_mult[i]`` channels (GroupNorm(32)
            needs multiples of 32).
        channel_mult: per-level multipliers, finest level first.
        num_res_blocks: residual blocks in the middle and per level.
    """

    unit_range_output = True  # TiTok's pixel convention; callers map to vistok's [-1, 1]

    def __init__(self, dim: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int) -> None:
        super().__init__()
        levels = len(channel_mult)
        top = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(dim, top, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(top, top) for _ in range(num_res_blocks)])
        # Stored finest level first (the released key order), run from the coarsest.
        self.up = nn.ModuleList([
            UpLevel(channels * channel_mult[i + 1] if i < levels - 1 else top, channels * channel_mult[i], num_res_blocks, upsample=i != 0)
            for i in range(levels)
        ])
        self.norm_out = nn.GroupNorm(32, channels * channel_mult[0], eps=1e-6)
        self.conv_out = nn.Conv2d(channels * channel_mult[0], 3, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, g*g, dim); ``lengths`` must be None (a grid decodes whole)."""
        b, n, d = tokens.shape
        grid = int(round(n ** 0.5))
        # (B, g*g, D) -> (B, D, g, g) as a view: the channels_last layout TiTok's einsum produces,
        # so the convs pick the same CPU kernels as the original.
        x = self.conv_in(tokens.transpose(1, 2).reshape(b, d, grid, grid))
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))
