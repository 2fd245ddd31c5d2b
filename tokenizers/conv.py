"""2D convolutional encoder and decoder in the style of VQGAN (Esser et al., 2021).

The encoder downsamples by ``2 ** (len(channel_mult) - 1)`` (8 or 16 in the presets) and
flattens the (h, w) grid to a raster-ordered sequence, so quantizers, token dropout and the
rest of the pipeline treat 1D and 2D tokenizers the same way. The decoder mirrors it; a token
prefix is padded in raster order with a learned mask token (the same helper as the 1D decoder).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.token_dropout import pad_with_mask_token


def group_norm(channels: int) -> nn.GroupNorm:
    # VQGAN uses 32 groups; gcd keeps small test widths valid
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected) skip connection.

    ``bias=False`` drops the convolutions' biases (Open-MAGVIT2's blocks have none).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all h*w positions (VQGAN's mid block), via SDPA."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def full_grid(tokens: torch.Tensor, lengths: torch.Tensor | None, grid: int) -> torch.Tensor:
    """Tokens (B, grid*grid, D) in raster order -> feature map (B, D, grid, grid).

    For 2D decoders without a mask token (imported architectures): every position must be given,
    so a prefix (fewer tokens, or ``lengths`` below grid*grid) is refused.
    """
    num_tokens = grid * grid
    if tokens.shape[1] != num_tokens or (lengths is not None and bool((lengths < num_tokens).any())):
        raise VistokError(f"this 2D decoder has no mask token for missing positions and decodes only the full {grid}x{grid} grid; pass all {num_tokens} tokens.")
    # contiguous: the convolutions then take the same CPU kernels as on the original's tensors
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid).contiguous()


def _mid_block(channels: int, attention: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [ResnetBlock(channels, channels, dropout)]
    if attention:
        layers.append(AttentionBlock(channels))
    layers.append(ResnetBlock(channels, channels, dropout))
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latents (B, h*w, out_dim) in raster order.

    Args:
        channels: base channel count; level i has ``channels * channel_mult[i]``.
        channel_mult: one entry per resolution level; all but the last level halve the
            resolution, so the downsampling factor is ``2 ** (len(channel_mult) - 1)``.
        num_res_blocks: ResNet blocks per level.
        mid_attention: add a self-attention block at the lowest resolution.
        out_dim: D, the quantizer's input dimension.
    """

    def __init__(self, channels: int, channel_mult: Sequence[int], num_res_blocks: int, mid_attention: bool,
                 out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.downsample = 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        layers: list[nn.Module] = []
        c_in = channels
        for level, mult in enumerate(channel_mult):
            c_out = channels * mult
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
            if level != len(channel_mult) - 1:
                layers.append(Downsample(c_in))
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(c_in, mid_attention, dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_dim, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.down(self.conv_in(images)))
        x = self.conv_out(F.silu(self.norm_out(x)))
        return x.flatten(2).transpose(1, 2)


class ConvDecoder(nn.Module):
    """Tokens (B, k, in_dim), 1 <= k <= h*w, raster order -> image (B, 3, H, W) (unclamped).

    Positions k..h*w-1 (and >= ``lengths[b]``) are replaced by a learned mask token, then the
    grid is decoded by the mirror image of :class:`ConvEncoder` (``num_res_blocks + 1`` blocks
    per level, nearest-neighbour upsampling).
    """

    def __init__(self, image_size: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 mid_attention: bool, in_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.downsample = 2 ** (len(channel_mult) - 1)
        self.grid = image_size // self.downsample
        self.num_tokens = self.grid * self.grid
        self.mask_token = nn.Parameter(torch.zeros(in_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        c_in = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(in_dim, c_in, 3, padding=1)
        self.mid = _mid_block(c_in, mid_attention, dropout)
        layers: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            c_out = channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
            if level != 0:
                layers.append(Upsample(c_in))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The output convolution's weight (the adaptive GAN weight balances gradients at it)."""
        return self.conv_out.weight

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, k, in_dim); lengths: optional (B,) long tokens kept per sample."""
        x = pad_with_mask_token(tokens, self.mask_token, self.num_tokens, lengths)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        x = self.up(self.mid(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(x)))
