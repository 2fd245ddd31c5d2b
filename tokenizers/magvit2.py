"""Open-MAGVIT2's tokenizer (Luo et al., 2024, "Open-MAGVIT2: An Open-Source Project Toward
Democratizing Auto-regressive Visual Generation"; MAGVIT-v2, Yu et al., 2023), as a named vistok
architecture ``"open_magvit2"``.

A convolutional encoder and decoder without attention, built from vistok's ResNet blocks (here
without convolution biases), and lookup-free quantization of the encoder's output:

- encoder: ``conv_in`` -> per level ``num_res_blocks`` ResNet blocks and (all but the last level)
  a 3x3 stride-2 convolution -> ``num_res_blocks`` middle blocks -> GroupNorm, SiLU, 1x1
  convolution to D = log2(codebook size) channels (18 for the released 2^18 codebook). There is no
  ``quant_conv``: the D channels are the LFQ bits.
- decoder: ``conv_in`` -> middle blocks -> per level from the lowest resolution up: an adaptive
  group norm conditioned on the decoder's input code map, ResNet blocks, then (all but the highest
  resolution) a 3x3 convolution to 4x the channels and depth-to-space x2 -> GroupNorm, SiLU, conv.
- adaptive group norm: ``GroupNorm(x) * gamma(std(z)) + beta(mean(z))`` with per-channel spatial
  statistics of the code map z (the standard deviation from the unbiased variance) and linear maps
  gamma, beta (MAGVIT-v2's decoder conditions every level on the quantized input this way).

The quantizer is vistok's :class:`~vistok.tokenizers.quantizers.LFQ`: q_d = sign(z_d) (0 -> -1) and
token id = sum_d [z_d > 0] 2^d, channel 0 the least significant bit, as Open-MAGVIT2 computes it.
Depth-to-space here is ``torch.nn.functional.pixel_shuffle`` (input channel c*4 + 2i + j goes to
pixel (2h+i, 2w+j)); Open-MAGVIT2's own depth_to_space reads channel (2i + j)*C + c, so its
upsampling convolutions' output channels are permuted on import. Pixels are in [-1, 1] at both
ends. The decoder has no mask token, so it decodes only the full grid (no tail-token prefixes).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vistok.tokenizers.conv import Downsample, ResnetBlock, full_grid, group_norm

# The released Open-MAGVIT2 "L" tokenizers (configs/Open-MAGVIT2/gpu/imagenet_lfqgan_{128,256}_L.yaml);
# "tiny" trains on a CPU at 16-32 px.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1},
    "L": {"channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4},
}
OVERRIDES = ("channels", "channel_mult", "num_res_blocks")


def res_blocks(in_channels: int, out_channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, bias=False)
                           for i in range(count)))


class AdaptiveGroupNorm(nn.Module):
    """x (B, C, H, W), code map z (B, D, h, w) -> GroupNorm(x) * gamma(std_hw(z)) + beta(mean_hw(z))."""

    def __init__(self, z_channels: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2)
        scale = self.gamma((flat.var(dim=-1) + 1e-6).sqrt())
        bias = self.beta(flat.mean(dim=-1))
        return self.norm(x) * scale[:, :, None, None] + bias[:, :, None, None]


class DepthToSpaceUpsample(nn.Module):
    """(B, C, H, W) -> 3x3 conv to 4C -> pixel_shuffle -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class Level(nn.Module):
    """One resolution level: ResNet blocks, then a down- or upsampler (or nothing)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: nn.Module | None) -> None:
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, num_blocks)
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(self.block(x))


class MagvitEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, h*w, out_dim), raster order, h = H / 2^(L-1).

    Args:
        channels: base width; level i has ``channels * channel_mult[i]``.
        channel_mult: one entry per level, highest resolution first.
        num_res_blocks: ResNet blocks per level and in the middle.
        out_dim: D, the LFQ bits.
    """

    def __init__(self, channels: int, channel_mult: Sequence[int], num_res_blocks: int, out_dim: int) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.down = nn.Sequential(*(
            Level(([channels] + widths)[i], width, num_res_blocks, Downsample(width) if i < len(widths) - 1 else None)
            for i, width in enumerate(widths)))
        self.mid_block = res_blocks(widths[-1], widths[-1], num_res_blocks)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.down(self.conv_in(images)))
        return self.conv_out(F.silu(self.norm_out(x))).flatten(2).transpose(1, 2)


class MagvitDecoder(nn.Module):
    """Tokens (B, h*w, in_dim), the full raster-ordered grid -> image (B, 3, H, W), unclamped [-1, 1].

    ``up[i]`` and ``adaptive[i]`` are indexed by level (0 = highest resolution) and run from the
    lowest resolution up.
    """

    decodes_prefixes = False

    def __init__(self, image_size: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 in_dim: int) -> None:
        super().__init__()
        self.grid = image_size // 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult]
        inputs = [*widths[1:], widths[-1]]  # level i receives level i+1's output
        self.conv_in = nn.Conv2d(in_dim, widths[-1], 3, padding=1)
        self.mid_block = res_blocks(widths[-1], widths[-1], num_res_blocks)
        self.up = nn.ModuleList(Level(inputs[i], widths[i], num_res_blocks, DepthToSpaceUpsample(widths[i]) if i > 0 else None)
                                for i in range(len(widths)))
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(in_dim, inputs[i]) for i in range(len(widths)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The output convolution's weight (the adaptive GAN weight balances gradients at it)."""
        return self.conv_out.weight

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        z = full_grid(tokens, lengths, self.grid)
        x = self.mid_block(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            x = self.up[i](self.adaptive[i](x, z))
        return self.conv_out(F.silu(self.norm_out(x)))


def build(image_size: int, dim: int, settings: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder for ``settings`` (a preset plus overrides); D = ``dim`` is the LFQ bits."""
    args = (settings["channels"], settings["channel_mult"], settings["num_res_blocks"])
    return MagvitEncoder(*args, out_dim=dim), MagvitDecoder(image_size, *args, in_dim=dim)
