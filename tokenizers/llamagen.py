"""LlamaGen's VQ tokenizer (Sun et al., 2024, "Autoregressive Model Beats Diffusion: Llama for
Scalable Image Generation"), as a named vistok architecture ``"llamagen"``.

A VQGAN-style convolutional encoder and decoder (Esser et al., 2021) built from vistok's blocks
(:mod:`vistok.tokenizers.conv`), with three differences from vistok's own ``conv`` layout:

- self-attention after every ResNet block of the lowest-resolution level (encoder: its last
  level; decoder: its first), besides the attention in the middle block;
- downsampling pads the right and bottom edges by one pixel and convolves with stride 2 and no
  padding (taming-transformers' asymmetric scheme);
- 1x1 convolutions between the encoder's ``z_channels`` and the codebook dimension (``quant_conv``)
  and back (``post_quant_conv``), so the codebook can be small: VQ-16 looks up 8-dimensional,
  l2-normalised codes (16384 of them) although its encoder ends in 256 channels.

The quantizer is vistok's :class:`~vistok.tokenizers.quantizers.VectorQuantizer` with
``use_cosine=True``: latents and codes are l2-normalised before the nearest-code search, which
is LlamaGen's ``codebook_l2_norm``. Pixels are in [-1, 1] at the encoder's input and the decoder's
output, as in vistok. The token grid is read in raster order; the decoder has no mask token, so it
decodes only the full grid (no tail-token prefixes).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vistok.tokenizers.conv import AttentionBlock, ResnetBlock, Upsample, full_grid, group_norm
from vistok.tokenizers.errors import VistokError

# VQ-16 and VQ-8 as released (tokenizer_image/vq_model.py: ch 128, num_res_blocks 2, z_channels 256);
# "tiny" trains on a CPU at 16-32 px.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16},
    "vq16": {"channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
    "vq8": {"channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
}
OVERRIDES = ("channels", "channel_mult", "num_res_blocks", "z_channels", "dropout")


class PaddedDownsample(nn.Module):
    """Halve the resolution: pad right/bottom by one, then a 3x3 stride-2 convolution without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
                 resample: nn.Module | None, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttentionBlock(out_channels) for _ in range(num_blocks if attention else 0))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return self.resample(x)


def mid_block(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels, dropout), AttentionBlock(channels),
                         ResnetBlock(channels, channels, dropout))


class LlamaGenEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, h*w, out_dim), raster order, h = H / 2^(L-1).

    Args:
        channels: base width; level i has ``channels * channel_mult[i]``.
        channel_mult: one entry per level, highest resolution first (L levels).
        num_res_blocks: ResNet blocks per level.
        z_channels: width of the encoder's output convolution, before ``quant_conv``.
        out_dim: D, the codebook dimension (``quant_conv``'s output).
    """

    def __init__(self, channels: int, channel_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        last = len(widths) - 1
        self.conv_blocks = nn.Sequential(*(
            Level(([channels] + widths)[i], width, num_res_blocks, attention=i == last,
                  resample=PaddedDownsample(width) if i < last else None, dropout=dropout)
            for i, width in enumerate(widths)))
        self.mid = mid_block(widths[-1], dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(z_channels, out_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_blocks(self.conv_in(images)))
        x = self.conv_out(F.silu(self.norm_out(x)))
        return self.quant_conv(x).flatten(2).transpose(1, 2)


class LlamaGenDecoder(nn.Module):
    """Tokens (B, h*w, in_dim), the full raster-ordered grid -> image (B, 3, H, W), unclamped [-1, 1].

    ``conv_blocks[0]`` is the lowest resolution (with attention); each level but the last ends
    with nearest-neighbour x2 upsampling and a 3x3 convolution.
    """

    decodes_prefixes = False

    def __init__(self, image_size: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, in_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.grid = image_size // 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in reversed(channel_mult)]
        self.post_quant_conv = nn.Conv2d(in_dim, z_channels, 1)
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = mid_block(widths[0], dropout)
        last = len(widths) - 1
        self.conv_blocks = nn.Sequential(*(
            Level(widths[max(k - 1, 0)], width, num_res_blocks + 1, attention=k == 0,
                  resample=Upsample(width) if k < last else None, dropout=dropout)
            for k, width in enumerate(widths)))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The output convolution's weight (the adaptive GAN weight balances gradients at it)."""
        return self.conv_out.weight

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.mid(self.conv_in(self.post_quant_conv(full_grid(tokens, lengths, self.grid))))
        return self.conv_out(F.silu(self.norm_out(self.conv_blocks(x))))


def build(image_size: int, dim: int, settings: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder for ``settings`` (a preset plus overrides); D = ``dim`` is the codebook dimension."""
    if isinstance(settings["z_channels"], bool) or not isinstance(settings["z_channels"], int) or settings["z_channels"] < 1:
        raise VistokError(f"z_channels must be a positive integer, got {settings['z_channels']!r}; fix the z_channels setting.")
    args = (settings["channels"], settings["channel_mult"], settings["num_res_blocks"], settings["z_channels"])
    dropout = float(settings.get("dropout", 0.0))
    encoder = LlamaGenEncoder(*args, out_dim=dim, dropout=dropout)
    decoder = LlamaGenDecoder(image_size, *args, in_dim=dim, dropout=dropout)
    return encoder, decoder
