"""Finite scalar quantization (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the d = len(levels) channels is bounded to a range that holds L_i integers, rounded
(straight-through gradient) and rescaled to about [-1, 1]. The codebook is the implicit grid of
prod(levels) points; a code's index is the mixed-radix number whose digits are the per-channel
levels. There is no codebook to learn and no auxiliary loss. When the latent width ``dim``
differs from d, linear projections map into and out of the grid.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, code_stats, no_neighbourhood_size, uniform_like


class FSQ(Quantizer):
    """Finite scalar quantizer over the grid ``levels`` (e.g. [8, 8, 8, 5, 5, 5] = 64000 codes).

    Args:
        dim: latent width D of the ``(B, N, D)`` input; defaults to ``len(levels)``.
        levels: number of values per grid channel, each >= 2.
        eps: shrinks the bound slightly so tanh's open interval still reaches the outer levels.
    """

    def __init__(self, dim: int | None = None, levels: Sequence[int] = (8, 5, 5, 5), eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise VistokError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels}; use e.g. [8, 5, 5, 5].")
        self.levels = levels
        self.grid_dim = len(levels)
        self.dim = int(dim) if dim is not None else self.grid_dim
        if self.dim < 1:
            raise VistokError(f"FSQ dim must be a positive integer, got {dim}; leave it unset to use len(levels).")
        self.eps = float(eps)
        self.codebook_size = math.prod(levels)

        level_tensor = torch.tensor(levels)
        # Mixed-radix place values: index = sum_i digit_i * prod_{j<i} L_j.
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0)
        self.register_buffer("_levels", level_tensor, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", level_tensor // 2, persistent=False)
        # float32 constants of the bound and the index map, computed once instead of every forward
        for name, value in zip(_CONSTANT_NAMES, _grid_constants(level_tensor, self.eps)):
            self.register_buffer(name, value, persistent=False)

        needs_projection = self.dim != self.grid_dim
        self.project_in = nn.Linear(self.dim, self.grid_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.grid_dim, self.dim) if needs_projection else nn.Identity()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d) in (-L_i/2, L_i/2) so that rounding yields exactly L_i integers.

        For odd L the range is symmetric, {-(L-1)/2, ..., (L-1)/2}. For even L it is shifted by a
        half step, {-L/2, ..., L/2 - 1}; the shift inside tanh keeps z = 0 mapped to 0.
        """
        shift, scale, offset, *_ = self._constants()
        return torch.tanh(z + shift) * scale - offset

    def _constants(self) -> tuple[torch.Tensor, ...]:
        """The float32 constants of ``_grid_constants``; recomputed from the integer levels when a
        module-wide cast (e.g. bf16-true training) has rounded the stored ones."""
        stored = tuple(getattr(self, name) for name in _CONSTANT_NAMES)
        if stored[0].dtype == torch.float32:
            return stored
        return _grid_constants(self._levels, self.eps)

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """latents (B, N, D) float32 -> codes on the grid, scaled to [-1, 1] per channel."""
        shift, scale, offset, half_width, basis, zero_index = self._constants()
        codes, rounded = _BoundRound.apply(self.project_in(latents), shift, scale, offset, half_width)
        if self.codebook_size <= FLOAT_EXACT_INDICES:
            # one matrix-vector product instead of four elementwise ops; float32 is exact here
            flat = torch.addmv(zero_index, rounded.reshape(-1, self.grid_dim), basis)
            indices = flat.long().reshape(rounded.shape[:-1])
        else:
            indices = ((rounded.long() + self._half_width) * self._basis).sum(dim=-1)
        return QuantizerOutput(
            quantized=self.project_out(codes),
            indices=indices,
            loss=latents.new_zeros(()),
            stats=code_stats(indices, self.codebook_size),
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, N) long in [0, prod(levels)) -> (B, N, D) float, the exact inverse of the index map."""
        digits = torch.div(indices.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels
        codes = (digits - self._half_width).float() / self._half_width.float()
        return self.project_out(codes)

    def neighbourhood_size(self, k: int | None) -> None:
        no_neighbourhood_size("FSQ", k, "the grid points one level step away on one channel")

    @torch.no_grad()
    def neighbours(self, indices: torch.Tensor, k: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """A grid neighbour of each code: one channel moved one level up or down, staying on the grid,
        chosen uniformly among the (2d or fewer at the edges) neighbours. Same shape as ``indices``."""
        self.neighbourhood_size(k)
        digits = torch.div(indices.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels  # (..., d)
        # move j < d raises channel j, move d + j lowers it; a move off the grid is not a neighbour
        valid = torch.cat([digits + 1 < self._levels, digits > 0], dim=-1)
        draw = uniform_like(valid.shape, generator, indices.device).masked_fill(~valid, -1.0)
        move = draw.argmax(dim=-1)  # the largest of iid uniforms over the valid moves: uniform among them
        channel = move % self.grid_dim
        step = torch.where(move < self.grid_dim, 1, -1)
        return indices + step * self._basis[channel]

    def get_config(self) -> dict:
        return {"_target_": "vistok.tokenizers.quantizers.FSQ", "dim": self.dim, "levels": list(self.levels), "eps": self.eps}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, levels={self.levels}, codebook_size={self.codebook_size}"


# Indices below 2^24 are exact in float32.
FLOAT_EXACT_INDICES = 2**24
_CONSTANT_NAMES = ("_shift", "_scale", "_offset", "_half_width_float", "_basis_float", "_zero_index")


def _grid_constants(levels: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Per-channel float32 constants of FSQ for (d,) long ``levels``.

    Returns (shift, scale, offset, half_width, basis, zero_index): bound(z) = tanh(z + shift) *
    scale - offset; a rounded point r has index sum_i r_i * basis_i + zero_index (the index of
    the all-zero code). For even L the range is shifted by a half step (offset 0.5); for L = 2,
    offset / scale > 1 and no shift is needed (z = 0 is already the boundary).
    """
    scale = (levels.float() - 1) * (1 - eps) / 2
    offset = torch.where(levels % 2 == 1, 0.0, 0.5).float()
    ratio = offset / scale
    shift = torch.where(ratio < 1, torch.atanh(ratio.clamp(max=0.999)), 0.0)
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)
    zero_index = ((levels // 2) * basis).sum()
    return shift, scale, offset, (levels // 2).float(), basis.float(), zero_index.float()


class _BoundRound(torch.autograd.Function):
    """bound -> round -> rescale with a straight-through gradient, in few kernels.

    Forward: ``t = tanh(z + shift)``, ``rounded = round(t * scale - offset)``, ``codes =
    rounded / half_width``; returns (codes, rounded). Backward treats the rounding as the
    identity: d codes / dz = scale / half_width * (1 - t^2), from the saved ``t`` alone. FSQ does
    little arithmetic per element, so its time is the number of operations: written out with
    ``z + (round(z) - z).detach()``, forward and backward take about twice as many.
    """

    @staticmethod
    def forward(ctx, z, shift, scale, offset, half_width):
        t = torch.tanh(z + shift)
        rounded = torch.addcmul(-offset, t, scale).round_()
        ctx.save_for_backward(t, scale / half_width)
        ctx.mark_non_differentiable(rounded)
        return rounded / half_width, rounded

    @staticmethod
    def backward(ctx, grad_codes, _grad_rounded):
        t, slope = ctx.saved_tensors
        # (1 - t^2) * slope * grad, with 1 - t^2 as one fused multiply-add
        return torch.addcmul(torch.ones_like(t), t, t, value=-1).mul_(slope).mul_(grad_codes), None, None, None, None
